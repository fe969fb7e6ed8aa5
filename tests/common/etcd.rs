//! A real etcd server as a child process: Debian's `etcd-server` package
//! (`/usr/bin/etcd`; `ZBROKER_TEST_ETCD` names another binary), on free
//! loopback ports, its data in a temporary directory; started healthy,
//! stopped and restarted on the same ports and data, killed on drop. Also a
//! raw etcd client, to look at and write keys behind the membership's back.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};

use super::child::Reaped;
use super::{DEADLINE, free_port};

/// One etcd member forming a cluster of one.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`, where clients connect.
    pub client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
    process: Option<Reaped>,
}

impl Etcd {
    /// Starts etcd and waits until it reports itself healthy; fails the test
    /// (saying to run `scripts/deps`) when etcd is not installed.
    pub fn start() -> Etcd {
        let mut etcd = Etcd {
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir: tempfile::tempdir().expect("create a temp dir"),
            process: None,
        };
        etcd.restart();
        etcd
    }

    /// Kills etcd (a crash, as far as clients can tell) and waits for it to
    /// be gone. Its data stays, for [`Etcd::restart`].
    pub fn stop(&mut self) {
        drop(self.process.take());
    }

    /// Freezes etcd (SIGSTOP): its sockets stay open but nothing answers,
    /// as with a hung server or a network that drops packets.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`Etcd::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let process = self.process.as_ref().expect("etcd is running");
        let pid = process.0.id().to_string();
        let status = Command::new("kill")
            .args([which, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid}");
    }

    /// Starts etcd again on the same ports and data (or for the first time),
    /// and waits until it is healthy.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "etcd is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log");
        let mut command = Command::new(binary());
        command
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log);
        // etcd reads any ETCD_* variable as a flag.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run scripts/deps to install etcd (Debian's etcd-server)",
                binary().display()
            )
        });
        self.process = Some(Reaped(child));
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        let address = self.client_url.trim_start_matches("http://").to_string();
        loop {
            if let Some(process) = &mut self.process
                && let Ok(Some(status)) = process.0.try_wait()
            {
                panic!("etcd exited ({status}) while starting:\n{}", self.log());
            }
            match health(&address) {
                Ok(body) if body.contains(r#""health":"true""#) => return,
                result => assert!(
                    Instant::now() < deadline,
                    "etcd not healthy within {DEADLINE:?} ({result:?}):\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Everything etcd logged, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `f` with a fresh client on a runtime of its own.
    fn with_client<T>(&self, f: impl AsyncFnOnce(&mut Client) -> T) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async {
            let call = async {
                let mut client = Client::connect([&self.client_url], None)
                    .await
                    .expect("connect to etcd");
                f(&mut client).await
            };
            tokio::time::timeout(DEADLINE, call)
                .await
                .expect("etcd answers within the deadline")
        })
    }

    /// Puts `value` at `key`, with no lease.
    pub fn put(&self, key: &[u8], value: &[u8]) {
        self.with_client(async |client| {
            client
                .put(key.to_vec(), value.to_vec(), None)
                .await
                .expect("put");
        });
    }

    /// The key-value pairs under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<Kv> {
        self.with_client(async |client| {
            let response = client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .expect("get");
            response
                .kvs()
                .iter()
                .map(|kv| Kv {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    value: String::from_utf8_lossy(kv.value()).into_owned(),
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                })
                .collect()
        })
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.with_client(async |client| {
            let response = client.get("/", None).await.expect("get");
            response.header().expect("a header").revision()
        })
    }
}

/// A key-value pair as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    /// The revision of its last put.
    pub mod_revision: i64,
    /// Its lease, 0 for none.
    pub lease: i64,
}

/// The etcd binary: `ZBROKER_TEST_ETCD`, or Debian's.
fn binary() -> PathBuf {
    std::env::var_os("ZBROKER_TEST_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// `GET /health`, by hand: one request, bounded in time.
fn health(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /health HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
