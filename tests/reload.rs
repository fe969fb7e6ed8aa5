//! SIGHUP reloads the key lists of a running CURVE broker (a child process,
//! over real sockets): a key added gets in, a key removed loses its
//! subscriptions with a notice, a filter narrowed is cut alone, a broken
//! list changes nothing, and a subscriber the reload does not concern sees
//! nothing of it: no notice, no gap.

mod common;

use std::process::Command;

use common::keys::KeyDir;
use common::{ChildBroker, Metrics};

/// The key pairs of the test: the broker's, a publisher's and four
/// subscribers'.
fn keys() -> KeyDir {
    let keys = KeyDir::new(&["broker", "publisher", "keep", "gone", "narrowed", "late"]);
    keys.write(
        "publishers.keys",
        &format!("{} prefix:net.\n", keys.public("publisher")),
    );
    write_subscribers(
        &keys,
        &[
            ("keep", "prefix:net."),
            ("gone", "prefix:net."),
            ("narrowed", "prefix:net."),
        ],
    );
    keys
}

fn write_subscribers(keys: &KeyDir, entries: &[(&str, &str)]) {
    let text: String = entries
        .iter()
        .map(|(name, filters)| format!("{} {filters}\n", keys.public(name)))
        .collect();
    keys.write("subscribers.keys", &text);
}

fn args(keys: &KeyDir) -> Vec<String> {
    vec![
        "--pub-bind".into(),
        "tcp://127.0.0.1:0".into(),
        "--sub-bind".into(),
        "tcp://127.0.0.1:0".into(),
        "--metrics-bind".into(),
        "127.0.0.1:0".into(),
        "--curve-secret-key".into(),
        keys.secret_arg("broker"),
        "--publisher-keys".into(),
        keys.path("publishers.keys").to_str().unwrap().into(),
        "--subscriber-keys".into(),
        keys.path("subscribers.keys").to_str().unwrap().into(),
    ]
}

/// A protocol v1 subscriber over a raw DEALER, to see every frame.
struct Sub(zmq::Socket);

impl Sub {
    fn call(&self, frames: &[&[u8]]) -> Vec<Vec<u8>> {
        self.0.send_multipart(frames, 0).unwrap();
        self.recv()
    }

    fn recv(&self) -> Vec<Vec<u8>> {
        self.0
            .recv_multipart(0)
            .unwrap_or_else(|e| panic!("nothing from the broker within the deadline: {e}"))
    }

    fn subscribe(&self, kind: &str, filter: &str) -> Vec<Vec<u8>> {
        self.call(&[b"SUB", kind.as_bytes(), filter.as_bytes()])
    }

    /// The next message's (seq, topic, payload); fails on anything else.
    fn message(&self) -> (u64, Vec<u8>, Vec<u8>) {
        let frames = self.recv();
        let header = &frames[0];
        assert!(
            header.starts_with(b"MSG"),
            "expected a message, got {frames:?}"
        );
        let seq = u64::from_be_bytes(header[3..11].try_into().unwrap());
        (seq, header[11..].to_vec(), frames[1].clone())
    }

    /// Everything up to the PONG of a PING sent now: what the broker had
    /// routed to this subscriber before it read the PING.
    fn until_pong(&self) -> Vec<Vec<Vec<u8>>> {
        self.0.send(&b"PING"[..], 0).unwrap();
        let mut before = Vec::new();
        loop {
            let frames = self.recv();
            if frames == [b"PONG".to_vec()] {
                return before;
            }
            before.push(frames);
        }
    }
}

fn ok(frames: &[Vec<u8>]) -> bool {
    frames.first().is_some_and(|f| f == b"OK")
}

