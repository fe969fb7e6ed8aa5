//! Malformed frames on both endpoints are refused, counted and answered where
//! there is someone to answer, and the broker keeps routing correctly.

mod common;

use std::time::Duration;

use common::TestBroker;

fn err_code(reply: &[Vec<u8>]) -> &[u8] {
    assert_eq!(reply.len(), 3, "an ERR reply is three frames: {reply:?}");
    assert_eq!(reply[0], b"ERR");
    assert!(!reply[2].is_empty(), "ERR carries an explanation");
    &reply[1]
}

#[test]
fn malformed_commands_get_errors_and_the_subscriber_still_works() {
    for transport in common::TRANSPORTS {
        let broker = TestBroker::start(transport, common::test_config());
        let ctx = zmq::Context::new();
        let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
        let long = vec![b'x'; 1025];
        let cases: Vec<(Vec<&[u8]>, &[u8])> = vec![
            (vec![b""], b"bad-command"),
            (vec![b"HELLO"], b"bad-command"),
            (vec![b"sub", b"exact", b"x"], b"bad-command"),
            (vec![b"SUB"], b"bad-command"),
            (vec![b"SUB", b"exact"], b"bad-command"),
            (vec![b"SUB", b"glob", b"x"], b"bad-command"),
            (vec![b"SUB", b"exact", b"x", b"extra"], b"bad-command"),
            (
                vec![b"SUB", b"exact", b"a", b"b", b"c", b"d", b"e", b"f"],
                b"bad-command",
            ),
            (vec![b"PING", b"x"], b"bad-command"),
            (vec![b"SUB", b"exact", b""], b"bad-filter"),
            (vec![b"SUB", b"pattern", b""], b"bad-filter"),
            (vec![b"SUB", b"pattern", b"a.>.b"], b"bad-filter"),
            (vec![b"SUB", b"prefix", &long], b"bad-filter"),
            (vec![b"UNSUB", b"exact", b"never"], b"not-subscribed"),
            (vec![b"\xff\x00\xfe", b"\x00"], b"bad-command"),
        ];
        for (frames, code) in &cases {
            let reply = sub.call(frames);
            assert_eq!(
                err_code(&reply),
                *code,
                "{transport:?}: {frames:?} -> {reply:?}"
            );
        }
        // The same connection subscribes and receives normally afterwards.
        sub.subscribe("exact", b"ok");
        let publisher = common::publisher(&ctx, &broker.pub_endpoint);
        common::publish(&publisher, b"ok", b"payload");
        assert_eq!(sub.recv_message(), (1, b"ok".to_vec(), b"payload".to_vec()));
        let stats = broker.stop();
        assert_eq!(stats.counters.malformed_commands, cases.len() as u64 - 1);
        assert_eq!(stats.subscriptions, 1);
    }
}

#[test]
fn malformed_publishes_are_dropped_counted_and_routing_goes_on() {
    for transport in common::TRANSPORTS {
        let mut config = common::test_config();
        config.limits.max_topic_len = 64;
        let broker = TestBroker::start(transport, config);
        let ctx = zmq::Context::new();
        let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
        sub.subscribe("prefix", b"");
        let publisher = common::publisher(&ctx, &broker.pub_endpoint);
        let long_topic = vec![b't'; 65];
        let bad: Vec<Vec<&[u8]>> = vec![
            vec![b"only-topic"],
            vec![b"t", b"p", b"extra"],
            vec![b"t", b"p", b"x", b"y", b"z", b"w"],
            vec![b"", b"empty topic"],
            vec![&long_topic, b"p"],
        ];
        for (i, frames) in bad.iter().enumerate() {
            publisher.send_multipart(frames, 0).unwrap();
            // Interleave valid messages: each must arrive, in order.
            common::publish(&publisher, b"good", i.to_string().as_bytes());
        }
        for i in 0..bad.len() {
            let (seq, topic, payload) = sub.recv_message();
            assert_eq!(
                (seq, &topic[..], payload),
                (i as u64 + 1, &b"good"[..], i.to_string().into_bytes())
            );
        }
        let stats = broker.wait_for(Duration::from_secs(5), "malformed count", |s| {
            s.counters.malformed_publishes == bad.len() as u64
        });
        assert_eq!(stats.counters.published, bad.len() as u64);
    }
}
