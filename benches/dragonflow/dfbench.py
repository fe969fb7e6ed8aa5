"""Dragonflow-shaped pub/sub benchmark: zbroker, its drop-in fronts, Redis, and
Dragonflow's own df-publisher-service, under the same load.

Run through ``scripts/bench-dragonflow`` (which installs what this needs).

For each system, in turn:

1. Start it on free 127.0.0.1 ports (publishers' endpoint an ipc path where
   the system has one, as Dragonflow's workers use).
2. Fork the receiver processes, each holding a share of the subscriber
   sockets (subscriber i goes to process i mod R), and wait until every
   subscription is confirmed (protocol v1's ``OK``, Redis' ``subscribe``).
3. Fork the publisher processes (each connects as a neutron-server worker).
4. Warm up: one event on every topic, repeated until every subscriber has
   seen every one of its topics (a SUB socket's subscription is not
   confirmed otherwise).
5. Flat out: every publisher sends as fast as its socket takes events.
   If anything was lost, calibrate: pace all publishers together at 90 % of
   the delivered rate, then at 0.75x per step, until a run loses nothing.
   The measured runs use that pace (or flat out, if flat out lost nothing).
6. N measured runs: deliveries/s = deliveries counted at the receivers /
   (last delivery - first send); lost = expected - received, expected being
   the sum over sent events of their topic's subscriber count.
7. N latency runs paced at half of the median delivered rate: every
   delivery's (receive time - send stamp), both ``CLOCK_MONOTONIC`` on one
   machine.

Broker CPU: utime + stime of the broker (or service) process, from
/proc/PID/stat, per run, per million deliveries. RSS: its VmHWM (peak) after
all its runs. A run ends when every expected delivery has arrived or nothing
has for 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import clients  # noqa: E402
import systems as sysmod  # noqa: E402
import workload as wlmod  # noqa: E402

LOSS_OK = 0  # a run is lossless when it lost exactly nothing


def log(msg: str) -> None:
    print(f"dfbench: {msg}", file=sys.stderr, flush=True)


class StopRequestedError(Exception):
    pass


def _on_term(signo, _frame):
    # Once: the cleanup that follows (stopping children and the system under
    # test) must not be cut short by the next signal (a terminal's Ctrl-C
    # reaches the whole process group, and the wrapper script sends TERM).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise StopRequestedError(f"signal {signo}")


class Session:
    """One system under test with its receivers and publishers."""

    def __init__(self, name: str, args: argparse.Namespace, wl: wlmod.Workload, tmp: str) -> None:
        self.name = name
        self.args = args
        self.wl = wl
        self.tmp = tmp
        self.holders = wl.holders()
        self.fanout = wl.mean_fanout()
        self.system: Optional[sysmod.Running] = None
        self.receivers: List[Any] = []
        self.rconns: List[Any] = []
        self.publishers: List[Any] = []
        self.pconns: List[Any] = []

    # ---- setup and teardown

    def start(self) -> None:
        ctx = mp.get_context("fork")
        self.system = sysmod.start(self.name, self.tmp, self.args.zbroker)
        topics = self.wl.topics()
        subs = [[topics[t] for t in held] for held in self.wl.subscriptions()]
        t0 = time.monotonic()
        for r in range(self.args.receivers):
            mine = subs[r :: self.args.receivers]
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=clients.receiver_main,
                args=(child, self.system.sub, mine),
                name=f"dfbench-rx{r}",
                daemon=True,
            )
            p.start()
            child.close()
            self.receivers.append(p)
            self.rconns.append(parent)
        for conn in self.rconns:
            msg = self._recv(conn, 120)
            if msg[0] != "ready":
                raise RuntimeError(f"receiver failed: {msg}")
        log(f"{self.name}: {len(subs)} subscribers ready in {time.monotonic() - t0:.1f} s")
        for i in range(self.args.publishers):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=clients.publisher_main,
                args=(child, i, self.system.pub, self.wl, self.args.redis_client),
                name=f"dfbench-pub{i}",
                daemon=True,
            )
            p.start()
            child.close()
            self.publishers.append(p)
            self.pconns.append(parent)
        for conn in self.pconns:
            msg = self._recv(conn, 60)
            if msg[0] != "ready":
                raise RuntimeError(f"publisher failed: {msg}")

    def stop(self) -> None:
        for conn in self.pconns + self.rconns:
            with contextlib.suppress(OSError):
                conn.send(("quit",))
        # One deadline for all: a publisher in the middle of a run (after an
        # interrupt) reads no command until the run ends, so it is killed.
        deadline = time.monotonic() + 3.0
        for p in self.publishers + self.receivers:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.publishers + self.receivers:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.pconns + self.rconns:
            conn.close()
        self.publishers, self.receivers, self.pconns, self.rconns = [], [], [], []
        if self.system is not None:
            self.system.stop()

    def _recv(self, conn, timeout: float):
        if not conn.poll(timeout):
            raise RuntimeError(f"{self.name}: no answer from a child in {timeout} s")
        return conn.recv()

    def _rx_all(self, cmd) -> List[Any]:
        for c in self.rconns:
            c.send(cmd)
        return [self._recv(c, 30) for c in self.rconns]

    # ---- phases

    def warmup(self) -> int:
        """Rounds needed until every subscriber saw all of its topics."""
        self._rx_all(("mode", clients.WARMUP))
        nsubs = self.wl.subscribers
        for rnd in range(1, 41):
            self.pconns[rnd % len(self.pconns)].send(("warmup",))
            self._recv(self.pconns[rnd % len(self.pconns)], 30)
            time.sleep(0.25)
            stats = self._rx_all(("stats",))
            if sum(s["complete"] for s in stats) == nsubs:
                return rnd
        raise RuntimeError(f"{self.name}: subscriptions never all took effect")

    def quiesce(self, limit: float = 10.0) -> None:
        """Waits until nothing arrives for 0.3 s (bounded)."""
        last, since = -1, time.monotonic()
        deadline = since + limit
        while time.monotonic() < deadline:
            total = sum(s["received"] for s in self._rx_all(("stats",)))
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since > 0.3:
                return
            time.sleep(0.05)

    def idle(self, seconds: float) -> Dict[str, float]:
        """CPU of the broker and of the receivers with every subscriber
        connected and nothing published: the fixed cost of holding them."""
        assert self.system is not None
        self.quiesce()
        self._rx_all(("mode", clients.COUNT))
        cpu0 = clients.cpu_seconds(self.system.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        stats = self._rx_all(("stats",))
        wall = time.monotonic() - t0
        return {
            "broker_cores": (clients.cpu_seconds(self.system.pid) - cpu0) / wall,
            "receivers_cores": sum(s["cpu_s"] for s in stats) / wall,
        }

    def run(self, deliveries_per_s: Optional[float], duration: float, mode: str) -> Dict[str, Any]:
        """One run: publishers paced at ``deliveries_per_s`` (None: flat out)."""
        assert self.system is not None
        self.quiesce()
        self._rx_all(("mode", mode))
        drops0 = sysmod.dropped(self.system.metrics())
        cpu0 = clients.cpu_seconds(self.system.pid)
        wall0 = time.monotonic()
        load0 = os.getloadavg()
        events_per_s = None
        if deliveries_per_s:
            events_per_s = deliveries_per_s / self.fanout
        per_pub = events_per_s / len(self.pconns) if events_per_s else None
        for c in self.pconns:
            c.send(("run", per_pub, duration))
        reports = [self._recv(c, duration + 60) for c in self.pconns]
        sent = [0] * len(self.holders)
        for r in reports:
            for t, n in enumerate(r["sent"]):
                sent[t] += n
        expected = wlmod.expected_deliveries(sent, self.holders)
        # Wait for every expected delivery, or for 1 s without any.
        last, since = -1, time.monotonic()
        deadline = since + 60
        while True:
            stats = self._rx_all(("stats",))
            received = sum(s["received"] for s in stats)
            now = time.monotonic()
            if received >= expected or now > deadline:
                break
            if received != last:
                last, since = received, now
            elif now - since > 1.0:
                break
            time.sleep(0.05)
        cpu = clients.cpu_seconds(self.system.pid) - cpu0
        wall = time.monotonic() - wall0
        drops1 = sysmod.dropped(self.system.metrics())
        first_ns = min(r["first_ns"] for r in reports)
        last_ns = max(s["last_ns"] for s in stats)
        span = max((last_ns - first_ns) / 1e9, 1e-9)
        events = sum(r["events"] for r in reports)
        out: Dict[str, Any] = {
            "mode": mode,
            "paced_deliveries_per_s": deliveries_per_s,
            "paced_events_per_s": events_per_s,
            "duration_s": duration,
            "events_sent": events,
            "events_per_s_sent": events / duration,
            "send_failures": sum(r["failed"] for r in reports),
            "expected": expected,
            "received": received,
            "lost": max(expected - received, 0),
            "extra": max(received - expected, 0),
            "loss_pct": 100.0 * max(expected - received, 0) / expected if expected else 0.0,
            "span_s": span,
            "deliveries_per_s": received / span,
            "broker_cpu_s": cpu,
            "broker_cpu_s_per_m": cpu / received * 1e6 if received else None,
            "wall_s": wall,
            "receivers_cpu_s": sum(s["cpu_s"] for s in stats),
            "publishers_cpu_s": sum(r["cpu_s"] for r in reports),
            "min_per_subscriber": min(s["min_per_socket"] for s in stats),
            "seq_gaps": sum(s["gaps"] for s in stats),
            "redis_closed_subscribers": sum(s["closed"] for s in stats),
            "found_by_sweep": sum(s["swept"] for s in stats),
            "loadavg_before": load0,
        }
        if drops0 or drops1:
            out["broker_drops"] = {k: drops1.get(k, 0) - drops0.get(k, 0) for k in drops1}
        if mode == clients.LATENCY:
            lat: List[int] = []
            for c in self.rconns:
                c.send(("latency",))
            from array import array

            for c in self.rconns:
                if not c.poll(60):
                    raise RuntimeError("no latency samples")
                a = array("q")
                a.frombytes(c.recv_bytes())
                lat.extend(a)
            lat.sort()
            out["latency_samples"] = len(lat)
            if lat:
                out["p50_us"] = lat[len(lat) // 2] / 1e3
                out["p99_us"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3
                out["p999_us"] = lat[min(len(lat) - 1, int(len(lat) * 0.999))] / 1e3
                out["max_us"] = lat[-1] / 1e3
        return out


def _brief(r: Dict[str, Any]) -> str:
    pace = (
        "flat out"
        if not r["paced_deliveries_per_s"]
        else f"paced {r['paced_deliveries_per_s'] / 1e3:.0f} k/s"
    )
    s = (
        f"{pace}: {r['deliveries_per_s'] / 1e3:.1f} k deliveries/s, "
        f"{r['events_per_s_sent']:.0f} events/s sent, lost {r['lost']} ({r['loss_pct']:.2f} %)"
    )
    if r.get("seq_gaps"):
        s += f", seq gaps {r['seq_gaps']}"
    if r.get("broker_cpu_s_per_m") is not None:
        s += f", broker {r['broker_cpu_s_per_m']:.2f} CPU s/M"
    s += f", receivers {r['receivers_cpu_s'] / r['wall_s']:.2f} cores"
    s += f", {r['found_by_sweep']} found by the sweep"
    if "p50_us" in r:
        s += f", p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs"
    return s


def bench_round(
    name: str,
    k: int,
    result: Dict[str, Any],
    args: argparse.Namespace,
    wl: wlmod.Workload,
    tmp: str,
) -> None:
    """Round ``k`` of one system, on a fresh instance: in round 0 the flat-out
    probe and the calibration, then one measured run, one latency run at half
    of that run's delivered rate and one at the light rate. Results are
    appended to ``result``."""
    sess = Session(name, args, wl, tmp)
    t0 = time.monotonic()
    tag = f"{name} [round {k + 1}/{args.runs}]"
    try:
        sess.start()
        assert sess.system is not None
        result["command"] = sess.system.command
        result["version"] = sess.system.version
        result.setdefault("warmup_rounds", []).append(sess.warmup())
        idle = sess.idle(args.idle_s)
        log(
            f"{tag}: idle: broker {idle['broker_cores']:.3f} cores, "
            f"receivers {idle['receivers_cores']:.3f} cores"
        )
        result.setdefault("idle", []).append(idle)
        if k == 0:
            probe = sess.run(None, args.probe_s, clients.COUNT)
            log(f"{tag}: probe {_brief(probe)}")
            result["flat_out"] = probe
            calibration = []
            pace: Optional[float] = None
            if probe["lost"] > LOSS_OK:
                rate = 0.9 * probe["deliveries_per_s"]
                for _ in range(args.max_steps):
                    step = sess.run(rate, args.cal_s, clients.COUNT)
                    log(f"{tag}: calibration {_brief(step)}")
                    calibration.append(step)
                    if step["lost"] <= LOSS_OK:
                        pace = rate
                        break
                    rate *= 0.75
                else:
                    pace = rate / 0.75
                    result["calibration_failed"] = True
            result["calibration"] = calibration
            result["pace_deliveries_per_s"] = pace
        pace = result["pace_deliveries_per_s"]
        r = sess.run(pace, args.run_s, clients.COUNT)
        log(f"{tag}: measured {_brief(r)}")
        result.setdefault("runs", []).append(r)
        r = sess.run(0.5 * r["deliveries_per_s"], args.lat_s, clients.LATENCY)
        log(f"{tag}: half load {_brief(r)}")
        result.setdefault("latency_runs", []).append(r)
        r = sess.run(args.light_events * sess.fanout, args.lat_s, clients.LATENCY)
        log(f"{tag}: light load {_brief(r)}")
        result.setdefault("light_runs", []).append(r)
        status = sysmod.proc_status(sess.system.pid)
        result["rss_kib"] = max(result.get("rss_kib", 0), status.get("VmRSS", 0))
        result["hwm_kib"] = max(result.get("hwm_kib", 0), status.get("VmHWM", 0))
        drops = sysmod.dropped(sess.system.metrics())
        if drops:
            result.setdefault("broker_drop_counters", []).append(drops)
    finally:
        sess.stop()
        result["took_s"] = result.get("took_s", 0.0) + time.monotonic() - t0


def summarize(res: Dict[str, Any]) -> Dict[str, Any]:
    runs, lats, light = res["runs"], res["latency_runs"], res["light_runs"]
    med = statistics.median

    def pct(rs: List[Dict[str, Any]], key: str) -> Optional[float]:
        xs = [r[key] for r in rs if key in r]
        return med(xs) if xs else None

    cpu = [r["broker_cpu_s_per_m"] for r in runs if r["broker_cpu_s_per_m"] is not None]
    return {
        "deliveries_per_s": med(r["deliveries_per_s"] for r in runs),
        "events_per_s": med(r["events_per_s_sent"] for r in runs),
        "p50_us": pct(lats, "p50_us"),
        "p99_us": pct(lats, "p99_us"),
        "light_p50_us": pct(light, "p50_us"),
        "light_p99_us": pct(light, "p99_us"),
        "cpu_s_per_m": med(cpu) if cpu else None,
        "hwm_mib": (res.get("hwm_kib") or 0) / 1024,
        "lost": sum(r["lost"] for r in runs),
        "expected": sum(r["expected"] for r in runs),
        "lost_lat": sum(r["lost"] for r in lats + light),
        "expected_lat": sum(r["expected"] for r in lats + light),
        "gaps": sum(r["seq_gaps"] for r in runs + lats + light),
        "closed": max(r["redis_closed_subscribers"] for r in runs + lats + light),
        "rx_cores": med(r["receivers_cpu_s"] / r["wall_s"] for r in runs),
        "rx_us_half": med(
            r["receivers_cpu_s"] / r["received"] * 1e6 for r in lats if r["received"]
        ),
        "rx_us_light": med(
            r["receivers_cpu_s"] / r["received"] * 1e6 for r in light if r["received"]
        ),
        "broker_us_light": med(
            r["broker_cpu_s"] / r["received"] * 1e6 for r in light if r["received"]
        ),
        "idle_broker_cores": med(x["broker_cores"] for x in res["idle"]),
        "idle_rx_cores": med(x["receivers_cores"] for x in res["idle"]),
        "rx_us_per_delivery": med(
            r["receivers_cpu_s"] / r["received"] * 1e6 for r in runs if r["received"]
        ),
        "broker_cores": med(r["broker_cpu_s"] / r["wall_s"] for r in runs),
        "pub_cores": med(r["publishers_cpu_s"] / r["wall_s"] for r in runs),
        "paced": res["pace_deliveries_per_s"] is not None,
    }


def _k(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k"
    return f"{x:.0f}"


def _ms(us: Optional[float]) -> str:
    if us is None:
        return "—"
    if us < 1000:
        return f"{us / 1e3:.2f} ms"
    return f"{us / 1e3:.1f} ms"


def _lost(lost: int, expected: int) -> str:
    if not expected:
        return "—"
    if lost == 0:
        return "0"
    return f"{lost:,} of {expected:,} ({100.0 * lost / expected:.2f} %)"


def machine_notes() -> Dict[str, Any]:
    import zmq

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    import hiredis
    import msgpack
    import redis

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pyzmq": zmq.__version__,
        "libzmq (pyzmq)": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "redis-py": redis.__version__,
        "hiredis": hiredis.__version__,
        "redis-server": sysmod.redis_version() if shutil.which("redis-server") else "absent",
    }


def render(doc: Dict[str, Any]) -> str:
    a = doc["settings"]
    m = doc["machine"]
    subs, per, projects = a["subscribers"], a["per_sub"], a["projects"]
    light = f"{a['light_events']:.0f}"
    light_d = a["light_events"] * doc["mean_fanout"]
    out = [
        "# Dragonflow-shaped benchmark: results",
        "",
        f"Generated by `scripts/bench-dragonflow` (benches/dragonflow/dfbench.py) on {doc['date']} "
        f"(took {doc['took_s']:.0f} s). Raw figures: `{os.path.basename(doc['json'])}`.",
        "",
        f"- command: `{doc['command']}`",
        f"- machine: `nproc` {m['nproc']}, {m['cpu']}, {m['memory']} memory, "
        f"Linux {m['kernel']}; load average before/after: {doc['loadavg_before']} / "
        f"{doc['loadavg_after']} (a shared machine: other sessions' builds and tests ran "
        "at the same time)",
        f"- Python {m['python']}, pyzmq {m['pyzmq']} (libzmq {m['libzmq (pyzmq)']}), "
        f"msgpack {m['msgpack']}, redis-py {m['redis-py']}, hiredis {m['hiredis']}; "
        f"{m['redis-server']}",
        f"- zbroker: {doc['zbroker_version']}: {doc['zbroker_rev']}",
        f"- load: {a['publishers']} publisher processes (forked), {subs:,} subscribers in "
        f"{a['receivers']} receiver processes (subscriber i in process i mod {a['receivers']}, "
        f"about {subs // a['receivers']} sockets each), each subscriber on 'D' + {per} of "
        f"{projects:,} projects (each project held by {subs * per // projects}-"
        f"{-(-subs * per // projects)}); {a['d_share'] * 100:.0f} % of events on 'D', the rest "
        f"on a uniformly drawn project; msgpack events of {a['min_size']}-{a['max_size']} bytes; "
        f"{doc['mean_fanout']:.1f} deliveries per event on average",
        f"- timing per system: flat-out probe {a['probe_s']} s, calibration steps of "
        f"{a['cal_s']} s (only after a lossy probe), {a['runs']} measured run(s) of "
        f"{a['run_s']} s, {a['runs']} latency run(s) of {a['lat_s']} s at half load and as many at "
        f"{light} events/s",
        "",
    ]
    base = None
    for r in doc["results"]:
        if r["system"] == "zbroker" and "summary" in r:
            base = r["summary"]["deliveries_per_s"]
    out += [
        "| system | events/s delivered | ratio to zbroker native | p50 | p99 | "
        "CPU s per million deliveries | RSS MiB (peak) | lost (measured runs) | "
        f"lost (latency runs) | p50 / p99 at {light} events/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in doc["results"]:
        if "summary" not in r:
            out.append(f"| {r['label']} | failed: {r.get('error', '?')} | | | | | | | | |")
            continue
        s = r["summary"]
        ratio = f"{s['deliveries_per_s'] / base:.2f}×" if base else "—"
        mark = " †" if s["paced"] else ""
        lost = _lost(s["lost"], s["expected"])
        lost_lat = _lost(s["lost_lat"], s["expected_lat"])
        if r["system"] == "zbroker":
            lost += f"; seq gaps {s['gaps']:,}"
        if s["closed"]:
            lost += f"; {s['closed']} subscribers disconnected"
        cpu = f"{s['cpu_s_per_m']:.2f}" if s["cpu_s_per_m"] is not None else "—"
        out.append(
            f"| {r['label']} | {_k(s['deliveries_per_s'])}{mark} | {ratio} | "
            f"{_ms(s['p50_us'])} | {_ms(s['p99_us'])} | {cpu} | {s['hwm_mib']:.0f} | {lost} | "
            f"{lost_lat} | {_ms(s['light_p50_us'])} / {_ms(s['light_p99_us'])} |"
        )
    out += [
        "",
        "events/s delivered: deliveries (one event reaching one subscriber) counted at the "
        "receivers / (last delivery − first send), median of the measured runs. † = flat out "
        "lost events, so the measured runs were paced at the highest rate the calibration found "
        "lossless. p50/p99: receive time − send stamp of every delivery, at half of the median "
        "delivered rate, median over the latency runs; the last column is the same at a light, "
        f"fixed load (all publishers together {light} events/s, {light_d:,.0f} deliveries/s), "
        "nearer a real cloud's event rate. lost: expected deliveries (each sent event × its "
        "topic's subscribers) − received, over all runs (latency runs include the light ones). "
        "CPU and RSS are those of the broker / service process (all threads; RSS is VmHWM).",
        "",
        "## Flat out, and where the CPU went",
        "",
        "Cores: CPU seconds / wall seconds over the measured runs (median), out of "
        f"{m['nproc']}. Receivers' µs per delivery: their CPU over the deliveries they counted. "
        f"Idle: the same with every subscriber connected and nothing published for "
        f"{a.get('idle_s', 2.0):.0f} s (the receivers' includes their 100 ms sweeps).",
        "",
        "| system | flat out: delivered/s | flat out: lost | measured runs: delivered/s, min-max | "
        "events/s sent (measured runs) | "
        "broker cores | receivers' cores | receivers' µs CPU per delivery | publishers' cores | "
        "idle: broker / receivers' cores |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        if "summary" not in r:
            continue
        s = r["summary"]
        f = r["flat_out"]
        fl = _lost(f["lost"], f["expected"])
        if f.get("seq_gaps"):
            fl += f"; seq gaps {f['seq_gaps']:,}"
        if f.get("redis_closed_subscribers"):
            fl += f"; {f['redis_closed_subscribers']} subscribers disconnected"
        rates = [x["deliveries_per_s"] for x in r["runs"]]
        out.append(
            f"| {r['label']} | {_k(f['deliveries_per_s'])} | {fl} | "
            f"{_k(min(rates))}-{_k(max(rates))} | {s['events_per_s']:.0f} | "
            f"{s['broker_cores']:.2f} | {s['rx_cores']:.2f} | {s['rx_us_per_delivery']:.2f} | "
            f"{s['pub_cores']:.2f} | {s['idle_broker_cores']:.3f} / {s['idle_rx_cores']:.3f} |"
        )
    out += notes(doc)
    out += ["", "## Systems as started", ""]
    for r in doc["results"]:
        if "command" in r:
            cmd = " ".join(x if x else '""' for x in r["command"])
            out.append(f"- {r['label']}: `{cmd}` ({r.get('version', '')})")
    out.append("")
    return "\n".join(out)


def notes(doc: Dict[str, Any]) -> List[str]:
    """The method and caveats, with this run's own figures in them."""
    a = doc["settings"]
    ok = [r for r in doc["results"] if "summary" in r]
    out = ["", "## Notes", ""]
    out.append(
        f"- Subscribers: {a['subscribers']:,} sockets in {a['receivers']} receiver processes "
        "(1,000 processes do not fit on 2 cores). Each process keeps all its sockets' "
        "descriptors in one epoll set (`ZMQ_FD` for ZeroMQ sockets), drains a ready socket "
        "with `recv_into` into reused buffers until it would block, and sweeps every socket "
        "every 100 ms in case a wake-up was missed. Receivers count; they do not decode the "
        "msgpack (the latency runs read the send stamp at a fixed offset). Protocol v1 "
        "receivers also check every `seq`. Redis receivers are plain sockets parsed by hiredis."
    )
    if ok:
        rx = [r["summary"]["rx_cores"] for r in ok]
        br = [r["summary"]["broker_cores"] for r in ok]
        bound = sum(1 for x, y in zip(rx, br) if x > y)
        out.append(
            f"- Who was the limit: in the measured runs the receivers used {min(rx):.2f}-"
            f"{max(rx):.2f} cores and the brokers {min(br):.2f}-{max(br):.2f} "
            f"(receivers more than the broker for {bound} of {len(ok)} systems), out of "
            f"{doc['machine']['nproc']} cores shared with the publishers and with other "
            "sessions' work. So these figures are the ceiling of this many Python subscribers "
            "and the broker together on one small machine, largely set by the subscribers, not "
            "any broker's own capacity; they compare the systems under the same client load. "
            "The CPU-per-million-deliveries column is each broker's own cost and the fairer "
            "comparison of the brokers themselves."
        )
        rx_sat = statistics.median(r["summary"]["rx_us_per_delivery"] for r in ok)
        rx_half = statistics.median(r["summary"]["rx_us_half"] for r in ok)
        rx_light = statistics.median(r["summary"]["rx_us_light"] for r in ok)
        br_light = statistics.median(r["summary"]["broker_us_light"] for r in ok)
        out.append(
            f"- Half load is not light for the receivers: a delivery cost them {rx_sat:.1f} µs "
            f"of CPU flat out (backlogged sockets are drained in batches), {rx_half:.1f} µs at "
            f"half load and {rx_light:.1f} µs at the light rate (median over systems, fixed "
            "costs included), when messages arrive one by one and each costs a wake-up of "
            "libzmq's I/O thread and of the receiver. So p50/p99 at half load "
            "include queueing in the receivers. The light-load column is nearer the path itself: "
            f"there one 'D' event is {a['subscribers']:,} deliveries, each a separate write by "
            f"the broker ({br_light:.0f} µs of broker CPU per delivery, median, idle cost "
            "included) and a separate "
            "read by a receiver on the same 2 cores, so its last copy leaves milliseconds after "
            "its first: that fan-out, not a queue, is most of those latencies."
        )
    out.append(
        "- Publishers: forked processes, each sending events round-robin from 4,096 "
        "pre-packed templates (its own seeded mix), stamping `time.monotonic_ns()` just "
        "before sending. ZeroMQ publishers are PUSH sockets as Dragonflow's workers use "
        "(libzmq's default HWM of 1,000: a slow system blocks them, which paces them). "
        "Redis publishers send one `PUBLISH` per event and wait for its reply, as "
        f"Dragonflow's Redis driver does (client: {a['redis_client']}; the default writes "
        "RESP on a plain socket, since redis-py's 49 µs of CPU per call against 10 µs would "
        "take cores the systems under test need)."
    )
    out.append(
        "- df-publisher-service: benches/dragonflow/df_publisher_service.py does what "
        "Dragonflow's service does per event (PULL `recv_multipart`, msgpack unpack, a "
        "`DbUpdate`, msgpack pack, PUB `send_multipart` on the update's topic), without "
        "eventlet; libzmq defaults as Dragonflow leaves them (a PUB drops what a SUB's "
        "1,000-message pipe cannot hold). zbroker runs with its defaults, plus "
        "`--sub-timeout 600s` since the protocol v1 receivers send no PING; Redis with "
        "its defaults (no persistence)."
    )
    out.append(
        "- Noise: the machine is shared (see the load averages above) and has 2 cores for "
        "everything: the broker, 4 receiver and 8 publisher processes, and other sessions' "
        "builds. Systems are run round-robin (round k of each before round k + 1 of any), each "
        "round on a fresh instance, so drifts in load fall on all; the spread of the measured "
        "runs is in the second table (a factor of two is not unusual here), p99 varies more. "
        "Ratios and CPU per delivery are the meaningful parts."
    )
    return out


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dfbench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller, shorter, 1 run: about 2 minutes")
    p.add_argument(
        "--runs", type=int, default=None, help="measured runs per system (default 3; quick 1)"
    )
    p.add_argument(
        "--systems",
        default=",".join(sysmod.SYSTEMS),
        help="comma-separated: " + ", ".join(sysmod.SYSTEMS),
    )
    p.add_argument("--subscribers", type=int, default=None, help="default 1000 (quick 200)")
    p.add_argument(
        "--receivers", type=int, default=4, help="receiver processes sharing the subscriber sockets"
    )
    p.add_argument("--publishers", type=int, default=8, help="publisher processes")
    p.add_argument("--projects", type=int, default=1000)
    p.add_argument("--per-sub", type=int, default=5, help="projects per subscriber (besides 'D')")
    p.add_argument("--d-share", type=float, default=0.10, help="share of events on 'D'")
    p.add_argument("--min-size", type=int, default=300)
    p.add_argument("--max-size", type=int, default=1500)
    p.add_argument("--probe-s", type=float, default=None, help="flat-out probe length (4; quick 3)")
    p.add_argument("--cal-s", type=float, default=None, help="calibration step length (3; quick 2)")
    p.add_argument("--run-s", type=float, default=None, help="measured run length (6; quick 4)")
    p.add_argument("--lat-s", type=float, default=None, help="latency run length (5; quick 3)")
    p.add_argument(
        "--light-events",
        type=float,
        default=100.0,
        help="events/s (all publishers together) of the light-load latency runs",
    )
    p.add_argument(
        "--redis-client",
        choices=("resp", "redis-py"),
        default="resp",
        help="Redis publishers: PUBLISH over a plain socket (default) or through redis-py",
    )
    p.add_argument("--idle-s", type=float, default=2.0, help="idle measurement per round (seconds)")
    p.add_argument("--max-steps", type=int, default=6, help="calibration steps at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--zbroker", help="the zbroker binary (required unless --render)")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="only rewrite the Markdown beside this results JSON from it (runs nothing)",
    )
    p.add_argument("--zbroker-rev", default="unknown")
    p.add_argument("--command", default=None, help="the command line to record")
    p.add_argument(
        "--out",
        default=None,
        help="results Markdown (default benches/dragonflow/results[-quick].md)",
    )
    a = p.parse_args(argv)
    if not a.zbroker and not a.render:
        p.error("--zbroker is required")
    q = a.quick
    defaults = {
        "runs": 1 if q else 3,
        "subscribers": 200 if q else 1000,
        "probe_s": 3.0 if q else 4.0,
        "cal_s": 2.0 if q else 3.0,
        "run_s": 4.0 if q else 6.0,
        "lat_s": 3.0 if q else 5.0,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.out is None:
        a.out = os.path.join(HERE, "results-quick.md" if q else "results.md")
    a.systems = [s for s in a.systems.split(",") if s]
    for s in a.systems:
        if s not in sysmod.SYSTEMS:
            p.error(f"unknown system {s!r}")
    if a.runs < 1 or a.subscribers < 1 or a.receivers < 1 or a.publishers < 1:
        p.error("--runs, --subscribers, --receivers and --publishers must be at least 1")
    if not 30 <= a.min_size <= a.max_size <= 65536:
        p.error("need 30 <= --min-size <= --max-size <= 65536")
    if not 0.0 <= a.d_share <= 1.0 or a.per_sub > a.projects:
        p.error("--d-share is a fraction; --per-sub at most --projects")
    a.receivers = min(a.receivers, a.subscribers)
    return a


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        md_path = os.path.splitext(args.render)[0] + ".md"
        with open(md_path, "w") as f:
            f.write(render(doc))
        log(f"wrote {md_path}")
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    wl = wlmod.Workload(
        subscribers=args.subscribers,
        projects=args.projects,
        projects_per_subscriber=args.per_sub,
        d_share=args.d_share,
        min_size=args.min_size,
        max_size=args.max_size,
        seed=args.seed,
    )
    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    tmp = tempfile.mkdtemp(prefix="dfbench-")
    results = []
    try:
        # Round-robin: round k of every system before round k + 1 of any, so
        # that a change in the shared machine's load falls on all of them.
        results = [{"system": n, "label": sysmod.NAMES[n]} for n in args.systems]
        for k in range(args.runs):
            for res in results:
                if "error" in res:
                    continue
                try:
                    bench_round(res["system"], k, res, args, wl, tmp)
                except StopRequestedError:
                    raise
                except Exception as e:  # one failing system does not lose the others
                    log(f"{res['system']}: failed: {e!r}")
                    res["error"] = repr(e)
        for res in results:
            if "error" not in res:
                res["summary"] = summarize(res)
    except StopRequestedError as e:
        log(f"interrupted ({e}); stopped everything")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    json_path = os.path.splitext(args.out)[0] + ".json"
    doc = {
        "command": args.command or "dfbench.py " + " ".join(argv),
        "date": date,
        "took_s": time.monotonic() - started,
        "loadavg_before": load_before,
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "machine": machine_notes(),
        "zbroker_version": sysmod.zbroker_version(args.zbroker),
        "zbroker_rev": args.zbroker_rev,
        "settings": {k: v for k, v in vars(args).items() if k not in ("command", "out")},
        "mean_fanout": wl.mean_fanout(),
        "json": json_path,
        "results": results,
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    md = render(doc)
    with open(args.out, "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {args.out} and {json_path} in {doc['took_s']:.0f} s")
    return 0 if all("summary" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
