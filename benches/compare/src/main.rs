//! `compare`: the load generator behind `scripts/compare`.
//!
//! ```text
//! compare run --zbroker PATH [--systems a,b] [--workloads x,y] [--runs N]
//!             [--quick] [--no-scale] [--out results.json] [--md BENCHMARKS.md]
//!             [--png docs/compare.png] [--work DIR] [--command TEXT]
//! compare report --results results.json --md BENCHMARKS.md --png docs/compare.png
//! compare cluster --zbroker PATH [--quick] [--systems a,b] [--workloads x,y]
//!                 [--rounds N] [--runs N] [--interest-subscribers N] [--no-interest]
//!                 [--out cluster.json] [--md BENCHMARKS.md] [--work DIR] [--command TEXT]
//! compare cluster-report --results cluster.json --md BENCHMARKS.md
//! compare proxy FRONT BACK [PUB_HWM SUB_HWM IO_BATCH]  (libzmq XSUB/XPUB proxy process)
//! compare scale-subs ENDPOINT FIRST COUNT PER   (scale-test subscribers)
//! ```
//!
//! Systems (`--systems`, default all): zbroker, zbroker-bp (the same binary
//! and clients, broker run with `--overflow backpressure`), direct, proxy,
//! proxy-tuned (the proxy with zbroker's default libzmq queue depths and batch
//! sizes), redis, nats, mosquitto. The scale test runs zbroker only.
//!
//! `cluster` (src/cluster.rs, `scripts/bench-cluster`) compares a 3-broker
//! zbroker mesh with a 3-node NATS cluster, one zbroker and one nats-server.

mod async_clients;
mod bench;
mod cluster;
mod interest;
mod report;
mod scale;
mod servers;
mod session;
mod shared;
mod util;
mod workload;
mod zmq_clients;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use report::{Meta, Results};

/// Every system, in the order of the report's columns.
pub const SYSTEMS: [&str; 8] = [
    "zbroker",
    "zbroker-bp",
    "direct",
    "proxy",
    "proxy-tuned",
    "redis",
    "nats",
    "mosquitto",
];

pub(crate) struct Args {
    pub(crate) words: Vec<String>,
}

impl Args {
    pub(crate) fn flag(&mut self, name: &str) -> bool {
        if let Some(i) = self.words.iter().position(|w| w == name) {
            self.words.remove(i);
            true
        } else {
            false
        }
    }

