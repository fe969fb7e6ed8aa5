#!/usr/bin/env python3
"""Checks the Grafana dashboard and the Prometheus rules against a real broker.

Reads contrib/grafana/zbroker.json and contrib/prometheus/zbroker-rules.yml
(or the files given), extracts every series name their PromQL expressions
use, starts the broker binary as a 2-broker cluster on loopback (static
peers, an XPUB front, metrics on free ports), scrapes /metrics from both,
and fails naming:

- any zbroker_* series queried that neither broker exports (the exposition
  names counters with their _total suffix, and so must queries);
- any label value a query selects (reason="queue_full", a simple
  alternation such as reason=~"a|b") that no exported series carries;
- any zbroker:* recording rule used that the rules files do not define.

With --prometheus PATH it also runs that Prometheus server on loopback,
scraping both brokers with the rules loaded, and fails if a dashboard query
(Grafana variables filled in) errs or returns nothing, if a rule's last
evaluation erred, or if any alert is pending or firing on the healthy
cluster.

Standard library only. Exit status 0 when everything checks, 1 on a
finding, 2 when the check itself could not run (no broker, a broker that
does not start).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = ROOT / "contrib" / "grafana" / "zbroker.json"
DEFAULT_RULES = ROOT / "contrib" / "prometheus" / "zbroker-rules.yml"

# Labels Prometheus attaches at scrape time: never in the exposition.
SCRAPE_LABELS = frozenset({"job", "instance"})
# What the dashboard's Grafana variables become when the checker evaluates
# its queries on a real Prometheus.
GRAFANA_VARIABLES = {
    "__rate_interval": "5s",
    "__interval": "1s",
    "job": "zbroker",
    "instance": ".+",
    "queue_cap": "536870912",
}

STRING_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|#[^\n]*')
SERIES_NAME = re.compile(r"(?<![A-Za-z0-9_:$.])(zbroker[_:][A-Za-z0-9_:]*)")
SELECTOR = re.compile(r"(?<![A-Za-z0-9_:$])(zbroker_[A-Za-z0-9_]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
SIMPLE_ALTERNATION = re.compile(r"[A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*")
SAMPLE = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{([^}]*)\})?\s+\S+")
METRICS_LOG = re.compile(r"serving metrics endpoint=(http://\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
YAML_KEY = re.compile(r"^(\s*)(-\s+)?(expr|record|alert):(?:\s+(.*))?$")
BLOCK_INDICATOR = re.compile(r"[|>][+-]?[0-9]?")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it was found."""

    where: str
    expr: str


@dataclass
class Sources:
    """What the dashboard and the rules query, and what the rules define."""

    dashboard: List[Query] = field(default_factory=list)
    template: List[Query] = field(default_factory=list)
    rules: List[Query] = field(default_factory=list)
    records: Set[str] = field(default_factory=set)
    rule_count: int = 0

    def all_queries(self) -> List[Query]:
        return self.dashboard + self.template + self.rules


