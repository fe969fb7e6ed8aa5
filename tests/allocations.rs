//! The forwarding path makes no heap allocation per message per subscriber:
//! a counting global allocator watches the sans-IO core routing through the
//! real ROUTER transport to 100 live DEALER peers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use zbroker::broker::Broker;
use zbroker::config::BrokerConfig;
use zbroker::frame::Frame;
use zbroker::server::RouterTransport;

struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialised with no destructor, so reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: forwards every call unchanged to the system allocator; the only
// addition is a relaxed counter increment.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Heap allocations made on this thread by `f`.
fn count_allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

const PEERS: usize = 100;
const MESSAGES: usize = 2_000;

#[test]
fn fan_out_allocates_nothing_per_message_per_subscriber() {
    let ctx = zmq::Context::new();
    let mut router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_router_mandatory(true).unwrap();
    router.set_sndhwm(0).unwrap(); // never EAGAIN: this measures the direct path
    router.bind("inproc://allocations").unwrap();
    let peers: Vec<zmq::Socket> = (0..PEERS)
        .map(|i| {
            let peer = ctx.socket(zmq::DEALER).unwrap();
            peer.set_identity(format!("peer-{i}").as_bytes()).unwrap();
            peer.set_rcvhwm(0).unwrap();
            peer.connect("inproc://allocations").unwrap();
            peer.send("PING", 0).unwrap();
            peer
        })
        .collect();
    // Reading each PING from the ROUTER proves its peer is attached.
    let now = Instant::now();
    let mut broker: Broker<Frame> = Broker::new(BrokerConfig::default(), now);
    for _ in 0..PEERS {
        let frames = router.recv_multipart(0).unwrap();
        let sub: [&[u8]; 3] = [b"SUB", b"prefix", b"node."];
        broker.on_command(
            &frames[0],
            None,
            &sub,
            3,
            now,
            &mut RouterTransport::new(&mut router),
        );
    }
    let payload = vec![0xabu8; 512]; // above libzmq's 33-byte inline limit: shared, not copied

    let mut publish = |n: usize| {
        for i in 0..n {
            let mut frames = [
                Frame::from_slice(b"node.compute-1.port"),
                Frame::from_slice(&payload),
            ];
            let routed = broker
                .on_publish(
                    None,
                    &mut frames,
                    2,
                    now,
                    &mut RouterTransport::new(&mut router),
                )
                .unwrap();
            assert_eq!(routed, PEERS, "message {i}");
        }
    };
    publish(100); // warm up: scratch buffers reach their steady size
    let allocations = count_allocations(|| publish(MESSAGES));
    println!(
        "{allocations} heap allocations for {MESSAGES} messages x {PEERS} subscribers ({} deliveries)",
        MESSAGES * PEERS
    );
    assert_eq!(allocations, 0);

    // Every delivery really went out, with consecutive seqs.
    for peer in &peers {
        assert_eq!(peer.recv_multipart(0).unwrap()[0], b"OK");
        for seq in 1..=(100 + MESSAGES) as u64 {
            let frames = peer.recv_multipart(0).unwrap();
            assert_eq!(zbroker::protocol::parse_header(&frames[0]).unwrap().0, seq);
            assert_eq!(frames[1], payload);
        }
    }
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the test above against a counter that never counts.
    let n = count_allocations(|| drop(std::hint::black_box(vec![1u8; 64])));
    assert_eq!(n, 1);
}
