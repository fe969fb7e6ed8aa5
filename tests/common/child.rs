//! The `zbroker` binary as a child process: a broker started with flags
//! (`ChildBroker`: endpoints and metrics address from its log, the log kept,
//! `/proc` and metrics readers, killed on drop), and commands run to
//! completion within a time limit.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::DEADLINE;
use super::metrics::Metrics;
use super::procfs::Proc;

/// The `zbroker` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_zbroker");

/// `zbroker ARGS`, with none of the environment variables that would change
/// what it does behind the test's back; see [`hermetic`].
pub fn zbroker<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    hermetic(&mut command);
    command
}

/// Removes `RUST_LOG` and `ZBROKER_*_BIND` from `command`'s environment;
/// `Command::env` after this still sets them.
pub fn hermetic(command: &mut Command) -> &mut Command {
    command
        .env_remove("RUST_LOG")
        .env_remove("ZBROKER_PUB_BIND")
        .env_remove("ZBROKER_SUB_BIND")
        .env_remove("ZBROKER_METRICS_BIND")
}

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Streams a child's stderr (which must be piped) into a channel of lines.
pub fn stderr_lines(child: &mut Child) -> Receiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (30 s at most) for a line containing `needle`; returns every line
/// seen up to and including it.
pub fn wait_for_line(lines: &Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(DEADLINE) {
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

/// Waits up to `limit` for a child to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a command run by [`run_within`] did.
pub struct Ran {
    /// None when it ran over the limit and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` (stdout and stderr piped, each read on a thread of its
/// own so that a chatty child never blocks on a full pipe), killing it if
/// it runs over `limit`.
pub fn run_within(command: &mut Command, limit: Duration) -> std::io::Result<Ran> {
    let mut child = Reaped(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = collect(Box::new(child.0.stdout.take().expect("piped stdout")));
    let stderr = collect(Box::new(child.0.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.0.try_wait()? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    // Killed now if it ran over, so that its pipes close.
    drop(child);
    Ok(Ran {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `command` to completion; fails the test (killing it) if it is still
/// running after `limit`: a broker that wrongly starts must not hang the
/// test.
pub fn run_to_exit(command: &mut Command, limit: Duration) -> Output {
    let what = format!("{command:?}");
    let ran = run_within(command, limit).unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let status = ran.status.unwrap_or_else(|| {
        panic!(
            "{what} did not exit within {limit:?}; its stderr:\n{}",
            ran.stderr
        )
    });
    Output {
        status,
        stdout: ran.stdout.into_bytes(),
        stderr: ran.stderr.into_bytes(),
    }
}

/// `defaults` (`(flag, value)`) with each of `overrides` replacing the value
/// of its flag, or appended (clap refuses a flag given twice), flattened
/// into arguments.
pub fn flags(defaults: &[(&str, String)], overrides: &[(&str, &str)]) -> Vec<String> {
    let mut flags: Vec<(String, String)> = defaults
        .iter()
        .map(|(flag, value)| (flag.to_string(), value.clone()))
        .collect();
    for (flag, value) in overrides {
        assert!(flag.starts_with("--"), "not a flag: {flag}");
        match flags.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value.to_string(),
            None => flags.push((flag.to_string(), value.to_string())),
        }
    }
    flags
        .into_iter()
        .flat_map(|(flag, value)| [flag, value])
        .collect()
}

/// A child's stderr, kept whole: every line it wrote so far, and whether it
/// has closed (the child exited).
pub struct Log {
    state: Mutex<(Vec<String>, bool)>,
    grew: Condvar,
}

impl Log {
    /// Reads `stderr` to its end on a thread of its own. It is always
    /// drained: a full stderr pipe would stall the child.
    fn capture(stderr: impl Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log {
            state: Mutex::new((Vec::new(), false)),
            grew: Condvar::new(),
        });
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.state.lock().unwrap().0.push(line);
                sink.grew.notify_all();
            }
            sink.state.lock().unwrap().1 = true;
            sink.grew.notify_all();
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().0.clone()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.0[state.0.len().saturating_sub(n)..].to_vec()
    }

    /// Waits up to `limit` until `found` picks something out of the lines;
    /// `Err` with every line if it does not in time or the log closes first.
    fn wait<T>(
        &self,
        limit: Duration,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, Vec<String>> {
        let deadline = Instant::now() + limit;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(t) = found(&state.0) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.1 || left.is_zero() {
                return Err(state.0.clone());
            }
            state = self.grew.wait_timeout(state, left).unwrap().0;
        }
    }
}

/// The value after `endpoint=` on the first of `lines` containing `needle`.
fn logged_endpoint(lines: &[String], needle: &str) -> Option<(usize, String)> {
    lines.iter().enumerate().find_map(|(i, l)| {
        let endpoint = l.contains(needle).then(|| l.split("endpoint=").nth(1))??;
        Some((i, endpoint.trim().to_string()))
    })
}

/// How to start a [`ChildBroker`] beyond its flags.
#[derive(Default)]
pub struct Options<'a> {
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// A config file's contents, written to a temporary directory and
    /// passed with `--config`.
    pub config: Option<&'a str>,
    /// `ulimit -n` (soft and hard, so the broker cannot raise it back).
    pub file_limit: Option<u32>,
}

/// `zbroker run` as a child process; killed on drop, so a failing test
/// leaves nothing behind. Its endpoints (ports resolved) and metrics address
/// are read from its log, so `tcp://127.0.0.1:0` and `--metrics-bind
/// 127.0.0.1:0` let the system pick free ports.
pub struct ChildBroker {
    pub child: Child,
    pub pub_endpoint: String,
    pub sub_endpoint: String,
    /// `http://HOST:PORT/metrics`, when it serves metrics.
    pub metrics_url: Option<String>,
    /// What it logged up to binding both endpoints (and serving metrics).
    pub startup_log: Vec<String>,
    log: Arc<Log>,
    /// How far `wait_for_log` has read.
    read: Mutex<usize>,
    _dir: Option<tempfile::TempDir>,
}

impl ChildBroker {
    /// Runs `zbroker run ARGS` and waits until it has bound both endpoints.
    pub fn start(args: &[&str]) -> ChildBroker {
        ChildBroker::start_with(args, Options::default())
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ChildBroker {
        ChildBroker::start_with(
            args,
            Options {
                env,
                ..Options::default()
            },
        )
    }

    /// Like `start`, with `options`. With `--metrics-bind` among `args`, it
    /// also waits until the broker serves metrics.
    pub fn start_with<S: AsRef<str>>(args: &[S], options: Options) -> ChildBroker {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let mut command = match options.file_limit {
            None => zbroker(&["run"]),
            Some(files) => {
                // exec: the child's pid is the broker's, for /proc.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {files}; exec \"$0\" \"$@\""))
                    .args([BIN, "run"]);
                hermetic(&mut sh);
                sh
            }
        };
        command.args(&args);
        for (key, value) in options.env {
            command.env(key, value);
        }
        let dir = options.config.map(|contents| {
            let dir = tempfile::tempdir().expect("create a temp dir");
            let config = dir.path().join("zbroker.toml");
            std::fs::write(&config, contents).expect("write the config file");
            command.arg("--config").arg(config);
            dir
        });
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start zbroker");
        let log = Log::capture(child.stderr.take().expect("piped stderr"));
        let serves_metrics = args.contains(&"--metrics-bind");
        let started = log.wait(DEADLINE, |lines| {
            let (p, pub_endpoint) = logged_endpoint(lines, "publishers connect")?;
            let (s, sub_endpoint) = logged_endpoint(lines, "subscribers connect")?;
            let metrics = logged_endpoint(lines, "serving metrics");
            if serves_metrics && metrics.is_none() {
                return None;
            }
            let last = [Some(p), Some(s), metrics.as_ref().map(|m| m.0)]
                .into_iter()
                .flatten()
                .max()?;
            Some((last, pub_endpoint, sub_endpoint, metrics.map(|m| m.1)))
        });
        let (last, pub_endpoint, sub_endpoint, metrics_url) = match started {
            Ok(started) => started,
            Err(lines) => {
                // Its log closes as it exits: give it a moment to be reaped.
                let exit = (0..100).find_map(|_| {
                    let exit = child.try_wait().ok().flatten();
                    if exit.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    exit
                });
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "zbroker run {args:?} did not log its endpoints (exit status {exit:?}): \
                     {lines:#?}"
                );
            }
        };
        let startup_log = log.lines()[..=last].to_vec();
        ChildBroker {
            child,
            pub_endpoint,
            sub_endpoint,
            metrics_url,
            read: Mutex::new(startup_log.len()),
            startup_log,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its `/proc` entry.
    pub fn proc(&self) -> Proc {
        Proc::of(self.pid())
    }

    /// Its resident set size, in bytes.
    pub fn rss(&self) -> u64 {
        self.proc().rss()
    }

    /// Its resident set size and the peak of it, in bytes.
    pub fn memory(&self) -> (u64, u64) {
        self.proc().memory()
    }

    /// Its CPU time so far, user plus system, from `/proc` (which, unlike a
    /// scrape, needs no descriptor in the broker).
    pub fn cpu(&self) -> Duration {
        self.proc().cpu()
    }

    /// Whether it is still running: it is never reaped before `drop` (or
    /// `wait`), so one that died stays a zombie.
    pub fn alive(&self) -> bool {
        self.proc().alive()
    }

    pub fn assert_alive(&self, what: &str) {
        if !self.alive() {
            panic!(
                "{what}: the broker died; its last log lines: {:#?}",
                self.log.tail(20)
            );
        }
    }

    /// Everything it logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// What it logged after its startup.
    pub fn log_since_startup(&self) -> Vec<String> {
        self.log.lines()[self.startup_log.len()..].to_vec()
    }

    /// Its log, to read from elsewhere (another thread, a failure message).
    pub fn log(&self) -> Arc<Log> {
        Arc::clone(&self.log)
    }

    /// Waits (30 s at most) for a line containing `needle` among those from
    /// line `from` on; returns them up to and including it.
    pub fn wait_for_log_from(&self, from: usize, needle: &str) -> Vec<String> {
        let found = self.log.wait(DEADLINE, |lines| {
            let i = lines.iter().skip(from).position(|l| l.contains(needle))?;
            Some(lines[from..=from + i].to_vec())
        });
        found.unwrap_or_else(|lines| {
            panic!(
                "no log line containing {needle:?} (broker alive: {}); got {:#?}",
                self.alive(),
                lines.get(from..).unwrap_or_default()
            )
        })
    }

    /// Waits (30 s at most) for a log line containing `needle`, after those
    /// the previous call returned; returns the lines up to and including
    /// it.
    pub fn wait_for_log(&self, needle: &str) -> Vec<String> {
        let mut read = self.read.lock().unwrap();
        let lines = self.wait_for_log_from(*read, needle);
        *read += lines.len();
        lines
    }

    /// Its metrics endpoint; fails the test if it serves none.
    pub fn metrics_url(&self) -> &str {
        self.metrics_url
            .as_deref()
            .expect("a broker started with --metrics-bind")
    }

    /// Its metrics endpoint as `HOST:PORT`.
    pub fn metrics_address(&self) -> &str {
        let url = self.metrics_url();
        url.strip_prefix("http://")
            .and_then(|a| a.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("not an exporter URL: {url}"))
    }

    /// Scrapes its metrics.
    pub fn metrics(&self) -> Metrics {
        Metrics::scrape(self.metrics_url())
    }

    /// Metrics that include everything the broker did before this call. The
    /// broker publishes them on each tick (every `--sub-timeout` / 4), so a
    /// scrape can be a tick old; one that differs from the first scrape was
    /// published later. Something must be changing the counters meanwhile
    /// (a client's PINGs, say), or this waits in vain.
    pub fn fresh_metrics(&self) -> Metrics {
        let first = self.metrics();
        self.wait_for("a fresh snapshot", |m| *m != first)
    }

    /// Polls its metrics until `done` holds, failing the test after 30 s.
    /// For state no handshake reveals (expiry, cleanup, counters), this is
    /// the only way to observe it.
    pub fn wait_for(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        super::wait_until(
            DEADLINE,
            Duration::from_millis(25),
            what,
            || self.metrics(),
            done,
        )
    }

    /// Metrics, retrying while the exporter cannot take a connection (it
    /// pauses accepting after `EMFILE`).
    pub fn metrics_eventually(&self) -> Metrics {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match zbroker::metrics::fetch(self.metrics_url()) {
                Ok(text) => return Metrics::parse(&text),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the metrics exporter never answered again: {e}"
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The subscriber endpoint's address; fails the test unless it is tcp.
    pub fn sub_address(&self) -> SocketAddr {
        tcp_address(&self.sub_endpoint)
    }

    /// The publisher endpoint's address; fails the test unless it is tcp.
    pub fn pub_address(&self) -> SocketAddr {
        tcp_address(&self.pub_endpoint)
    }

    /// Sends it SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .expect("run kill")
                .success(),
            "kill -TERM {pid}"
        );
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait(DEADLINE)
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tcp://HOST:PORT` as an address.
pub fn tcp_address(endpoint: &str) -> SocketAddr {
    endpoint
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a tcp endpoint: {endpoint}"))
}
