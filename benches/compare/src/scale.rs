//! The scale test: one zbroker, 10,000 DEALER subscribers holding 10 exact
//! filters each (100,000 distinct topics), a publisher sending round-robin
//! to 1,000 of those topics (each held by a different subscriber). The
//! subscribers live in two child processes (`compare scale-subs`), 5,000
//! sockets each (two file descriptors per socket), polled by two threads
//! per process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bench::{RunResult, Settings, median};
use crate::servers::{self, Env};
use crate::shared::Shared;
use crate::util::{Ctx, KIND_MEASURE, Stamp, encode, now_ns, payload_buffer, raise_nofile};
use crate::zmq_clients::{Proto, poller};

pub const SUBSCRIBERS: usize = 10_000;
pub const PER_SUB: usize = 10;
pub const CHILDREN: usize = 2;
/// Every HOT_STRIDE-th topic is published to: 1,000 topics.
pub const HOT_STRIDE: usize = 100;
/// Sockets a child connects at once.
const CHUNK: usize = 50;
/// How long the parent waits for all subscriptions.
const SETUP_DEADLINE: Duration = Duration::from_secs(90);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleResult {
    pub subscribers: usize,
    pub subscriptions: usize,
    pub hot_topics: usize,
    pub variants: Vec<ScaleVariant>,
}

/// One broker configuration under the scale test.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleVariant {
    pub name: String,
    /// The TOML passed with `--config`, if any.
    pub config: Option<String>,
    pub server_command: String,
    pub error: Option<String>,
    /// Subscribers whose 10 SUBs were all answered OK.
    pub subscribed: usize,
    pub setup_s: f64,
    pub rss_empty_kb: Option<u64>,
    pub rss_subscribed_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    pub peak_rss_kb: Option<u64>,
    pub setup_cpu_s: Option<f64>,
    pub probe: Option<RunResult>,
    pub calibration: Vec<RunResult>,
    pub pace: Option<f64>,
    pub runs: Vec<RunResult>,
}

impl ScaleVariant {
    pub fn rate(&self) -> Option<f64> {
        let ok: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| !r.lossy)
            .map(|r| r.agg_rate)
            .collect();
        if ok.is_empty() || ok.len() * 2 < self.runs.len() {
            return None;
        }
        median(ok)
    }
}

fn topic(id: usize) -> String {
    format!("t.{id:06}")
}

