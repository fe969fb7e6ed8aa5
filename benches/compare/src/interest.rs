//! Interest traffic: how many messages a cluster's nodes exchange when
//! subscribers come and go on one of them.
//!
//! On node B, 1,000 subscribers (one connection each) take 1,000 distinct
//! exact filters, then 1,000 more all take the same one; then the first
//! 1,000 drop theirs, then the second. After each phase, a probe
//! subscriber on B takes a filter of its own, and publishers on A and C
//! repeat a probe on it until it has arrived from both: interest changes
//! travel a link in order, so by then A and C have applied every change B
//! sent before. What they received is then read where each system shows
//! it:
//!
//! - zbroker: `zbroker_cluster_interest_changes_total` and
//!   `zbroker_cluster_interest_snapshots_total{direction="received"}` on A
//!   and C (read from a scrape taken after A and C forwarded a probe, so
//!   the exported snapshot is not older than the probe's change), and
//!   `zbroker_peer_interest_entries{peer="b"}` on A;
//! - NATS: nothing counts route protocol messages, so its nodes run with
//!   `-V` (trace) and the `<<- [RS+ $G …]` / `<<- [RS- $G …]` lines in A's
//!   and C's logs are counted; the `subscriptions` of A's route to B on
//!   /routez is what A holds of B's interest.
//!
//! The probe's own filter (one change per phase) is not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::servers::{self, Env, Server};
use crate::session::runtime;
use crate::util::Ctx;

/// One phase: subscribers joining or leaving on B.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// Subscribers that subscribed or unsubscribed in this phase.
    pub subscribers: usize,
    /// Distinct filters among them.
    pub distinct_filters: usize,
    /// Interest messages (changes) A and C received from B during the
    /// phase, the probe's excluded: `(node, count)`.
    pub received: Vec<(String, u64)>,
    /// Full interest snapshots A and C received during the phase (zbroker;
    /// a link that had to start over sends one instead of changes).
    pub snapshots: u64,
    /// Entries of B's interest held at A after the phase (the probes' and,
    /// for NATS, the system account's excluded).
    pub held_at_a: Option<i64>,
    /// From the first command of the phase until both probes arrived,
    /// seconds (subscribing phases include connecting the clients).
    pub seconds: f64,
    /// From B's confirmation of the phase's last command (zbroker's OK,
    /// NATS's PONG after the flush) until both probes arrived, seconds:
    /// how long the changes took to reach A and C, plus the probe's own
    /// round (its SUB, its trip, a publish every 10 ms).
    #[serde(default)]
    pub propagate_s: f64,
}

/// The interest test on one cluster system.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterestResult {
    pub system: String,
    pub round: usize,
    pub phases: Vec<Phase>,
    pub error: Option<String>,
    pub server_command: String,
}

/// How long one phase (including its probe) may take.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// Runs the four phases on a fresh `system` ("zbroker-mesh" or
/// "nats-cluster") with `n` subscribers per group.
pub fn run(system: &str, env: &Env, n: usize, round: usize) -> InterestResult {
    let mut result = InterestResult {
        system: system.into(),
        round,
        ..Default::default()
    };
    let outcome = match system {
        "zbroker-mesh" => servers::zbroker_mesh(env).and_then(|mut mesh| {
            result.server_command = mesh.command.clone();
            zbroker(&mut mesh, n, &mut result.phases)
        }),
        "nats-cluster" => servers::nats_cluster(env, true).and_then(|mut cluster| {
            result.server_command = cluster.command.clone();
            nats(&mut cluster, n, &mut result.phases)
        }),
        other => Err(format!("{other} is not a cluster")),
    };
    if let Err(e) = outcome {
        eprintln!("  interest/{system}: {e}");
        result.error = Some(e);
    }
    result
}

/// The phases, in order: (name, which group, subscribe?, distinct
/// filters?).
const PHASES: [(&str, usize, bool); 4] = [
    (
        "1,000 subscribers, 1,000 distinct filters: subscribe",
        0,
        true,
    ),
    ("1,000 subscribers, all the same filter: subscribe", 1, true),
    ("the 1,000 distinct filters: unsubscribe", 0, false),
    ("the 1,000 same filters: unsubscribe", 1, false),
];

fn filter_of(group: usize, i: usize) -> String {
    if group == 0 {
        format!("i.{i:05}")
    } else {
        "same.0".to_string()
    }
}

