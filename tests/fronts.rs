//! The fronts Dragonflow needs: several endpoints per side (workers PUSH
//! over ipc, remote publishers over tcp) and the XPUB front, where
//! unchanged ZeroMQ SUB sockets subscribe by prefix and receive exactly
//! what a PUB socket would send them, next to protocol v1 DEALER
//! subscribers on the same broker.

mod common;

use std::time::{Duration, Instant};

use common::{RawSubscriber, TestBroker, publish, publisher};

const DEADLINE: Duration = Duration::from_secs(20);

/// A plain SUB socket, as Dragonflow's zmq driver opens one.
fn sub_socket(ctx: &zmq::Context, endpoint: &str, prefixes: &[&[u8]]) -> zmq::Socket {
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_linger(0).unwrap();
    sub.set_rcvtimeo(100).unwrap();
    sub.connect(endpoint).unwrap();
    for prefix in prefixes {
        sub.set_subscribe(prefix).unwrap();
    }
    sub
}

/// Subscribes `sub` to `probe` and publishes `probe` until it arrives: the
/// broker has then applied every notice `sub` sent before it (a SUB's
/// notices, the broker's reading of them and the deliveries all keep
/// their order). Returns what else arrived meanwhile.
fn handshake(sub: &zmq::Socket, push: &zmq::Socket, probe: &[u8]) -> Vec<Vec<Vec<u8>>> {
    sub.set_subscribe(probe).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut other = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no {probe:?} through the XPUB front"
        );
        publish(push, probe, b"probe");
        while let Ok(message) = sub.recv_multipart(0) {
            if message[0] == probe {
                sub.set_unsubscribe(probe).unwrap();
                return other;
            }
            other.push(message);
        }
    }
}

/// Everything `sub` receives until the message on `sentinel`, which it
/// must be subscribed to: messages from one PUSH keep their order through
/// the broker, so what is not there by then was not sent to it.
fn until(sub: &zmq::Socket, push: &zmq::Socket, sentinel: &[u8]) -> Vec<Vec<u8>> {
    publish(push, sentinel, b"end");
    let deadline = Instant::now() + DEADLINE;
    let mut topics = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no sentinel {sentinel:?}");
        if let Ok(message) = sub.recv_multipart(0) {
            assert_eq!(
                message.len(),
                2,
                "[topic, payload], as from a PUB: {message:?}"
            );
            if message[0] == sentinel {
                return topics;
            }
            topics.push(message[0].clone());
        }
    }
}

#[test]
fn sub_sockets_on_the_xpub_front_get_what_a_pub_would_send_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    // As Dragonflow deploys it: workers PUSH over ipc, remote publishers
    // over tcp, SUB sockets on the XPUB front, DEALERs on the ROUTER.
    config.pub_bind = vec![
        format!("ipc://{}/publisher-socket", dir.path().display()),
        "tcp://127.0.0.1:*".into(),
    ];
    config.sub_bind = vec!["tcp://127.0.0.1:*".into()];
    config.xpub_bind = vec![
        "tcp://127.0.0.1:*".into(),
        format!("ipc://{}/xpub", dir.path().display()),
    ];
    let broker = TestBroker::start_on(config, None);
    assert_eq!(broker.pub_endpoints.len(), 2);
    assert_eq!(broker.xpub_endpoints.len(), 2);
    let ctx = zmq::Context::new();
    let ipc_push = publisher(&ctx, &broker.pub_endpoints[0]);
    let tcp_push = publisher(&ctx, &broker.pub_endpoints[1]);

    // Two compute nodes: each on 'D' plus its projects, one per XPUB
    // endpoint; one DEALER subscriber with exact filters beside them.
    let node_a = sub_socket(
        &ctx,
        &broker.xpub_endpoints[0],
        &[b"D", b"project-1", b"end"],
    );
    let node_b = sub_socket(
        &ctx,
        &broker.xpub_endpoints[1],
        &[b"D", b"project-2", b"end"],
    );
    assert!(handshake(&node_a, &ipc_push, b"probe-a").is_empty());
    assert!(handshake(&node_b, &ipc_push, b"probe-b").is_empty());
    let dealer = RawSubscriber::connect(&ctx, &broker.sub_endpoint);
    dealer.subscribe("exact", b"project-2");
    dealer.subscribe("exact", b"end");

    // The tcp publisher's messages reach the same subscribers (first, and
    // waited for: two publishers' messages have no order between them).
    publish(&tcp_push, b"project-1", b"from tcp");
    let deadline = Instant::now() + DEADLINE;
    let from_tcp = loop {
        assert!(Instant::now() < deadline, "the tcp publisher's message");
        if let Ok(message) = node_a.recv_multipart(0) {
            break message;
        }
    };
    assert_eq!(from_tcp, [b"project-1".to_vec(), b"from tcp".to_vec()]);

    for topic in [
        &b"D"[..],
        b"project-1",
        b"project-2",
        b"project-3",
        b"listener_host",
    ] {
        publish(&ipc_push, topic, b"event");
    }
    let a = until(&node_a, &ipc_push, b"end");
    let b = until(&node_b, &ipc_push, b"end");
    assert_eq!(a, [&b"D"[..], b"project-1"], "node a");
    assert_eq!(b, [&b"D"[..], b"project-2"], "node b");
    let (_, topic, _) = dealer.recv_message();
    assert_eq!(topic, b"project-2");
    let (_, topic, _) = dealer.recv_message();
    assert_eq!(topic, b"end");

    // Unsubscribing stops delivery; the broker's counts follow.
    node_a.set_unsubscribe(b"project-1").unwrap();
    handshake(&node_a, &ipc_push, b"probe-a3");
    publish(&ipc_push, b"project-1", b"event");
    assert_eq!(until(&node_a, &ipc_push, b"end"), Vec::<Vec<u8>>::new());
    assert_eq!(until(&node_b, &ipc_push, b"end"), Vec::<Vec<u8>>::new());

    let snapshot = broker.stop();
    let c = &snapshot.counters;
    assert_eq!(
        c.xpub_malformed_notices + c.xpub_refused_notices,
        0,
        "{c:?}"
    );
    // Every notice each SUB sent, in the broker's count.
    assert_eq!((c.xpub_subscribes, c.xpub_unsubscribes), (9, 4), "{c:?}");
    // Once per message any SUB wanted, however many SUBs or prefixes
    // matched: probes and sentinels included, never project-3 or the
    // listener topic.
    assert!(c.xpub_delivered >= 7, "{c:?}");
    // project-3 and listener_host, and probes sent before their SUB's
    // notice was read.
    assert!(c.unmatched >= 2, "{c:?}");
}

