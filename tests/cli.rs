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

/// `zbroker ARGS` with `env` as the only `ZBROKER_*` variables; run to exit.
fn zbroker(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("ZBROKER_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

/// `zbroker run --check-config ARGS`: the effective configuration it
/// printed, read back as a config file, and the TOML text itself.
fn checked(args: &[&str], env: &[(&str, &str)]) -> (zbroker::config::Config, String) {
    let mut all = vec!["run", "--check-config"];
    all.extend_from_slice(args);
    let out = zbroker(&all, env);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{args:?} {env:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = stdout
        .strip_suffix("configuration OK\n")
        .unwrap_or_else(|| panic!("ends with `configuration OK`: {stdout}"));
    let config = zbroker::config::Config::from_toml(toml)
        .unwrap_or_else(|e| panic!("--check-config prints a config file: {e}\n{toml}"));
    (config, toml.to_string())
}

#[test]
fn settings_come_from_flag_then_environment_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("zbroker.toml");
    std::fs::write(
        &file,
        "sub_bind = \"tcp://127.0.0.1:7002\"\nsub_timeout = \"30s\"\n\
         [limits]\nmax_topic_len = 100\n[queue]\npolicy = \"drop-old\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("ZBROKER_SUB_BIND", "tcp://127.0.0.1:7003"),
        ("ZBROKER_SUB_TIMEOUT", "40s"),
        ("ZBROKER_MAX_TOPIC_LEN", "200"),
        ("ZBROKER_OVERFLOW", "disconnect"),
    ];
    let flags = [
        "--sub-bind",
        "tcp://127.0.0.1:7004",
        "--sub-timeout",
        "50s",
        "--max-topic-len",
        "300",
        "--overflow",
        "backpressure",
    ];
    let layers = |config: &zbroker::config::Config| {
        (
            config.sub_bind.join(","),
            config.sub_timeout.as_secs(),
            config.limits.max_topic_len,
            format!("{:?}", config.queue.policy),
        )
    };
    let expect = |bind: &str, secs: u64, len: usize, policy: &str| {
        (
            format!("tcp://127.0.0.1:{bind}"),
            secs,
            len,
            policy.to_string(),
        )
    };

    let (config, _) = checked(&[], &[]);
    assert_eq!(
        layers(&config),
        expect("5571", 10, 1024, "DropNew"),
        "defaults"
    );
    let (config, _) = checked(&["--config", file], &[]);
    assert_eq!(
        layers(&config),
        expect("7002", 30, 100, "DropOld"),
        "file over default"
    );
    let (config, _) = checked(&["--config", file], &env);
    assert_eq!(
        layers(&config),
        expect("7003", 40, 200, "Disconnect"),
        "env over file"
    );
    let mut args = vec!["--config", file];
    args.extend_from_slice(&flags);
    let (config, _) = checked(&args, &env);
    assert_eq!(
        layers(&config),
        expect("7004", 50, 300, "Backpressure"),
        "flag over env"
    );
    let (config, _) = checked(&flags, &[]);
    assert_eq!(
        layers(&config),
        expect("7004", 50, 300, "Backpressure"),
        "flag over default"
    );
    let (config, _) = checked(&[], &env);
    assert_eq!(
        layers(&config),
        expect("7003", 40, 200, "Disconnect"),
        "env over default"
    );

    // Each setting separately: one from each layer at once.
    let (config, _) = checked(
        &["--config", file, "--sub-bind", "tcp://127.0.0.1:7004"],
        &[("ZBROKER_MAX_TOPIC_LEN", "200")],
    );
    assert_eq!(layers(&config), expect("7004", 30, 200, "DropOld"));
    assert_eq!(config.limits.max_filter_len, 1024, "a default among them");

    // A flag switched on in the file stays on unless the environment or a
    // flag says otherwise.
    std::fs::write(dir.path().join("insecure.toml"), "insecure = true\n").unwrap();
    let insecure = dir.path().join("insecure.toml");
    let insecure = insecure.to_str().unwrap();
    assert!(checked(&["--config", insecure], &[]).0.insecure);
    assert!(
        !checked(&["--config", insecure], &[("ZBROKER_INSECURE", "false")])
            .0
            .insecure
    );
    assert!(checked(&[], &[("ZBROKER_INSECURE", "true")]).0.insecure);
}

#[test]
fn check_config_prints_a_config_file_that_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let keygen = |name: &str| {
        let out = zbroker(&["keygen", &path(name)], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    keygen("broker.key");
    let client = keygen("client.key");
    std::fs::write(path("clients.keys"), format!("{client} prefix:net.\n")).unwrap();
    let (first, text) = checked(
        &[
            "--sub-timeout",
            "1500ms",
            "--metrics-bind",
            "127.0.0.1:9570",
            "--max-queued-replies",
            "7",
            "--overflow",
            "backpressure",
            "--queue-max-total-bytes",
            "1000000",
            "--curve-secret-key",
            &path("broker.key"),
            "--publisher-keys",
            &path("clients.keys"),
            "--subscriber-keys",
            &path("clients.keys"),
        ],
        &[("ZBROKER_IO_THREADS", "2")],
    );
    assert_eq!(first.sub_timeout, Duration::from_millis(1500));
    assert_eq!(first.io_threads, 2);
    assert_eq!(first.limits.max_queued_replies, 7);
    assert_eq!(first.queue.max_total_bytes, 1_000_000);
    assert_eq!(first.metrics_bind.as_deref(), Some("127.0.0.1:9570"));
    assert!(first.curve.is_some());
    assert!(text.contains("policy = \"backpressure\""), "{text}");

    let file = path("effective.toml");
    std::fs::write(&file, &text).unwrap();
    let (second, again) = checked(&["--config", &file], &[]);
    assert_eq!(second, first);
    assert_eq!(again, text, "printing is a fixed point");
}

#[test]
fn help_shows_every_flag_with_its_default_and_environment_variable() {
    let out = zbroker(&["run", "--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // The text under one flag, up to the next flag.
    let block = |flag: &str| -> String {
        let start = help
            .find(&format!("      {flag} "))
            .or_else(|| help.find(&format!("      {flag}\n")))
            .unwrap_or_else(|| panic!("{flag} missing from:\n{help}"));
        let rest = &help[start + 6..];
        let end = rest.find("\n      --").unwrap_or(rest.len());
        rest[..end].to_string()
    };
    for (flag, default, key) in [
        ("--pub-bind", Some("tcp://127.0.0.1:5570"), "pub_bind"),
        ("--sub-bind", Some("tcp://127.0.0.1:5571"), "sub_bind"),
        ("--metrics-bind", None, "metrics_bind"),
        ("--insecure", None, "insecure"),
        ("--curve-secret-key", None, "curve.secret_key_file"),
        ("--publisher-keys", None, "curve.publisher_keys"),
        ("--subscriber-keys", None, "curve.subscriber_keys"),
        ("--zmtp-heartbeat", Some("30s"), "zmtp_heartbeat"),
        ("--sub-timeout", Some("10s"), "sub_timeout"),
        ("--max-topic-len", Some("1024"), "limits.max_topic_len"),
        ("--max-filter-len", Some("1024"), "limits.max_filter_len"),
        (
            "--max-subscribers",
            Some("100000"),
            "limits.max_subscribers",
        ),
        (
            "--max-filters-per-subscriber",
            Some("10000"),
            "limits.max_filters_per_subscriber",
        ),
        (
            "--max-filters-total",
            Some("1000000"),
            "limits.max_filters_total",
        ),
        (
            "--max-message-size",
            Some("16777216"),
            "limits.max_message_size",
        ),
        (
            "--max-commands-per-sec",
            Some("5000"),
            "limits.max_commands_per_sec",
        ),
        (
            "--max-queued-replies",
            Some("1024"),
            "limits.max_queued_replies",
        ),
        (
            "--max-pattern-segments",
            Some("16"),
            "limits.max_pattern_segments",
        ),
        (
            "--max-index-bytes",
            Some("1073741824"),
            "limits.max_index_bytes",
        ),
        (
            "--max-filters-per-key",
            Some("100000"),
            "limits.max_filters_per_key",
        ),
        (
            "--max-connections",
            Some("100000"),
            "limits.max_connections",
        ),
        ("--queue-max-messages", Some("10000"), "queue.max_messages"),
        ("--queue-max-bytes", Some("16777216"), "queue.max_bytes"),
        (
            "--queue-max-total-bytes",
            Some("536870912"),
            "queue.max_total_bytes",
        ),
        ("--overflow", Some("drop-new"), "queue.policy"),
        ("--disconnect-after", Some("5s"), "queue.disconnect_after"),
        ("--pub-hwm", Some("1000"), "pub_hwm"),
        ("--sub-hwm", Some("3000"), "sub_hwm"),
        ("--pub-hwm-bytes", Some("8388608"), "pub_hwm_bytes"),
        ("--sub-hwm-bytes", Some("8388608"), "sub_hwm_bytes"),
        ("--io-batch", Some("65536"), "io_batch"),
        ("--io-threads", Some("1"), "io_threads"),
        ("--linger", Some("2s"), "linger"),
    ] {
        let text = block(flag);
        let env = format!(
            "[env: ZBROKER_{}=]",
            flag[2..].to_ascii_uppercase().replace('-', "_")
        );
        assert!(text.contains(&env), "{flag} names {env}:\n{text}");
        assert!(
            text.contains(&format!("[config: {key}]")),
            "{flag} names {key}:\n{text}"
        );
        match default {
            Some(default) => assert!(
                text.contains(&format!("[default: {default}]")),
                "{flag} shows its default {default}:\n{text}"
            ),
            None => assert!(!text.contains("[default:"), "{flag}:\n{text}"),
        }
    }
    assert!(block("--config").contains("TOML"));
    assert!(block("--check-config").contains("Validate"));
    // The short help shows the defaults too.
    let out = zbroker(&["run", "-h"], &[]);
    let short = String::from_utf8(out.stdout).unwrap();
    assert!(
        short
            .lines()
            .any(|l| l.contains("--sub-timeout") && l.contains("[default: 10s]")),
        "{short}"
    );
}
