//! One slow consumer cannot hurt the others: 20 subscribers, one of which
//! stops reading during a 200,000-message burst. The other 19 get every
//! message in order without gaps; the broker's memory stays within its
//! configured queue bound plus a fixed overhead; the slow one sees a gap when
//! it resumes, exactly as large as the broker's drop counter.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::metrics::{DROPPED_QUEUE_FULL, ROUTED};
use common::{ChildBroker, RawSubscriber};

const BURST: u64 = 200_000;
const FAST: usize = 19;
const ROUND: u64 = 2_000;
const PAYLOAD: usize = 512;
const QUEUE_TOTAL_BYTES: u64 = 16 << 20;
/// libzmq pipes (hwm × peers), allocator slack and the binary's own growth.
const FIXED_OVERHEAD: u64 = 32 << 20;

#[test]
fn one_slow_subscriber_does_not_hurt_the_other_nineteen() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_endpoint, sub_endpoint) = common::endpoints(common::Transport::Ipc, &dir);
    let total = QUEUE_TOTAL_BYTES.to_string();
    let broker = ChildBroker::start(&[
        "--pub-bind",
        &pub_endpoint,
        "--sub-bind",
        &sub_endpoint,
        "--metrics-bind",
        "127.0.0.1:0",
        "--sub-hwm",
        "500",
        "--queue-max-messages",
        "5000",
        "--queue-max-bytes",
        "4194304",
        "--queue-max-total-bytes",
        &total,
        "--sub-timeout",
        "600s",
    ]);
    let ctx = zmq::Context::new();
    let slow = RawSubscriber::connect(&ctx, &sub_endpoint);
    slow.socket.set_rcvhwm(500).unwrap();
    slow.subscribe("prefix", b"");

    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..FAST).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = (0..FAST)
        .map(|n| {
            let sub = RawSubscriber::connect(&ctx, &sub_endpoint);
            sub.subscribe("prefix", b"");
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || {
                for seq in 1..=BURST + 1 {
                    let (got_seq, _topic, payload) = sub.recv_message();
                    assert_eq!(got_seq, seq, "fast subscriber {n} saw a gap or reordering");
                    assert_eq!(&payload[..8], &(seq - 1).to_be_bytes(), "subscriber {n}");
                    progress[n].store(seq, Ordering::Release);
                }
            })
        })
        .collect();
    let baseline = broker.rss();

    // Publish in rounds, each once every fast reader has caught up: the fast
    // ones never need more queue than a round, the slow one overflows.
    let publisher = common::publisher(&ctx, &pub_endpoint);
    let mut payload = vec![0u8; PAYLOAD];
    for i in 0..BURST {
        payload[..8].copy_from_slice(&i.to_be_bytes());
        common::publish(&publisher, b"burst", &payload);
        if (i + 1) % ROUND == 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while progress.iter().any(|p| p.load(Ordering::Acquire) < i + 1) {
                assert!(Instant::now() < deadline, "fast readers stalled at {i}");
                std::thread::yield_now();
            }
        }
    }
    let (_, peak) = broker.memory();
    let growth = peak.saturating_sub(baseline);
    println!(
        "broker RSS baseline {} MiB, peak {} MiB, growth {} MiB; bound {} MiB",
        baseline >> 20,
        peak >> 20,
        growth >> 20,
        (QUEUE_TOTAL_BYTES + FIXED_OVERHEAD) >> 20
    );
    assert!(
        growth < QUEUE_TOTAL_BYTES + FIXED_OVERHEAD,
        "broker memory grew {growth} bytes, beyond its queue bound plus overhead"
    );

    // The slow subscriber resumes: it reads what was kept for it, in order.
    let mut last = 0;
    while slow.socket.poll(zmq::POLLIN, 1000).unwrap() > 0 {
        let (seq, _, _) = slow.recv_message();
        assert_eq!(seq, last + 1, "what the broker kept arrives without holes");
        last = seq;
    }
    // One more message: the slow one sees it after the gap.
    common::publish(&publisher, b"burst", &BURST.to_be_bytes());
    let (seq, _, payload) = slow.recv_message();
    assert_eq!(seq, BURST + 1);
    assert_eq!(&payload[..8], &BURST.to_be_bytes());
    let gap = seq - last - 1;
    for reader in readers {
        reader.join().expect("a fast reader failed");
    }

    // The broker's drop counter is exactly the gap: only the slow one lost
    // anything. Its stats refresh on a timer, so wait until it has seen
    // every routed message.
    let routed_all = (BURST + 1) * (FAST as u64 + 1);
    let m = broker.wait_for("the stats to catch up", |m| m.get(ROUTED) == routed_all);
    let dropped = m.get(DROPPED_QUEUE_FULL);
    println!("slow subscriber: kept {last}, gap {gap}, broker dropped {dropped}");
    assert!(gap > 0, "the slow subscriber must have overflowed");
    assert_eq!(dropped, gap);
}