fn phase_name(name: &str, n: usize) -> String {
    name.replace("1,000", &crate::util::thousands(n as u64))
}

fn say(system: &str, p: &Phase) {
    eprintln!(
        "  interest/{system}: {}: received {:?}, snapshots {}, held at A {:?}, {:.2} s, \
         {:.3} s after the last confirmation",
        p.name, p.received, p.snapshots, p.held_at_a, p.seconds, p.propagate_s
    );
}

// ---------------------------------------------------------------- zbroker

fn zbroker(mesh: &mut Server, n: usize, phases: &mut Vec<Phase>) -> Result<(), String> {
    let ctx = Arc::new(Ctx::new(1, 65536));
    let push = |node: usize| -> Result<zmq::Socket, String> {
        let s = ctx.socket(zmq::PUSH);
        s.connect(&format!("tcp://127.0.0.1:{}", mesh.node_port(node, 0)))
            .map_err(|e| format!("connect PUSH: {e}"))?;
        Ok(s)
    };
    let publishers = [push(0)?, push(2)?];
    let sub_endpoint = format!("tcp://127.0.0.1:{}", mesh.node_port(1, 1));
    let mut groups: [Vec<zmq::Socket>; 2] = [Vec::new(), Vec::new()];
    let mut probes = Vec::new();
    let (a, c) = (mesh.monitor[0], mesh.monitor[2]);
    for (k, (name, group, subscribe)) in PHASES.iter().enumerate() {
        let before = [servers::scrape(a)?, servers::scrape(c)?];
        let t0 = Instant::now();
        let verb: &[u8] = if *subscribe { b"SUB" } else { b"UNSUB" };
        if *subscribe {
            for _ in 0..n {
                let d = ctx.socket(zmq::DEALER);
                d.connect(&sub_endpoint)
                    .map_err(|e| format!("connect DEALER: {e}"))?;
                groups[*group].push(d);
            }
        }
        for (i, d) in groups[*group].iter().enumerate() {
            let f = filter_of(*group, i);
            d.send_multipart([verb, b"exact", f.as_bytes()], 0)
                .map_err(|e| format!("send {}: {e}", String::from_utf8_lossy(verb)))?;
        }
        wait_oks(&groups[*group], t0 + PHASE_DEADLINE)?;
        let confirmed = Instant::now();
        // The probe: a filter taken after every change of the phase.
        let probe_topic = format!("probe.{k}");
        let probe = ctx.socket(zmq::DEALER);
        probe
            .connect(&sub_endpoint)
            .map_err(|e| format!("connect DEALER: {e}"))?;
        probe
            .send_multipart([&b"SUB"[..], b"exact", probe_topic.as_bytes()], 0)
            .map_err(|e| format!("send SUB: {e}"))?;
        wait_oks(std::slice::from_ref(&probe), t0 + PHASE_DEADLINE)?;
        let mut seen = [false; 2];
        while !seen.iter().all(|s| *s) {
            if Instant::now() > t0 + PHASE_DEADLINE {
                return Err(format!("{name}: probes from A and C arrived: {seen:?}"));
            }
            for (from, p) in publishers.iter().enumerate() {
                if !seen[from] {
                    p.send(probe_topic.as_bytes(), zmq::SNDMORE)
                        .and_then(|_| p.send(&[from as u8][..], 0))
                        .map_err(|e| format!("publish a probe: {e}"))?;
                }
            }
            if probe.poll(zmq::POLLIN, 10).map_err(|e| e.to_string())? > 0 {
                while let Ok(parts) = probe.recv_multipart(zmq::DONTWAIT) {
                    if parts.len() == 2
                        && parts[0].starts_with(b"MSG")
                        && let Some(&from) = parts[1].first()
                        && (from as usize) < seen.len()
                    {
                        seen[from as usize] = true;
                    }
                }
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let propagate_s = confirmed.elapsed().as_secs_f64();
        probes.push(probe);
        // Scrapes that postdate the probe's change on A and on C: each has
        // forwarded a probe to B since the phase began.
        let forwarded = "zbroker_peer_messages_forwarded_total{peer=\"b\"}";
        let mut after = Vec::new();
        for (port, old) in [a, c].into_iter().zip(&before) {
            let was = servers::metric(old, forwarded).unwrap_or(0.0);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let now = servers::scrape(port)?;
                if servers::metric(&now, forwarded).unwrap_or(0.0) > was {
                    after.push(now);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{name}: no forwarded probe counted"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let delta = |series: &str, i: usize| -> u64 {
            let v = |text: &str| servers::metric(text, series).unwrap_or(0.0) as u64;
            v(&after[i]).saturating_sub(v(&before[i]))
        };
        let changes = "zbroker_cluster_interest_changes_total";
        let snapshots = "zbroker_cluster_interest_snapshots_total{direction=\"received\"}";
        let held = servers::metric(&after[0], "zbroker_peer_interest_entries{peer=\"b\"}");
        let phase = Phase {
            name: phase_name(name, n),
            subscribers: n,
            distinct_filters: if *group == 0 { n } else { 1 },
            received: vec![
                ("a".into(), delta(changes, 0).saturating_sub(1)),
                ("c".into(), delta(changes, 1).saturating_sub(1)),
            ],
            snapshots: delta(snapshots, 0) + delta(snapshots, 1),
            held_at_a: held.map(|h| h as i64 - probes.len() as i64),
            seconds,
            propagate_s,
        };
        say("zbroker-mesh", &phase);
        phases.push(phase);
    }
    drop(probes);
    drop(groups);
    drop(publishers);
    Ok(())
}

/// Reads replies until every socket in `socks` has had one `OK`.
fn wait_oks(socks: &[zmq::Socket], deadline: Instant) -> Result<(), String> {
    let mut waiting: Vec<bool> = vec![true; socks.len()];
    let mut left = socks.len();
    while left > 0 {
        if Instant::now() > deadline {
            return Err(format!("{left} commands unanswered"));
        }
        let mut items: Vec<zmq::PollItem> =
            socks.iter().map(|s| s.as_poll_item(zmq::POLLIN)).collect();
        zmq::poll(&mut items, 100).map_err(|e| format!("poll: {e}"))?;
        for (i, item) in items.iter().enumerate() {
            if !item.is_readable() {
                continue;
            }
            while let Ok(parts) = socks[i].recv_multipart(zmq::DONTWAIT) {
                match parts.first().map(Vec::as_slice) {
                    Some(b"OK") if waiting[i] => {
                        waiting[i] = false;
                        left -= 1;
                    }
                    Some(b"ERR") => {
                        let text: Vec<String> = parts
                            .iter()
                            .map(|p| String::from_utf8_lossy(p).into())
                            .collect();
                        return Err(format!("zbroker refused a command: {text:?}"));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- NATS

/// Interest lines received on a route, in a node's trace log.
fn route_interest_lines(log: &std::path::Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.contains("<<- [RS+ $G ") || l.contains("<<- [RS- $G "))
        .count() as u64)
}

/// `subscriptions` of the route on A whose remote is `remote_id`.
fn route_subscriptions(monitor: u16, remote_id: &str) -> Result<i64, String> {
    let routez = servers::http_get(monitor, "/routez")?;
    let value: serde_json::Value = serde_json::from_str(&routez).map_err(|e| e.to_string())?;
    value["routes"]
        .as_array()
        .and_then(|routes| {
            routes
                .iter()
                .find(|r| r["remote_id"].as_str() == Some(remote_id))
        })
        .and_then(|r| r["subscriptions"].as_i64())
        .ok_or_else(|| format!("no route to {remote_id} on /routez: {routez}"))
}

fn nats(cluster: &mut Server, n: usize, phases: &mut Vec<Phase>) -> Result<(), String> {
    let rt = runtime();
    let addr = |node: usize| format!("127.0.0.1:{}", cluster.node_port(node, 0));
    let varz = servers::http_get(cluster.monitor[1], "/varz")?;
    let b_id = serde_json::from_str::<serde_json::Value>(&varz)
        .ok()
        .and_then(|v| v["server_id"].as_str().map(str::to_string))
        .ok_or("no server_id on B's /varz")?;
    let baseline = route_subscriptions(cluster.monitor[0], &b_id)?;
    let connect = |node: usize| {
        let a = addr(node);
        rt.block_on(async_nats::ConnectOptions::new().connect(a))
            .map_err(|e| format!("nats connect: {e}"))
    };
    let publishers = [connect(0)?, connect(2)?];
    type Group = Vec<(async_nats::Client, async_nats::Subscriber)>;
    let mut groups: [Group; 2] = [Vec::new(), Vec::new()];
    let mut probes = Vec::new();
    let logs = [cluster.logs[0].clone(), cluster.logs[2].clone()];
    for (k, (name, group, subscribe)) in PHASES.iter().enumerate() {
        let before = [
            route_interest_lines(&logs[0])?,
            route_interest_lines(&logs[1])?,
        ];
        let t0 = Instant::now();
        if *subscribe {
            let b = addr(1);
            let g = *group;
            let joined: Result<Group, String> = rt.block_on(async move {
                // Connect 50 at a time: a thousand handshakes at once only
                // queue behind each other.
                let mut all = Vec::with_capacity(n);
                for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
                    let batch = chunk.iter().map(|&i| {
                        let b = b.clone();
                        async move {
                            let client = async_nats::ConnectOptions::new()
                                .connect(b)
                                .await
                                .map_err(|e| format!("nats connect: {e}"))?;
                            let sub = client
                                .subscribe(filter_of(g, i))
                                .await
                                .map_err(|e| format!("nats subscribe: {e}"))?;
                            // The PONG proves B processed the SUB.
                            client
                                .flush()
                                .await
                                .map_err(|e| format!("nats flush: {e}"))?;
                            Ok::<_, String>((client, sub))
                        }
                    });
                    for r in futures::future::join_all(batch).await {
                        all.push(r?);
                    }
                }
                Ok(all)
            });
            groups[*group] = joined?;
        } else {
            let members = std::mem::take(&mut groups[*group]);
            let kept: Result<Group, String> = rt.block_on(async move {
                let mut kept = Vec::with_capacity(members.len());
                for (client, mut sub) in members {
                    sub.unsubscribe()
                        .await
                        .map_err(|e| format!("nats unsubscribe: {e}"))?;
                    client
                        .flush()
                        .await
                        .map_err(|e| format!("nats flush: {e}"))?;
                    kept.push((client, sub));
                }
                Ok(kept)
            });
            // Kept connected: only the subscriptions go.
            groups[*group] = kept?;
        }
        let confirmed = Instant::now();
        let probe_subject = format!("probe.{k}");
        let probe_client = connect(1)?;
        let mut probe_sub = rt
            .block_on(probe_client.subscribe(probe_subject.clone()))
            .map_err(|e| format!("nats subscribe: {e}"))?;
        rt.block_on(probe_client.flush())
            .map_err(|e| format!("nats flush: {e}"))?;
        let mut seen = [false; 2];
        while !seen.iter().all(|s| *s) {
            if Instant::now() > t0 + PHASE_DEADLINE {
                return Err(format!("{name}: probes from A and C arrived: {seen:?}"));
            }
            for (from, p) in publishers.iter().enumerate() {
                if !seen[from] {
                    rt.block_on(async {
                        p.publish(probe_subject.clone(), vec![from as u8].into())
                            .await
                            .map_err(|e| e.to_string())?;
                        p.flush().await.map_err(|e| e.to_string())
                    })
                    .map_err(|e| format!("nats publish: {e}"))?;
                }
            }
            let got = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(10), probe_sub.next()).await
            });
            if let Ok(Some(m)) = got
                && let Some(&from) = m.payload.first()
                && (from as usize) < seen.len()
            {
                seen[from as usize] = true;
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let propagate_s = confirmed.elapsed().as_secs_f64();
        probes.push((probe_client, probe_sub));
        let after = [
            route_interest_lines(&logs[0])?,
            route_interest_lines(&logs[1])?,
        ];
        let held = route_subscriptions(cluster.monitor[0], &b_id)?;
        let phase = Phase {
            name: phase_name(name, n),
            subscribers: n,
            distinct_filters: if *group == 0 { n } else { 1 },
            received: vec![
                ("a".into(), (after[0] - before[0]).saturating_sub(1)),
                ("c".into(), (after[1] - before[1]).saturating_sub(1)),
            ],
            snapshots: 0,
            held_at_a: Some(held - baseline - probes.len() as i64),
            seconds,
            propagate_s,
        };
        say("nats-cluster", &phase);
        phases.push(phase);
    }
    drop(probes);
    drop(groups);
    drop(publishers);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
