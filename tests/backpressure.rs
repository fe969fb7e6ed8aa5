//! The `backpressure` overflow policy over real sockets: a subscriber that
//! stops reading holds the publisher back instead of losing messages, and one
//! that takes nothing for `disconnect_after` is cut off so the others go on.

mod common;

use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use common::metrics::{BACKPRESSURE_PAUSES, PUBLISHERS_PAUSED};
use common::{Metrics, RawSubscriber, TRANSPORTS, TestBroker, Transport};
use zbroker::config::{Config, OverflowPolicy};

/// More than libzmq's pipes, the kernel's socket buffers and the broker's
/// queue hold together, so the publisher must be held back.
const MESSAGES: u64 = 200_000;
const PAYLOAD: usize = 64;

fn config(disconnect_after: Duration) -> Config {
    let mut config = common::test_config();
    config.queue.policy = OverflowPolicy::Backpressure;
    config.queue.max_messages = 2_000;
    config.queue.disconnect_after = disconnect_after;
    config.pub_hwm = 100;
    config.sub_hwm = 100;
    // Stalled subscribers send no commands; they must not expire.
    config.sub_timeout = Duration::from_secs(60);
    config
}

/// Publishes `MESSAGES` numbered messages on a thread; each send may wait
/// up to 30 s for the broker to read again. The socket stays open until
/// `done` fires: on ipc, libzmq 4.3 discards what a peer sent before hanging
/// up if the receiving side had stopped reading (README, libzmq#4660).
/// Returns how many it sent.
fn publish_all(endpoint: &str, done: Receiver<()>) -> std::thread::JoinHandle<u64> {
    let endpoint = endpoint.to_string();
    std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let publisher = common::publisher(&ctx, &endpoint);
        publisher.set_sndhwm(100).unwrap();
        publisher.set_sndtimeo(30_000).unwrap();
        let mut payload = [0u8; PAYLOAD];
        for i in 0..MESSAGES {
            payload[..8].copy_from_slice(&i.to_be_bytes());
            if publisher
                .send_multipart([&b"t"[..], &payload[..]], 0)
                .is_err()
            {
                return i;
            }
        }
        let _ = done.recv_timeout(Duration::from_secs(60));
        MESSAGES
    })
}

/// A subscriber on everything whose receive queue holds 100 messages, so it
/// pushes back on the broker as soon as it stops reading.
fn stalling_subscriber(ctx: &zmq::Context, endpoint: &str) -> RawSubscriber {
    let sub = RawSubscriber::connect(ctx, endpoint);
    sub.socket.set_rcvhwm(100).unwrap();
    sub.subscribe("prefix", b"");
    sub
}

/// Receives every message in order: seq 1, 2, … with the payload numbered
/// from 0.
fn expect_all(sub: &RawSubscriber, who: &str) {
    for seq in 1..=MESSAGES {
        let (got, _topic, payload) = sub.recv_message();
        assert_eq!(got, seq, "{who}: a gap or reordering");
        assert_eq!(&payload[..8], &(seq - 1).to_be_bytes(), "{who}");
    }
}

#[test]
fn a_stalled_subscriber_holds_the_publisher_back_and_loses_nothing() {
    for transport in TRANSPORTS {
        run_stall(transport);
    }
}

fn run_stall(transport: Transport) {
    let mut config = config(Duration::from_secs(60));
    let metrics = format!("127.0.0.1:{}", common::free_port());
    config.metrics_bind = Some(metrics.clone());
    let broker = TestBroker::start(transport, config);
    let ctx = zmq::Context::new();
    let sub = stalling_subscriber(&ctx, &broker.sub_endpoint);
    let (done, publishing) = channel();
    let publisher = publish_all(&broker.pub_endpoint, publishing);
    // The handshake: the broker says it stopped reading publishers while
    // the subscriber reads nothing.
    broker.wait_for(Duration::from_secs(30), "publishers paused", |s| {
        s.publishers_paused == 1
    });
    // Operators see it too.
    let m = Metrics::scrape(&metrics);
    assert_eq!(m.get(PUBLISHERS_PAUSED), 1, "{m:#?}");
    assert!(m.get(BACKPRESSURE_PAUSES) >= 1, "{m:#?}");
    expect_all(&sub, &format!("{transport:?}"));
    done.send(()).unwrap();
    assert_eq!(
        publisher.join().unwrap(),
        MESSAGES,
        "{transport:?}: sends timed out"
    );
    let last = broker.stop();
    let c = &last.counters;
    assert_eq!(c.dropped_queue_full, 0, "{transport:?}: {c:?}");
    assert_eq!(c.delivered, MESSAGES, "{transport:?}: {c:?}");
    assert!(c.backpressure_pauses >= 1, "{transport:?}: {c:?}");
    assert_eq!(last.publishers_paused, 0, "{transport:?}");
}

#[test]
fn a_subscriber_taking_nothing_is_cut_off_and_the_others_get_everything() {
    let broker = TestBroker::start(Transport::Tcp, config(Duration::from_millis(300)));
    let ctx = zmq::Context::new();
    let stuck = stalling_subscriber(&ctx, &broker.sub_endpoint);
    let healthy = RawSubscriber::connect(&ctx, &broker.sub_endpoint);
    healthy.subscribe("prefix", b"");
    let reader = std::thread::spawn(move || expect_all(&healthy, "healthy subscriber"));
    let (done, publishing) = channel();
    let publisher = publish_all(&broker.pub_endpoint, publishing);
    reader
        .join()
        .expect("the healthy subscriber got everything");
    done.send(()).unwrap();
    assert_eq!(publisher.join().unwrap(), MESSAGES, "sends timed out");

    // What reached the stuck subscriber's pipe before the cut-off arrives in
    // order, then the notice; the rest was dropped and counted.
    let mut kept = 0;
    let notice = loop {
        let frames = stuck.recv();
        if frames[0] == b"ERR" {
            break frames;
        }
        let (seq, _) = zbroker::protocol::parse_header(&frames[0]).expect("a MSG header");
        assert_eq!(
            seq,
            kept + 1,
            "the stuck subscriber's messages arrive in order"
        );
        kept = seq;
    };
    assert_eq!(notice[1], b"limit");
    assert!(notice[2].starts_with(b"cut-off"), "{notice:?}");
    let last = broker.stop();
    let c = &last.counters;
    assert_eq!(c.slow_disconnects, 1, "{c:?}");
    let routed_to_stuck = c.routed - MESSAGES;
    assert_eq!(c.dropped_queue_full, routed_to_stuck - kept, "{c:?}");
}
