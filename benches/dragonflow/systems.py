"""The systems under test, each started on free 127.0.0.1 ports and ipc paths
in a temporary directory, and stopped (TERM, then KILL) by ``stop()``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

SYSTEMS = ("zbroker", "zbroker-xpub", "redis", "df-service")
NAMES = {
    "zbroker": "zbroker (protocol v1, exact filters)",
    "zbroker-xpub": "zbroker drop-in (PUSH ipc → zbroker → SUB on --xpub-bind)",
    "redis": "Redis pub/sub (PUBLISH/SUBSCRIBE)",
    "df-service": "df-publisher-service (PUSH ipc → Python PULL→PUB → SUB)",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def _wait_path(path: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before binding {path}")
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path} not bound after {timeout} s")


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    pub: Tuple[str, str]  # ("zmq", endpoint) or ("redis", "host:port")
    sub: Tuple[str, str]  # ("native" | "sub", endpoint) or ("redis", "host:port")
    command: List[str]
    version: str
    metrics_port: Optional[int] = None
    log: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> Dict[str, float]:
        """zbroker's Prometheus counters, flattened (name{labels} -> value)."""
        if self.metrics_port is None:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            k, _, v = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[k] = float(v)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _spawn(cmd: List[str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def zbroker_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def redis_version() -> str:
    exe = shutil.which("redis-server") or "redis-server"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def start(name: str, tmp: str, zbroker: str) -> Running:
    log = os.path.join(tmp, f"{name}.log")
    if name in ("zbroker", "zbroker-xpub"):
        ipc = f"ipc://{tmp}/zbroker-pub.ipc"
        sub_port, metrics_port = free_port(), free_port()
        cmd = [
            zbroker,
            "--log-level",
            "warn",
            "run",
            "--pub-bind",
            ipc,
            "--sub-bind",
            f"tcp://127.0.0.1:{sub_port}",
            "--metrics-bind",
            f"127.0.0.1:{metrics_port}",
            # The receivers send no PING (protocol v1 keep-alive), so that
            # the native subscribers cost no more than SUB sockets.
            "--sub-timeout",
            "600s",
        ]
        xpub_port = None
        if name == "zbroker-xpub":
            xpub_port = free_port()
            cmd += ["--xpub-bind", f"tcp://127.0.0.1:{xpub_port}"]
        proc = _spawn(cmd, log)
        _wait_port(sub_port, proc)
        if xpub_port:
            _wait_port(xpub_port, proc)
        _wait_path(ipc[len("ipc://") :], proc)
        if name == "zbroker":
            sub = ("native", f"tcp://127.0.0.1:{sub_port}")
        else:
            sub = ("sub", f"tcp://127.0.0.1:{xpub_port}")
        return Running(
            name, proc, ("zmq", ipc), sub, cmd, zbroker_version(zbroker), metrics_port, log
        )
    if name == "redis":
        port = free_port()
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found (scripts/bench-dragonflow installs it)")
        cmd = [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "10000",
            "--dir",
            tmp,
        ]
        proc = _spawn(cmd, log)
        _wait_port(port, proc)
        hp = f"127.0.0.1:{port}"
        return Running(name, proc, ("redis", hp), ("redis", hp), cmd, redis_version(), None, log)
    if name == "df-service":
        ipc = f"ipc://{tmp}/df-publisher.ipc"
        port = free_port()
        cmd = [
            sys.executable,
            os.path.join(HERE, "df_publisher_service.py"),
            ipc,
            f"tcp://127.0.0.1:{port}",
        ]
        proc = _spawn(cmd, log)
        _wait_port(port, proc)
        _wait_path(ipc[len("ipc://") :], proc)
        import zmq

        version = (
            f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"
        )
        return Running(
            name, proc, ("zmq", ipc), ("sub", f"tcp://127.0.0.1:{port}"), cmd, version, None, log
        )
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


def dropped(metrics: Dict[str, float]) -> Dict[str, float]:
    """zbroker's drop counters, by reason."""
    out = {}
    for k, v in metrics.items():
        m = re.match(r'^zbroker_messages_dropped_total\{reason="([a-z_]+)"\}$', k)
        if m:
            out[m.group(1)] = v
        m = re.match(r'^zbroker_xpub_messages_total\{outcome="dropped"\}$', k)
        if m:
            out["xpub_dropped"] = v
    return out
