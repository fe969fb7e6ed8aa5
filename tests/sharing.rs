//! Fan-out shares the payload instead of copying it per subscriber.
//!
//! 100 subscribers hold `prefix ""` and never read, so libzmq's pipes to them
//! fill (HWM 1) and the broker queues the rest. 100 messages of 256 KiB are
//! published: with a copy per subscriber the queued deliveries would pin
//! about 2.5 GiB; with shared frames (`zmq_msg_copy`) about 25 MiB. The test
//! waits until all 10,000 deliveries are routed and sit in the broker's
//! queues (or went to libzmq), checks from the broker's own counters that
//! they really are queued, and asserts that this process's resident memory
//! grew by far less than one copy per subscriber would take.
//!
//! The clients live in this process too, so the growth also counts what
//! libzmq holds for them (at most a couple of 256 KiB messages per
//! subscriber, in its receive pipe and decoder) and the publisher's sends.

mod common;

use std::time::Duration;

use common::procfs::Proc;
use common::{TestBroker, Transport, mib};
use zbroker::config::Config;

const SUBSCRIBERS: usize = 100;
const MESSAGES: usize = 100;
const PAYLOAD_LEN: usize = 256 << 10;
const DELIVERIES: u64 = (SUBSCRIBERS * MESSAGES) as u64;
/// Well under the 2.5 GiB of per-subscriber copies, well over the ~25 MiB of
/// shared payloads plus what the clients in this process hold.
const MAX_GROWTH: u64 = 200 << 20;

#[test]
fn fan_out_shares_payloads_instead_of_copying_them() {
    let mut config = Config {
        // libzmq takes one message per subscriber; the broker queues the rest.
        sub_hwm: 1,
        // Nobody pings during the test; nobody must expire.
        sub_timeout: Duration::from_secs(600),
        linger: Duration::from_millis(100),
        ..Config::default()
    };
    // Queue limits charge each delivery its full size, shared or not, so
    // they must admit all 10,000 x 256 KiB for nothing to be dropped.
    config.queue.max_messages = 10 * MESSAGES;
    config.queue.max_bytes = 4 * MESSAGES * PAYLOAD_LEN;
    config.queue.max_total_bytes = 4 * SUBSCRIBERS * MESSAGES * PAYLOAD_LEN;
    let broker = TestBroker::start(Transport::Ipc, config);

    let ctx = zmq::Context::new();
    let subscribers: Vec<zmq::Socket> = (0..SUBSCRIBERS)
        .map(|_| {
            let socket = ctx.socket(zmq::DEALER).unwrap();
            socket.set_rcvhwm(1).unwrap();
            socket.set_linger(0).unwrap();
            socket.set_rcvtimeo(common::RECV_TIMEOUT_MS).unwrap();
            socket.connect(&broker.sub_endpoint).unwrap();
            socket
                .send_multipart([&b"SUB"[..], b"prefix", b""], 0)
                .unwrap();
            socket
        })
        .collect();
    for socket in &subscribers {
        let reply = socket.recv_multipart(0).expect("OK within the timeout");
        assert_eq!(reply, [&b"OK"[..], b"SUB", b"prefix", b""]);
    }
    let publisher = common::publisher(&ctx, &broker.pub_endpoint);
    let mut payload = vec![0x5a; PAYLOAD_LEN];

    let baseline = Proc::this().rss();
    for i in 0..MESSAGES {
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        common::publish(&publisher, b"neutron.port.shared", &payload);
    }
    let snapshot = broker.wait_for(
        Duration::from_secs(60),
        "every delivery routed and queued or handed to libzmq",
        |s| {
            s.counters.routed == DELIVERIES
                && s.counters.delivered + s.queued_messages == DELIVERIES
        },
    );
    let rss = Proc::this().rss();
    let growth = rss.saturating_sub(baseline);
    let counters = &snapshot.counters;

    let copied = DELIVERIES * PAYLOAD_LEN as u64;
    let shared = (MESSAGES * PAYLOAD_LEN) as u64;
    println!(
        "{MESSAGES} messages x {SUBSCRIBERS} subscribers x {} KiB: {} routed, {} handed to libzmq, \
         {} queued in the broker ({:.0} MiB as the queue limits count them)",
        PAYLOAD_LEN >> 10,
        counters.routed,
        counters.delivered,
        snapshot.queued_messages,
        mib(snapshot.queued_bytes),
    );
    println!(
        "VmRSS {:.1} MiB -> {:.1} MiB: grew {:.1} MiB; copied per subscriber would be {:.0} MiB, \
         shared {:.1} MiB; limit {:.0} MiB",
        mib(baseline),
        mib(rss),
        mib(growth),
        mib(copied),
        mib(shared),
        mib(MAX_GROWTH),
    );

    // Not vacuous: nothing was dropped, and the broker itself holds most
    // deliveries (libzmq can only have taken a few per subscriber).
    assert_eq!(counters.published, MESSAGES as u64, "{snapshot:#?}");
    assert_eq!(counters.dropped_queue_full, 0, "{snapshot:#?}");
    assert_eq!(counters.dropped_subscriber_gone, 0, "{snapshot:#?}");
    assert!(
        snapshot.queued_messages >= DELIVERIES / 2,
        "the broker should hold most deliveries: {snapshot:#?}"
    );
    assert!(
        snapshot.queued_bytes >= snapshot.queued_messages * PAYLOAD_LEN as u64,
        "{snapshot:#?}"
    );
    assert!(
        growth < MAX_GROWTH,
        "resident memory grew {:.1} MiB with {} deliveries of {} KiB queued: payloads are copied",
        mib(growth),
        snapshot.queued_messages,
        PAYLOAD_LEN >> 10
    );

    // Subscribers go first: a DEALER whose connection dies while its receive
    // queue is full can abort the process (libzmq#3937).
    drop(subscribers);
    drop(publisher);
    broker.stop();
}
