//! The Rust client API against a real broker: confirmations, refusals, gaps,
//! reconnection with resync, and a stalled client.

mod common;

use std::time::Duration;

use common::{TestBroker, Transport};
use zbroker::client::{
    ClientError, Event, Message, Publisher, ResyncReason, Subscriber, SubscriberOptions,
};
use zbroker::filter::Filter;
use zbroker::protocol::ErrorCode;

fn filter(spec: &str) -> Filter {
    Filter::parse_cli(spec, 1024).unwrap()
}

fn quick_options() -> SubscriberOptions {
    SubscriberOptions {
        heartbeat: Duration::from_millis(200),
        broker_timeout: Duration::from_secs(2),
        broker_sub_timeout: common::test_config().sub_timeout,
        confirm_timeout: Duration::from_secs(5),
        ..SubscriberOptions::default()
    }
}

fn next_message(sub: &mut Subscriber) -> Message {
    match sub.recv_timeout(Duration::from_secs(10)).unwrap() {
        Some(Event::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn subscribe_publish_receive_unsubscribe() {
    for transport in common::TRANSPORTS {
        let broker = TestBroker::start(transport, common::test_config());
        let mut sub = Subscriber::connect_with(&broker.sub_endpoint, quick_options()).unwrap();
        sub.subscribe(&filter("pattern:net.*.port")).unwrap();
        sub.subscribe(&filter("exact:fence")).unwrap();
        let mut publisher = Publisher::connect(&broker.pub_endpoint).unwrap();
        publisher.publish(b"net.a.port", b"up").unwrap();
        publisher.publish(b"net.a.b.port", b"no").unwrap();
        publisher.publish(b"fence", b"").unwrap();
        let m = next_message(&mut sub);
        assert_eq!(
            m,
            Message {
                topic: b"net.a.port".to_vec(),
                payload: b"up".to_vec(),
                seq: 1,
                gap: false
            }
        );
        assert_eq!(next_message(&mut sub).topic, b"fence");

        sub.unsubscribe(&filter("pattern:net.*.port")).unwrap();
        publisher.publish(b"net.a.port", b"after").unwrap();
        publisher.publish(b"fence", b"").unwrap();
        assert_eq!(next_message(&mut sub).topic, b"fence", "{transport:?}");
        assert_eq!(sub.filters().count(), 1);
    }
}

#[test]
fn refusals_are_typed_errors() {
    let mut config = common::test_config();
    config.limits.max_filters_per_subscriber = 1;
    let broker = TestBroker::start(Transport::Tcp, config);
    let mut sub = Subscriber::connect_with(&broker.sub_endpoint, quick_options()).unwrap();
    sub.subscribe(&filter("exact:a")).unwrap();
    sub.subscribe(&filter("exact:a")).unwrap(); // idempotent, not a second filter
    match sub.subscribe(&filter("exact:b")) {
        Err(ClientError::Refused {
            code: Some(ErrorCode::Limit),
            ..
        }) => {}
        other => panic!("expected a limit refusal, got {other:?}"),
    }
    match sub.unsubscribe(&filter("prefix:zzz")) {
        Err(ClientError::Refused {
            code: Some(ErrorCode::NotSubscribed),
            ..
        }) => {}
        other => panic!("expected not-subscribed, got {other:?}"),
    }
    assert_eq!(sub.filters().count(), 1);
}

#[test]
fn dropped_messages_show_as_a_gap_equal_to_the_drop_count() {
    let mut config = common::test_config();
    config.sub_hwm = 10;
    config.queue.max_messages = 50;
    config.sub_timeout = Duration::from_secs(60);
    let broker = TestBroker::start(Transport::Ipc, config);
    let options = SubscriberOptions {
        hwm: 10,
        broker_sub_timeout: Duration::from_secs(60),
        ..quick_options()
    };
    let mut sub = Subscriber::connect_with(&broker.sub_endpoint, options).unwrap();
    sub.subscribe(&filter("prefix:")).unwrap();
    let mut publisher = Publisher::connect(&broker.pub_endpoint).unwrap();
    const N: u64 = 2_000;
    for i in 0..N {
        publisher.publish(b"t", &i.to_be_bytes()).unwrap();
    }
    // Not reading: the broker fills libzmq's pipes, then its queue, then drops.
    let stats = broker.wait_for(Duration::from_secs(10), "all routed", |s| {
        s.counters.routed == N
    });
    let dropped = stats.counters.dropped_queue_full;
    assert!(dropped > 0, "the subscriber's queue must have overflowed");

    let mut received = 0;
    let mut gaps = 0;
    let mut last_seq = 0;
    while received + dropped < N {
        let m = next_message(&mut sub);
        gaps += m.seq - last_seq - 1;
        assert_eq!(m.gap, m.seq != last_seq + 1);
        last_seq = m.seq;
        received += 1;
    }
    // The gap after the last delivered message shows on the next one.
    publisher.publish(b"t", b"last").unwrap();
    let m = next_message(&mut sub);
    gaps += m.seq - last_seq - 1;
    assert_eq!(m.seq, N + 1);
    assert_eq!(
        gaps, dropped,
        "every drop is visible as a gap, and nothing else is"
    );
}

#[test]
fn subscriber_resyncs_after_a_broker_restart() {
    for transport in common::TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::test_config();
        match transport {
            Transport::Tcp => {
                // Learn a free port from a first bind, then pin it.
                let probe = TestBroker::start(Transport::Tcp, common::test_config());
                let port = |e: &str| e.rsplit(':').next().unwrap().to_string();
                config.pub_bind = vec![format!("tcp://127.0.0.1:{}", port(&probe.pub_endpoint))];
                config.sub_bind = vec![format!("tcp://127.0.0.1:{}", port(&probe.sub_endpoint))];
                probe.stop();
            }
            Transport::Ipc => {
                config.pub_bind = vec![format!("ipc://{}/pub", dir.path().display())];
                config.sub_bind = vec![format!("ipc://{}/sub", dir.path().display())];
            }
        }
        let broker = TestBroker::start_on(config.clone(), None);
        let mut sub = Subscriber::connect_with(&config.sub_bind[0], quick_options()).unwrap();
        sub.subscribe(&filter("prefix:cfg.")).unwrap();
        let mut publisher = Publisher::connect(&config.pub_bind[0]).unwrap();
        publisher.publish(b"cfg.1", b"before").unwrap();
        assert_eq!(next_message(&mut sub).payload, b"before");

        broker.stop();
        let broker = TestBroker::start_on(config.clone(), None);
        // The client notices, reconnects, re-subscribes, then says so.
        match sub.recv_timeout(Duration::from_secs(10)).unwrap() {
            Some(Event::Resync(ResyncReason::Reconnected)) => {}
            other => panic!("{transport:?}: expected a resync, got {other:?}"),
        }
        publisher.publish(b"cfg.2", b"after").unwrap();
        let m = next_message(&mut sub);
        assert_eq!(
            (m.payload.as_slice(), m.seq, m.gap),
            (&b"after"[..], 1, false)
        );
        assert_eq!(broker.stop().subscriptions, 1);
    }
}

#[test]
fn a_stalled_subscriber_resubscribes_and_says_so() {
    let broker = TestBroker::start(Transport::Tcp, common::test_config());
    let mut sub = Subscriber::connect_with(&broker.sub_endpoint, quick_options()).unwrap();
    sub.subscribe(&filter("exact:x")).unwrap();
    // The client's thread does not call into it for longer than the
    // broker's timeout: this sleep is the stall under test.
    std::thread::sleep(common::test_config().sub_timeout * 2);
    match sub.recv_timeout(Duration::from_secs(10)).unwrap() {
        Some(Event::Resync(_)) => {}
        other => panic!("expected a resync, got {other:?}"),
    }
    let mut publisher = Publisher::connect(&broker.pub_endpoint).unwrap();
    publisher.publish(b"x", b"fresh").unwrap();
    let m = next_message(&mut sub);
    assert_eq!(m.payload, b"fresh");
    assert_eq!(broker.stats.snapshot().counters.expired_subscribers, 1);
}
