//! Starting and stopping the systems under test, each on 127.0.0.1 only,
//! and reading their CPU time and memory from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{cpu_seconds, free_port, proc_status_kb, wait_port};

/// Paths and settings every system needs.
#[derive(Clone, Debug)]
pub struct Env {
    /// `target/release/zbroker` of the repository.
    pub zbroker: PathBuf,
    /// This harness (for the `proxy` sub-mode).
    pub harness: PathBuf,
    /// Where server logs and config files go.
    pub work: PathBuf,
}

/// A running server: one process, several (a cluster, each process a
/// node), or none (the brokerless baseline).
pub struct Server {
    #[allow(dead_code)]
    pub name: String,
    children: Vec<Child>,
    /// Ports it listens on for clients, `per_node` of them per node, in a
    /// system-specific order, node after node.
    pub ports: Vec<u16>,
    /// Client ports per node (`ports.len()` for a single process).
    pub per_node: usize,
    /// Each node's monitoring port (cluster systems only: zbroker's
    /// `--metrics-bind`, nats-server's `-m`).
    pub monitor: Vec<u16>,
    /// Each node's log file.
    pub logs: Vec<PathBuf>,
    pub command: String,
}

impl Server {
    pub fn none(name: &str, ports: Vec<u16>) -> Server {
        Server {
            name: name.into(),
            children: Vec::new(),
            per_node: ports.len(),
            ports,
            monitor: Vec::new(),
            logs: Vec::new(),
            command: String::new(),
        }
    }

    /// Nodes (processes); 1 for a single broker and for none.
    pub fn nodes(&self) -> usize {
        self.children.len().max(1)
    }

    /// Port `k` of node `node` (taken modulo the node count, so a workload
    /// that places clients on nodes B and C runs on a single broker too).
    pub fn node_port(&self, node: usize, k: usize) -> u16 {
        self.ports[(node % self.nodes()) * self.per_node + k]
    }

    /// utime + stime so far, seconds, summed over every process (None
    /// without one, or if one is unreadable).
    pub fn cpu(&self) -> Option<f64> {
        if self.children.is_empty() {
            return None;
        }
        self.children.iter().map(|c| cpu_seconds(c.id())).sum()
    }

