"""What the Dragonflow driver's tests share (tests/test_dragonflow*.py and
tests/dragonflow_child.py): which Dragonflow is installed and where its
options and aliases differ, a callback that records, and publishing helpers
bounded in count and time. Needs the real dragonflow package: 4.0.0, or
master built from source (scripts/test-dragonflow, DRAGONFLOW_SOURCE)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from dragonflow.db import db_common, pub_sub_api

from harness import WAIT

ALIAS = "zbroker_pubsub_driver"


def _flavour() -> str:
    """Which Dragonflow's pub/sub base classes are installed, told by their
    own code: 4.0.0's subscriber has ``is_daemonize`` and an abstract
    ``run``, master's an abstract ``is_running`` instead."""
    abstract = pub_sub_api.SubscriberApi.__abstractmethods__
    has_daemonize = hasattr(pub_sub_api.SubscriberAgentBase, "is_daemonize")
    if has_daemonize and "run" in abstract and "is_running" not in abstract:
        return "4.0.0"
    if not has_daemonize and "is_running" in abstract and "run" not in abstract:
        return "master"
    raise RuntimeError(
        f"{pub_sub_api.__file__} is neither Dragonflow 4.0.0's nor master's: "
        f"abstract {sorted(abstract)}, is_daemonize {has_daemonize}"
    )


#: "4.0.0" or "master": what the tests below set up differently for.
FLAVOUR = _flavour()

#: Where the two differ in what the tests configure and load (the driver's
#: own options and alias are the same on both):
#:
#: - the option that makes 4.0.0's neutron-server publish through
#:   ``[df] pub_sub_multiproc_driver`` (on by default) instead of
#:   ``[df] pub_sub_driver``; master has neither;
#: - the ipc path that Dragonflow's zmq multiproc publisher PUSHes to:
#:   ``[df] publisher_multiproc_socket`` on 4.0.0, ``[df_zmq] ipc_socket`` on
#:   master;
#: - Dragonflow's zmq drivers: on 4.0.0 ``zmq_pubsub_driver`` (ZMQPubSub) has
#:   the SUB subscriber and ``zmq_pubsub_multiproc_driver``
#:   (ZMQPubSubMultiproc) the ipc PUSH publisher; on master
#:   ``zmq_pubsub_driver`` (ZMQPubSubConnect) has both.
MULTIPROC_OPTION: Optional[Tuple[str, str]]
if FLAVOUR == "4.0.0":
    MULTIPROC_OPTION = ("df", "pub_sub_use_multiproc")
    IPC_SOCKET_OPTION = ("df", "publisher_multiproc_socket")
    ZMQ_SUBSCRIBER_DRIVER = ("zmq_pubsub_driver", "ZMQPubSub")
    ZMQ_PUBLISHER_DRIVER = ("zmq_pubsub_multiproc_driver", "ZMQPubSubMultiproc")
else:
    MULTIPROC_OPTION = None
    IPC_SOCKET_OPTION = ("df_zmq", "ipc_socket")
    ZMQ_SUBSCRIBER_DRIVER = ("zmq_pubsub_driver", "ZMQPubSubConnect")
    ZMQ_PUBLISHER_DRIVER = ("zmq_pubsub_driver", "ZMQPubSubConnect")

#: One callback: (table, key, action, value, topic).
Update = Tuple[Any, Any, Any, Any, Any]
SYNC: Update = (None, None, "sync", None, None)


class Collector:
    """A subscriber callback that records every call; tests wait on it."""

    def __init__(self, hook: Optional[Callable[[Update], None]] = None) -> None:
        self.updates: List[Update] = []
        self._taken = 0
        self._cond = threading.Condition()
        self._hook = hook

    def __call__(self, table: Any, key: Any, action: Any, value: Any, topic: Any = None) -> None:
        update = (table, key, action, value, topic)
        if self._hook is not None:
            self._hook(update)
        with self._cond:
            self.updates.append(update)
            self._cond.notify_all()

    def take_until(
        self, match: Callable[[Update], bool], what: str, limit: float = WAIT
    ) -> Optional[List[Update]]:
        """The updates not taken yet, up to the first that ``match``es
        (included); None if none did within ``limit``."""
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                for i in range(self._taken, len(self.updates)):
                    if match(self.updates[i]):
                        taken = self.updates[self._taken : i + 1]
                        self._taken = i + 1
                        return taken
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def expect(
        self, match: Callable[[Update], bool], what: str, limit: float = WAIT
    ) -> List[Update]:
        taken = self.take_until(match, what, limit)
        if taken is None:
            raise AssertionError(
                f"no {what} within {limit} s; updates: {self.updates[self._taken :]!r}"
            )
        return taken


def is_key(table: str, key: str) -> Callable[[Update], bool]:
    return lambda u: u[0] == table and u[1] == key


def send(publisher: Any, table: str, key: str, value: Any = None, topic: str = "D") -> None:
    """Publishes through Dragonflow's PublisherAgentBase.send_event."""
    publisher.send_event(db_common.DbUpdate(table, key, "set", value, topic=topic))


def probe(
    publisher: Any, collector: Collector, topic: str = "D", max_probes: int = 400
) -> List[Update]:
    """Sends probes on ``topic`` until one arrives: the publisher's and the
    subscriber's connections are then both up. Returns the updates before
    it. Bounded in count and time."""
    deadline = time.monotonic() + WAIT
    for n in range(max_probes):
        send(publisher, "probe", f"{topic}-{n}", topic=topic)
        got = collector.take_until(lambda u: u[0] == "probe" and u[4] == topic, "a probe", 0.05)
        if got is not None:
            return got[:-1]
        if time.monotonic() >= deadline:
            break
    raise AssertionError(f"no probe on {topic!r} arrived within {WAIT} s: {collector.updates!r}")


def fence(publisher: Any, collector: Collector, n: int) -> List[Update]:
    """Everything delivered before a fence published now (fence excluded),
    less the probes: those after the first that arrived are leftovers."""
    send(publisher, "fence", str(n))
    got = collector.expect(is_key("fence", str(n)), f"fence {n}")[:-1]
    return [u for u in got if u[0] != "probe"]


def syncs(updates: Sequence[Update]) -> int:
    return sum(1 for u in updates if u == SYNC)
