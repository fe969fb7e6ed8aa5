//! CURVE and topic ACLs, over tcp and ipc: only listed keys get through,
//! each only within its ACL; strangers, plaintext clients and clients with
//! the wrong broker key get nothing through and are counted. Also the CLI's
//! safety rails: no public bind without CURVE unless `--insecure`, `keygen`
//! never overwrites, and a bad key file is reported by file and line.
//!
//! Keys are made with `zbroker::auth::keygen` in a temporary directory:
//! the broker's, a publisher (`prefix:net.`), a subscriber (`prefix:net.`,
//! `exact:fence`), a watcher subscriber allowed everything (`prefix:`, so
//! that it would see any message that got through by mistake) and a key the
//! broker does not list.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::metrics::AUTH_DENIED;
use common::{DEADLINE, Reaped, TestBroker, Transport};
use zbroker::client::{
    ClientError, CurveKeys, Event, Message, Publisher, PublisherOptions, Subscriber,
    SubscriberOptions,
};
use zbroker::config::CurveConfig;
use zbroker::filter::Filter;
use zbroker::metrics::Snapshot;
use zbroker::protocol::ErrorCode;

/// How long a client that cannot get in waits for a confirmation: its
/// failure is the expected outcome, so this only sets the test's pace.
const REFUSED_CONFIRM: Duration = Duration::from_millis(500);

/// Key pairs and key lists in a temporary directory.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys { dir };
        for name in ["broker", "publisher", "subscriber", "watcher", "unknown"] {
            zbroker::auth::keygen(&keys.secret(name)).expect("keygen");
        }
        std::fs::write(
            keys.path("publishers.keys"),
            format!("# API workers\n{} prefix:net.\n", keys.public("publisher")),
        )
        .unwrap();
        std::fs::write(
            keys.path("subscribers.keys"),
            format!(
                "{}  prefix:net. exact:fence  # an agent\n{} prefix:\n",
                keys.public("subscriber"),
                keys.public("watcher")
            ),
        )
        .unwrap();
        keys
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn secret(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.key"))
    }

    fn public_file(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.key.pub"))
    }

    fn public(&self, name: &str) -> String {
        zbroker::auth::read_public_key(&self.public_file(name)).unwrap()
    }

    /// `name`'s credentials for a broker whose public key is `broker`'s.
    fn client(&self, name: &str) -> CurveKeys {
        CurveKeys::from_files(&self.public_file("broker"), &self.secret(name)).unwrap()
    }

    fn config(&self) -> CurveConfig {
        CurveConfig {
            secret_key_file: self.secret("broker"),
            publisher_keys: self.path("publishers.keys"),
            subscriber_keys: self.path("subscribers.keys"),
            cluster_peer_keys: None,
        }
    }

    fn cli_args(&self) -> Vec<String> {
        let path = |p: PathBuf| p.to_str().unwrap().to_string();
        vec![
            "--curve-secret-key".into(),
            path(self.secret("broker")),
            "--publisher-keys".into(),
            path(self.path("publishers.keys")),
            "--subscriber-keys".into(),
            path(self.path("subscribers.keys")),
        ]
    }
}

fn curve_broker(keys: &Keys, transport: Transport) -> TestBroker {
    let mut config = common::test_config();
    config.curve = Some(keys.config());
    TestBroker::start(transport, config)
}

fn filter(spec: &str) -> Filter {
    Filter::parse_cli(spec, 1024).unwrap()
}

fn subscriber(endpoint: &str, curve: Option<CurveKeys>, confirm: Duration) -> Subscriber {
    let options = SubscriberOptions {
        heartbeat: Duration::from_millis(200),
        broker_sub_timeout: common::test_config().sub_timeout,
        confirm_timeout: confirm,
        curve,
        ..SubscriberOptions::default()
    };
    Subscriber::connect_with(endpoint, options).unwrap()
}

/// A publisher; one that cannot get in has nothing to flush, so no linger.
fn publisher(endpoint: &str, curve: Option<CurveKeys>, admitted: bool) -> Publisher {
    let options = PublisherOptions {
        curve,
        linger: if admitted {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        },
        ..PublisherOptions::default()
    };
    Publisher::connect_with(endpoint, &options).unwrap()
}

fn next_message(sub: &mut Subscriber) -> Message {
    match sub.recv_timeout(DEADLINE).unwrap() {
        Some(Event::Message(m)) => m,
        Some(Event::Resync(why)) => panic!("unexpected resync: {why}"),
        None => panic!("no message within {DEADLINE:?}"),
    }
}

