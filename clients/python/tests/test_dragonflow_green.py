"""Dragonflow's pub/sub under eventlet, as its services run it (they
monkey-patch first): this driver, and Dragonflow's own zmq driver, unchanged,
through the broker's drop-in fronts (a PUSH publisher on an ipc --pub-bind,
SUB subscribers on --xpub-bind). Each test drives tests/dragonflow_child.py
in a child process, against the real broker binary, with the pub/sub base
classes and zmq driver of the Dragonflow installed: 4.0.0's, or master's when
scripts/test-dragonflow built it from source (DRAGONFLOW_SOURCE)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List

import pytest

from conftest import BrokerFactory
from dragonflow_support import (
    ALIAS,
    IPC_SOCKET_OPTION,
    SYNC,
    ZMQ_PUBLISHER_DRIVER,
    ZMQ_SUBSCRIBER_DRIVER,
    Update,
    syncs,
)
from harness import WAIT, Broker, free_tcp_endpoint

TESTS = Path(__file__).resolve().parent


class Child:
    """tests/dragonflow_child.py in a child process; ``call`` sends one
    command and returns its result, waiting at most ``WAIT`` (or
    ``limit``)."""

    def __init__(self, stderr: IO[bytes], *args: str) -> None:
        self._stderr = stderr
        env = dict(os.environ, PYTHONPATH=str(TESTS))
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "dragonflow_child.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-20_000:]

    def call(self, op: str, limit: float = WAIT, **args: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.process.stdin.flush()
        try:
            line = self._lines.get(timeout=limit)
        except queue.Empty:
            raise AssertionError(f"{op}: no answer within {limit} s:\n{self.stderr()}") from None
        if not line:
            raise AssertionError(f"{op}: the child exited:\n{self.stderr()}")
        answer: Dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"{op}: {answer['error']}\n{self.stderr()}")
        return answer["ok"]

    def updates(self, op: str, **args: Any) -> List[Update]:
        return [tuple(u) for u in self.call(op, **args)]

    def fence(self, publisher: str, subscribers: List[str], n: int) -> Dict[str, List[Update]]:
        before = self.call("fence", publisher=publisher, subscribers=subscribers, n=n)
        return {name: [tuple(u) for u in got] for name, got in before.items()}

    def close(self) -> int:
        """Closes the drivers and waits for the child to exit (bounded)."""
        if self.process.poll() is None:
            try:
                self.call("close")
                return self.process.wait(timeout=WAIT)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=WAIT)
        return self.process.returncode


@pytest.fixture
def transport() -> str:
    return "tcp"


@pytest.fixture
def child() -> Iterator[Child]:
    """The child, with the installed Dragonflow's pub/sub base classes."""
    with tempfile.TemporaryFile() as stderr:
        made = Child(stderr)
        yield made
        made.close()


def keys(updates: List[Update]) -> List[Any]:
    return [u[1] for u in updates if u[0] != "probe"]


def test_this_driver_under_eventlet(make_broker: BrokerFactory, child: Child) -> None:
    broker = make_broker()
    child.call("set", group="zbroker", name="publisher_endpoints", value=[broker.pub_endpoint])
    child.call("set", group="zbroker", name="subscriber_endpoints", value=[broker.sub_endpoint])
    assert child.call("subscriber", name="s", driver=ALIAS, topics=["D", "project-a"]) == [
        "ZbrokerPubSub",
        "ZbrokerSubscriberAgent",
    ]
    assert child.call("publisher", name="p", driver=ALIAS) == [
        "ZbrokerPubSub",
        "ZbrokerPublisherAgent",
    ]
    assert child.updates("probe", publisher="p", subscriber="s", topic="D") == []

    # The subscriber's green thread waits in eventlet's thread pool, not in
    # the hub: other green threads run on (a blocking wait would hold each
    # switch up for the driver's 0.1 s poll: 2 s for 20).
    assert child.call("hub", switches=20) < 1.0

    for topic in ["project-a", "project-b", "D"]:
        child.call("send", publisher="p", table="lport", key=topic, value="{}", topic=topic)
    assert keys(child.fence("p", ["s"], 1)["s"]) == ["project-a", "D"]

    broker.restart()
    before = child.updates("probe", publisher="p", subscriber="s", topic="D")
    assert before[-1:] == [SYNC], before
    assert child.fence("p", ["s"], 2)["s"] == []
    assert syncs(child.updates("updates", subscriber="s")) == 1
    assert child.call("running", subscriber="s") == [True, True]
    bases = child.call("base_classes", subscriber="s")
    assert [b.split()[0] for b in bases] == ["SubscriberAgentBase", "SubscriberApi"]
    assert all(b.endswith("pub_sub_api.py") for b in bases)
    assert child.call("close_subscriber", subscriber="s") is True
    assert child.call("running", subscriber="s") == [False, False]
    assert child.close() == 0


