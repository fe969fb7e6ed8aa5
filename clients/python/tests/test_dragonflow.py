"""The Dragonflow driver (zbroker.dragonflow) through Dragonflow's own code:
loaded by Dragonflow's loader, events sent by its PublisherAgentBase and
unpacked by its SubscriberAgentBase, against the real broker binary.

Needs the real dragonflow package: scripts/test-dragonflow runs these in its
virtualenv (conftest.py leaves them out elsewhere), with Dragonflow 4.0.0, or
with master built from source (DRAGONFLOW_SOURCE); the same tests run against
either (dragonflow_support.FLAVOUR says where they set up differently).
Threads here are real threads; tests/test_dragonflow_green.py runs the
driver, and Dragonflow's own zmq driver, under eventlet as Dragonflow's
services do."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import pytest
from dragonflow.common import utils as df_utils
from dragonflow.db import db_common, pub_sub_api
from oslo_config import cfg

import zbroker
import zbroker.dragonflow

from conftest import BrokerFactory, Clients
from dragonflow_support import (
    ALIAS,
    FLAVOUR,
    MULTIPROC_OPTION,
    SYNC,
    ZMQ_PUBLISHER_DRIVER,
    ZMQ_SUBSCRIBER_DRIVER,
    Collector,
    Update,
    fence,
    is_key,
    probe,
    send,
    syncs,
)
from harness import WAIT, Broker, free_tcp_endpoint


class Dragonflow:
    """Configuration and drivers for one test, loaded as Dragonflow loads
    them; every agent is closed and every option reset afterwards."""

    def __init__(self) -> None:
        self._overrides: List[Tuple[str, str]] = []
        self._agents: List[Any] = []
        self.set("df", "pub_sub_driver", ALIAS)
        if MULTIPROC_OPTION is not None:
            # 4.0.0's neutron-server would publish through [df]
            # pub_sub_multiproc_driver instead; master has no such option.
            self.set(*MULTIPROC_OPTION, False)

    def set(self, group: str, name: str, value: Any) -> None:
        cfg.CONF.set_override(name, value, group=group)
        self._overrides.append((group, name))

    def brokers(self, *brokers: Broker) -> None:
        self.set("zbroker", "publisher_endpoints", [b.pub_endpoint for b in brokers])
        self.set("zbroker", "subscriber_endpoints", [b.sub_endpoint for b in brokers])

    def driver(self, name: str = ALIAS) -> Any:
        return df_utils.load_driver(name, df_utils.DF_PUBSUB_DRIVER_NAMESPACE)

    def publisher(self) -> Any:
        publisher = self.driver().get_publisher()
        self._agents.append(publisher)
        publisher.initialize()
        return publisher

    def subscriber(
        self,
        topics: Sequence[str] = ("D",),
        uris: Sequence[str] = (),
        collector: Optional[Collector] = None,
    ) -> Tuple[Any, Collector]:
        """A running subscriber, set up as Dragonflow's NbApi does: initialize,
        topics, listen addresses, daemonize."""
        subscriber = self.driver().get_subscriber()
        self._agents.append(subscriber)
        collector = Collector() if collector is None else collector
        subscriber.initialize(collector)
        for topic in topics:
            subscriber.register_topic(topic)
        for uri in uris:
            subscriber.register_listen_address(uri)
        subscriber.daemonize()
        return subscriber, collector

    def close(self) -> None:
        agents, self._agents = self._agents, []
        for agent in agents:
            agent.close()
        overrides, self._overrides = self._overrides, []
        for group, name in overrides:
            cfg.CONF.clear_override(name, group=group)


@pytest.fixture
def df() -> Iterator[Dragonflow]:
    made = Dragonflow()
    yield made
    made.close()


@pytest.fixture
def transport() -> str:
    # Dragonflow's brokers are on tcp (conftest.py's default runs both).
    return "tcp"


def test_the_dragonflow_under_test_is_the_one_asked_for() -> None:
    # scripts/test-dragonflow says which Dragonflow it installed: 4.0.0 from
    # the package registry, or a source tree (by default master) with a
    # version naming its commit.
    dist = importlib.metadata.distribution("dragonflow")
    assert os.environ.get("ZBROKER_DRAGONFLOW_FLAVOUR", FLAVOUR) == FLAVOUR
    assert dist.version == os.environ.get("ZBROKER_DRAGONFLOW_VERSION", dist.version)
    # Imported from that installation, not from a source tree on the path.
    installed = Path(str(dist.locate_file("dragonflow/db/pub_sub_api.py")))
    assert Path(pub_sub_api.__file__).resolve() == installed.resolve()
    points = {
        p.name: p.value for p in importlib.metadata.entry_points(group="dragonflow.pubsub_driver")
    }
    zmq_module = "dragonflow.db.pubsub_drivers.zmq_pubsub_driver"
    for alias, cls in (ZMQ_SUBSCRIBER_DRIVER, ZMQ_PUBLISHER_DRIVER):
        assert points[alias] == f"{zmq_module}:{cls}"
    if FLAVOUR == "4.0.0":
        assert MULTIPROC_OPTION is not None
        assert getattr(getattr(cfg.CONF, MULTIPROC_OPTION[0]), MULTIPROC_OPTION[1]) is True
    else:
        assert dist.version != "4.0.0"
        assert "pub_sub_use_multiproc" not in cfg.CONF.df
        assert "zmq_pubsub_multiproc_driver" not in points


def test_loaded_by_dragonflows_loader_by_alias_and_by_class_path(df: Dragonflow) -> None:
    # The entry point Dragonflow's loader (stevedore) finds the alias by.
    points = importlib.metadata.entry_points(group="dragonflow.pubsub_driver")
    assert {p.name: p.value for p in points}[ALIAS] == "zbroker.dragonflow:ZbrokerPubSub"
    # The options, with the broker's default endpoints.
    assert cfg.CONF.zbroker.publisher_endpoints == ["tcp://127.0.0.1:5570"]
    assert cfg.CONF.zbroker.subscriber_endpoints == ["tcp://127.0.0.1:5571"]
    assert zbroker.dragonflow.list_opts()[0][0] == "zbroker"

    by_alias = df.driver(ALIAS)
    by_path = df.driver("zbroker.dragonflow.ZbrokerPubSub")
    for driver in (by_alias, by_path):
        assert isinstance(driver, zbroker.dragonflow.ZbrokerPubSub)
        assert isinstance(driver, pub_sub_api.PubSubApi)
        publisher, subscriber = driver.get_publisher(), driver.get_subscriber()
        assert isinstance(publisher, pub_sub_api.PublisherAgentBase)
        assert isinstance(subscriber, pub_sub_api.SubscriberAgentBase)
        # Constructing connected nothing and started nothing.
        assert publisher._publisher is None
        assert not subscriber.is_running
        assert not subscriber.is_daemonize
        # Closing what never started is fine.
        publisher.close()
        subscriber.close()
    assert by_alias.get_subscriber() is not by_path.get_subscriber()


def test_send_event_reaches_the_callback_unchanged(
    make_broker: BrokerFactory, df: Dragonflow
) -> None:
    df.brokers(make_broker())
    subscriber, got = df.subscriber(topics=["D", "tenant-1"])
    assert subscriber.is_running
    assert subscriber.is_daemonize
    publisher = df.publisher()
    assert probe(publisher, got) == []

    updates = [
        db_common.DbUpdate("lport", "port-1", "create", '{"id": "port-1", "name": "ü"}'),
        db_common.DbUpdate("lswitch", "net-1", "set", '{"id": "net-1"}', topic="tenant-1"),
        db_common.DbUpdate("lport", "port-1", "delete", None, topic="tenant-1"),
        db_common.DbUpdate("chassis", "host-1", "set", "x" * 100_000),
        # No topic: sent on 'D', and the callback's topic is None.
        db_common.DbUpdate("lrouter", "r-1", "create", "{}", topic=None),
    ]
    for update in updates:
        publisher.send_event(update)
    # An explicit topic overrides the update's.
    publisher.send_event(db_common.DbUpdate("qos", "q-1", "set", "{}", topic="other"), "tenant-1")
    received = [u for u in got.expect(is_key("qos", "q-1"), "the last update") if u[0] != "probe"]
    expected = [(u.table, u.key, u.action, u.value, u.topic) for u in updates]
    assert received == [*expected, ("qos", "q-1", "set", "{}", "other")]
    assert fence(publisher, got, 1) == []


def test_topics_are_exact_filters_and_change_while_running(
    make_broker: BrokerFactory, df: Dragonflow
) -> None:
    df.brokers(make_broker())
    subscriber, got = df.subscriber(topics=["D", "project-a"])
    publisher = df.publisher()
    probe(publisher, got)

    for topic in ["project-a", "project-b", "Dx", "project-a-2", "D"]:
        send(publisher, "lport", topic, topic=topic)
    assert [u[1] for u in fence(publisher, got, 1)] == ["project-a", "D"]

    # Registered while running: in effect once register_topic returns.
    assert subscriber.register_topic("project-b") is True
    assert subscriber.register_topic("project-b") is False
    send(publisher, "lport", "b-1", topic="project-b")
    subscriber.unregister_topic("project-a")
    send(publisher, "lport", "a-1", topic="project-a")
    send(publisher, "lport", "b-2", topic="project-b")
    assert [u[1] for u in fence(publisher, got, 2)] == ["b-1", "b-2"]
    assert syncs(got.updates) == 0


def test_broker_restart_gives_exactly_one_sync(make_broker: BrokerFactory, df: Dragonflow) -> None:
    broker = make_broker()
    df.brokers(broker)
    subscriber, got = df.subscriber(topics=["D", "project-a"])
    publisher = df.publisher()
    assert probe(publisher, got) == []

    # A crash: the new broker knows nothing of this subscriber.
    broker.restart()
    before = probe(publisher, got)
    # Leftover probes of the old connection, then the one sync.
    assert before[-1:] == [SYNC], before
    assert all(u[0] == "probe" for u in before[:-1]), before

    # Every topic is back, and no other sync is pending.
    send(publisher, "lport", "a-1", topic="project-a")
    send(publisher, "lport", "b-1", topic="project-b")
    assert [u[1] for u in fence(publisher, got, 1)] == ["a-1"]
    assert syncs(got.updates) == 1
    assert subscriber.is_running


def test_forced_gap_gives_exactly_one_sync(
    make_broker: BrokerFactory, df: Dragonflow, clients: Clients
) -> None:
    # Tiny queues in the broker; the subscriber's callback blocks while a
    # flood far larger than every buffer on the way goes by.
    broker = make_broker("--sub-hwm", "4", "--queue-max-messages", "4")
    df.brokers(broker)
    entered, release = threading.Event(), threading.Event()

    def block(update: Update) -> None:
        if update[0] == "block":
            entered.set()
            release.wait(WAIT)

    subscriber, got = df.subscriber(collector=Collector(block))
    publisher = df.publisher()
    probe(publisher, got)
    # A plain client on another topic tells when the broker routed the flood.
    watcher = clients.subscriber(broker.sub_endpoint)
    watcher.subscribe("exact", b"watch")
    for n in range(400):
        send(publisher, "watch", str(n), topic="watch")
        if watcher.recv(timeout=0.05) is not None:
            break
    else:
        raise AssertionError("the watcher got nothing")

    try:
        send(publisher, "block", "1")
        assert entered.wait(WAIT), "the callback was not called"
        count = 3000
        value = "v" * 16384
        for i in range(count):
            send(publisher, "flood", str(i), value)
        send(publisher, "watch", "fence", topic="watch")
        for _ in range(100_000):
            event = watcher.recv(timeout=WAIT)
            assert event is not None, "the fence did not reach the watcher"
            if isinstance(event, zbroker.Message) and b"fence" in event.payload:
                break
    finally:
        release.set()

    # Probes until one arrives: drops at the flood's tail show as a gap on
    # the next update. The sync comes once the subscriber caught up.
    updates = probe(publisher, got)
    if SYNC not in updates:
        updates += got.expect(lambda u: u == SYNC, "a sync")
    flood = [int(u[1]) for u in updates if u[0] == "flood"]
    assert 0 < len(flood) < count, "the broker dropped part of the flood"
    assert flood == sorted(flood), "in order"
    # One sync for the whole burst of drops (the subscriber sees a gap after
    # each run the broker could deliver); delivery goes on, with no other.
    assert fence(publisher, got, 1) == []
    assert syncs(got.updates) == 1
    assert subscriber.is_running


def test_failover_to_a_registered_broker(make_broker: BrokerFactory, df: Dragonflow) -> None:
    first, second = make_broker(), make_broker()
    df.brokers(first)
    # The second broker joins the subscriber by register_listen_address, as
    # Dragonflow registers its publishers; the publisher lists both.
    df.set("zbroker", "publisher_endpoints", [first.pub_endpoint, second.pub_endpoint])
    subscriber, got = df.subscriber(uris=[second.sub_endpoint])
    assert subscriber.register_listen_address(second.sub_endpoint) is False
    publisher = df.publisher()
    assert probe(publisher, got) == []

    first.kill()
    before = probe(publisher, got)
    assert before[-1:] == [SYNC], before
    assert syncs(got.updates) == 1
    assert fence(publisher, got, 1) == []

    # A broker registered while running: the subscriber reconnects (by the
    # time register_listen_address returns), and says so with one sync
    # before the new connection's first update.
    third = make_broker()
    assert subscriber.register_listen_address(third.sub_endpoint) is True
    assert probe(publisher, got) == [SYNC]
    assert syncs(got.updates) == 2
    subscriber.unregister_listen_address("tcp://127.0.0.1:1")  # not registered: ignored
    assert fence(publisher, got, 2) == []


def test_a_topic_subscribed_late_gives_one_sync(df: Dragonflow, broker_bin: Path) -> None:
    # No broker yet where the subscriber looks.
    pub_endpoint, sub_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    df.set("zbroker", "publisher_endpoints", [pub_endpoint])
    df.set("zbroker", "subscriber_endpoints", [sub_endpoint])
    subscriber, got = df.subscriber()
    # register_topic while running gives up after a bound without a broker.
    started = time.monotonic()
    subscriber.register_topic("project-a")
    assert time.monotonic() - started < WAIT

    broker = Broker(broker_bin, pub_endpoint, sub_endpoint).start()
    try:
        publisher = df.publisher()
        before = probe(publisher, got)
        assert before == [SYNC], before
        send(publisher, "lport", "a-1", topic="project-a")
        assert [u[1] for u in fence(publisher, got, 1)] == ["a-1"]
        assert syncs(got.updates) == 1
    finally:
        df.close()
        broker.stop()


def test_close_stops_the_thread(make_broker: BrokerFactory, df: Dragonflow) -> None:
    df.brokers(make_broker())
    subscriber, got = df.subscriber()
    publisher = df.publisher()
    probe(publisher, got)
    thread = subscriber.daemon
    assert thread.daemon
    assert thread.is_alive()
    subscriber.close()
    assert not thread.is_alive()
    assert not subscriber.is_running
    subscriber.close()
    publisher.close()
    publisher.close()


# Dragonflow master's abstract interface, as read in openstack/dragonflow's
# dragonflow/db/pub_sub_api.py at 4dc36ed6 (master is not on the package
# registry, and its code is not copied here): what a driver must provide
# there beyond 4.0.0. `is_running` is an abstract property on master,
# `is_daemonize` one on 4.0.0; master's SubscriberAgentBase starts with
# `daemon = None` and starts no thread before `daemonize()`. Run against
# master (scripts/test-dragonflow with DRAGONFLOW_SOURCE), the test below
# also checks this reading against master's code, and every other test here
# runs the driver on master's base classes.
MASTER_PUBLISHER = ("initialize", "_send_event", "close")
MASTER_SUBSCRIBER = (
    "initialize",
    "register_listen_address",
    "unregister_listen_address",
    "daemonize",
    "close",
    "register_topic",
    "unregister_topic",
    "run",
)


def test_the_driver_provides_dragonflow_masters_interface() -> None:
    from zbroker.dragonflow import ZbrokerPublisherAgent, ZbrokerSubscriberAgent

    for cls, names in (
        (ZbrokerPublisherAgent, MASTER_PUBLISHER),
        (ZbrokerSubscriberAgent, MASTER_SUBSCRIBER),
    ):
        for name in names:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
            assert not getattr(getattr(cls, name), "__isabstractmethod__", False), name
    for name in ("is_running", "is_daemonize"):
        assert isinstance(inspect.getattr_static(ZbrokerSubscriberAgent, name), property), name
    subscriber = ZbrokerSubscriberAgent()
    subscriber.daemon = None  # as master's base leaves it before daemonize()
    assert subscriber.is_running is False
    assert subscriber.is_daemonize is False
    subscriber.close()

    # What is abstract in the installed Dragonflow, the driver implements.
    assert not ZbrokerPublisherAgent.__abstractmethods__
    assert not ZbrokerSubscriberAgent.__abstractmethods__
    if FLAVOUR == "master":
        # The reading above is master's code.
        assert set(pub_sub_api.PublisherApi.__abstractmethods__) == set(MASTER_PUBLISHER)
        assert set(pub_sub_api.SubscriberApi.__abstractmethods__) == {
            *MASTER_SUBSCRIBER,
            "is_running",
        } - {"run"}
        # Master's base class starts the driver with no thread.
        fresh = ZbrokerSubscriberAgent()
        assert fresh.daemon is None
        assert fresh.is_running is False
        fresh.close()
