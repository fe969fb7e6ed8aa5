//! Shared test harness, one copy of each piece. Each integration test
//! compiles this module on its own and uses some of it, hence
//! `allow(dead_code)`.
//!
//! - here: the in-process broker (`TestBroker`) on real tcp/ipc sockets, a
//!   raw protocol-level subscriber and publisher, endpoints and free ports,
//!   seeds and a deterministic `Rng`, bounded waits;
//! - [`child`]: the `zbroker` binary as a child process (`ChildBroker`), and
//!   commands run to completion within a time limit;
//! - [`metrics`]: the Prometheus text parser (`Metrics`) and series names;
//! - [`procfs`]: a process's memory, CPU time, threads and descriptors;
//! - [`zmtp`]: raw ZMTP 3.0 over TCP, for clients libzmq will not be.
#![allow(dead_code)]

pub mod child;
pub mod etcd;
pub mod keys;
pub mod mesh;
pub mod metrics;
pub mod procfs;
pub mod zmtp;

use std::fmt::Debug;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zbroker::config::Config;
use zbroker::metrics::Snapshot;
use zbroker::server::{Server, StatsHandle, Stopper};

#[allow(unused_imports)]
pub use child::{
    BIN, ChildBroker, Reaped, run_to_exit, stderr_lines, wait_exit, wait_for_line, zbroker,
};
#[allow(unused_imports)]
pub use metrics::{Metrics, metric};

/// Bounds every wait on a broker or a child process; only reached when
/// something is wrong.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const MIB: f64 = (1 << 20) as f64;

/// `bytes` in MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// Samples `sample` every `every` until `done` holds for a sample, which it
/// returns; fails the test, showing the last sample, after `limit`. For
/// state with no handshake to wait on (expiry, counters), polling is the
/// only way to observe it.
pub fn wait_until<T: Debug>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut sample: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let value = sample();
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {value:#?}"
        );
        std::thread::sleep(every);
    }
}

/// `ZBROKER_TEST_SEED`, which makes the random tests use another seed.
pub fn test_seed() -> Option<u64> {
    let seed = std::env::var("ZBROKER_TEST_SEED").ok()?;
    Some(seed.parse().expect("ZBROKER_TEST_SEED is a number"))
}

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
    /// Every endpoint as bound, in the order configured.
    pub pub_endpoints: Vec<String>,
    pub sub_endpoints: Vec<String>,
    pub xpub_endpoints: Vec<String>,
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
                config.pub_bind = vec!["tcp://127.0.0.1:*".into()];
                config.sub_bind = vec!["tcp://127.0.0.1:*".into()];
                None
            }
            Transport::Ipc => {
                let dir = tempfile::tempdir().expect("create a temp dir");
                config.pub_bind = vec![format!("ipc://{}/pub", dir.path().display())];
                config.sub_bind = vec![format!("ipc://{}/sub", dir.path().display())];
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
        let pub_endpoints = server.pub_endpoints().to_vec();
        let sub_endpoints = server.sub_endpoints().to_vec();
        let xpub_endpoints = server.xpub_endpoints().to_vec();
        let stats = server.stats();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run().expect("broker loop"));
        TestBroker {
            pub_endpoint,
            sub_endpoint,
            pub_endpoints,
            sub_endpoints,
            xpub_endpoints,
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
        wait_until(
            limit,
            Duration::from_millis(20),
            what,
            || self.stats.snapshot(),
            done,
        )
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

/// What a broker binds for `transport`: loopback tcp on ports the system
/// picks (the broker reports them), or ipc paths in `dir`.
pub fn binds(transport: Transport, dir: &std::path::Path) -> (String, String) {
    match transport {
        Transport::Tcp => ("tcp://127.0.0.1:0".into(), "tcp://127.0.0.1:0".into()),
        Transport::Ipc => (
            format!("ipc://{}/pub", dir.display()),
            format!("ipc://{}/sub", dir.display()),
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
