//! Interoperability: a Python client written from docs/PROTOCOL.md alone
//! (tests/interop/pyzmq_client.py, pyzmq only) talks to the broker over tcp
//! and ipc. Needs `python3` with pyzmq (`pip install pyzmq`); the test fails,
//! rather than skips, when they are missing.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::{Ran, run_within};
use common::{TestBroker, Transport};

const PYTHON: &str = "python3";
const CHILD_LIMIT: Duration = Duration::from_secs(60);

fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/pyzmq_client.py")
}

fn run_python(args: &[&str], limit: Duration) -> std::io::Result<Ran> {
    run_within(Command::new(PYTHON).args(args).stdin(Stdio::null()), limit)
}

/// Fails the test (never skips) if python3 or pyzmq is missing.
fn require_pyzmq() {
    let hint = "the interop test needs python3 with pyzmq: pip install pyzmq";
    let out = match run_python(&["-c", "import zmq"], Duration::from_secs(30)) {
        Ok(out) => out,
        Err(e) => panic!("cannot run `{PYTHON}` ({e}); {hint}"),
    };
    match out.status {
        Some(status) if status.success() => {}
        Some(status) => panic!(
            "`{PYTHON} -c 'import zmq'` failed ({status}); {hint}\nstderr:\n{}",
            out.stderr
        ),
        None => panic!("`{PYTHON} -c 'import zmq'` did not finish within 30 s; {hint}"),
    }
}

fn interop(transport: Transport) {
    require_pyzmq();
    let script = script_path();
    assert!(script.is_file(), "missing {}", script.display());

    let broker = TestBroker::start(transport, common::test_config());
    let (pub_endpoint, sub_endpoint) = (broker.pub_endpoint.clone(), broker.sub_endpoint.clone());
    let started = Instant::now();
    let out = run_python(
        &[
            script.to_str().expect("a UTF-8 script path"),
            &pub_endpoint,
            &sub_endpoint,
        ],
        CHILD_LIMIT,
    )
    .unwrap_or_else(|e| panic!("cannot run `{PYTHON}` ({e}); pip install pyzmq"));
    let elapsed = started.elapsed();
    drop(broker);

    let report = format!(
        "transport {transport:?}: {PYTHON} {} {pub_endpoint} {sub_endpoint} ran {elapsed:.2?}\n\
         --- stdout ---\n{}\n--- stderr ---\n{}",
        script.display(),
        out.stdout.trim_end(),
        out.stderr.trim_end(),
    );
    match out.status {
        None => panic!("the interop client ran over {CHILD_LIMIT:?} and was killed\n{report}"),
        Some(status) => {
            assert!(
                status.success(),
                "the interop client failed ({status})\n{report}"
            );
        }
    }
    assert!(
        out.stdout
            .lines()
            .last()
            .is_some_and(|l| l.ends_with("passed, 0 failed")),
        "the interop client exited 0 without its summary line\n{report}"
    );
    println!("{report}");
}

/// The transport of `common::TRANSPORTS` that `is_it` picks.
fn transport(is_it: fn(&Transport) -> bool) -> Transport {
    *common::TRANSPORTS
        .iter()
        .find(|t| is_it(t))
        .expect("transport in common::TRANSPORTS")
}

#[test]
fn pyzmq_client_over_tcp() {
    interop(transport(|t| matches!(t, Transport::Tcp)));
}

#[test]
fn pyzmq_client_over_ipc() {
    interop(transport(|t| matches!(t, Transport::Ipc)));
}
