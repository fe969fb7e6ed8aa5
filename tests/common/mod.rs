//! Shared test harness: an in-process broker on real tcp/ipc sockets and a
//! raw protocol-level subscriber.
#![allow(dead_code)]

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zbroker::config::Config;
use zbroker::metrics::Snapshot;
use zbroker::server::{Server, StatsHandle, Stopper};

/// The two transports every network test runs over.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp,
    Ipc,
}

pub const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Ipc];

/// A broker running on its own thread; stopped and joined on drop.
pub struct TestBroker {
    pub pub_endpoint: String,
    pub sub_endpoint: String,
    pub stats: StatsHandle,
    stopper: Stopper,
    thread: Option<JoinHandle<Snapshot>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestBroker {
    /// Starts a broker on loopback tcp (ports picked by the system) or on
    /// ipc paths in a fresh temporary directory.
    pub fn start(transport: Transport, mut config: Config) -> TestBroker {
        let dir = match transport {
            Transport::Tcp => {
                config.pub_bind = "tcp://127.0.0.1:*".into();
                config.sub_bind = "tcp://127.0.0.1:*".into();
                None
            }
            Transport::Ipc => {
                let dir = tempfile::tempdir().expect("create a temp dir");
                config.pub_bind = format!("ipc://{}/pub", dir.path().display());
                config.sub_bind = format!("ipc://{}/sub", dir.path().display());
                Some(dir)
            }
        };
        TestBroker::start_on(config, dir)
    }

    /// Starts a broker on exactly the configured endpoints.
    pub fn start_on(config: Config, dir: Option<tempfile::TempDir>) -> TestBroker {
        let server = Server::bind(config).expect("bind the broker");
        let pub_endpoint = server.pub_endpoint().to_string();
        let sub_endpoint = server.sub_endpoint().to_string();
        let stats = server.stats();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run().expect("broker loop"));
        TestBroker {
            pub_endpoint,
            sub_endpoint,
            stats,
            stopper,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Stops the broker and returns its final counters.
    pub fn stop(mut self) -> Snapshot {
        self.stop_inner().expect("broker thread")
    }

    fn stop_inner(&mut self) -> Option<Snapshot> {
        self.stopper.stop();
        self.thread.take()?.join().ok()
    }

    /// Polls the broker's counters until `done` holds, failing the test if it
    /// does not within `limit`. For state with no handshake to wait on
    /// (expiry), this is the only way to observe it.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let deadline = Instant::now() + limit;
        loop {
            let snapshot = self.stats.snapshot();
            if done(&snapshot) {
                return snapshot;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {snapshot:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// A config for tests: short timeouts so expiry and ticks happen quickly.
pub fn test_config() -> Config {
    Config {
        sub_timeout: Duration::from_secs(2),
        linger: Duration::from_millis(200),
        ..Config::default()
    }
}

/// A subscriber speaking protocol v1 by hand on a raw DEALER socket.
pub struct RawSubscriber {
    pub socket: zmq::Socket,
}

pub const RECV_TIMEOUT_MS: i32 = 10_000;

impl RawSubscriber {
    pub fn connect(ctx: &zmq::Context, endpoint: &str) -> RawSubscriber {
        let socket = ctx.socket(zmq::DEALER).unwrap();
        socket.set_linger(0).unwrap();
        socket.set_rcvtimeo(RECV_TIMEOUT_MS).unwrap();
        socket.set_rcvhwm(0).unwrap();
        socket.connect(endpoint).unwrap();
        RawSubscriber { socket }
    }

    pub fn send(&self, frames: &[&[u8]]) {
        self.socket.send_multipart(frames, 0).unwrap();
    }

    /// Receives one message; panics after RECV_TIMEOUT_MS.
    pub fn recv(&self) -> Vec<Vec<u8>> {
        self.socket
            .recv_multipart(0)
            .expect("a reply from the broker within the receive timeout")
    }

    /// Sends a command and returns the broker's reply.
    pub fn call(&self, frames: &[&[u8]]) -> Vec<Vec<u8>> {
        self.send(frames);
        self.recv()
    }

    /// Subscribes and checks the OK.
    pub fn subscribe(&self, kind: &str, filter: &[u8]) {
        let reply = self.call(&[b"SUB", kind.as_bytes(), filter]);
        assert_eq!(
            reply,
            vec![
                b"OK".to_vec(),
                b"SUB".to_vec(),
                kind.as_bytes().to_vec(),
                filter.to_vec()
            ]
        );
    }

    /// Receives one delivery: (seq, topic, payload).
    pub fn recv_message(&self) -> (u64, Vec<u8>, Vec<u8>) {
        let frames = self.recv();
        assert_eq!(frames.len(), 2, "a delivery is two frames: {frames:?}");
        let (seq, topic) = zbroker::protocol::parse_header(&frames[0]).expect("a MSG header");
        (seq, topic.to_vec(), frames[1].clone())
    }
}

/// A raw PUSH publisher. Its linger is long: closing a PUSH socket discards
/// whatever libzmq has not handed to the broker when the linger runs out.
pub fn publisher(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = ctx.socket(zmq::PUSH).unwrap();
    socket.set_linger(30_000).unwrap();
    socket.set_sndtimeo(10_000).unwrap();
    socket.connect(endpoint).unwrap();
    socket
}

pub fn publish(socket: &zmq::Socket, topic: &[u8], payload: &[u8]) {
    socket.send_multipart([topic, payload], 0).unwrap();
}

/// Deterministic xorshift generator: reproducible random tests without a
/// dependency. The seed is printed on failure by the callers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The `zbroker` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_zbroker");

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Streams a child's stderr (which must be piped) into a channel of lines.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (30 s at most) for a line containing `needle`; returns every line
/// seen up to and including it.
pub fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
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
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
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

/// A broker running as a child process: killed on drop, so a failing test
/// leaves nothing behind. Its stderr is streamed into `log`.
pub struct ChildBroker {
    pub child: std::process::Child,
    pub log: std::sync::mpsc::Receiver<String>,
    /// What it logged up to binding both endpoints.
    pub startup_log: Vec<String>,
}

impl ChildBroker {
    /// Runs `zbroker run ARGS` and waits until it has bound both endpoints.
    pub fn start(args: &[&str]) -> ChildBroker {
        ChildBroker::start_with_env(args, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ChildBroker {
        let mut command = std::process::Command::new(BIN);
        command
            .arg("run")
            .args(args)
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start zbroker");
        let log = stderr_lines(&mut child);
        let startup_log = wait_for_line(&log, "subscribers connect");
        ChildBroker {
            child,
            log,
            startup_log,
        }
    }

    /// Waits for a log line containing `needle`; returns the lines seen.
    pub fn wait_for_log(&self, needle: &str) -> Vec<String> {
        wait_for_line(&self.log, needle)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `/proc/PID/status` field in kB, e.g. `VmRSS` or `VmHWM`.
    pub fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.wait(Duration::from_secs(30))
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A publisher and a subscriber endpoint: loopback tcp on free ports, or ipc
/// paths in `dir`.
pub fn endpoints(transport: Transport, dir: &tempfile::TempDir) -> (String, String) {
    match transport {
        Transport::Tcp => (
            format!("tcp://127.0.0.1:{}", free_port()),
            format!("tcp://127.0.0.1:{}", free_port()),
        ),
        Transport::Ipc => (
            format!("ipc://{}/pub", dir.path().display()),
            format!("ipc://{}/sub", dir.path().display()),
        ),
    }
}

/// A free loopback TCP port (the OS picks it; it is free when we return).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads one sample from Prometheus text, e.g.
/// `zbroker_messages_dropped_total{reason="queue_full"}`.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}