fn hup(broker: &ChildBroker) {
    let status = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn publish(publisher: &zmq::Socket, topic: &str, payload: &str) {
    publisher
        .send_multipart([topic.as_bytes(), payload.as_bytes()], 0)
        .unwrap();
}

#[test]
fn sighup_reloads_the_key_lists_without_disturbing_anyone_else() {
    if !zmq::has("curve").unwrap_or(false) {
        panic!("this libzmq has no CURVE");
    }
    let keys = keys();
    let broker = ChildBroker::start_with(&args(&keys), Default::default());
    let ctx = zmq::Context::new();
    let sub_ep = broker.sub_endpoint.clone();
    let dealer = |name: &str| Sub(keys.socket(&ctx, zmq::DEALER, name, "broker", &sub_ep));
    let keep = dealer("keep");
    let gone = dealer("gone");
    let narrowed = dealer("narrowed");
    assert!(ok(&keep.subscribe("prefix", "net.")));
    assert!(ok(&gone.subscribe("prefix", "net.")));
    assert!(ok(&narrowed.subscribe("prefix", "net.")));
    assert!(ok(&narrowed.subscribe("exact", "net.a")));
    // The Rust client, for the key that will be removed.
    let curve =
        zbroker::client::CurveKeys::from_files(&keys.path("broker.key.pub"), &keys.secret("gone"))
            .unwrap();
    let mut gone_client = zbroker::client::Subscriber::connect_with(
        &sub_ep,
        zbroker::client::SubscriberOptions {
            curve: Some(curve),
            ..Default::default()
        },
    )
    .unwrap();
    gone_client
        .subscribe(&zbroker::filter::Filter::parse_cli("prefix:net.", 64).unwrap())
        .unwrap();
    let publisher = keys.socket(&ctx, zmq::PUSH, "publisher", "broker", &broker.pub_endpoint);
    publish(&publisher, "net.a", "1");
    for sub in [&keep, &gone, &narrowed] {
        assert_eq!(sub.message(), (1, b"net.a".to_vec(), b"1".to_vec()));
    }

    // gone leaves the list, narrowed may keep exact:net.a only, late joins.
    write_subscribers(
        &keys,
        &[
            ("keep", "prefix:net."),
            ("narrowed", "exact:net.a"),
            ("late", "prefix:net."),
        ],
    );
    hup(&broker);
    broker.wait_for_log("key lists reloaded");
    let revoked = |sub: &Sub| {
        let frames = sub.recv();
        assert_eq!(frames[0], b"ERR", "expected a notice, got {frames:?}");
        assert_eq!(frames[1], b"unauthorized");
        assert!(
            frames[2].starts_with(b"revoked: prefix:net."),
            "{:?}",
            String::from_utf8_lossy(&frames[2])
        );
    };
    revoked(&gone);
    revoked(&narrowed);
    // The Rust client drops the revoked filter (it would not re-subscribe
    // it); the message routed before the cut arrives first.
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while gone_client.filters().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the Rust client kept a revoked filter"
        );
        let _ = gone_client
            .recv_timeout(std::time::Duration::from_millis(20))
            .unwrap();
    }

    publish(&publisher, "net.a", "2");
    publish(&publisher, "net.b", "3");
    publish(&publisher, "net.a", "4");
    // keep saw nothing of the reload: every message, seqs unbroken.
    assert_eq!(keep.message(), (2, b"net.a".to_vec(), b"2".to_vec()));
    assert_eq!(keep.message(), (3, b"net.b".to_vec(), b"3".to_vec()));
    assert_eq!(keep.message(), (4, b"net.a".to_vec(), b"4".to_vec()));
    assert!(
        keep.until_pong().is_empty(),
        "keep got more than its messages"
    );
    // narrowed gets net.a only; gone gets nothing.
    assert_eq!(narrowed.message(), (2, b"net.a".to_vec(), b"2".to_vec()));
    assert_eq!(narrowed.message(), (3, b"net.a".to_vec(), b"4".to_vec()));
    assert!(narrowed.until_pong().is_empty());
    assert!(gone.until_pong().is_empty(), "gone still gets messages");
    let refused = gone.subscribe("prefix", "net.");
    assert_eq!(refused[..2], [b"ERR".to_vec(), b"unauthorized".to_vec()]);

    // The added key gets in and subscribes.
    let late = dealer("late");
    assert!(ok(&late.subscribe("prefix", "net.")));
    publish(&publisher, "net.c", "5");
    assert_eq!(late.message(), (1, b"net.c".to_vec(), b"5".to_vec()));
    assert_eq!(keep.message(), (5, b"net.c".to_vec(), b"5".to_vec()));

    // A broken list is refused whole: the running lists stay.
    keys.write("subscribers.keys", "this is not a key\n");
    hup(&broker);
    broker.wait_for_log("key lists not reloaded");
    publish(&publisher, "net.d", "6");
    assert_eq!(keep.message(), (6, b"net.d".to_vec(), b"6".to_vec()));
    assert_eq!(late.message(), (2, b"net.d".to_vec(), b"6".to_vec()));
    let late_again = dealer("late");
    assert!(
        ok(&late_again.subscribe("prefix", "net.")),
        "the old lists no longer admit late"
    );

    let metrics: Metrics = broker.wait_for("the reloads counted", |m| {
        m.get("zbroker_key_reloads_total{outcome=\"refused\"}") == 1
    });
    assert_eq!(
        metrics.get("zbroker_key_reloads_total{outcome=\"installed\"}"),
        1
    );
    assert_eq!(metrics.get("zbroker_filters_revoked_total"), 3);
    broker.assert_alive("after two reloads");
}
