//! A cluster under CURVE: peer links are CURVE too, each link checks its
//! peer's public key, and only brokers whose keys `--cluster-peer-keys`
//! lists may link in. Two brokers with their own key pairs carry a message
//! from a CURVE publisher on one to a CURVE subscriber on the other; a third
//! broker whose key is not listed is refused at the handshake and gets no
//! interest, no messages.

mod common;

use common::keys::KeyDir;
use common::{ChildBroker, DEADLINE, Metrics, free_port};

fn broker(keys: &KeyDir, name: &str, cluster: &str, peers: &str, peer_keys: &str) -> ChildBroker {
    let publishers = keys.write(
        "publishers.keys",
        &format!("{} prefix:\n", keys.public("publisher")),
    );
    let subscribers = keys.write(
        "subscribers.keys",
        &format!("{} prefix:\n", keys.public("subscriber")),
    );
    ChildBroker::start(&[
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
        "--metrics-bind",
        "127.0.0.1:0",
        "--curve-secret-key",
        &keys.secret_arg(name),
        "--publisher-keys",
        &publishers,
        "--subscriber-keys",
        &subscribers,
        "--cluster-peer-keys",
        peer_keys,
        "--cluster-bind",
        cluster,
        "--cluster-peers",
        peers,
        "--cluster-id",
        name,
        "--cluster-ping-interval",
        "100ms",
        "--cluster-peer-timeout",
        "1s",
    ])
}

fn peer_up(m: &Metrics, peer: &str) -> Option<u64> {
    m.0.get(&format!("zbroker_peer_up{{peer=\"{peer}\"}}"))
        .copied()
}

#[test]
fn peer_links_use_curve_and_admit_only_listed_brokers() {
    let keys = KeyDir::new(&["a", "b", "stranger", "publisher", "subscriber"]);
    let (a_ep, b_ep, s_ep) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    // a and b list each other; the stranger lists a (and itself), but a
    // does not list the stranger.
    let listed = keys.write(
        "peers.keys",
        &format!("{} {a_ep}\n{} {b_ep}\n", keys.public("a"), keys.public("b")),
    );
    let strangers = keys.write(
        "stranger-peers.keys",
        &format!(
            "{} {a_ep}\n{} {s_ep}\n",
            keys.public("a"),
            keys.public("stranger")
        ),
    );
    let peers = format!("{a_ep},{b_ep}");
    let a = broker(&keys, "a", &a_ep, &peers, &listed);
    let b = broker(&keys, "b", &b_ep, &peers, &listed);
    for (me, other) in [(&a, "b"), (&b, "a")] {
        me.wait_for("the CURVE link up", |m| peer_up(m, other) == Some(1));
    }

    let ctx = zmq::Context::new();
    let sub = keys.socket(&ctx, zmq::DEALER, "subscriber", "b", &b.sub_endpoint);
    sub.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    sub.send_multipart([&b"SUB"[..], b"prefix", b"net."], 0)
        .unwrap();
    assert_eq!(sub.recv_multipart(0).unwrap()[0], b"OK");
    let publisher = keys.socket(&ctx, zmq::PUSH, "publisher", "a", &a.pub_endpoint);
    // A probe proves b's interest reached a over the CURVE link.
    sub.set_rcvtimeo(50).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing crossed the CURVE link"
        );
        publisher
            .send_multipart([&b"net.probe"[..], b"p"], 0)
            .unwrap();
        if sub.recv_multipart(0).is_ok() {
            break;
        }
    }
    sub.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    for i in 0..20 {
        publisher
            .send_multipart([&b"net.x"[..], format!("{i}").as_bytes()], 0)
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let frames = sub.recv_multipart(0).expect("the messages cross");
        if frames[0].ends_with(b"net.x") {
            got.push(String::from_utf8(frames[1].clone()).unwrap());
        }
    }
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(got, expected);

    // The stranger's link to a is refused by a's ZAP handler: a serves
    // only b, and the stranger never hears from a.
    let before = a.metrics().get("zbroker_auth_denied_total");
    let stranger = broker(
        &keys,
        "stranger",
        &s_ep,
        &format!("{a_ep},{s_ep}"),
        &strangers,
    );
    a.wait_for("the stranger refused", |m| {
        m.get("zbroker_auth_denied_total") > before
    });
    let m = a.metrics();
    assert_eq!(
        m.get("zbroker_cluster_peers_served"),
        1,
        "a serves a link it should not"
    );
    let s = stranger.metrics();
    assert_ne!(
        peer_up(&s, &a_ep),
        Some(1),
        "the stranger's link to a is up"
    );
    assert_ne!(peer_up(&s, "a"), Some(1), "the stranger's link to a is up");
}
