//! A publisher that dies while the broker holds it back does not abort the
//! broker.
//!
//! Under `--overflow backpressure` the broker stops reading publishers
//! while a subscriber is behind; libzmq's pipe from the publisher fills and
//! its engine stops reading the connection. When that connection then turns
//! readable (the publisher closed it), libzmq 4.3.4 marks the engine as
//! failed until the pipe drains, and its ZMTP heartbeat timer used to send
//! a PING anyway, tripping `zmq_assert (!_io_error)`: the whole broker
//! aborted (libzmq#4841; zbroker's libzmq stops the heartbeat instead).
//! The publisher here is raw ZMTP over TCP, so the test decides exactly
//! when it stops writing and closes.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{ChildBroker, zmtp};

#[test]
fn a_publisher_dying_while_held_back_does_not_abort_the_broker() {
    let broker = ChildBroker::start(&[
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
        "--metrics-bind",
        "127.0.0.1:0",
        "--overflow",
        "backpressure",
        "--zmtp-heartbeat",
        "100ms",
        "--queue-max-messages",
        "4",
        "--sub-hwm",
        "4",
        "--pub-hwm",
        "4",
    ]);
    // A subscriber that takes everything and reads nothing.
    let ctx = zmq::Context::new();
    let stalled = ctx.socket(zmq::DEALER).unwrap();
    stalled.set_rcvhwm(1).unwrap();
    stalled.set_linger(0).unwrap();
    stalled.connect(&broker.sub_endpoint).unwrap();
    stalled
        .send_multipart([&b"SUB"[..], b"prefix", b""], 0)
        .unwrap();
    assert_eq!(stalled.recv_multipart(0).unwrap()[0], b"OK");

    // Publish until the broker stops reading: the writes back up into the
    // kernel's buffers and block.
    let mut publisher = zmtp::connect(broker.pub_address(), b"PUSH");
    publisher
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let payload = vec![b'x'; 64 << 10];
    let message = zmtp::message(&[b"t", &payload]);
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the broker never held the publisher back"
        );
        if publisher.write_all(&message).is_err() {
            break;
        }
    }
    broker.wait_for("publishers held back", |m| {
        m.get("zbroker_publishers_paused") == 1
    });
    // The publisher dies with its input stopped at the broker.
    drop(publisher);

    // Heartbeats every 100 ms: the old libzmq aborted at the first one.
    // Each scrape proves the broker alive; a few seconds of them cover
    // dozens of heartbeat intervals.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if zbroker::metrics::fetch(broker.metrics_url()).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            broker.assert_alive("after a held-back publisher died");
        }
    }
    // And it recovers: the subscriber reads, the broker serves it again.
    stalled
        .set_rcvtimeo(common::DEADLINE.as_millis() as i32)
        .unwrap();
    for _ in 0..4 {
        stalled
            .recv_multipart(0)
            .expect("the queued messages arrive");
    }
    broker.assert_alive("once the subscriber read");
}