fn message(topic: &[u8], payload: &[u8], seq: u64) -> Message {
    Message {
        topic: topic.to_vec(),
        payload: payload.to_vec(),
        seq,
        gap: false,
    }
}

fn assert_refused(result: Result<(), ClientError>, what: &str) {
    match result {
        Err(ClientError::Refused {
            code: Some(ErrorCode::Unauthorized),
            ..
        }) => {}
        other => panic!("{what}: expected an unauthorized refusal, got {other:?}"),
    }
}

fn assert_timed_out(result: Result<(), ClientError>, what: &str) {
    match result {
        Err(ClientError::Timeout(_)) => {}
        other => panic!("{what}: expected no answer at all, got {other:?}"),
    }
}

#[test]
fn this_build_has_curve() {
    assert_eq!(zmq::has("curve"), Some(true), "libzmq without CURVE");
}

#[test]
fn listed_keys_work_end_to_end_within_their_acls() {
    let keys = Keys::new();
    for transport in common::TRANSPORTS {
        let broker = curve_broker(&keys, transport);
        let what = format!("{transport:?}");
        let mut sub = subscriber(
            &broker.sub_endpoint,
            Some(keys.client("subscriber")),
            DEADLINE,
        );
        for spec in ["prefix:net.a", "exact:fence", "pattern:net.*.port"] {
            if let Err(e) = sub.subscribe(&filter(spec)) {
                panic!(
                    "{what}: {spec} refused ({e:?}) for the key {} listed in\n{}\nbroker: {:#?}",
                    keys.public("subscriber"),
                    std::fs::read_to_string(keys.path("subscribers.keys")).unwrap(),
                    broker.stats.snapshot()
                );
            }
        }
        let outside = [
            "prefix:other",
            "prefix:",
            "prefix:ne",
            "exact:fence2",
            "pattern:*.a",
            "pattern:>",
        ];
        for spec in outside {
            assert_refused(sub.subscribe(&filter(spec)), &format!("{what} {spec}"));
        }
        let mut watcher = subscriber(&broker.sub_endpoint, Some(keys.client("watcher")), DEADLINE);
        watcher.subscribe(&filter("prefix:")).unwrap();

        let mut publisher = publisher(&broker.pub_endpoint, Some(keys.client("publisher")), true);
        publisher.publish(b"net.a.x", b"hello").unwrap();
        assert_eq!(
            next_message(&mut sub),
            message(b"net.a.x", b"hello", 1),
            "{what}"
        );
        assert_eq!(
            next_message(&mut watcher),
            message(b"net.a.x", b"hello", 1),
            "{what}"
        );

        // Outside the publisher's ACL: dropped. The watcher would get it
        // (seq 2) before the permitted message right after it.
        publisher.publish(b"other.x", b"must not arrive").unwrap();
        publisher.publish(b"net.a.fence", b"").unwrap();
        assert_eq!(
            next_message(&mut watcher),
            message(b"net.a.fence", b"", 2),
            "{what}"
        );
        assert_eq!(
            next_message(&mut sub),
            message(b"net.a.fence", b"", 2),
            "{what}"
        );

        // Counted in order: once the fence is, the publish before it is.
        let stats = broker.wait_for(DEADLINE, "the fence counted", |s| s.counters.published >= 2);
        assert_eq!(stats.counters.published, 2, "{what}");
        assert_eq!(stats.counters.unauthorized_publishes, 1, "{what}");
        assert_eq!(
            stats.counters.refused_unauthorized,
            outside.len() as u64,
            "{what}"
        );
        assert_eq!(
            stats.subscriptions, 4,
            "{what}: refused filters are not held"
        );
        assert_eq!(stats.connections.handshake_failures, 0, "{what}");
        assert_eq!(stats.connections.auth_denied, 0, "{what}");
    }
}

/// Waits until the broker has refused `failures` more handshakes (and
/// `denied` more keys) than in `before`.
fn wait_refused(broker: &TestBroker, before: &Snapshot, failures: u64, denied: u64) -> Snapshot {
    broker.wait_for(DEADLINE, "the refused handshakes counted", |s| {
        s.connections.handshake_failures >= before.connections.handshake_failures + failures
            && s.connections.auth_denied >= before.connections.auth_denied + denied
    })
}

