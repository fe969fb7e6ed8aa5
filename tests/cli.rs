//! The `zbroker` binary: run with endpoints from the environment, pub and sub
//! as an operator would use them, and a clean stop on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, ChildBroker, Reaped, stderr_lines, wait_exit, wait_for_line};

#[test]
fn run_pub_sub_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_endpoint, sub_endpoint) = common::endpoints(common::Transport::Ipc, &dir);
    let mut broker = ChildBroker::start_with_env(
        &[],
        &[
            ("ZBROKER_PUB_BIND", &pub_endpoint),
            ("ZBROKER_SUB_BIND", &sub_endpoint),
        ],
    );
    let lines = &broker.startup_log;
    assert!(
        lines.iter().any(|l| l.contains(&pub_endpoint)),
        "logs what it bound: {lines:#?}"
    );

    let mut sub = Reaped(
        Command::new(BIN)
            .args([
                "sub",
                &sub_endpoint,
                "pattern:net.*.port",
                "exact:done",
                "--count",
                "2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let sub_log = stderr_lines(&mut sub.0);
    wait_for_line(&sub_log, "subscribed");

    let status = Command::new(BIN)
        .args(["pub", &pub_endpoint, "net.a.port", "up"])
        .status()
        .unwrap();
    assert!(status.success());
    let mut from_stdin = Command::new(BIN)
        .args(["pub", &pub_endpoint, "done"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    from_stdin
        .stdin
        .take()
        .unwrap()
        .write_all(b"payload from stdin")
        .unwrap();
    assert!(wait_exit(&mut from_stdin, Duration::from_secs(20)).success());

    assert!(wait_exit(&mut sub.0, Duration::from_secs(20)).success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut sub.0.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out, "net.a.port up\ndone payload from stdin\n");

    let status = broker.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let lines = broker.wait_for_log("broker stopped");
    assert!(lines.last().unwrap().contains("published=2"), "{lines:#?}");
}

#[test]
fn bad_arguments_and_busy_endpoints_explain_themselves() {
    let out = Command::new(BIN)
        .args(["sub", "tcp://127.0.0.1:1", "glob:x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exact:TOPIC, prefix:TOPIC or pattern:TOPIC")
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", taken.local_addr().unwrap());
    let out = Command::new(BIN)
        .args([
            "run",
            "--pub-bind",
            &endpoint,
            "--sub-bind",
            "tcp://127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another broker") && stderr.contains("--pub-bind"),
        "{stderr}"
    );
}
