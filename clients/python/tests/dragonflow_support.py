"""What the Dragonflow driver's tests share (tests/test_dragonflow*.py and
tests/dragonflow_child.py): a callback that records, and publishing helpers
bounded in count and time. Needs the real dragonflow package."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from dragonflow.db import db_common

from harness import WAIT

ALIAS = "zbroker_pubsub_driver"

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
