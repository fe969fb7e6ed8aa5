//! Restarts and failures with the broker as a real process: SIGKILL and
//! restart (the Rust client resyncs by itself), SIGTERM (queued messages are
//! flushed, final counters logged, exit 0), and a publisher whose broker is
//! down (queues up to its HWM, then times out; nothing it was told was sent
//! is lost).

mod common;

use std::time::{Duration, Instant};

use common::ChildBroker;
use common::metrics::PUBLISHED;
use zbroker::client::{
    ClientError, Event, Publisher, PublisherOptions, ResyncReason, Subscriber, SubscriberOptions,
};
use zbroker::filter::Filter;

#[test]
fn sigkill_and_restart_resubscribes_and_delivers_within_two_seconds() {
    for transport in common::TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let (pub_ep, sub_ep) = common::endpoints(transport, &dir);
        let args = ["--pub-bind", &pub_ep, "--sub-bind", &sub_ep];
        let mut broker = ChildBroker::start(&args);
        let options = SubscriberOptions {
            heartbeat: Duration::from_millis(500),
            ..SubscriberOptions::default()
        };
        let mut sub = Subscriber::connect_with(&sub_ep, options).unwrap();
        sub.subscribe(&Filter::parse_cli("prefix:state.", 1024).unwrap())
            .unwrap();
        let mut publisher = Publisher::connect(&pub_ep).unwrap();
        publisher.publish(b"state.1", b"before").unwrap();
        match sub.recv_timeout(Duration::from_secs(10)).unwrap() {
            Some(Event::Message(m)) => assert_eq!(m.payload, b"before"),
            other => panic!("{transport:?}: {other:?}"),
        }

        broker.child.kill().unwrap();
        broker.wait(Duration::from_secs(10));
        let broker = ChildBroker::start(&args);
        let restarted = Instant::now();

        // Publish until the subscriber sees something new: what was
        // published before it re-subscribed had no receiver.
        let mut resynced = false;
        let mut n = 0u64;
        let received = loop {
            assert!(
                restarted.elapsed() < Duration::from_secs(20),
                "{transport:?}: nothing after restart"
            );
            publisher.publish(b"state.2", &n.to_be_bytes()).unwrap();
            n += 1;
            match sub.recv_timeout(Duration::from_millis(50)).unwrap() {
                Some(Event::Resync(reason)) => {
                    assert_eq!(reason, ResyncReason::Reconnected);
                    resynced = true;
                }
                Some(Event::Message(m)) => break (m, restarted.elapsed()),
                None => {}
            }
        };
        let (message, after) = received;
        println!("{transport:?}: first new message {after:?} after the restart");
        assert!(
            resynced,
            "the client said a resync was due before new messages"
        );
        assert_eq!(message.topic, b"state.2");
        assert_eq!(message.seq, 1, "a new broker numbers from 1");
        assert!(
            after < Duration::from_secs(2),
            "{transport:?}: took {after:?}"
        );
        drop(broker);
    }
}

#[test]
fn sigterm_flushes_queued_messages_logs_counters_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_ep, sub_ep) = common::endpoints(common::Transport::Ipc, &dir);
    let mut broker = ChildBroker::start(&[
        "--pub-bind",
        &pub_ep,
        "--sub-bind",
        &sub_ep,
        "--pub-hwm",
        "10",
        "--sub-hwm",
        "10",
        "--linger",
        "10s",
        "--metrics-bind",
        "127.0.0.1:0",
    ]);
    let ctx = zmq::Context::new();
    let sub = common::RawSubscriber::connect(&ctx, &sub_ep);
    sub.socket.set_rcvhwm(10).unwrap();
    sub.subscribe("exact", b"job");
    let publisher = common::publisher(&ctx, &pub_ep);
    const N: u64 = 500;
    for i in 0..N {
        common::publish(&publisher, b"job", &i.to_be_bytes());
    }
    common::publish(&publisher, b"fence", b""); // nobody holds it: unmatched
    // Not reading yet: most of the 500 wait in the broker's queue. Stop it
    // only once it has taken all 501 from the publisher.
    broker.wait_for("the broker to take every message", |m| {
        m.get(PUBLISHED) > N // the N jobs and the fence
    });
    broker.sigterm();
    // While the broker lingers, read everything it had queued.
    for seq in 1..=N {
        if sub.socket.poll(zmq::POLLIN, 5000).unwrap() == 0 {
            let alive = broker.child.try_wait().unwrap();
            panic!(
                "stalled before seq {seq}; broker exit {alive:?}; log: {:#?}",
                broker.log_since_startup()
            );
        }
        let (got, _, payload) = sub.recv_message();
        assert_eq!(got, seq);
        assert_eq!(payload, (seq - 1).to_be_bytes());
    }
    // With no subscriber connection left, the broker need not wait out
    // the rest of its linger.
    drop(sub);
    let status = broker.wait(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
    let lines = broker.wait_for_log("broker stopped");
    let last = lines.last().unwrap();
    assert!(
        last.contains("published=501") && last.contains("dropped_at_exit=0"),
        "{last}"
    );
}

#[test]
fn a_publisher_whose_broker_is_down_queues_then_times_out_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_ep, sub_ep) = common::endpoints(common::Transport::Ipc, &dir);
    let options = PublisherOptions {
        hwm: 10,
        send_timeout: Some(Duration::from_millis(200)),
        ..PublisherOptions::default()
    };
    let mut publisher = Publisher::connect_with(&pub_ep, &options).unwrap();
    let mut accepted = 0u64;
    let refused = loop {
        match publisher.publish(b"t", b"p") {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 1_000, "the queue must be bounded by the HWM");
    };
    assert!(matches!(refused, ClientError::Timeout(_)), "{refused}");
    assert!(accepted >= 10, "at least the HWM is queued, got {accepted}");

    // Every message `publish` accepted reaches the broker once it is up.
    let broker = ChildBroker::start(&[
        "--pub-bind",
        &pub_ep,
        "--sub-bind",
        &sub_ep,
        "--metrics-bind",
        "127.0.0.1:0",
        "--sub-timeout",
        "1s",
    ]);
    broker.wait_for("every accepted message to arrive", |m| {
        let published = m.get(PUBLISHED);
        assert!(published <= accepted, "more arrived than were accepted");
        published == accepted
    });
}