    /// Peak resident set (VmHWM), KiB, summed over every process.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        self.status_sum("VmHWM")
    }

    /// Current resident set (VmRSS), KiB, summed over every process.
    pub fn rss_kb(&self) -> Option<u64> {
        self.status_sum("VmRSS")
    }

    fn status_sum(&self, key: &str) -> Option<u64> {
        if self.children.is_empty() {
            return None;
        }
        self.children
            .iter()
            .map(|c| proc_status_kb(c.id(), key))
            .sum()
    }

    /// Whether every process is still running.
    pub fn alive(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM to every process, then SIGKILL to those still running after
    /// 5 s.
    pub fn stop(&mut self) {
        let mut children = std::mem::take(&mut self.children);
        for child in &children {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if children
                .iter_mut()
                .all(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Adds `other`'s processes, ports, monitoring ports and logs as the
    /// next node (all nodes must have the same number of client ports).
    fn join(&mut self, mut other: Server) {
        self.children.append(&mut other.children);
        self.ports.append(&mut other.ports);
        self.monitor.append(&mut other.monitor);
        self.logs.append(&mut other.logs);
        if self.command.is_empty() {
            self.command = std::mem::take(&mut other.command);
        } else {
            self.command = format!("{}; {}", self.command, other.command);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(
    name: &str,
    mut cmd: Command,
    ports: Vec<u16>,
    wait: &[u16],
    env: &Env,
) -> Result<Server, String> {
    let log = env.work.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let file2 = file.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
    die_with_parent(&mut cmd);
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() {
                "\"\"".to_string()
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name} ({command}): {e}"))?;
    let mut server = Server {
        name: name.into(),
        children: vec![child],
        per_node: ports.len(),
        ports,
        monitor: Vec::new(),
        logs: vec![log.clone()],
        command,
    };
    for &p in wait {
        if let Err(e) = wait_port(p, Duration::from_secs(10)) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            server.stop();
            return Err(format!("{name}: {e}\n{tail}"));
        }
    }
    Ok(server)
}

/// Makes the child get SIGTERM if the harness dies first.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// The `run` arguments a system that is the zbroker binary adds to the
/// common ones below; None for the other systems. All of these speak
/// protocol v1 and use the same clients.
pub fn zbroker_args(system: &str) -> Option<&'static [&'static str]> {
    match system {
        "zbroker" => Some(&[]),
        "zbroker-bp" => Some(&["--overflow", "backpressure"]),
        _ => None,
    }
}

/// Whether `system` is the zbroker binary (in any configuration).
pub fn is_zbroker(system: &str) -> bool {
    zbroker_args(system).is_some()
}

/// Whether `system` is served by zbroker's protocol v1 clients: a single
/// zbroker in any configuration, or the mesh.
pub fn speaks_v1(system: &str) -> bool {
    is_zbroker(system) || system == "zbroker-mesh"
}

/// zbroker as `system` (see [`zbroker_args`]): its defaults except the
/// endpoints, a 600 s subscriber timeout (the load generator does not PING)
/// and warnings-only logs, optionally with a `--config` file; its log is
/// `<work>/<system>.log`.
pub fn zbroker_with(env: &Env, system: &str, config: Option<&Path>) -> Result<Server, String> {
    let system_args = zbroker_args(system).ok_or_else(|| format!("{system} is not zbroker"))?;
    let (p1, p2) = (free_port(), free_port());
    let mut cmd = zbroker_command(env, system_args);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--pub-bind")
        .arg(format!("tcp://127.0.0.1:{p1}"))
        .arg("--sub-bind")
        .arg(format!("tcp://127.0.0.1:{p2}"))
        .args(["--sub-timeout", "600s"]);
    spawn(system, cmd, vec![p1, p2], &[p1, p2], env)
}

/// `zbroker --log-level warn run` with `system_args`, under
/// `COMPARE_WRAP_ZBROKER` and with `COMPARE_ZBROKER_ARGS` when set.
fn zbroker_command(env: &Env, system_args: &[&str]) -> Command {
    let mut cmd = Command::new(&env.zbroker);
    if let Some(wrap) = std::env::var("COMPARE_WRAP_ZBROKER")
        .ok()
        .filter(|w| !w.is_empty())
    {
        // Profiling: e.g. "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p".
        let mut words = wrap.split_whitespace();
        cmd = Command::new(words.next().expect("non-empty"));
        cmd.args(words).arg(&env.zbroker);
    }
    cmd.args(["--log-level", "warn", "run"]);
    // Extra flags for experiments (profiling, metrics); empty in the
    // published runs.
    if let Ok(extra) = std::env::var("COMPARE_ZBROKER_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.args(system_args);
    cmd
}

/// The names of a cluster's nodes: publishers sit on the first (A).
pub const NODE_NAMES: [&str; 3] = ["a", "b", "c"];

/// How long a cluster may take to link up.
const LINK_DEADLINE: Duration = Duration::from_secs(30);

/// Three zbroker processes in a full mesh (`--cluster-peers` lists all
/// three cluster endpoints, each broker's own included, as tests/cluster.rs
/// does), each otherwise as `zbroker` (see [`zbroker_with`]) plus
/// `--metrics-bind` on a free port; returns once every broker's link to
/// both others is up (`zbroker_peer_up{peer=...} 1`). Ports per node: the
/// publisher and subscriber endpoints.
pub fn zbroker_mesh(env: &Env) -> Result<Server, String> {
    let cluster_ports: Vec<u16> = NODE_NAMES.iter().map(|_| free_port()).collect();
    let peers = cluster_ports
        .iter()
        .map(|p| format!("tcp://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut mesh: Option<Server> = None;
    for (i, name) in NODE_NAMES.iter().enumerate() {
        let (p1, p2, metrics) = (free_port(), free_port(), free_port());
        let mut cmd = zbroker_command(env, &[]);
        cmd.arg("--pub-bind")
            .arg(format!("tcp://127.0.0.1:{p1}"))
            .arg("--sub-bind")
            .arg(format!("tcp://127.0.0.1:{p2}"))
            .args(["--sub-timeout", "600s"])
            .arg("--cluster-bind")
            .arg(format!("tcp://127.0.0.1:{}", cluster_ports[i]))
            .arg("--cluster-peers")
            .arg(&peers)
            .args(["--cluster-id", name])
            .arg("--metrics-bind")
            .arg(format!("127.0.0.1:{metrics}"));
        let mut node = spawn(
            &format!("zbroker-mesh-{name}"),
            cmd,
            vec![p1, p2],
            &[p1, p2, metrics],
            env,
        )?;
        node.monitor.push(metrics);
        match mesh.as_mut() {
            None => mesh = Some(node),
            Some(m) => m.join(node),
        }
    }
    let mut mesh = mesh.expect("three nodes");
    mesh.name = "zbroker-mesh".into();
    let deadline = Instant::now() + LINK_DEADLINE;
    for (i, name) in NODE_NAMES.iter().enumerate() {
        let others: Vec<&str> = NODE_NAMES.iter().copied().filter(|n| n != name).collect();
        loop {
            let metrics = scrape(mesh.monitor[i]).unwrap_or_default();
            let up = others.iter().all(|peer| {
                metric(&metrics, &format!("zbroker_peer_up{{peer=\"{peer}\"}}")) == Some(1.0)
            });
            if up {
                break;
            }
            if Instant::now() > deadline || !mesh.alive() {
                return Err(format!(
                    "zbroker mesh: {name}'s links to {others:?} not up after {LINK_DEADLINE:?}; \
                     its metrics:\n{}",
                    metrics
                        .lines()
                        .filter(|l| l.contains("peer"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(mesh)
}

/// A zbroker's metrics (`GET /metrics` on 127.0.0.1:`port`).
pub fn scrape(port: u16) -> Result<String, String> {
    http_get(port, "/metrics")
}

/// One sample of Prometheus text, by series name (labels included).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The body of `GET path` on 127.0.0.1:`port` (one request, `Connection:
/// close`; both exporters used here answer that way).
pub fn http_get(port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("127.0.0.1:{port}{path}: no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "127.0.0.1:{port}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

/// zbroker's default libzmq settings (src/config.rs), which the
/// `proxy-tuned` system gives libzmq's proxy too.
pub const ZBROKER_LIBZMQ: ProxyTuning = ProxyTuning {
    pub_hwm: 1000,
    sub_hwm: 3000,
    io_batch: 65536,
};

/// libzmq settings for the proxy's two sockets, as zbroker sets them on its
/// own: the queue depths from publishers and to subscribers, and the bytes
/// moved per system call on the message path.
#[derive(Clone, Copy, Debug)]
pub struct ProxyTuning {
    /// XSUB `ZMQ_RCVHWM` (zbroker `--pub-hwm`).
    pub pub_hwm: i32,
    /// XPUB `ZMQ_SNDHWM` (zbroker `--sub-hwm`).
    pub sub_hwm: i32,
    /// XSUB `ZMQ_IN_BATCH_SIZE` and XPUB `ZMQ_OUT_BATCH_SIZE` (zbroker `--io-batch`).
    pub io_batch: i32,
}

/// Whether `system` is libzmq's proxy (in any configuration).
pub fn is_proxy(system: &str) -> bool {
    matches!(system, "proxy" | "proxy-tuned")
}

/// libzmq's XSUB/XPUB proxy as `system`, in this harness's `proxy` sub-mode:
/// libzmq's defaults, or zbroker's libzmq settings as `proxy-tuned`.
pub fn proxy(env: &Env, system: &str) -> Result<Server, String> {
    let (p1, p2) = (free_port(), free_port());
    let mut cmd = Command::new(&env.harness);
    if let Some(wrap) = std::env::var("COMPARE_WRAP_PROXY")
        .ok()
        .filter(|w| !w.is_empty())
    {
        let mut words = wrap.split_whitespace();
        cmd = Command::new(words.next().expect("non-empty"));
        cmd.args(words).arg(&env.harness);
    }
    cmd.arg("proxy")
        .arg(format!("tcp://127.0.0.1:{p1}"))
        .arg(format!("tcp://127.0.0.1:{p2}"));
    if system == "proxy-tuned" {
        let t = ZBROKER_LIBZMQ;
        cmd.args([t.pub_hwm, t.sub_hwm, t.io_batch].map(|v| v.to_string()));
    }
    spawn(system, cmd, vec![p1, p2], &[p1, p2], env)
}

/// redis-server without persistence, bound to 127.0.0.1, defaults otherwise
/// (pub/sub client output buffer limit 32mb/8mb/60s).
pub fn redis(env: &Env) -> Result<Server, String> {
    let p = free_port();
    let dir = env.work.join("redis");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("redis-server");
    cmd.arg("--port")
        .arg(p.to_string())
        .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(&dir)
        .args(["--maxclients", "20000"]);
    spawn("redis", cmd, vec![p], &[p], env)
}

/// nats-server bound to 127.0.0.1, defaults otherwise (no monitoring port,
/// no JetStream).
pub fn nats(env: &Env) -> Result<Server, String> {
    let p = free_port();
    let mut cmd = Command::new("nats-server");
    cmd.args(["-a", "127.0.0.1", "-p"]).arg(p.to_string());
    spawn("nats", cmd, vec![p], &[p], env)
}

/// Three nats-server processes in one cluster (`--cluster_name zbench`,
/// each `--routes` to the other two, `-m` for monitoring), defaults
/// otherwise; with `trace`, `-V` (every protocol message in the log, for
/// counting the route's RS+/RS- lines). Returns once each node has routes
/// to both others (`num_routes` 2 on /routez). Ports per node: the client
/// port.
pub fn nats_cluster(env: &Env, trace: bool) -> Result<Server, String> {
    let routes: Vec<u16> = NODE_NAMES.iter().map(|_| free_port()).collect();
    let mut cluster: Option<Server> = None;
    for (i, name) in NODE_NAMES.iter().enumerate() {
        let (p, monitor) = (free_port(), free_port());
        let others = routes
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, r)| format!("nats://127.0.0.1:{r}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p"])
            .arg(p.to_string())
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", routes[i]))
            .arg("--routes")
            .arg(others)
            .args(["--cluster_name", "zbench", "-n"])
            .arg(format!("nats-{name}"))
            .arg("-m")
            .arg(monitor.to_string());
        if trace {
            cmd.arg("-V");
        }
        let log_name = if trace {
            format!("nats-cluster-traced-{name}")
        } else {
            format!("nats-cluster-{name}")
        };
        let mut node = spawn(&log_name, cmd, vec![p], &[p, monitor], env)?;
        node.monitor.push(monitor);
        match cluster.as_mut() {
            None => cluster = Some(node),
            Some(c) => c.join(node),
        }
    }
    let mut cluster = cluster.expect("three nodes");
    cluster.name = "nats-cluster".into();
    let deadline = Instant::now() + LINK_DEADLINE;
    for (i, name) in NODE_NAMES.iter().enumerate() {
        loop {
            let routez = http_get(cluster.monitor[i], "/routez").unwrap_or_default();
            if json_number(&routez, "num_routes") == Some(2.0) {
                break;
            }
            if Instant::now() > deadline || !cluster.alive() {
                return Err(format!(
                    "nats cluster: node {name} has not both routes after {LINK_DEADLINE:?}: {routez}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(cluster)
}

/// A top-level number of a JSON object, e.g. /routez's `num_routes`.
pub fn json_number(text: &str, key: &str) -> Option<f64> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value.get(key)?.as_f64()
}

/// The mosquitto.conf the comparison uses.
pub fn mosquitto_conf(port: u16) -> String {
    format!(
        "# Minimal broker for the comparison: one listener on loopback only.\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

/// mosquitto with a minimal config (one loopback listener, anonymous, no
/// persistence), defaults otherwise.
pub fn mosquitto(env: &Env) -> Result<Server, String> {
    let p = free_port();
    let conf = env.work.join("mosquitto.conf");
    std::fs::write(&conf, mosquitto_conf(p)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    spawn("mosquitto", cmd, vec![p], &[p], env)
}

pub fn start(system: &str, env: &Env) -> Result<Server, String> {
    if is_zbroker(system) {
        return zbroker_with(env, system, None);
    }
    match system {
        "zbroker-mesh" => zbroker_mesh(env),
        "nats-cluster" => nats_cluster(env, false),
        s if is_proxy(s) => proxy(env, s),
        "redis" => redis(env),
        "nats" => nats(env),
        "mosquitto" => mosquitto(env),
        "direct" => Ok(Server::none("direct", vec![])),
        other => Err(format!("unknown system {other}")),
    }
}

pub fn version_of(system: &str, env: &Env) -> String {
    let run = |prog: &Path, args: &[&str]| -> String {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).to_string();
                if s.trim().is_empty() {
                    s = String::from_utf8_lossy(&o.stderr).to_string();
                }
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|e| format!("unknown ({e})"))
    };
    let (maj, min, pat) = zmq::version();
    match system {
        s if is_zbroker(s) || s == "zbroker-mesh" => format!(
            "{} (libzmq {maj}.{min}.{pat})",
            run(&env.zbroker, &["--version"])
        ),
        s if s == "direct" || is_proxy(s) => format!("libzmq {maj}.{min}.{pat}"),
        "redis" => run(Path::new("redis-server"), &["--version"]),
        "nats" | "nats-cluster" => run(Path::new("nats-server"), &["--version"]),
        "mosquitto" => run(Path::new("mosquitto"), &["-h"]),
        _ => String::new(),
    }
}
