//! Routing over real sockets against the brute-force reference matcher:
//! random topics and filters of every kind, many filters per subscriber,
//! unsubscribe, over tcp and ipc.

mod common;

use std::collections::BTreeSet;

use common::{Rng, TestBroker, Transport};
use zbroker::filter::{Filter, FilterKind};

/// A topic no generated topic can equal (generated segments are a, b, ab).
const FENCE: &[u8] = b"fence";

fn random_topic(rng: &mut Rng) -> Vec<u8> {
    let segments = 1 + rng.below(4);
    let parts: Vec<&str> = (0..segments)
        .map(|_| *rng.pick(&["a", "b", "ab", ""]))
        .collect();
    let topic = parts.join(".");
    if topic.is_empty() {
        "a".into()
    } else {
        topic.into_bytes()
    }
}

fn random_filter(rng: &mut Rng) -> Filter {
    let kind = *rng.pick(&FilterKind::ALL);
    let text: Vec<u8> = match kind {
        FilterKind::Exact => random_topic(rng),
        FilterKind::Prefix => {
            let topic = random_topic(rng);
            let len = rng.below(topic.len() + 1);
            topic[..len].to_vec()
        }
        FilterKind::Pattern => {
            let segments = 1 + rng.below(3);
            let mut parts: Vec<&str> = (0..segments)
                .map(|_| *rng.pick(&["a", "b", "*", "ab"]))
                .collect();
            if rng.below(3) == 0 {
                parts.push(">");
            }
            parts.join(".").into_bytes()
        }
    };
    Filter::new(kind, &text, 1024).expect("generated filters are valid")
}

fn reference_model(transport: Transport, seed: u64) {
    let broker = TestBroker::start(transport, common::test_config());
    let ctx = zmq::Context::new();
    let mut rng = Rng::new(seed);

    // Each subscriber: its final filters, after subscribing extra ones and
    // unsubscribing them again.
    let mut subscribers = Vec::new();
    for _ in 0..12 {
        let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
        sub.subscribe("exact", FENCE);
        let mut kept = BTreeSet::new();
        for _ in 0..1 + rng.below(6) {
            let filter = random_filter(&mut rng);
            sub.subscribe(filter.kind().as_str(), filter.text());
            kept.insert(filter);
        }
        for _ in 0..rng.below(3) {
            let extra = random_filter(&mut rng);
            if kept.contains(&extra) {
                continue;
            }
            sub.subscribe(extra.kind().as_str(), extra.text());
            let reply = sub.call(&[b"UNSUB", extra.kind().as_bytes(), extra.text()]);
            assert_eq!(reply[0], b"OK", "seed {seed}: {reply:?}");
        }
        subscribers.push((sub, kept));
    }

    let publisher = common::publisher(&ctx, &broker.pub_endpoint);
    let topics: Vec<Vec<u8>> = (0..2000).map(|_| random_topic(&mut rng)).collect();
    for (i, topic) in topics.iter().enumerate() {
        common::publish(&publisher, topic, i.to_string().as_bytes());
    }
    // One publisher's messages are routed in order, so once a subscriber
    // sees the fence it has seen everything published before it.
    common::publish(&publisher, FENCE, b"");

    for (n, (sub, filters)) in subscribers.iter().enumerate() {
        let expected: Vec<usize> = topics
            .iter()
            .enumerate()
            .filter(|(_, t)| filters.iter().any(|f| f.matches(t)))
            .map(|(i, _)| i)
            .collect();
        let mut got = Vec::new();
        let mut next_seq = 1;
        loop {
            let (seq, topic, payload) = sub.recv_message();
            assert_eq!(seq, next_seq, "seed {seed}: subscriber {n} saw a gap");
            next_seq += 1;
            if topic == FENCE {
                break;
            }
            let i: usize = String::from_utf8(payload).unwrap().parse().unwrap();
            assert_eq!(
                topic, topics[i],
                "seed {seed}: payload {i} under the wrong topic"
            );
            got.push(i);
        }
        assert_eq!(
            got, expected,
            "seed {seed}: subscriber {n} with filters {filters:?}"
        );
    }
    let stats = broker.stop();
    assert_eq!(stats.counters.published, 2001);
    assert_eq!(stats.counters.dropped_queue_full, 0);
}

fn seeds() -> Vec<u64> {
    common::test_seed().map_or(vec![0x5eed, 42, 7_777_777], |seed| vec![seed])
}

#[test]
fn random_filters_match_the_reference_over_tcp() {
    for seed in seeds() {
        reference_model(Transport::Tcp, seed);
    }
}

#[test]
fn random_filters_match_the_reference_over_ipc() {
    for seed in seeds() {
        reference_model(Transport::Ipc, seed);
    }
}

#[test]
fn overlapping_filters_deliver_once_and_unsubscribe_stops_delivery() {
    for transport in common::TRANSPORTS {
        let broker = TestBroker::start(transport, common::test_config());
        let ctx = zmq::Context::new();
        let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
        sub.subscribe("exact", b"net.a.port");
        sub.subscribe("prefix", b"net.");
        sub.subscribe("pattern", b"net.*.port");
        sub.subscribe("pattern", b"net.>");
        sub.subscribe("prefix", b"net."); // idempotent
        sub.subscribe("exact", FENCE);
        let publisher = common::publisher(&ctx, &broker.pub_endpoint);
        common::publish(&publisher, b"net.a.port", b"1");
        common::publish(&publisher, FENCE, b"");
        assert_eq!(
            sub.recv_message(),
            (1, b"net.a.port".to_vec(), b"1".to_vec())
        );
        assert_eq!(sub.recv_message().1, FENCE);

        for (kind, filter) in [
            ("exact", &b"net.a.port"[..]),
            ("prefix", b"net."),
            ("pattern", b"net.*.port"),
        ] {
            let reply = sub.call(&[b"UNSUB", kind.as_bytes(), filter]);
            assert_eq!(
                reply,
                vec![
                    b"OK".to_vec(),
                    b"UNSUB".to_vec(),
                    kind.as_bytes().to_vec(),
                    filter.to_vec()
                ]
            );
        }
        // Only net.> is left: net.a.port still matches it, net does not.
        common::publish(&publisher, b"net", b"2");
        common::publish(&publisher, b"net.a.port", b"3");
        common::publish(&publisher, FENCE, b"");
        assert_eq!(
            sub.recv_message(),
            (3, b"net.a.port".to_vec(), b"3".to_vec())
        );
        assert_eq!(sub.recv_message().1, FENCE);
        // Publishers and commands travel on different sockets, so only a
        // fence orders them: everything above is routed before this UNSUB.
        let reply = sub.call(&[b"UNSUB", b"pattern", b"net.>"]);
        assert_eq!(reply[0], b"OK");
        common::publish(&publisher, b"net.a.port", b"4");
        common::publish(&publisher, FENCE, b"");
        assert_eq!(sub.recv_message(), (5, FENCE.to_vec(), Vec::new()));
        let stats = broker.stop();
        assert_eq!(stats.subscriptions, 1, "only the fence filter is left");
    }
}
