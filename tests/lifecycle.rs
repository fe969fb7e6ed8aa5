//! Subscribers that vanish are cleaned up: by expiry when silent, at once
//! (EHOSTUNREACH) when the broker tries to send to them.

mod common;

use std::time::Duration;

use common::TestBroker;

const SUBSCRIBERS: usize = 1_000;

/// Connects `SUBSCRIBERS` raw subscribers, each holding two filters, and
/// returns them (still connected).
fn connect_many(ctx: &zmq::Context, broker: &TestBroker) -> Vec<common::RawSubscriber> {
    (0..SUBSCRIBERS)
        .map(|i| {
            let sub = common::RawSubscriber::connect(ctx, &broker.sub_endpoint);
            sub.subscribe("exact", format!("node.{i}").as_bytes());
            sub.subscribe("prefix", b"all.");
            sub
        })
        .collect()
}

#[test]
fn a_thousand_vanished_subscribers_expire_within_the_timeout() {
    for transport in common::TRANSPORTS {
        let config = common::test_config();
        let timeout = config.sub_timeout;
        let broker = TestBroker::start(transport, config);
        let ctx = zmq::Context::new();
        let subs = connect_many(&ctx, &broker);
        broker.wait_for(Duration::from_secs(5), "1000 subscribers", |s| {
            s.subscribers == SUBSCRIBERS as u64 && s.subscriptions == 2 * SUBSCRIBERS as u64
        });
        drop(subs); // vanish without a word
        // Expiry is checked every timeout/4, so everything is gone by
        // 1.25 × timeout after the last command; allow scheduling slack.
        let stats = broker.wait_for(timeout * 2, "every subscriber to expire", |s| {
            s.subscribers == 0 && s.subscriptions == 0
        });
        assert_eq!(
            stats.counters.expired_subscribers, SUBSCRIBERS as u64,
            "{transport:?}"
        );
    }
}

#[test]
fn sending_to_vanished_subscribers_frees_them_at_once() {
    for transport in common::TRANSPORTS {
        let mut config = common::test_config();
        config.sub_timeout = Duration::from_secs(600); // expiry must not be what frees them
        let broker = TestBroker::start(transport, config);
        let ctx = zmq::Context::new();
        let subs = connect_many(&ctx, &broker);
        broker.wait_for(Duration::from_secs(5), "1000 subscribers", |s| {
            s.subscribers == SUBSCRIBERS as u64
        });
        drop(subs);
        let publisher = common::publisher(&ctx, &broker.pub_endpoint);
        // libzmq notices the closed connections asynchronously; keep
        // publishing until every send has failed with EHOSTUNREACH.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            common::publish(&publisher, b"all.x", b"p");
            let stats = broker.stats.snapshot();
            if stats.subscribers == 0 {
                assert_eq!(stats.subscriptions, 0);
                assert_eq!(stats.counters.unreachable_subscribers, SUBSCRIBERS as u64);
                assert_eq!(stats.counters.expired_subscribers, 0);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{transport:?}: {stats:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_pinging_subscriber_is_kept() {
    let config = common::test_config();
    let timeout = config.sub_timeout;
    let broker = TestBroker::start(common::Transport::Tcp, config);
    let ctx = zmq::Context::new();
    let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
    sub.subscribe("prefix", b"");
    // Ping for two full timeouts; each PONG is the handshake that the
    // broker still holds us.
    let pings = 8;
    for _ in 0..pings {
        std::thread::sleep(timeout / 4);
        assert_eq!(sub.call(&[b"PING"]), vec![b"PONG".to_vec()]);
    }
    let stats = broker.stats.snapshot();
    assert_eq!(stats.subscribers, 1);
    assert_eq!(stats.counters.expired_subscribers, 0);
}
