//! Runs: warm-up, a timed publishing phase (flood or paced), waiting for the
//! deliveries, and the figures of one run; calibration of a lossless rate;
//! the whole measurement of one (system, workload) pair.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::servers::{self, Env};
use crate::session::{PubSink, Session};
use crate::shared::Shared;
use crate::util::{KIND_MEASURE, KIND_WARM, Stamp, encode, now_ns, payload_buffer};
use crate::workload::Workload;
use crate::{async_clients, zmq_clients};

#[derive(Clone, Debug)]
pub struct Settings {
    /// Publishing time of a measured run.
    pub duration: Duration,
    /// Publishing time of a calibration run.
    pub probe_duration: Duration,
    /// Measured runs per pair.
    pub runs: usize,
    /// A run ends this long after the last delivery when some are missing.
    pub idle: Duration,
    /// Whether a throughput pair ends with a run at half its peak rate that
    /// records latency (`compare cluster` measures latency at a fixed rate
    /// instead).
    pub latency_run: bool,
    /// Whether calibration after a lossy flat-out run starts at no less
    /// than 90 % of half the rate the probe published at (rather than at
    /// 90 % of what got through, however little that was).
    pub calibrate_from_half_publish_rate: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub samples: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// Total publish rate the publishers were paced at (None: flat out).
    pub paced: Option<f64>,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    /// zbroker: messages its seq numbers say were dropped.
    pub gaps: u64,
    /// Payloads without our stamp (must be 0).
    pub foreign: u64,
    pub lossy: bool,
    pub loss_pct: f64,
    /// First publish to last delivery, seconds.
    pub elapsed_s: f64,
    /// Delivered messages per second per receiving subscriber.
    pub per_sub_rate: f64,
    /// All deliveries per second.
    pub agg_rate: f64,
    /// Messages published per second (all publishers), first publish to
    /// last delivery.
    pub publish_rate: f64,
    /// Broker CPU (utime + stime, all threads) during the run, seconds.
    pub cpu_s: Option<f64>,
    pub cpu_s_per_m: Option<f64>,
    pub latency: Option<Latency>,
    /// Single publisher: the lowest "highest seq + 1" any receiver saw
    /// (below `sent` means the tail of the run was lost).
    #[serde(default)]
    pub min_max_seq: u64,
    /// Measured messages that arrived below a higher seq (single publisher).
    #[serde(default)]
    pub reordered: u64,
    /// Subscriber connections the system closed during the run.
    #[serde(default)]
    pub disconnects: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PairResult {
    pub system: String,
    pub workload: String,
    pub error: Option<String>,
    /// The first flat-out run.
    pub probe: Option<RunResult>,
    /// Paced runs that searched for a rate without loss (steps down, then
    /// the bisections refining it).
    pub calibration: Vec<RunResult>,
    /// The pace of the measured runs (None: flat out).
    pub pace: Option<f64>,
    pub runs: Vec<RunResult>,
    /// Earlier rounds of runs whose majority lost messages (then repeated
    /// at a lower pace).
    #[serde(default)]
    pub discarded: Vec<RunResult>,
    pub latency_run: Option<RunResult>,
    pub peak_rss_kb: Option<u64>,
    pub setup_s: f64,
    pub server_command: String,
    /// /proc/loadavg (1, 5, 15 min) when the pair started: other work on
    /// the machine.
    #[serde(default)]
    pub loadavg: String,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl PairResult {
    pub fn lossless_runs(&self) -> Vec<&RunResult> {
        self.runs.iter().filter(|r| !r.lossy).collect()
    }

    /// Median msgs/s per subscriber over lossless runs, if most runs were
    /// lossless.
    pub fn rate(&self) -> Option<f64> {
        let ok = self.lossless_runs();
        if ok.is_empty() || ok.len() * 2 < self.runs.len() {
            return None;
        }
        median(ok.iter().map(|r| r.per_sub_rate).collect())
    }

    pub fn median_loss(&self) -> Option<f64> {
        median(self.runs.iter().map(|r| r.loss_pct).collect())
    }

    pub fn cpu_per_m(&self) -> Option<f64> {
        let ok = self.lossless_runs();
        let src: Vec<&RunResult> = if ok.is_empty() {
            self.runs.iter().collect()
        } else {
            ok
        };
        median(src.iter().filter_map(|r| r.cpu_s_per_m).collect())
    }
}

fn open(system: &str, wl: &Workload, env: &Env) -> Result<Session, String> {
    let mut server = servers::start(system, env)?;
    let t0 = Instant::now();
    let zmq = zmq_clients::handles(system);
    let lat_sinks = if zmq {
        zmq_clients::SUB_THREADS
    } else {
        wl.subs
    };
    let shared = Arc::new(Shared::new(wl.subs, lat_sinks));
    let opened = match system {
        _ if zmq => zmq_clients::open(system, wl, &mut server, &shared),
        "redis" => async_clients::open_redis(wl, &mut server, &shared),
        "nats" | "nats-cluster" => async_clients::open_nats(wl, &mut server, &shared),
        "mosquitto" => async_clients::open_mqtt(wl, &mut server, &shared),
        other => Err(format!("unknown system {other}")),
    };
    let (pubs, subs) = opened?;
    Ok(Session {
        wl: wl.clone(),
        system: system.into(),
        shared,
        pubs,
        subs: Some(subs),
        setup_s: t0.elapsed().as_secs_f64(),
        server,
    })
}

/// Calibration: paced attempts, each `STEP` times the previous rate.
const CALIBRATION_STEPS: usize = 6;
const STEP: f64 = 0.75;
/// Then bisections between the lossless rate found and the lossy one above.
const REFINE_STEPS: usize = 2;
/// Rounds of measured runs repeated at a lower pace when most lost messages.
const EXTRA_ROUNDS: usize = 2;

/// The id stamped into the next run's messages (stragglers of earlier runs
/// carry other ids and are ignored).
static RUN_ID: AtomicU8 = AtomicU8::new(1);

fn next_run_id() -> u8 {
    loop {
        let id = RUN_ID.fetch_add(1, Relaxed);
        if id != 0 {
            return id;
        }
    }
}

struct Publisher<'a> {
    sink: &'a mut Box<dyn PubSink>,
    index: usize,
    measured_topics: usize,
    warm_topics: usize,
    payload: Vec<u8>,
}

impl Publisher<'_> {
    fn warm_up(&mut self, run: u8, done: &AtomicBool) {
        let mut round = 0u64;
        while !done.load(Relaxed) {
            for t in 0..self.warm_topics {
                let stamp = Stamp {
                    seq: round,
                    sent_ns: now_ns(),
                    publisher: self.index as u8,
                    run,
                    kind: KIND_WARM,
                };
                encode(&mut self.payload, stamp);
                self.sink.send(t, &self.payload);
            }
            self.sink.flush();
            round += 1;
            // Back off (10 ms, 20 ms, ... up to 500 ms between rounds): a
            // round to 1,000 topics is 1,000 messages, and a slow system must
            // not be buried under warm-up rounds. Sleep in short steps so the
            // measurement starts promptly.
            let pause = (10u64 << round.min(6)).min(500);
            for _ in 0..pause {
                if done.load(Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Publishes for `duration`, flat out or at `rate` msgs/s; returns the
    /// count.
    fn publish(&mut self, run: u8, duration: Duration, rate: Option<f64>, stamp_time: bool) -> u64 {
        let start = now_ns();
        let end = start + duration.as_nanos() as u64;
        let n = self.measured_topics as u64;
        let mut stamp = Stamp {
            seq: 0,
            sent_ns: 0,
            publisher: self.index as u8,
            run,
            kind: KIND_MEASURE,
        };
        let mut k = 0u64;
        // Profiling under valgrind: cap the count so a run stays short.
        let cap = std::env::var("COMPARE_MAX_MESSAGES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let end = if cap < u64::MAX { u64::MAX } else { end };
        match rate {
            None => loop {
                for _ in 0..64 {
                    stamp.seq = k;
                    if stamp_time {
                        stamp.sent_ns = now_ns();
                    }
                    encode(&mut self.payload, stamp);
                    self.sink.send((k % n) as usize, &self.payload);
                    k += 1;
                }
                if now_ns() >= end || k >= cap {
                    break;
                }
            },
            Some(rate) => {
                let per_ns = rate / 1e9;
                // After a stall (this thread descheduled), catch up at most
                // 10 ms worth of messages at once and forget the rest of
                // the debt: a long catch-up burst would measure the burst,
                // not the rate.
                let max_debt = ((rate / 100.0) as u64).max(16);
                let mut anchor = start;
                let mut anchor_k = 0u64;
                loop {
                    let now = now_ns();
                    if now >= end || k >= cap {
                        break;
                    }
                    let mut due = anchor_k + ((now - anchor) as f64 * per_ns) as u64 + 1;
                    if due > k + max_debt {
                        anchor = now;
                        anchor_k = k;
                        due = k + 1;
                    }
                    if k < due {
                        let until = due;
                        while k < until {
                            stamp.seq = k;
                            stamp.sent_ns = now_ns();
                            encode(&mut self.payload, stamp);
                            self.sink.send((k % n) as usize, &self.payload);
                            k += 1;
                        }
                    } else {
                        self.sink.flush();
                        // Next message is due in (k + 1 - due) / rate.
                        let wait_ns = ((k + 1 - due) as f64 / per_ns) as u64;
                        std::thread::sleep(Duration::from_nanos(wait_ns.clamp(20_000, 1_000_000)));
                    }
                }
            }
        }
        self.sink.finish();
        k
    }
}

/// One run: warm-up until every subscriber saw a warm-up message from each
/// of its publishers, then `duration` of publishing, then waiting until all
/// expected deliveries arrived (or `settings.idle` passed without progress).
pub fn run_once(
    sess: &mut Session,
    settings: &Settings,
    duration: Duration,
    rate: Option<f64>,
    latency: bool,
) -> Result<RunResult, String> {
    let wl = sess.wl.clone();
    let shared: Arc<Shared> = Arc::clone(&sess.shared);
    let run = next_run_id();
    shared.begin_run(run, latency);
    let disconnects0 = shared.disconnects.load(Relaxed);
    let warm_done = AtomicBool::new(false);
    let barrier = Barrier::new(wl.pubs + 1);
    let per_pub_rate = rate.map(|r| r / wl.pubs as f64);
    let masks: Vec<u64> = (0..wl.subs).map(|s| wl.ready_mask(s)).collect();
    let mut cpu0 = None;
    let mut t0 = 0;
    let sent: Vec<u64> = std::thread::scope(|scope| -> Result<Vec<u64>, String> {
        let mut handles = Vec::new();
        for (p, sink) in sess.pubs.iter_mut().enumerate() {
            let mut publisher = Publisher {
                sink,
                index: p,
                measured_topics: wl.pub_topics(p).len(),
                warm_topics: wl.warm_topics(p).len(),
                payload: payload_buffer(wl.payload),
            };
            let warm_done = &warm_done;
            let barrier = &barrier;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("pub-{p}"))
                    .spawn_scoped(scope, move || {
                        publisher.warm_up(run, warm_done);
                        barrier.wait();
                        publisher.publish(run, duration, per_pub_rate, latency)
                    })
                    .expect("spawn publisher"),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            let ready = shared
                .slots
                .iter()
                .zip(&masks)
                .all(|(slot, &m)| slot.ready.load(Relaxed) & m == m);
            if ready || Instant::now() > deadline {
                break ready;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        warm_done.store(true, Relaxed);
        // Let the last warm-up messages drain: wait until nothing has
        // arrived for 30 ms.
        let drain_deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = shared.any_received();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(30) && Instant::now() < drain_deadline {
            std::thread::sleep(Duration::from_millis(2));
            let now_seen = shared.any_received();
            if now_seen != seen {
                seen = now_seen;
                quiet_since = Instant::now();
            }
        }
        cpu0 = sess.server.cpu();
        t0 = now_ns();
        barrier.wait();
        let sent = handles
            .into_iter()
            .map(|h| h.join().expect("publisher panicked"))
            .collect();
        if ready {
            Ok(sent)
        } else {
            let waiting = shared
                .slots
                .iter()
                .zip(&masks)
                .filter(|(slot, m)| slot.ready.load(Relaxed) & **m != **m)
                .count();
            Err(format!("{waiting} subscribers never saw the warm-up"))
        }
    })?;

    let expected: Vec<u64> = (0..wl.subs).map(|s| wl.expected(s, &sent)).collect();
    let total_expected: u64 = expected.iter().sum();
    let mut last_total = u64::MAX;
    let mut last_progress = Instant::now();
    let hard_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let total: u64 = shared.slots.iter().map(|s| s.received.load(Relaxed)).sum();
        if total >= total_expected {
            break;
        }
        // Progress is anything arriving (a slow system may still be
        // delivering older messages ahead of the measured ones).
        let any = shared.any_received();
        if any != last_total {
            last_total = any;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > settings.idle {
            break;
        }
        if Instant::now() > hard_deadline || !sess.server.alive() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cpu1 = sess.server.cpu();
    let delivered: u64 = shared.slots.iter().map(|s| s.received.load(Relaxed)).sum();
    let gaps: u64 = shared.slots.iter().map(|s| s.gaps.load(Relaxed)).sum();
    let foreign: u64 = shared.slots.iter().map(|s| s.foreign.load(Relaxed)).sum();
    let t_end = shared
        .slots
        .iter()
        .map(|s| s.last_ns.load(Relaxed))
        .max()
        .unwrap_or(t0);
    let elapsed_s = (t_end.saturating_sub(t0)) as f64 / 1e9;
    let receivers = wl.receivers().len() as f64;
    let total_sent: u64 = sent.iter().sum();
    let lost = total_expected.saturating_sub(delivered);
    let lossy = lost > 0 || gaps > 0 || delivered > total_expected;
    let cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let lat = if latency {
        shared.take_latency().map(|h| Latency {
            p50_us: h.value_at_quantile(0.50) as f64 / 1e3,
            p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
            p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
            max_us: h.max() as f64 / 1e3,
            samples: h.len(),
        })
    } else {
        None
    };
    let receiver_ids = wl.receivers();
    let min_max_seq = receiver_ids
        .iter()
        .map(|&s| shared.slots[s].max_seq.load(Relaxed))
        .min()
        .unwrap_or(0);
    let reordered = shared.slots.iter().map(|s| s.reordered.load(Relaxed)).sum();
    let safe = |x: f64| if elapsed_s > 0.0 { x / elapsed_s } else { 0.0 };
    Ok(RunResult {
        paced: rate,
        sent: total_sent,
        expected: total_expected,
        delivered,
        gaps,
        foreign,
        lossy,
        loss_pct: if total_expected > 0 {
            100.0 * (lost.max(gaps)) as f64 / total_expected as f64
        } else {
            0.0
        },
        elapsed_s,
        per_sub_rate: safe(delivered as f64 / receivers),
        agg_rate: safe(delivered as f64),
        publish_rate: safe(total_sent as f64),
        cpu_s,
        cpu_s_per_m: cpu_s
            .filter(|_| delivered > 0)
            .map(|c| c / (delivered as f64 / 1e6)),
        latency: lat,
        min_max_seq,
        reordered,
        disconnects: shared.disconnects.load(Relaxed) - disconnects0,
    })
}

fn describe(r: &RunResult) -> String {
    let mut s = format!(
        "{} msg/s/sub, {} published/s",
        crate::util::si(r.per_sub_rate),
        crate::util::si(r.publish_rate)
    );
    if let Some(p) = r.paced {
        s += &format!(" (paced {})", crate::util::si(p));
    }
    if r.lossy {
        s += &format!(
            ", LOSSY {:.3}% ({} of {} missing, {} seq gaps)",
            r.loss_pct,
            r.expected.saturating_sub(r.delivered),
            r.expected,
            r.gaps
        );
        s += &format!(
            " [sent {} max-seq {} reordered {} disconnects {}]",
            r.sent, r.min_max_seq, r.reordered, r.disconnects
        );
    }
    if let Some(c) = r.cpu_s_per_m {
        s += &format!(", broker {c:.2} CPU s/M");
    }
    if let Some(l) = &r.latency {
        s += &format!(", p50 {:.0} us, p99 {:.0} us", l.p50_us, l.p99_us);
    }
    if r.foreign > 0 {
        s += &format!(", {} FOREIGN payloads", r.foreign);
    }
    s
}

/// Everything measured for one (system, workload) pair, on a fresh server.
pub fn bench_pair(system: &str, wl: &Workload, env: &Env, settings: &Settings) -> PairResult {
    let mut result = PairResult {
        system: system.into(),
        workload: wl.name.into(),
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        ..Default::default()
    };
    let mut sess = match open(system, wl, env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("  {system}/{}: setup failed: {e}", wl.name);
            result.error = Some(e);
            return result;
        }
    };
    result.setup_s = sess.setup_s;
    result.server_command = sess.server.command.clone();
    eprintln!(
        "  {system}/{}: {} subscribers ready in {:.1} s",
        wl.name, wl.subs, sess.setup_s
    );
    let outcome = (|| -> Result<(), String> {
        if let Some(rate) = wl.fixed_rate {
            // A latency workload: every run at the same moderate rate, no
            // search for the peak.
            result.pace = Some(rate);
            for i in 0..settings.runs {
                let r = run_once(&mut sess, settings, settings.duration, Some(rate), true)?;
                eprintln!("    run {}: {}", i + 1, describe(&r));
                result.runs.push(r);
            }
            return Ok(());
        }
        // Calibration runs are as long as measured runs: some limits (Redis'
        // 32 MB output buffer) only bite after a while.
        let probe = run_once(&mut sess, settings, settings.duration, None, false)?;
        eprintln!("    probe: {}", describe(&probe));
        let mut pace = None;
        // What got through flat out, as a publish rate: where the search
        // for a rate without loss starts.
        let through = |r: &RunResult| 0.9 * r.delivered as f64 / wl.fan() / r.elapsed_s.max(1e-3);
        if probe.lossy {
            let mut rate = through(&probe);
            if settings.calibrate_from_half_publish_rate {
                // A probe that lost most of its messages says little about
                // what the system sustains: some collapse under overload
                // (async-nats subscribers overflowing drop nearly all) far
                // below what they carry when paced.
                rate = rate.max(0.9 * 0.5 * probe.publish_rate);
            }
            // The rate taken as too fast: at first what got through flat
            // out (the 0.9 margin removed), then each lossy paced rate.
            let mut bad = rate / 0.9;
            let mut ok = None;
            for _ in 0..CALIBRATION_STEPS {
                let r = run_once(&mut sess, settings, settings.duration, Some(rate), false)?;
                eprintln!("    calibrate: {}", describe(&r));
                let lossless = !r.lossy;
                result.calibration.push(r);
                pace = Some(rate);
                if lossless {
                    ok = Some(rate);
                    break;
                }
                bad = rate;
                rate *= STEP;
            }
            // A STEP down may land well below the limit (lossless at 0.87 of
            // the lossy rate is measured at 0.75): bisect (geometrically)
            // between the two to measure closer to what the system sustains.
            if let Some(mut ok) = ok {
                for _ in 0..REFINE_STEPS {
                    let mid = (ok * bad).sqrt();
                    let r = run_once(&mut sess, settings, settings.duration, Some(mid), false)?;
                    eprintln!("    refine: {}", describe(&r));
                    if r.lossy {
                        bad = mid;
                    } else {
                        ok = mid;
                    }
                    result.calibration.push(r);
                }
                pace = Some(ok);
            }
        }
        result.probe = Some(probe);
        for round in 0..=EXTRA_ROUNDS {
            result.pace = pace;
            result.runs.clear();
            for i in 0..settings.runs {
                let r = run_once(&mut sess, settings, settings.duration, pace, false)?;
                eprintln!("    run {}: {}", i + 1, describe(&r));
                result.runs.push(r);
            }
            if result.rate().is_some() || round == EXTRA_ROUNDS {
                break;
            }
            // Most runs lost messages at a rate the calibration passed (the
            // machine is shared and noisy): slow down and measure again.
            let base = pace.unwrap_or_else(|| {
                let start = |r: &RunResult| {
                    if settings.calibrate_from_half_publish_rate {
                        through(r).max(0.9 * 0.5 * r.publish_rate)
                    } else {
                        through(r)
                    }
                };
                median(result.runs.iter().map(start).collect()).unwrap_or(1000.0)
            });
            pace = Some(base * STEP);
            eprintln!(
                "    most runs lost messages: again at {}",
                crate::util::si(base * STEP)
            );
            result.discarded.append(&mut result.runs);
        }
        if !settings.latency_run {
            return Ok(());
        }
        let peak = median(
            result
                .lossless_runs()
                .iter()
                .map(|r| r.publish_rate)
                .collect(),
        )
        .or(pace)
        .unwrap_or(1000.0);
        let r = run_once(
            &mut sess,
            settings,
            settings.duration,
            Some(0.5 * peak),
            true,
        )?;
        eprintln!(
            "    latency at 50% ({} msg/s): {}",
            crate::util::si(0.5 * peak),
            describe(&r)
        );
        result.latency_run = Some(r);
        Ok(())
    })();
    if let Err(e) = outcome {
        eprintln!("  {system}/{}: {e}", wl.name);
        result.error = Some(e);
    }
    result.peak_rss_kb = sess.server.peak_rss_kb();
    drop(sess);
    result
}