/// Publishes a fence from the listed publisher and checks it is the next
/// and only thing the watcher (allowed everything) receives: nothing from
/// a refused client got in ahead of it.
fn fence_arrives_alone(broker: &TestBroker, keys: &Keys, watcher: &mut Subscriber, what: &str) {
    let mut honest = publisher(&broker.pub_endpoint, Some(keys.client("publisher")), true);
    honest.publish(b"net.fence", what.as_bytes()).unwrap();
    assert_eq!(
        next_message(watcher),
        message(b"net.fence", what.as_bytes(), 1),
        "{what}"
    );
    let stats = broker.wait_for(DEADLINE, "the fence counted", |s| s.counters.published >= 1);
    assert_eq!(
        stats.counters.published, 1,
        "{what}: only the fence was published"
    );
    assert_eq!(
        stats.subscribers, 1,
        "{what}: only the watcher is a subscriber"
    );
}

#[test]
fn unknown_keys_get_nothing_through() {
    let keys = Keys::new();
    for transport in common::TRANSPORTS {
        let broker = curve_broker(&keys, transport);
        let what = format!("{transport:?}");
        let mut watcher = subscriber(&broker.sub_endpoint, Some(keys.client("watcher")), DEADLINE);
        watcher.subscribe(&filter("prefix:")).unwrap();
        let before = broker.stats.snapshot();

        let mut stranger = subscriber(
            &broker.sub_endpoint,
            Some(keys.client("unknown")),
            REFUSED_CONFIRM,
        );
        assert_timed_out(
            stranger.subscribe(&filter("prefix:net.")),
            &format!("{what}: unknown subscriber"),
        );
        let mut rogue = publisher(&broker.pub_endpoint, Some(keys.client("unknown")), false);
        rogue.publish(b"net.rogue", b"must not arrive").unwrap();
        // Listed, but for the other endpoint.
        let mut wrong_side = subscriber(
            &broker.sub_endpoint,
            Some(keys.client("publisher")),
            REFUSED_CONFIRM,
        );
        assert_timed_out(
            wrong_side.subscribe(&filter("prefix:net.")),
            &format!("{what}: publisher key on the subscriber endpoint"),
        );
        let mut wrong_side_pub =
            publisher(&broker.pub_endpoint, Some(keys.client("subscriber")), false);
        wrong_side_pub
            .publish(b"net.wrong", b"must not arrive")
            .unwrap();

        let stats = wait_refused(&broker, &before, 4, 4);
        eprintln!(
            "{what}: {} handshake failures, {} keys denied",
            stats.connections.handshake_failures, stats.connections.auth_denied
        );
        fence_arrives_alone(&broker, &keys, &mut watcher, &what);
    }
}

#[test]
fn plaintext_and_wrong_broker_key_clients_get_nothing_through() {
    let keys = Keys::new();
    for transport in common::TRANSPORTS {
        let broker = curve_broker(&keys, transport);
        let what = format!("{transport:?}");
        let mut watcher = subscriber(&broker.sub_endpoint, Some(keys.client("watcher")), DEADLINE);
        watcher.subscribe(&filter("prefix:")).unwrap();
        let before = broker.stats.snapshot();

        let mut plain = subscriber(&broker.sub_endpoint, None, REFUSED_CONFIRM);
        assert_timed_out(
            plain.subscribe(&filter("prefix:net.")),
            &format!("{what}: plaintext subscriber"),
        );
        let mut plain_pub = publisher(&broker.pub_endpoint, None, false);
        plain_pub.publish(b"net.plain", b"must not arrive").unwrap();
        // A listed key, but the client trusts another server key: the
        // broker cannot read its hello.
        let misled = CurveKeys {
            server_public: keys.public("unknown"),
            ..keys.client("subscriber")
        };
        let mut misled = subscriber(&broker.sub_endpoint, Some(misled), REFUSED_CONFIRM);
        assert_timed_out(
            misled.subscribe(&filter("prefix:net.")),
            &format!("{what}: wrong broker key"),
        );

        let stats = wait_refused(&broker, &before, 3, 0);
        // All fail before any key is presented to the ZAP handler.
        assert_eq!(
            stats.connections.auth_denied, before.connections.auth_denied,
            "{what}"
        );
        fence_arrives_alone(&broker, &keys, &mut watcher, &what);
    }
}

// ----------------------------------------------------------------- the CLI