@dataclass
class Exported:
    """What the brokers' /metrics served: sample names and label pairs."""

    names: Set[str] = field(default_factory=set)
    labels: Dict[str, Set[Tuple[str, str]]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = SAMPLE.match(line)
            if match is None:
                continue
            name = match.group(1)
            self.names.add(name)
            pairs = self.labels.setdefault(name, set())
            for label, op, quoted in MATCHER.findall(match.group(2) or ""):
                if op == "=":
                    pairs.add((label, unquote(quoted)))


class CheckError(Exception):
    """The check could not run (as opposed to a finding)."""


def unquote(quoted: str) -> str:
    """The value of a double-quoted PromQL, exposition or YAML string; its
    raw text if it uses an escape JSON lacks (such as a regex's `\\.`)."""
    try:
        value: object = json.loads(quoted)
    except ValueError:
        return quoted[1:-1]
    return value if isinstance(value, str) else quoted[1:-1]


# ------------------------------------------------------------------ sources


def dashboard_queries(path: Path, sources: Sources) -> None:
    """Every target expression of every panel (rows' nested panels too) and
    every query variable of the dashboard at `path`."""
    try:
        data: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckError(f"{path}: does not parse as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckError(f"{path}: not a dashboard (a JSON object)")

    def walk(panels: object) -> Iterator[Dict[str, object]]:
        if not isinstance(panels, list):
            return
        for panel in panels:
            if isinstance(panel, dict):
                yield panel
                yield from walk(panel.get("panels"))

    for panel in walk(data.get("panels")):
        title = panel.get("title", "?")
        targets = panel.get("targets")
        if not isinstance(targets, list):
            continue
        for target in targets:
            if isinstance(target, dict) and isinstance(target.get("expr"), str):
                expr = str(target["expr"])
                where = f"{path.name}: panel {title!r} target {target.get('refId', '?')}"
                sources.dashboard.append(Query(where, expr))
    templating = data.get("templating")
    variables = templating.get("list") if isinstance(templating, dict) else None
    for variable in variables if isinstance(variables, list) else []:
        if not isinstance(variable, dict) or variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            where = f"{path.name}: variable {variable.get('name', '?')!r}"
            sources.template.append(Query(where, query))


def rules_queries(path: Path, sources: Sources) -> None:
    """The `expr` of every rule in the rules file at `path`, and the names
    its recording rules define.

    A reader for the part of YAML rules files use (promtool checks the
    whole file): `expr:` and `record:` keys with a plain, quoted or block
    (`|`, `>`) scalar value.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CheckError(f"{path}: {e}") from e
    index = 0
    while index < len(lines):
        match = YAML_KEY.match(lines[index])
        index += 1
        if match is None:
            continue
        lineno = index
        indent, dash, key, raw = match.groups()
        column = len(indent) + len(dash or "")
        value = (raw or "").strip()
        continuation: List[str] = []
        while index < len(lines):
            line = lines[index]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= column:
                break
            continuation.append(line)
            index += 1
        while continuation and not continuation[-1].strip():
            continuation.pop()
        if BLOCK_INDICATOR.fullmatch(value):
            text = "\n".join(line.strip() for line in continuation)
        elif value.startswith('"'):
            text = unquote(" ".join([value, *(line.strip() for line in continuation)]))
        elif value.startswith("'"):
            joined = " ".join([value, *(line.strip() for line in continuation)])
            text = joined[1:-1].replace("''", "'")
        else:
            text = " ".join([value, *(line.strip() for line in continuation)]).strip()
            text = re.sub(r"\s+#.*$", "", text)
        if key == "record":
            sources.records.add(text)
            sources.rule_count += 1
        elif key == "alert":
            sources.rule_count += 1
        else:
            sources.rules.append(Query(f"{path.name}:{lineno}: expr", text))
    if not sources.rules:
        raise CheckError(f"{path}: no rule expressions found")


def series_names(expr: str) -> Set[str]:
    """zbroker_* and zbroker:* names in a PromQL expression, outside string
    literals and comments."""
    return set(SERIES_NAME.findall(STRING_OR_COMMENT.sub(" ", expr)))


def label_selections(expr: str) -> Iterator[Tuple[str, str, str]]:
    """(series, label, value) for each label value the expression selects
    by equality, or by a regex that is a plain alternation of words; Grafana
    variables and scrape-time labels are left out."""
    for name, body in SELECTOR.findall(expr):
        for label, op, quoted in MATCHER.findall(body):
            if label in SCRAPE_LABELS or op not in ("=", "=~"):
                continue
            value = unquote(quoted)
            if "$" in value:
                continue
            if op == "=":
                yield name, label, value
            elif SIMPLE_ALTERNATION.fullmatch(value):
                for alternative in value.split("|"):
                    yield name, label, alternative


def findings(sources: Sources, exported: Exported) -> List[str]:
    problems: List[str] = []
    for query in sources.all_queries():
        for name in sorted(series_names(query.expr)):
            if ":" in name:
                if name not in sources.records:
                    problems.append(f"{query.where}: recording rule {name} is used but not defined")
            elif name not in exported.names:
                hint = ""
                if f"{name}_total" in exported.names:
                    hint = f" (the broker exports {name}_total)"
                problems.append(f"{query.where}: {name} is not exported by the broker{hint}")
        for name, label, value in label_selections(query.expr):
            if name in exported.names and (label, value) not in exported.labels.get(name, set()):
                problems.append(f'{query.where}: no exported {name} series has {label}="{value}"')
    return problems


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Everything fetched is on loopback: never through a proxy from the
# environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> str:
    with OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode("utf-8")


class Process:
    """A child process with its stderr in a file, stopped on close."""

    def __init__(self, name: str, argv: List[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
        except OSError as e:
            self._log_file.close()
            raise CheckError(f"cannot start {name} ({argv[0]}): {e}") from e

    def log_text(self) -> str:
        return ANSI.sub("", self.log.read_text(encoding="utf-8", errors="replace"))

    def exited(self) -> Optional[int]:
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log_file.close()


# A probe returns (the value waited for, or None) and what it last saw.
Probe = Callable[[], Tuple[Optional[str], str]]


def wait_for(what: str, deadline: float, probe: Probe) -> str:
    """Polls `probe` (every 50 ms, until `deadline`) until it returns a
    value; raises CheckError naming `what` otherwise."""
    last = ""
    while time.monotonic() < deadline:
        result, last = probe()
        if result is not None:
            return result
        time.sleep(0.05)
    raise CheckError(f"timed out waiting for {what}{': ' + last if last else ''}")


class Cluster:
    """Two brokers, a and b, linked by static peers on loopback."""

    def __init__(self, binary: str, workdir: Path, timeout: float) -> None:
        self.binary = binary
        self.workdir = workdir
        self.timeout = timeout
        self.brokers: Dict[str, Process] = {}
        self.urls: Dict[str, str] = {}

    def start(self) -> None:
        # The cluster ports must be known before either broker starts (each
        # names the other's); a port taken meanwhile makes a broker exit,
        # and the attempt is made again on new ports.
        for attempt in range(3):
            try:
                self._start_once()
                return
            except CheckError as e:
                self.close()
                if attempt == 2:
                    raise
                print(f"check_metrics: retrying the cluster on new ports: {e}", file=sys.stderr)

    def _start_once(self) -> None:
        ports = {"a": free_port(), "b": free_port()}
        peers = ",".join(f"tcp://127.0.0.1:{ports[n]}" for n in ("a", "b"))
        for name in ("a", "b"):
            ipc = self.workdir / name
            argv = [
                self.binary,
                "run",
                "--pub-bind",
                f"ipc://{ipc}.pub",
                "--sub-bind",
                f"ipc://{ipc}.sub",
                "--xpub-bind",
                f"ipc://{ipc}.xpub",
                "--cluster-bind",
                f"tcp://127.0.0.1:{ports[name]}",
                "--cluster-id",
                name,
                "--cluster-peers",
                peers,
                "--cluster-ping-interval",
                "100ms",
                "--cluster-peer-timeout",
                "1s",
                "--metrics-bind",
                "127.0.0.1:0",
                "--linger",
                "0s",
            ]
            self.brokers[name] = Process(
                f"broker {name}", argv, self.workdir / f"broker-{name}.log"
            )
        deadline = time.monotonic() + self.timeout
        for name, broker in self.brokers.items():
            self.urls[name] = wait_for(
                f"broker {name} to serve metrics", deadline, self._endpoint_probe(broker)
            )
        for name in self.brokers:
            wait_for(
                f"broker {name}'s link to its peer to come up", deadline, self._link_probe(name)
            )

    @staticmethod
    def _endpoint_probe(broker: Process) -> Probe:
        def probe() -> Tuple[Optional[str], str]:
            text = broker.log_text()
            match = METRICS_LOG.search(text)
            if match is not None:
                return match.group(1), ""
            status = broker.exited()
            if status is not None:
                raise CheckError(f"{broker.name} exited with status {status}:\n{text}")
            return None, ""

        return probe

    def _link_probe(self, name: str) -> Probe:
        def probe() -> Tuple[Optional[str], str]:
            try:
                text = http_get(self.urls[name])
            except (OSError, urllib.error.URLError) as e:
                return None, str(e)
            if re.search(r"^zbroker_peer_up\{[^}]*\} 1$", text, re.M):
                return text, ""
            return None, "zbroker_peer_up is not 1 yet"

        return probe

    def scrape(self) -> Exported:
        exported = Exported()
        for name, url in self.urls.items():
            try:
                exported.add(http_get(url))
            except (OSError, urllib.error.URLError) as e:
                raise CheckError(f"cannot scrape broker {name} at {url}: {e}") from e
        return exported

    def close(self) -> None:
        for broker in self.brokers.values():
            broker.close()
        self.brokers.clear()
        self.urls.clear()


# ------------------------------------------------------------------ prometheus


class Prometheus:
    """A Prometheus server on loopback scraping the cluster every second,
    with the rules loaded."""

    def __init__(
        self, binary: str, workdir: Path, targets: List[str], rules: List[Path], timeout: float
    ) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.proc: Optional[Process] = None
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p.resolve()) for p in rules],
            "scrape_configs": [{"job_name": "zbroker", "static_configs": [{"targets": targets}]}],
        }
        # JSON is YAML.
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for attempt in range(3):
            self.port = free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self.proc = Process(
                "prometheus",
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / f'tsdb{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                workdir / "prometheus.log",
            )
            try:
                wait_for("prometheus to be ready", time.monotonic() + timeout, self._ready)
                return
            except CheckError:
                self.close()
                if attempt == 2:
                    raise

    def _ready(self) -> Tuple[Optional[str], str]:
        assert self.proc is not None
        status = self.proc.exited()
        if status is not None:
            raise CheckError(f"prometheus exited with status {status}:\n{self.proc.log_text()}")
        try:
            return http_get(f"{self.base}/-/ready"), ""
        except (OSError, urllib.error.URLError) as e:
            return None, str(e)

    def api(self, path: str, **params: str) -> object:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = http_get(url, timeout=10)
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")
        except (OSError, urllib.error.URLError) as e:
            raise CheckError(f"prometheus at {url}: {e}") from e
        reply: object = json.loads(body)
        if not isinstance(reply, dict):
            raise CheckError(f"prometheus at {url}: not a JSON object")
        if reply.get("status") != "success":
            return str(reply.get("error", body))
        data: object = reply.get("data")
        return data

    def query(self, expr: str) -> Tuple[List[object], str]:
        """(result, "") on success, ([], error) otherwise."""
        data = self.api("query", query=expr)
        if isinstance(data, str):
            return [], data
        if not isinstance(data, dict):
            return [], "no data in the answer"
        result = data.get("result")
        if data.get("resultType") == "scalar":
            return [result], ""
        return (list(result), "") if isinstance(result, list) else ([], "no result")

    def wait_for_samples(self) -> None:
        # Enough scrapes of both brokers that a rate over 5 s has points.
        expr = 'count(count_over_time(up{job="zbroker"}[5s]) >= 4)'

        def probe() -> Tuple[Optional[str], str]:
            result, error = self.query(expr)
            if error:
                return None, error
            if result and isinstance(result[0], dict):
                value = result[0].get("value")
                if isinstance(value, list) and len(value) == 2 and value[1] == "2":
                    return "ok", ""
            return None, "fewer than 4 scrapes of both brokers"

        wait_for("prometheus to scrape both brokers", time.monotonic() + self.timeout, probe)

    def rule_groups(self) -> List[Dict[str, object]]:
        data = self.api("rules")
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise CheckError(f"prometheus rules API: unexpected answer {data!r}")
        return [g for g in data["groups"] if isinstance(g, dict)]

    def rules(self) -> List[Dict[str, object]]:
        out: List[Dict[str, object]] = []
        for group in self.rule_groups():
            rules = group.get("rules")
            for rule in rules if isinstance(rules, list) else []:
                if isinstance(rule, dict):
                    out.append(rule)
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None


def grafana_to_promql(expr: str) -> Tuple[str, List[str]]:
    """The expression with the dashboard's variables filled in, and the
    names of any variable the checker does not know."""
    unknown: List[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        unknown.append(name)
        return match.group(0)

    filled = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", fill, expr)
    return filled, unknown


def prometheus_findings(prom: Prometheus, sources: Sources) -> List[str]:
    problems: List[str] = []
    prom.wait_for_samples()
    for query in sources.dashboard + sources.template:
        expr, unknown = grafana_to_promql(query.expr)
        if unknown:
            problems.append(f"{query.where}: unknown dashboard variable(s) {', '.join(unknown)}")
            continue
        label = None
        values = LABEL_VALUES.match(expr)
        if values is not None:
            expr, label = values.group(1), values.group(2)
        result, error = prom.query(expr)
        if error:
            problems.append(f"{query.where}: prometheus refused {expr!r}: {error}")
        elif not result:
            problems.append(f"{query.where}: {expr!r} returned no data from the cluster")
        elif label is not None and not any(
            isinstance(r, dict) and isinstance(r.get("metric"), dict) and label in r["metric"]
            for r in result
        ):
            problems.append(f"{query.where}: no series of {expr!r} has the label {label}")

    # Every rule must have been evaluated at least once, without error.
    deadline = time.monotonic() + prom.timeout
    while True:
        rules = prom.rules()
        if rules and all(r.get("health") != "unknown" for r in rules):
            break
        if time.monotonic() > deadline:
            problems.append("prometheus did not evaluate every rule in time")
            break
        time.sleep(0.2)
    if len(rules) != sources.rule_count:
        problems.append(
            f"prometheus loaded {len(rules)} rules, the files define {sources.rule_count}"
        )
    for rule in rules:
        name = rule.get("name", "?")
        if rule.get("health") != "ok":
            problems.append(f"rule {name}: health {rule.get('health')}: {rule.get('lastError')}")
        if rule.get("type") == "alerting" and rule.get("state") != "inactive":
            problems.append(f"alert {name} is {rule.get('state')} on a healthy cluster")
    return problems


# ------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dashboard", type=Path, action="append", help="Grafana dashboard JSON")
    parser.add_argument("--rules", type=Path, action="append", help="Prometheus rules file")
    parser.add_argument(
        "--broker",
        default=os.environ.get("ZBROKER_BIN", str(ROOT / "target" / "debug" / "zbroker")),
        help="the zbroker binary (default: $ZBROKER_BIN, else target/debug/zbroker)",
    )
    parser.add_argument("--prometheus", help="also evaluate everything on this Prometheus server")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)

    dashboards: List[Path] = args.dashboard or [DEFAULT_DASHBOARD]
    rules: List[Path] = args.rules or [DEFAULT_RULES]
    sources = Sources()
    try:
        for path in dashboards:
            dashboard_queries(path, sources)
        for path in rules:
            rules_queries(path, sources)
    except CheckError as e:
        print(f"check_metrics: {e}", file=sys.stderr)
        return 1
    used: Set[str] = set()
    for query in sources.all_queries():
        used |= series_names(query.expr)
    print(
        f"check_metrics: {len(sources.dashboard)} panel queries, {len(sources.template)} "
        f"variable queries, {len(sources.rules)} rule expressions; "
        f"{len(used)} distinct zbroker series named",
        file=sys.stderr,
    )

    broker = shutil.which(args.broker) or args.broker
    if not os.access(broker, os.X_OK):
        print(f"check_metrics: no broker binary at {broker} (set ZBROKER_BIN)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="zbroker-check-"))
    cluster = Cluster(broker, workdir, args.timeout)
    prom: Optional[Prometheus] = None
    try:
        cluster.start()
        exported = cluster.scrape()
        print(
            f"check_metrics: the cluster exports {len(exported.names)} zbroker sample names",
            file=sys.stderr,
        )
        problems = findings(sources, exported)
        if args.prometheus and not problems:
            targets = [urllib.parse.urlsplit(u).netloc for u in cluster.urls.values()]
            prom = Prometheus(args.prometheus, workdir, targets, rules, args.timeout)
            problems += prometheus_findings(prom, sources)
    except CheckError as e:
        print(f"check_metrics: {e}", file=sys.stderr)
        print(f"check_metrics: logs in {workdir}", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        if prom is not None:
            prom.close()
        cluster.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for problem in problems:
        print(f"check_metrics: FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    stage = " and on prometheus" if args.prometheus else ""
    print(f"check_metrics: every queried series is exported{stage}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
