"""Runs Dragonflow pub/sub drivers under eventlet, monkey-patched first as
Dragonflow's services are, for tests/test_dragonflow_green.py.

Reads JSON commands from stdin, one a line, and answers each with one JSON
line on stdout: ``{"ok": result}`` or ``{"error": text}``. Each command waits
boundedly (harness.WAIT). Ends at ``close`` or at the end of its input."""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

from dragonflow.common import utils as df_utils  # noqa: E402
from dragonflow.db import db_common  # noqa: E402
from eventlet import tpool  # noqa: E402
from oslo_config import cfg  # noqa: E402

import zbroker.dragonflow  # noqa: E402

from dragonflow_support import Collector, fence, probe  # noqa: E402


class Child:
    def __init__(self) -> None:
        self.publishers: Dict[str, Any] = {}
        self.subscribers: Dict[str, Any] = {}
        self.collectors: Dict[str, Collector] = {}

    def set(self, group: str, name: str, value: Any) -> None:
        cfg.CONF.set_override(name, value, group=group)

    def publisher(self, name: str, driver: str) -> List[str]:
        """A publisher from ``driver`` (an alias), initialized; the classes
        of the driver and of the publisher."""
        driver_object = df_utils.load_driver(driver, df_utils.DF_PUBSUB_DRIVER_NAMESPACE)
        publisher = driver_object.get_publisher()
        publisher.initialize()
        self.publishers[name] = publisher
        return [type(driver_object).__name__, type(publisher).__name__]

    def subscriber(
        self, name: str, driver: str, topics: List[str], uris: Optional[List[str]] = None
    ) -> List[str]:
        """A running subscriber from ``driver``, set up as Dragonflow's NbApi
        does; the classes of the driver and of the subscriber."""
        driver_object = df_utils.load_driver(driver, df_utils.DF_PUBSUB_DRIVER_NAMESPACE)
        subscriber = driver_object.get_subscriber()
        collector = Collector()
        subscriber.initialize(collector)
        for topic in topics:
            subscriber.register_topic(topic)
        for uri in uris or []:
            subscriber.register_listen_address(uri)
        subscriber.daemonize()
        self.subscribers[name] = subscriber
        self.collectors[name] = collector
        return [type(driver_object).__name__, type(subscriber).__name__]

    def send(self, publisher: str, table: str, key: str, value: Any, topic: str) -> None:
        update = db_common.DbUpdate(table, key, "set", value, topic=topic)
        self.publishers[publisher].send_event(update)

    def probe(self, publisher: str, subscriber: str, topic: str) -> Any:
        return probe(self.publishers[publisher], self.collectors[subscriber], topic)

    def fence(self, publisher: str, subscribers: List[str], n: int) -> Any:
        """Sends one fence; what each subscriber got before it."""
        first, *others = subscribers
        before = {first: fence(self.publishers[publisher], self.collectors[first], n)}
        for name in others:
            got = self.collectors[name].expect(
                lambda u: u[0] == "fence" and u[1] == str(n), f"fence {n}"
            )
            before[name] = [u for u in got[:-1] if u[0] != "probe"]
        return before

    def updates(self, subscriber: str) -> Any:
        return self.collectors[subscriber].updates

    def hub(self, switches: int) -> float:
        """Seconds this green thread takes to yield ``switches`` times: a
        driver blocking eventlet's hub would hold each switch up."""
        started = time.monotonic()
        for _ in range(switches):
            eventlet.sleep(0)
        return time.monotonic() - started

    def running(self, subscriber: str) -> List[bool]:
        """``is_running`` (master's) and ``is_daemonize`` (4.0.0's): the
        driver has both on either."""
        agent = self.subscribers[subscriber]
        return [bool(agent.is_running), bool(agent.is_daemonize)]

    def base_classes(self, subscriber: str) -> List[str]:
        """Where the subscriber's Dragonflow base classes come from."""
        return [
            f"{base.__name__} {sys.modules[base.__module__].__file__}"
            for base in type(self.subscribers[subscriber]).__mro__
            if base.__module__ == "dragonflow.db.pub_sub_api"
        ]

    def close_subscriber(self, subscriber: str) -> bool:
        """Closes a subscriber; whether its thread stopped."""
        agent = self.subscribers[subscriber]
        agent.close()
        return not agent.daemon.is_alive()


def main() -> None:
    child = Child()
    while True:
        # In a real thread, so that green threads run meanwhile.
        line = tpool.execute(sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        op = command.pop("op")
        if op == "close":
            # Dragonflow's zmq subscriber has no way to stop: its thread ends
            # with the process. This driver's agents close.
            for name, agent in child.subscribers.items():
                if isinstance(agent, zbroker.dragonflow.ZbrokerSubscriberAgent):
                    child.close_subscriber(name)
            for agent in child.publishers.values():
                agent.close()
            print(json.dumps({"ok": None}), flush=True)
            return
        try:
            result = getattr(child, op)(**command)
            answer = {"ok": result}
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
