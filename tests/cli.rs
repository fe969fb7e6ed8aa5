//! The `zbroker` binary: run with endpoints from the environment, pub and sub
//! as an operator would use them, and a clean stop on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_zbroker");

/// Kills the child on drop so a failing test leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Streams a child's stderr lines into a channel.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a stderr line containing `needle`; returns every line seen.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no line containing {needle:?}; got {seen:#?}"),
        }
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_pub_sub_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_endpoint, sub_endpoint) = common::endpoints(common::Transport::Ipc, &dir);
    let mut broker = Reaped(
        Command::new(BIN)
            .arg("run")
            .env("ZBROKER_PUB_BIND", &pub_endpoint)
            .env("ZBROKER_SUB_BIND", &sub_endpoint)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let broker_log = stderr_lines(&mut broker.0);
    let lines = wait_for_line(&broker_log, "subscribers connect");
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
    assert!(wait_with_timeout(&mut from_stdin, Duration::from_secs(20)).success());

    assert!(wait_with_timeout(&mut sub.0, Duration::from_secs(20)).success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut sub.0.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out, "net.a.port up\ndone payload from stdin\n");

    let pid = broker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_with_timeout(&mut broker.0, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let lines = wait_for_line(&broker_log, "broker stopped");
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