/// `compare scale-subs ENDPOINT FIRST COUNT PER`: the child side.
pub fn child(endpoint: &str, first: usize, count: usize, per: usize) -> Result<(), String> {
    raise_nofile();
    let ctx = Arc::new(Ctx::new(1, (count + 64) as i32));
    let t0 = Instant::now();
    let mut socks = Vec::with_capacity(count);
    // Connect in chunks: more simultaneous connections than the broker's
    // listen backlog (libzmq's ZMQ_BACKLOG, 100) turn into SYN retransmits
    // a second later. Two children connect 50 at a time each.
    let mut out = std::io::stdout().lock();
    for chunk_start in (0..count).step_by(CHUNK) {
        let chunk_end = (chunk_start + CHUNK).min(count);
        for i in chunk_start..chunk_end {
            let d = ctx.socket(zmq::DEALER);
            d.set_rcvhwm(1000).map_err(|e| e.to_string())?;
            d.connect(endpoint).map_err(|e| format!("connect: {e}"))?;
            for j in 0..per {
                let t = topic((first + i) * per + j);
                d.send_multipart([&b"SUB"[..], b"exact", t.as_bytes()], 0)
                    .map_err(|e| format!("send SUB: {e}"))?;
            }
            socks.push((i, d));
        }
        let mut left = (chunk_end - chunk_start) * per;
        let deadline = Instant::now() + Duration::from_secs(600);
        while left > 0 {
            if Instant::now() > deadline {
                return Err(format!("{left} SUBs unanswered"));
            }
            let chunk = &socks[chunk_start..chunk_end];
            let mut items: Vec<zmq::PollItem> = chunk
                .iter()
                .map(|(_, s)| s.as_poll_item(zmq::POLLIN))
                .collect();
            zmq::poll(&mut items, 100).map_err(|e| e.to_string())?;
            for (k, item) in items.iter().enumerate() {
                if !item.is_readable() {
                    continue;
                }
                while let Ok(parts) = chunk[k].1.recv_multipart(zmq::DONTWAIT) {
                    match parts.first().map(Vec::as_slice) {
                        Some(b"OK") => left -= 1,
                        Some(b"ERR") => {
                            return Err(format!(
                                "ERR {:?}",
                                parts
                                    .iter()
                                    .map(|p| String::from_utf8_lossy(p).to_string())
                                    .collect::<Vec<_>>()
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        writeln!(out, "PROGRESS {chunk_end}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    let shared = Arc::new(Shared::new(count, 2));
    shared.subscribed.store(count, Relaxed);
    writeln!(out, "READY {}", t0.elapsed().as_millis()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;

    let mut groups: Vec<Vec<(usize, zmq::Socket)>> = vec![Vec::new(), Vec::new()];
    for (i, s) in socks.into_iter().enumerate() {
        groups[i % 2].push(s);
    }
    let threads: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(t, g)| {
            let shared = Arc::clone(&shared);
            let ctx = Arc::clone(&ctx);
            std::thread::spawn(move || {
                poller(g, Proto::Zbroker, &shared, t);
                drop(ctx);
            })
        })
        .collect();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["RUN", id] => {
                shared.begin_run(id.parse().map_err(|_| "bad run id")?, false);
                writeln!(out, "OK").map_err(|e| e.to_string())?;
            }
            ["COUNT"] => {
                let received: u64 = shared.slots.iter().map(|s| s.received.load(Relaxed)).sum();
                let gaps: u64 = shared.slots.iter().map(|s| s.gaps.load(Relaxed)).sum();
                let last = shared
                    .slots
                    .iter()
                    .map(|s| s.last_ns.load(Relaxed))
                    .max()
                    .unwrap_or(0);
                writeln!(out, "COUNT {received} {gaps} {last}").map_err(|e| e.to_string())?;
            }
            ["QUIT"] => break,
            _ => {}
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    shared.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

struct ChildProc {
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ChildProc {
    fn spawn(mut child: Child) -> ChildProc {
        let stdin = child.stdin.take().expect("piped");
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim().to_string()).is_err() {
                    break;
                }
            }
        });
        ChildProc {
            child,
            stdin,
            lines,
        }
    }

    fn ask(&mut self, line: &str) -> Result<String, String> {
        writeln!(self.stdin, "{line}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        self.read(Duration::from_secs(30))?
            .ok_or_else(|| format!("no answer to {line}"))
    }

    /// The next line, or None after `timeout`.
    fn read(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(Some(l)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(_) => Err("scale child exited".into()),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "QUIT");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(clippy::too_many_arguments)]
fn scale_run(
    server: &mut servers::Server,
    children: &mut [ChildProc],
    push: &zmq::Socket,
    hot: &[Vec<u8>],
    run: u8,
    duration: Duration,
    rate: Option<f64>,
    idle: Duration,
) -> Result<RunResult, String> {
    for c in children.iter_mut() {
        let r = c.ask(&format!("RUN {run}"))?;
        if r != "OK" {
            return Err(format!("child said {r}"));
        }
    }
    let mut payload = payload_buffer(64);
    let cpu0 = server.cpu();
    let t0 = now_ns();
    let end = t0 + duration.as_nanos() as u64;
    let mut k = 0u64;
    let mut stamp = Stamp {
        seq: 0,
        sent_ns: 0,
        publisher: 0,
        run,
        kind: KIND_MEASURE,
    };
    loop {
        let now = now_ns();
        if now >= end {
            break;
        }
        let due = match rate {
            None => k + 64,
            Some(r) => ((now - t0) as f64 * r / 1e9) as u64 + 1,
        };
        if k >= due {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        while k < due {
            stamp.seq = k;
            stamp.sent_ns = now_ns();
            encode(&mut payload, stamp);
            let t = &hot[(k % hot.len() as u64) as usize];
            push.send(&t[..], zmq::SNDMORE).map_err(|e| e.to_string())?;
            push.send(&payload[..], 0).map_err(|e| e.to_string())?;
            k += 1;
        }
    }
    let sent = k;
    let mut last_total = u64::MAX;
    let mut last_progress = Instant::now();
    let (received, gaps, last) = loop {
        let mut received = 0;
        let mut gaps = 0;
        let mut last = 0;
        for c in children.iter_mut() {
            let r = c.ask("COUNT")?;
            let w: Vec<u64> = r
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            if w.len() != 3 {
                return Err(format!("bad COUNT reply {r}"));
            }
            received += w[0];
            gaps += w[1];
            last = last.max(w[2]);
        }
        if received >= sent {
            break (received, gaps, last);
        }
        if received != last_total {
            last_total = received;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > idle {
            break (received, gaps, last);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu1 = server.cpu();
    let elapsed_s = last.saturating_sub(t0) as f64 / 1e9;
    let lost = sent.saturating_sub(received);
    let cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let per = |x: f64| if elapsed_s > 0.0 { x / elapsed_s } else { 0.0 };
    Ok(RunResult {
        paced: rate,
        sent,
        expected: sent,
        delivered: received,
        gaps,
        foreign: 0,
        lossy: lost > 0 || gaps > 0,
        loss_pct: 100.0 * lost.max(gaps) as f64 / sent.max(1) as f64,
        elapsed_s,
        per_sub_rate: per(received as f64 / hot.len() as f64),
        agg_rate: per(received as f64),
        publish_rate: per(sent as f64),
        cpu_s,
        cpu_s_per_m: cpu_s
            .filter(|_| received > 0)
            .map(|c| c / (received as f64 / 1e6)),
        latency: None,
        min_max_seq: 0,
        reordered: 0,
        disconnects: 0,
    })
}

/// The broker configurations the scale test runs: zbroker's defaults, and
/// the same with a 1 s ZMTP heartbeat (the default before commit 76fce70).
/// libzmq 4.3 cancels a heartbeat timer with a linear scan over all of the
/// I/O thread's timers, once per connection per heartbeat: with a short
/// interval that is quadratic in the connection count.
pub fn variants(env: &Env) -> Vec<(String, Option<&'static str>)> {
    let default = default_heartbeat(env).unwrap_or_else(|| "?".into());
    vec![
        (format!("defaults (ZMTP heartbeat {default})"), None),
        (
            "zmtp_heartbeat = 1s".to_string(),
            Some("zmtp_heartbeat = \"1s\"\n"),
        ),
    ]
}

/// The binary's default ZMTP heartbeat, from `zbroker run --check-config`.
fn default_heartbeat(env: &Env) -> Option<String> {
    let out = Command::new(&env.zbroker)
        .args(["run", "--check-config"])
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // A TOML line: `zmtp_heartbeat = "30s"`.
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("zmtp_heartbeat ="))?;
    Some(line.split('=').nth(1)?.trim().trim_matches('"').to_string())
}

pub fn run(env: &Env, settings: &Settings) -> ScaleResult {
    let mut result = ScaleResult {
        subscribers: SUBSCRIBERS,
        subscriptions: SUBSCRIBERS * PER_SUB,
        hot_topics: SUBSCRIBERS * PER_SUB / HOT_STRIDE,
        variants: Vec::new(),
    };
    // COMPARE_SCALE_VARIANTS=1 runs only the second variant (profiling).
    let only: Option<Vec<usize>> = std::env::var("COMPARE_SCALE_VARIANTS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    for (i, (name, config)) in variants(env).into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        eprintln!("  scale variant: {name}");
        let mut v = ScaleVariant {
            name,
            config: config.map(str::to_string),
            ..Default::default()
        };
        if let Err(e) = run_variant(env, settings, &mut v) {
            eprintln!("  scale: {e}");
            v.error = Some(e);
        }
        result.variants.push(v);
    }
    result
}

fn run_variant(env: &Env, settings: &Settings, v: &mut ScaleVariant) -> Result<(), String> {
    let config_path = match &v.config {
        Some(text) => {
            let p = env.work.join("scale-zbroker.toml");
            std::fs::write(&p, text).map_err(|e| e.to_string())?;
            Some(p)
        }
        None => None,
    };
    let mut server = servers::zbroker_with(env, "zbroker", config_path.as_deref())?;
    v.server_command = server.command.clone();
    std::thread::sleep(Duration::from_millis(200));
    v.rss_empty_kb = server.rss_kb();
    let cpu0 = server.cpu();
    let t0 = Instant::now();
    let endpoint = format!("tcp://127.0.0.1:{}", server.ports[1]);
    let per_child = SUBSCRIBERS / CHILDREN;
    let mut children = Vec::new();
    for c in 0..CHILDREN {
        let mut cmd = Command::new(&env.harness);
        cmd.arg("scale-subs")
            .arg(&endpoint)
            .arg((c * per_child).to_string())
            .arg(per_child.to_string())
            .arg(PER_SUB.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        servers::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("spawn scale child: {e}"))?;
        children.push(ChildProc::spawn(child));
    }
    let mut progress = [0usize; CHILDREN];
    let mut ready = [false; CHILDREN];
    let deadline = t0 + SETUP_DEADLINE;
    while ready.iter().any(|r| !r) && Instant::now() < deadline {
        for (i, c) in children.iter_mut().enumerate() {
            if ready[i] {
                continue;
            }
            while let Some(line) = c.read(Duration::from_millis(20))? {
                if let Some(n) = line.strip_prefix("PROGRESS ") {
                    progress[i] = n.parse().unwrap_or(progress[i]);
                } else if line.starts_with("READY") {
                    ready[i] = true;
                    break;
                } else {
                    return Err(format!("scale child: {line}"));
                }
            }
        }
    }
    v.subscribed = progress.iter().sum();
    v.setup_s = t0.elapsed().as_secs_f64();
    v.setup_cpu_s = cpu0.zip(server.cpu()).map(|(a, b)| b - a);
    v.rss_subscribed_kb = server.rss_kb();
    if ready.iter().any(|r| !r) {
        v.peak_rss_kb = server.peak_rss_kb();
        return Err(format!(
            "only {} of {SUBSCRIBERS} subscribers subscribed within {:.0} s (broker CPU {:.1} s meanwhile)",
            v.subscribed,
            SETUP_DEADLINE.as_secs_f64(),
            v.setup_cpu_s.unwrap_or(0.0)
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    v.rss_subscribed_kb = server.rss_kb();
    eprintln!(
        "  scale: {} subscribers, {} filters in {:.1} s; broker RSS {} MiB",
        SUBSCRIBERS,
        SUBSCRIBERS * PER_SUB,
        v.setup_s,
        v.rss_subscribed_kb.unwrap_or(0) / 1024
    );

    let ctx = Ctx::new(1, 16);
    let push = ctx.socket(zmq::PUSH);
    push.connect(&format!("tcp://127.0.0.1:{}", server.ports[0]))
        .map_err(|e| e.to_string())?;
    let hot: Vec<Vec<u8>> = (0..SUBSCRIBERS * PER_SUB)
        .step_by(HOT_STRIDE)
        .map(|t| topic(t).into_bytes())
        .collect();
    let idle = settings.idle * 2;
    let mut run_id = 200u8;
    let mut next = || {
        run_id = run_id.wrapping_add(1).max(1);
        run_id
    };
    let dur = settings.duration;
    let probe = scale_run(
        &mut server,
        &mut children,
        &push,
        &hot,
        next(),
        dur,
        None,
        idle,
    )?;
    eprintln!(
        "    probe: {} deliveries/s, loss {:.3}%",
        crate::util::si(probe.agg_rate),
        probe.loss_pct
    );
    let mut pace = None;
    if probe.lossy {
        let mut rate = 0.9 * probe.agg_rate;
        for _ in 0..5 {
            let r = scale_run(
                &mut server,
                &mut children,
                &push,
                &hot,
                next(),
                dur,
                Some(rate),
                idle,
            )?;
            eprintln!(
                "    calibrate {}: loss {:.3}%",
                crate::util::si(rate),
                r.loss_pct
            );
            let ok = !r.lossy;
            v.calibration.push(r);
            pace = Some(rate);
            if ok {
                break;
            }
            rate *= 0.75;
        }
    }
    v.probe = Some(probe);
    v.pace = pace;
    for i in 0..settings.runs.min(3) {
        let r = scale_run(
            &mut server,
            &mut children,
            &push,
            &hot,
            next(),
            dur,
            pace,
            idle,
        )?;
        eprintln!(
            "    run {}: {} deliveries/s{}",
            i + 1,
            crate::util::si(r.agg_rate),
            if r.lossy {
                format!(", LOSSY {:.3}%", r.loss_pct)
            } else {
                String::new()
            }
        );
        v.runs.push(r);
    }
    v.rss_after_kb = server.rss_kb();
    v.peak_rss_kb = server.peak_rss_kb();
    drop(push);
    drop(children);
    server.stop();
    Ok(())
}
