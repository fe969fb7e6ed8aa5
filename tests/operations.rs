//! Operating the broker: a TOML config file with flags and environment on
//! top, `--check-config`, the Prometheus endpoint and `zbroker stats`.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::metrics::{
    DELIVERED, MALFORMED_PUBLISHES, PUB_CONNECTIONS, SUBSCRIBERS, SUBSCRIPTIONS,
};
use common::{ChildBroker, DEADLINE, Metrics, run_to_exit, zbroker};

/// `zbroker ARGS` run to completion (bounded).
fn zbroker_run(args: &[&str]) -> Output {
    run_to_exit(&mut zbroker(args), DEADLINE)
}

fn check_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = zbroker(&["run", "--check-config"]);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    run_to_exit(&mut command, DEADLINE)
}

#[test]
fn flags_override_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zbroker.toml");
    std::fs::write(
        &file,
        "pub_bind = \"tcp://127.0.0.1:7001\"\nsub_bind = \"tcp://127.0.0.1:7002\"\n\
         sub_timeout = \"30s\"\n[queue]\npolicy = \"drop-old\"\nmax_messages = 77\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = check_config(
        &["--config", path, "--sub-bind", "tcp://127.0.0.1:7004"],
        &[
            ("ZBROKER_PUB_BIND", "tcp://127.0.0.1:7003"),
            ("ZBROKER_SUB_BIND", "tcp://127.0.0.1:7005"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("pub_bind = \"tcp://127.0.0.1:7003\""),
        "env over file: {text}"
    );
    assert!(
        text.contains("sub_bind = \"tcp://127.0.0.1:7004\""),
        "flag over env: {text}"
    );
    assert!(
        text.contains("sub_timeout = \"30s\""),
        "file over default: {text}"
    );
    assert!(
        text.contains("policy = \"drop-old\"") && text.contains("max_messages = 77"),
        "{text}"
    );
    assert!(text.ends_with("configuration OK\n"));
}

#[test]
fn bad_configurations_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "sub_timout = \"1s\"\n").unwrap();
    let out = check_config(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sub_timout"), "names the unknown field: {err}");

    let out = check_config(&["--pub-bind", "tcp://0.0.0.0:5570"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure") && err.contains("CURVE"), "{err}");
    let out = check_config(&["--pub-bind", "tcp://0.0.0.0:5570", "--insecure"], &[]);
    assert!(out.status.success());
}

#[test]
fn metrics_endpoint_and_stats_command() {
    let dir = tempfile::tempdir().unwrap();
    let (pub_ep, sub_ep) = common::endpoints(common::Transport::Ipc, &dir);
    let broker = ChildBroker::start(&[
        "--pub-bind",
        &pub_ep,
        "--sub-bind",
        &sub_ep,
        "--metrics-bind",
        "127.0.0.1:0",
        "--sub-timeout",
        "1s",
    ]);
    let ctx = zmq::Context::new();
    let sub = common::RawSubscriber::connect(&ctx, &sub_ep);
    sub.subscribe("prefix", b"m.");
    let publisher = common::publisher(&ctx, &pub_ep);
    common::publish(&publisher, b"m.1", b"x");
    publisher.send("malformed", 0).unwrap();
    common::publish(&publisher, b"m.2", b"y");
    assert_eq!(sub.recv_message().0, 1);
    assert_eq!(sub.recv_message().0, 2);
    // Stats refresh on the broker's timer (every sub_timeout/4 here).
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let out = zbroker_run(&["stats", broker.metrics_address()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if Metrics::parse(&text).get(DELIVERED) == 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let m = Metrics::parse(&text);
    assert_eq!(m.get(MALFORMED_PUBLISHES), 1);
    assert_eq!(m.get(SUBSCRIBERS), 1);
    assert_eq!(m.get(SUBSCRIPTIONS), 1);
    assert_eq!(m.get(PUB_CONNECTIONS), 1);
    assert!(
        text.contains("# TYPE zbroker_messages_dropped counter"),
        "{text}"
    );

    let out = zbroker_run(&["stats", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-bind"));
}