def test_dragonflows_zmq_driver_through_the_drop_in_fronts(
    make_broker: BrokerFactory, ipc_dir: Path, child: Child
) -> None:
    # The broker in place of Dragonflow's publisher service: neutron-server's
    # multiproc PUSH connects to [df] publisher_multiproc_socket (4.0.0) or
    # [df_zmq] ipc_socket (master), SUB sockets to [df] publishers_ips and
    # publisher_port.
    ipc = f"{ipc_dir}/publisher-socket"
    xpub = free_tcp_endpoint()
    broker = make_broker("--pub-bind", f"ipc://{ipc}", "--xpub-bind", xpub)
    _drop_in_fronts(broker, child, ipc, xpub)


def _drop_in_fronts(broker: Broker, child: Child, ipc: str, xpub: str) -> None:
    group, option = IPC_SOCKET_OPTION
    child.call("set", group=group, name=option, value=ipc)
    child.call("set", group="zbroker", name="publisher_endpoints", value=[broker.pub_endpoint])
    child.call("set", group="zbroker", name="subscriber_endpoints", value=[broker.sub_endpoint])
    topics = ["D", "project-a"]
    # Dragonflow's SUB subscriber and ipc PUSH publisher: one driver on
    # master, two on 4.0.0.
    alias, driver = ZMQ_SUBSCRIBER_DRIVER
    assert child.call("subscriber", name="zmq", driver=alias, topics=topics, uris=[xpub]) == [
        driver,
        "ZMQSubscriberAgent",
    ]
    assert child.call("subscriber", name="native", driver=ALIAS, topics=topics) == [
        "ZbrokerPubSub",
        "ZbrokerSubscriberAgent",
    ]
    alias, driver = ZMQ_PUBLISHER_DRIVER
    assert child.call("publisher", name="push", driver=alias) == [
        driver,
        "ZMQPublisherMultiprocAgent",
    ]
    assert child.call("publisher", name="native", driver=ALIAS) == [
        "ZbrokerPubSub",
        "ZbrokerPublisherAgent",
    ]
    both = ["zmq", "native"]
    for publisher in ["push", "native"]:
        for subscriber in both:
            child.call("probe", publisher=publisher, subscriber=subscriber, topic="D")
    child.fence("push", both, 0)
    child.fence("native", both, 0)

    # Both publishers reach both subscribers, filtered by topic, unchanged.
    for n, publisher in enumerate(["push", "native"], start=1):
        for topic in ["project-a", "project-b", "D"]:
            child.call(
                "send", publisher=publisher, table="lport", key=topic, value="ü{}", topic=topic
            )
        for name, got in child.fence(publisher, both, n).items():
            assert got == [
                ("lport", "project-a", "set", "ü{}", "project-a"),
                ("lport", "D", "set", "ü{}", "D"),
            ], name

    # A restart: libzmq reconnects the PUSH and the SUB (which subscribes
    # again by itself); this driver's subscriber reports one sync, while
    # Dragonflow's zmq driver reports none (what the broker lost meanwhile is
    # lost silently: the XPUB front has no sequence numbers).
    broker.restart()
    before = child.updates("probe", publisher="push", subscriber="native", topic="D")
    assert before[-1:] == [SYNC], before
    child.updates("probe", publisher="native", subscriber="zmq", topic="D")
    child.fence("push", both, 10)
    assert child.fence("native", both, 11) == {"zmq": [], "native": []}
    assert syncs(child.updates("updates", subscriber="native")) == 1
    assert syncs(child.updates("updates", subscriber="zmq")) == 0
    assert child.close() == 0