    pub(crate) fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        if let Some(i) = self.words.iter().position(|w| w == name) {
            if i + 1 >= self.words.len() {
                return Err(format!("{name} needs a value"));
            }
            let v = self.words.remove(i + 1);
            self.words.remove(i);
            Ok(Some(v))
        } else {
            Ok(None)
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn machine_meta(
    env: &servers::Env,
    systems: &[String],
    command: String,
    settings: String,
) -> Meta {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let (a, b, c) = zmq::version();
    Meta {
        command,
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        kernel: sh("uname", &["-r"]),
        libzmq: format!(
            "{a}.{b}.{c} (built by vendor/zmq-sys; DRAFT API: {}, CURVE: {})",
            yes_no(zmq::has("draft")),
            yes_no(zmq::has("curve"))
        ),
        rustc: sh("rustc", &["--version"]),
        versions: systems
            .iter()
            .map(|s| (s.clone(), servers::version_of(s, env)))
            .collect(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        settings,
        total_s: 0.0,
        zbroker_rev: String::new(),
    }
}

fn run(mut args: Args) -> Result<(), String> {
    let quick = args.flag("--quick");
    let no_scale = args.flag("--no-scale");
    let scale_only = args.flag("--scale-only");
    let zbroker = args
        .value("--zbroker")?
        .map(PathBuf::from)
        .ok_or("--zbroker PATH is required")?;
    let mut systems: Vec<String> = match args.value("--systems")? {
        Some(s) => s.split(',').map(str::to_string).collect(),
        None => SYSTEMS.iter().map(|s| s.to_string()).collect(),
    };
    for s in &systems {
        if !SYSTEMS.contains(&s.as_str()) {
            return Err(format!("unknown system {s}; known: {}", SYSTEMS.join(",")));
        }
    }
    // SYSTEMS' order, whatever the command line's: the report's columns
    // (zbroker-bp right after zbroker) and colours stay the same.
    systems.sort_by_key(|s| SYSTEMS.iter().position(|k| k == s));
    systems.dedup();
    let default_workloads: Vec<String> = if quick {
        vec!["1to1-64", "fanout-10", "selective-1000"]
            .into_iter()
            .map(String::from)
            .collect()
    } else {
        workload::all().iter().map(|w| w.name.to_string()).collect()
    };
    let workloads: Vec<workload::Workload> = match args.value("--workloads")? {
        _ if scale_only => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|n| workload::by_name(n).ok_or(format!("unknown workload {n}")))
            .collect::<Result<_, _>>()?,
        None => default_workloads
            .iter()
            .map(|n| workload::by_name(n).unwrap())
            .collect(),
    };
    let runs: usize = match args.value("--runs")? {
        Some(n) => n.parse().map_err(|_| "--runs N")?,
        None => {
            if quick {
                1
            } else {
                5
            }
        }
    };
    let scale_on = (!no_scale && !quick) || args.flag("--scale") || scale_only;
    let out = PathBuf::from(
        args.value("--out")?
            .unwrap_or("target/compare/results.json".into()),
    );
    let md = args.value("--md")?.map(PathBuf::from);
    let png = args.value("--png")?.map(PathBuf::from);
    let work = PathBuf::from(
        args.value("--work")?
            .unwrap_or("target/compare/work".into()),
    );
    let command = args
        .value("--command")?
        .unwrap_or_else(|| "compare run".into());
    let zbroker_rev = args
        .value("--zbroker-rev")?
        .unwrap_or_else(|| "unknown".into());
    if !args.words.is_empty() {
        return Err(format!("unexpected arguments: {:?}", args.words));
    }
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let env = servers::Env {
        zbroker,
        harness: std::env::current_exe().map_err(|e| e.to_string())?,
        work,
    };
    let settings = if quick {
        bench::Settings {
            duration: Duration::from_millis(400),
            probe_duration: Duration::from_millis(400),
            runs,
            idle: Duration::from_millis(500),
            latency_run: true,
            calibrate_from_half_publish_rate: false,
        }
    } else {
        bench::Settings {
            duration: Duration::from_millis(1000),
            probe_duration: Duration::from_millis(1000),
            runs,
            idle: Duration::from_millis(500),
            latency_run: true,
            calibrate_from_half_publish_rate: false,
        }
    };
    let nofile = util::raise_nofile();
    let settings_text = format!(
        "{} runs per pair of {:.1} s publishing each (calibration runs {:.1} s), a run ends {:.1} s after the last delivery if some are missing; load generator RLIMIT_NOFILE {nofile}",
        settings.runs,
        settings.duration.as_secs_f64(),
        settings.probe_duration.as_secs_f64(),
        settings.idle.as_secs_f64()
    );
    let started = Instant::now();
    let mut results = Results {
        meta: Meta {
            zbroker_rev,
            ..machine_meta(&env, &systems, command, settings_text)
        },
        systems: systems.clone(),
        workloads: workloads.iter().map(|w| w.name.to_string()).collect(),
        pairs: Vec::new(),
        scale: None,
    };
    let save = |r: &Results| -> Result<(), String> {
        let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
        std::fs::write(&out, json).map_err(|e| format!("{}: {e}", out.display()))
    };
    for wl in &workloads {
        eprintln!("== {} ({})", wl.name, wl.label);
        for s in &systems {
            let pair = bench::bench_pair(s, wl, &env, &settings);
            results.pairs.push(pair);
            save(&results)?;
        }
    }
    if scale_on {
        eprintln!("== scale: zbroker with {} subscribers", scale::SUBSCRIBERS);
        results.scale = Some(scale::run(&env, &settings));
    }
    results.meta.loadavg_end = loadavg();
    results.meta.total_s = started.elapsed().as_secs_f64();
    save(&results)?;
    eprintln!("results: {}", out.display());
    write_report(&results, md.as_deref(), png.as_deref())
}

fn write_report(
    results: &Results,
    md: Option<&std::path::Path>,
    png: Option<&std::path::Path>,
) -> Result<(), String> {
    if let Some(png) = png {
        if let Some(d) = png.parent() {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        report::plot(results, png)?;
        eprintln!("plot: {}", png.display());
    }
    if let Some(md) = md {
        report::write_markdown(md, &report::markdown(results))?;
        eprintln!("tables: {}", md.display());
    }
    Ok(())
}

fn report_cmd(mut args: Args) -> Result<(), String> {
    let path = args.value("--results")?.ok_or("--results PATH")?;
    let md = args.value("--md")?.map(PathBuf::from);
    let png = args.value("--png")?.map(PathBuf::from);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let results: Results = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    write_report(&results, md.as_deref(), png.as_deref())
}

fn main() -> ExitCode {
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    if words.is_empty() {
        eprintln!(
            "usage: compare run|report|cluster|cluster-report|proxy|scale-subs ... (see src/main.rs)"
        );
        return ExitCode::from(2);
    }
    let mode = words.remove(0);
    let result = match mode.as_str() {
        "run" => run(Args { words }),
        "report" => report_cmd(Args { words }),
        "cluster" => cluster::run(Args { words }),
        "cluster-report" => cluster::report_cmd(Args { words }),
        "proxy" => match words.as_slice() {
            [front, back] => zmq_clients::run_proxy(front, back, None),
            [front, back, pub_hwm, sub_hwm, io_batch] => {
                match (pub_hwm.parse(), sub_hwm.parse(), io_batch.parse()) {
                    (Ok(pub_hwm), Ok(sub_hwm), Ok(io_batch)) => {
                        let tuning = servers::ProxyTuning {
                            pub_hwm,
                            sub_hwm,
                            io_batch,
                        };
                        zmq_clients::run_proxy(front, back, Some(tuning))
                    }
                    _ => Err(format!("bad settings {pub_hwm} {sub_hwm} {io_batch}")),
                }
            }
            _ => Err("usage: compare proxy FRONT BACK [PUB_HWM SUB_HWM IO_BATCH]".into()),
        },
        "scale-subs" => match words.as_slice() {
            [ep, first, count, per] => (|| {
                let p = |s: &str| s.parse::<usize>().map_err(|_| format!("bad number {s}"));
                scale::child(ep, p(first)?, p(count)?, p(per)?)
            })(),
            _ => Err("usage: compare scale-subs ENDPOINT FIRST COUNT PER".into()),
        },
        other => Err(format!("unknown mode {other}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare {mode}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn yes_no(capability: Option<bool>) -> &'static str {
    if capability == Some(true) {
        "yes"
    } else {
        "no"
    }
}
