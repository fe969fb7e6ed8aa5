//! Operating the broker: a TOML config file with flags and environment on
//! top, `--check-config`, the Prometheus endpoint and `zbroker stats`.

mod common;

use std::process::Command;

use common::{BIN, ChildBroker};

fn check_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(["run", "--check-config"]).args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .env_remove("ZBROKER_PUB_BIND")
        .env_remove("ZBROKER_SUB_BIND");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
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
        text.contains("pub_bind: \"tcp://127.0.0.1:7003\""),
        "env over file: {text}"
    );
    assert!(
        text.contains("sub_bind: \"tcp://127.0.0.1:7004\""),
        "flag over env: {text}"
    );
    assert!(
        text.contains("sub_timeout: 30s"),
        "file over default: {text}"
    );
    assert!(
        text.contains("policy: DropOld") && text.contains("max_messages: 77"),
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
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let _broker = ChildBroker::start(&[
        "--pub-bind",
        &pub_ep,
        "--sub-bind",
        &sub_ep,
        "--metrics-bind",
        &metrics,
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let out = Command::new(BIN)
            .args(["stats", &metrics])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if common::metric(&text, "zbroker_messages_delivered_total") == 2 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        common::metric(&text, "zbroker_malformed_total{endpoint=\"publisher\"}"),
        1
    );
    assert_eq!(common::metric(&text, "zbroker_subscribers"), 1);
    assert_eq!(common::metric(&text, "zbroker_subscriptions"), 1);
    assert_eq!(common::metric(&text, "zbroker_publisher_connections"), 1);
    assert!(
        text.contains("# TYPE zbroker_messages_dropped counter"),
        "{text}"
    );

    let out = Command::new(BIN)
        .args(["stats", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-bind"));
}
