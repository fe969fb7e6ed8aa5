"""Runs the real zbroker binary for the tests, and bounded helpers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import zbroker

REPO_ROOT = Path(__file__).resolve().parents[3]

#: Longest a test waits for anything it expects (generous: a loaded 2-core
#: CI machine); never what decides pass or fail by itself.
WAIT = 20.0


class HarnessError(Exception):
    pass


def broker_binary() -> Path:
    """``$ZBROKER_BIN``, else ``<repo>/target/debug/zbroker``."""
    configured = os.environ.get("ZBROKER_BIN")
    path = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "zbroker"
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = "ZBROKER_BIN points to" if configured else "expected the broker at"
        raise HarnessError(
            f"{where} {path}, which is not an executable file. Build it with "
            "`cargo build` in the repository root (it creates target/debug/zbroker), "
            "or set ZBROKER_BIN to a zbroker binary, e.g. "
            "ZBROKER_BIN=target/release/zbroker after `cargo build --release`."
        )
    return path


def free_tcp_endpoint() -> str:
    """A loopback tcp endpoint nothing listens on (the system picked the
    port; it is free when this returns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


class Broker:
    """``zbroker run`` as a child process, on the given bind endpoints
    (``tcp://127.0.0.1:*`` lets the system pick a port; after the first start
    the broker is restarted on the port it got)."""

    def __init__(
        self, binary: Path, pub_bind: str, sub_bind: str, args: Sequence[str] = ()
    ) -> None:
        self.binary = binary
        self.pub_bind = pub_bind
        self.sub_bind = sub_bind
        self.args = list(args)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader: Optional[threading.Thread] = None
        self.pub_endpoint = ""
        self.sub_endpoint = ""

    def start(self) -> Broker:
        """Starts the broker and waits until it has bound both endpoints."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        command = [str(self.binary), "run", "--pub-bind", self.pub_bind]
        command += ["--sub-bind", self.sub_bind, *self.args]
        with self._cond:
            self.lines = []
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        pub = self._wait_for_line("publishers connect")
        sub = self._wait_for_line("subscribers connect")
        self.pub_endpoint = _endpoint_of(pub)
        self.sub_endpoint = _endpoint_of(sub)
        # Restart on exactly these endpoints.
        self.pub_bind, self.sub_bind = self.pub_endpoint, self.sub_endpoint
        return self

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_for_line(self, needle: str) -> str:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                assert self.process is not None
                if self.process.poll() is not None and not (
                    self._reader is not None and self._reader.is_alive()
                ):
                    raise HarnessError(
                        f"zbroker exited with {self.process.returncode} before logging "
                        f"{needle!r}:\n" + "\n".join(self.lines)
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError(
                        f"zbroker did not log {needle!r} within {WAIT} s:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.5))

    def wait_for_log(self, needle: str) -> str:
        """Waits (``WAIT`` at most) for a log line containing ``needle``."""
        return self._wait_for_line(needle)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the broker dies at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT)

    def stop(self) -> None:
        """SIGCONT (in case it was stopped), SIGTERM, then SIGKILL after a
        bounded wait."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)

    def restart(self) -> Broker:
        """Kills the broker and starts a new one on the same endpoints."""
        self.kill()
        return self.start()


def _endpoint_of(line: str) -> str:
    match = re.search(r"endpoint=(\S+)", line)
    if match is None:
        raise HarnessError(f"no endpoint in the broker's log line {line!r}")
    return match.group(1).strip('"')


def recv_event(sub: zbroker.Subscriber, what: str, limit: float = WAIT) -> zbroker.Event:
    """The next event, failing the test if none comes within ``limit``."""
    event = sub.recv(timeout=limit)
    if event is None:
        raise AssertionError(f"nothing received within {limit} s while waiting for {what}")
    return event


def recv_message(sub: zbroker.Subscriber, what: str, limit: float = WAIT) -> zbroker.Message:
    event = recv_event(sub, what, limit)
    assert isinstance(event, zbroker.Message), f"expected a message ({what}), got {event!r}"
    return event


def connect_probe(
    pub: zbroker.Publisher,
    sub: zbroker.Subscriber,
    topic: bytes,
    *,
    limit: float = WAIT,
    interval: float = 0.05,
    max_probes: int = 2000,
) -> Tuple[List[zbroker.Event], zbroker.Message]:
    """Publishes probes on ``topic`` (which ``sub`` must hold a filter for)
    until one arrives: then the publisher's connection is up and everything
    it publishes from now on reaches the broker after the probes. Returns
    the other events seen meanwhile and the first probe received. Bounded in
    count and time."""
    deadline = time.monotonic() + limit
    others: List[zbroker.Event] = []
    for n in range(max_probes):
        pub.publish(topic, b"probe-%d" % n)
        while True:
            event = sub.recv(timeout=interval)
            if event is None:
                break
            if isinstance(event, zbroker.Message) and event.topic == topic:
                return others, event
            others.append(event)
        if time.monotonic() >= deadline:
            break
    raise AssertionError(f"no probe on {topic!r} arrived within {limit} s; events: {others!r}")


def drain_until(
    sub: zbroker.Subscriber, stop: Callable[[zbroker.Message], bool], what: str
) -> List[zbroker.Event]:
    """Receives until a message for which ``stop`` holds (included), failing
    after ``WAIT`` s without any event, or 100,000 events."""
    events: List[zbroker.Event] = []
    for _ in range(100_000):
        event = recv_event(sub, what)
        events.append(event)
        if isinstance(event, zbroker.Message) and stop(event):
            return events
    raise AssertionError(f"too many events before {what}")