/// Runs `zbroker ARGS` to completion, failing (and killing it) if it is
/// still running after `DEADLINE`: a broker that wrongly starts must not
/// hang the test.
fn run_to_exit(args: &[&str]) -> Output {
    common::run_to_exit(&mut common::zbroker(args), DEADLINE)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn public_binds_need_curve_or_insecure() {
    let keys = Keys::new();
    let public = format!("tcp://0.0.0.0:{}", common::free_port());
    for flag in ["--pub-bind", "--sub-bind"] {
        let out = run_to_exit(&["run", flag, &public]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {public}: {err}");
        assert!(err.contains("--insecure") && err.contains(flag), "{err}");
    }
    // Accepted with --insecure: checked only, so nothing is exposed.
    let out = run_to_exit(&["run", "--pub-bind", &public, "--insecure", "--check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("configuration OK"));
    // And with CURVE, no --insecure is needed.
    let mut args = vec!["run", "--check-config", "--pub-bind", &public];
    let curve = keys.cli_args();
    args.extend(curve.iter().map(String::as_str));
    let out = run_to_exit(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn keygen_writes_a_private_secret_and_never_overwrites_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.key");
    let path_str = path.to_str().unwrap();
    let public_path = dir.path().join("agent.key.pub");

    let out = run_to_exit(&["keygen", path_str]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout).trim().to_string();
    assert_eq!(printed.len(), 40, "prints the Z85 public key: {printed:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the secret key is private");
    assert_eq!(
        zbroker::auth::read_public_key(&public_path).unwrap(),
        printed
    );
    assert_eq!(
        zbroker::auth::read_secret_key(&path).unwrap().public,
        printed,
        "the two files are one pair"
    );

    let secret_before = std::fs::read(&path).unwrap();
    let public_before = std::fs::read(&public_path).unwrap();
    let out = run_to_exit(&["keygen", path_str]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(path_str),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), secret_before);
    assert_eq!(std::fs::read(&public_path).unwrap(), public_before);
}

/// `keygen PATH` writes two files; a `PATH.pub` already there (say, a
/// client's public key copied in for the key list) must survive as well as
/// a `PATH` would.
#[test]
fn keygen_never_overwrites_an_existing_public_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.key");
    let public_path = dir.path().join("agent.key.pub");
    let existing = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7\n";
    std::fs::write(&public_path, existing).unwrap();
    let out = run_to_exit(&["keygen", path.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&public_path).unwrap(),
        existing,
        "keygen replaced an existing {} (exit {:?})",
        public_path.display(),
        out.status
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Every key `zbroker keygen` writes must be usable: in its own files and
/// in a key list. `#` is one of Z85's 85 characters (about 4 keys in 10
/// contain one), and key files also use it for comments.
#[test]
fn keys_with_a_hash_character_can_be_read_back() {
    let dir = tempfile::tempdir().unwrap();
    // About 4 keys in 10 contain a '#'; 1000 tries cannot all miss.
    let (path, public) = (0..1000)
        .find_map(|i| {
            let path = dir.path().join(format!("k{i}.key"));
            let public = zbroker::auth::keygen(&path).expect("keygen");
            public.contains('#').then_some((path, public))
        })
        .expect("a public key with '#'");
    let public_path = PathBuf::from(format!("{}.pub", path.display()));
    let read_back = zbroker::auth::read_public_key(&public_path);
    let listed = zbroker::auth::KeyList::parse(&format!("{public} prefix:\n"), 1024);
    let secret_back = zbroker::auth::read_secret_key(&path);
    assert!(
        matches!(&read_back, Ok(k) if *k == public)
            && listed.as_ref().is_ok_and(|l| l.contains(&public))
            && matches!(&secret_back, Ok(k) if k.public == public),
        "the public key {public} (Z85, which includes '#') is not read back: \
         {} -> {read_back:?}; in a key list -> {:?}; its secret key file -> {:?}",
        public_path.display(),
        listed.map(|l| l.len()),
        secret_back.map(|k| k.public)
    );
}

#[test]
fn check_config_names_the_bad_key_file_and_line() {
    let keys = Keys::new();
    let listed = keys.public("publisher");
    let cases: [(&str, String, usize, &str); 4] = [
        (
            "a key that is not Z85",
            format!("# workers\n{listed} prefix:net.\nnot-a-key prefix:net.\n"),
            3,
            "Z85",
        ),
        (
            "a key with no filters",
            format!("\n{listed}\n"),
            2,
            "prefix:",
        ),
        (
            "an unknown filter kind",
            format!("{listed} glob:net.*\n"),
            1,
            "glob:net.*",
        ),
        (
            "a key one character short",
            format!("{}  prefix:\n", &listed[..39]),
            1,
            "Z85",
        ),
    ];
    for (what, contents, line, hint) in cases {
        let bad = keys.path("bad.keys");
        std::fs::write(&bad, contents).unwrap();
        for flag in ["--publisher-keys", "--subscriber-keys"] {
            let mut curve = keys.cli_args();
            let i = curve.iter().position(|a| a == flag).unwrap();
            curve[i + 1] = bad.to_str().unwrap().to_string();
            let mut args = vec!["run", "--check-config"];
            args.extend(curve.iter().map(String::as_str));
            let out = run_to_exit(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} in {flag}: {err}");
            let location = format!("{}:{line}", bad.display());
            assert!(
                err.contains(&location) && err.contains(hint),
                "{what} in {flag}: expected {location} and {hint:?} in {err}"
            );
        }
    }
    let mut curve = keys.cli_args();
    curve[1] = keys.path("missing.key").to_str().unwrap().to_string();
    let mut args = vec!["run", "--check-config"];
    args.extend(curve.iter().map(String::as_str));
    let out = run_to_exit(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("missing.key"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn curve_from_the_command_line() {
    let keys = Keys::new();
    let pub_endpoint = format!("ipc://{}", keys.path("pub").display());
    let sub_endpoint = format!("ipc://{}", keys.path("sub").display());
    let mut args = vec!["--pub-bind", &pub_endpoint, "--sub-bind", &sub_endpoint];
    let curve = keys.cli_args();
    args.extend(curve.iter().map(String::as_str));
    let broker = common::ChildBroker::start(&args);

    let server_key = keys.public_file("broker");
    let server_key = server_key.to_str().unwrap();
    let own = |name: &str| keys.secret(name).to_str().unwrap().to_string();
    let subscriber_key = own("subscriber");
    let mut sub = Reaped(
        common::zbroker(&["sub", "--server-key", server_key, "--key", &subscriber_key])
            .args([&sub_endpoint, "prefix:net.", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Its "subscribed" line is the broker's confirmation.
    common::wait_for_line(&common::stderr_lines(&mut sub.0), "subscribed");

    let publisher_key = own("publisher");
    let out = run_to_exit(&[
        "pub",
        "--server-key",
        server_key,
        "--key",
        &publisher_key,
        &pub_endpoint,
        "net.cli",
        "over CURVE",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // It exits once it got its one message.
    common::wait_exit(&mut sub.0, DEADLINE);
    let mut printed = String::new();
    sub.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert_eq!(printed, "net.cli over CURVE\n");

    // A filter outside the key's ACL: refused, and the CLI says why.
    let out = run_to_exit(&[
        "sub",
        "--server-key",
        server_key,
        "--key",
        &subscriber_key,
        &sub_endpoint,
        "prefix:other.",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );
    drop(broker);
}

/// A client the broker refuses retries by itself, forever (libzmq
/// reconnects), and anyone can connect; so refusals must be counted without
/// a log line each, as the broker already does for malformed input.
#[test]
fn refused_keys_do_not_flood_the_log() {
    const CLIENTS: usize = 200;
    let keys = Keys::new();
    let pub_endpoint = format!("ipc://{}", keys.path("pub").display());
    let sub_endpoint = format!("ipc://{}", keys.path("sub").display());
    let mut args = vec![
        "--pub-bind",
        &pub_endpoint,
        "--sub-bind",
        &sub_endpoint,
        "--metrics-bind",
        "127.0.0.1:0",
    ];
    let curve = keys.cli_args();
    args.extend(curve.iter().map(String::as_str));
    let broker = common::ChildBroker::start(&args);

    let ctx = zmq::Context::new();
    let stranger = keys.client("unknown");
    let decode = |k: &str| zmq::z85_decode(k).unwrap();
    let sockets: Vec<zmq::Socket> = (0..CLIENTS)
        .map(|_| {
            let socket = ctx.socket(zmq::DEALER).unwrap();
            socket.set_linger(0).unwrap();
            socket
                .set_curve_serverkey(&decode(&stranger.server_public))
                .unwrap();
            socket
                .set_curve_publickey(&decode(&stranger.public))
                .unwrap();
            socket
                .set_curve_secretkey(&decode(&stranger.secret))
                .unwrap();
            socket.connect(&sub_endpoint).unwrap();
            socket
        })
        .collect();
    broker.wait_for("every refusal counted", |m| {
        m.get(AUTH_DENIED) >= CLIENTS as u64
    });
    drop(sockets);
    let lines = broker.log_since_startup();
    eprintln!(
        "{} log lines for {CLIENTS} refused clients, e.g. {:?}",
        lines.len(),
        lines.last()
    );
    assert!(
        lines.len() < CLIENTS / 10,
        "{} log lines for {CLIENTS} refused clients: refusals are logged one by one",
        lines.len()
    );
}
