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

/// A running server process (or none, for the brokerless baseline).
pub struct Server {
    #[allow(dead_code)]
    pub name: String,
    child: Option<Child>,
    /// Ports it listens on, in a system-specific order.
    pub ports: Vec<u16>,
    pub command: String,
}

impl Server {
    pub fn none(name: &str, ports: Vec<u16>) -> Server {
        Server {
            name: name.into(),
            child: None,
            ports,
            command: String::new(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// utime + stime so far, seconds.
    pub fn cpu(&self) -> Option<f64> {
        cpu_seconds(self.pid()?)
    }

    /// Peak resident set (VmHWM), KiB.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        proc_status_kb(self.pid()?, "VmHWM")
    }

    /// Current resident set (VmRSS), KiB.
    pub fn rss_kb(&self) -> Option<u64> {
        proc_status_kb(self.pid()?, "VmRSS")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
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
        child: Some(child),
        ports,
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

/// zbroker as `system` (see [`zbroker_args`]): its defaults except the
/// endpoints, a 600 s subscriber timeout (the load generator does not PING)
/// and warnings-only logs, optionally with a `--config` file; its log is
/// `<work>/<system>.log`.
pub fn zbroker_with(env: &Env, system: &str, config: Option<&Path>) -> Result<Server, String> {
    let system_args = zbroker_args(system).ok_or_else(|| format!("{system} is not zbroker"))?;
    let (p1, p2) = (free_port(), free_port());
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
        s if is_zbroker(s) => format!(
            "{} (libzmq {maj}.{min}.{pat})",
            run(&env.zbroker, &["--version"])
        ),
        s if s == "direct" || is_proxy(s) => format!("libzmq {maj}.{min}.{pat}"),
        "redis" => run(Path::new("redis-server"), &["--version"]),
        "nats" => run(Path::new("nats-server"), &["--version"]),
        "mosquitto" => run(Path::new("mosquitto"), &["-h"]),
        _ => String::new(),
    }
}