#[test]
fn dealers_on_every_sub_endpoint_get_messages_from_every_pub_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    config.pub_bind = vec![
        "tcp://127.0.0.1:*".into(),
        format!("ipc://{}/pub", dir.path().display()),
    ];
    config.sub_bind = vec![
        format!("ipc://{}/sub", dir.path().display()),
        "tcp://127.0.0.1:*".into(),
    ];
    let broker = TestBroker::start_on(config, None);
    let ctx = zmq::Context::new();
    let subs: Vec<RawSubscriber> = broker
        .sub_endpoints
        .iter()
        .map(|endpoint| {
            let sub = RawSubscriber::connect(&ctx, endpoint);
            sub.subscribe("prefix", b"net.");
            sub
        })
        .collect();
    for (i, endpoint) in broker.pub_endpoints.iter().enumerate() {
        let push = publisher(&ctx, endpoint);
        publish(&push, format!("net.{i}").as_bytes(), b"x");
        publish(&push, b"other", b"x");
    }
    for sub in &subs {
        let mut topics: Vec<Vec<u8>> = (0..2).map(|_| sub.recv_message().1).collect();
        topics.sort();
        assert_eq!(topics, [b"net.0".to_vec(), b"net.1".to_vec()]);
    }
}

#[test]
fn the_xpub_front_refuses_curve_and_endpoint_lists_parse() {
    let config = zbroker::config::Config::from_toml(
        "pub_bind = [\"ipc:///tmp/a\", \"tcp://127.0.0.1:1\"]\nxpub_bind = \"tcp://127.0.0.1:2\"\n",
    )
    .unwrap();
    assert_eq!(config.pub_bind.len(), 2);
    assert_eq!(config.xpub_bind, ["tcp://127.0.0.1:2"]);
    let printed = config.to_toml().unwrap();
    assert_eq!(
        zbroker::config::Config::from_toml(&printed).unwrap(),
        config
    );
    let mut with_curve = config;
    with_curve.curve = Some(zbroker::config::CurveConfig {
        secret_key_file: "k".into(),
        publisher_keys: "p".into(),
        subscriber_keys: "s".into(),
        cluster_peer_keys: None,
    });
    let err = with_curve.validate().unwrap_err().to_string();
    assert!(
        err.contains("--xpub-bind") && err.contains("CURVE"),
        "{err}"
    );
}

#[test]
fn what_a_slow_sub_loses_is_counted() {
    const MESSAGES: u64 = 20_000;
    let mut config = common::test_config();
    config.pub_bind = vec!["tcp://127.0.0.1:*".into()];
    config.sub_bind = vec!["tcp://127.0.0.1:*".into()];
    config.xpub_bind = vec!["tcp://127.0.0.1:*".into()];
    config.sub_hwm = 10;
    let broker = TestBroker::start_on(config, None);
    let ctx = zmq::Context::new();
    let push = publisher(&ctx, &broker.pub_endpoint);
    let slow = sub_socket(&ctx, &broker.xpub_endpoints[0], &[b"x"]);
    slow.set_rcvhwm(10).unwrap();
    assert!(handshake(&slow, &push, b"probe").is_empty());
    let payload = vec![0u8; 1024];
    for _ in 0..MESSAGES {
        publish(&push, b"x", &payload);
    }
    // Every message either reaches the SUB or is counted as dropped for it:
    // read until the two add up (the drop count is published every tick).
    let deadline = Instant::now() + DEADLINE;
    let mut received = 0u64;
    loop {
        while slow.recv_multipart(0).is_ok() {
            received += 1;
        }
        let drops = broker.stats.snapshot().xpub_sub_drops;
        if received + drops == MESSAGES && drops > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline && received + drops <= MESSAGES,
            "received {received} + dropped {drops} != {MESSAGES}"
        );
    }
}
