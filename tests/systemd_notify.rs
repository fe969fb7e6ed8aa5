//! systemd readiness (src/server/notify.rs): `zbroker run` started the way
//! systemd starts a `Type=notify` service, with `NOTIFY_SOCKET` naming a
//! datagram socket the test binds, says `READY=1` only once every endpoint
//! accepts connections, `STOPPING=1` when it stops, and nothing at all when
//! an endpoint cannot be bound.

mod common;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{DEADLINE, RawSubscriber, Reaped, stderr_lines, wait_exit, zbroker};

/// The service manager's end: a datagram socket in a temporary directory.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next notification, waiting up to `DEADLINE`.
    fn recv(&self) -> String {
        self.socket
            .set_read_timeout(Some(DEADLINE))
            .expect("set a receive timeout");
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {DEADLINE:?}: {e}"));
        String::from_utf8(buf[..n].to_vec()).expect("a notification is text")
    }

    /// A notification already queued, if any. Datagrams on a Unix socket
    /// are queued at the receiver when `send` returns, so after the sender
    /// has exited this sees everything it sent.
    fn queued(&self) -> Option<String> {
        self.socket.set_nonblocking(true).expect("set nonblocking");
        let mut buf = [0u8; 4096];
        let got = match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => panic!("read the notify socket: {e}"),
        };
        self.socket.set_nonblocking(false).expect("set blocking");
        got
    }
}

/// `KEY=value` lines of a notification.
fn fields(notification: &str) -> HashMap<&str, &str> {
    notification
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect()
}

/// `serving; publishers at A, B; subscribers at C`: what -> endpoints.
fn endpoints_in_status(status: &str) -> HashMap<String, Vec<String>> {
    let mut parts = status.split("; ");
    assert_eq!(parts.next(), Some("serving"), "STATUS={status}");
    parts
        .map(|part| {
            let (what, list) = part
                .split_once(" at ")
                .unwrap_or_else(|| panic!("not `WHAT at ENDPOINTS`: {part:?} in {status:?}"));
            (
                what.to_string(),
                list.split(", ").map(str::to_string).collect(),
            )
        })
        .collect()
}

/// Connects to `endpoint` (tcp, ipc or the metrics URL) once; the broker
/// need not answer, the kernel accepts on a listening socket.
fn connects(endpoint: &str) -> std::io::Result<()> {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        return UnixStream::connect(path).map(drop);
    }
    let address = endpoint
        .strip_prefix("tcp://")
        .or_else(|| {
            endpoint
                .strip_prefix("http://")
                .and_then(|rest| rest.strip_suffix("/metrics"))
        })
        .unwrap_or_else(|| panic!("unexpected endpoint {endpoint}"));
    let address = address.parse().expect("a socket address");
    TcpStream::connect_timeout(&address, DEADLINE).map(drop)
}

fn sigterm(pid: u32) {
    let pid = pid.to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
}

#[test]
fn ready_is_sent_once_every_endpoint_accepts_connections_and_stopping_on_sigterm() {
    let notify = NotifySocket::bind();
    let ipc_dir = tempfile::tempdir().expect("create a temp dir");
    let ipc = format!("ipc://{}/pub", ipc_dir.path().display());
    let mut child = Reaped(
        zbroker(&[
            "run",
            "--pub-bind",
            "tcp://127.0.0.1:0",
            "--pub-bind",
            &ipc,
            "--sub-bind",
            "tcp://127.0.0.1:0",
            "--xpub-bind",
            "tcp://127.0.0.1:0",
            "--metrics-bind",
            "127.0.0.1:0",
            "--linger",
            "100ms",
        ])
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start zbroker"),
    );
    // Drained on a thread of its own, so the broker never blocks on it.
    let log = stderr_lines(&mut child.0);

    // The first thing it says is READY=1: nothing came before it.
    let ready = notify.recv();
    let ready_fields = fields(&ready);
    assert_eq!(ready_fields.get("READY"), Some(&"1"), "{ready:?}");
    let status = ready_fields.get("STATUS").expect("a STATUS line");
    // Every endpoint accepts a connection now, before anything else is
    // waited for.
    let endpoints = endpoints_in_status(status);
    for (what, list) in &endpoints {
        for endpoint in list {
            if let Err(e) = connects(endpoint) {
                panic!("{what} endpoint {endpoint} refused a connection after READY=1: {e}");
            }
        }
    }
    let publishers = &endpoints["publishers"];
    assert_eq!(publishers.len(), 2, "{status}");
    assert!(publishers[0].starts_with("tcp://127.0.0.1:"), "{status}");
    assert!(!publishers[0].ends_with(":0"), "ports resolved: {status}");
    assert_eq!(publishers[1], ipc, "{status}");
    assert_eq!(endpoints["subscribers"].len(), 1, "{status}");
    assert_eq!(endpoints["SUB sockets"].len(), 1, "{status}");
    assert_eq!(endpoints["metrics"].len(), 1, "{status}");

    // And it serves: a subscriber's command is answered.
    let ctx = zmq::Context::new();
    let subscriber = RawSubscriber::connect(&ctx, &endpoints["subscribers"][0]);
    subscriber.subscribe("prefix", b"a.");

    sigterm(child.0.id());
    let stopping = notify.recv();
    let stopping_fields = fields(&stopping);
    assert_eq!(stopping_fields.get("STOPPING"), Some(&"1"), "{stopping:?}");
    assert!(
        stopping_fields
            .get("STATUS")
            .is_some_and(|s| s.starts_with("stopping")),
        "{stopping:?}"
    );
    drop(subscriber); // the linger ends early once no subscriber is left
    let exit = wait_exit(&mut child.0, DEADLINE);
    assert!(exit.success(), "exit status {exit}");
    assert_eq!(notify.queued(), None, "nothing after STOPPING=1");
    let lines: Vec<String> = log.try_iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("broker stopped")),
        "{lines:#?}"
    );
}

#[test]
fn a_broker_that_cannot_bind_never_says_ready() {
    let notify = NotifySocket::bind();
    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("its address"));
    // The publishers' endpoint binds, then the subscribers' fails.
    let output = common::run_to_exit(
        zbroker(&[
            "run",
            "--pub-bind",
            "tcp://127.0.0.1:0",
            "--sub-bind",
            &endpoint,
        ])
        .env("NOTIFY_SOCKET", &notify.path),
        DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it started: {stderr}");
    assert!(
        stderr.contains(&endpoint) && stderr.contains("in use"),
        "says which endpoint and why: {stderr}"
    );
    assert_eq!(notify.queued(), None, "sent a notification: {stderr}");
}

#[test]
fn check_config_binds_nothing_and_says_nothing() {
    let notify = NotifySocket::bind();
    let output = common::run_to_exit(
        zbroker(&["run", "--check-config"]).env("NOTIFY_SOCKET", &notify.path),
        DEADLINE,
    );
    assert!(output.status.success());
    assert_eq!(notify.queued(), None);
}
