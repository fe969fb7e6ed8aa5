"""Timeouts, closing and argument checks."""

from __future__ import annotations

import time

import pytest

import zbroker

from conftest import BrokerFactory, Clients, Endpoints
from harness import WAIT, connect_probe


def test_recv_timeout_returns_none(make_broker: BrokerFactory, clients: Clients) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint)
    sub.subscribe("exact", b"quiet")
    start = time.monotonic()
    assert sub.recv(timeout=0.3) is None
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < WAIT
    assert sub.recv(timeout=0) is None


def test_recv_timeout_zero_returns_what_already_arrived(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint)
    sub.subscribe("prefix", b"z.")
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"z.probe")
    pub.publish(b"z.fence", b"")
    deadline = time.monotonic() + WAIT
    while True:
        assert time.monotonic() < deadline, "the fence never arrived"
        event = sub.recv(timeout=0)
        if isinstance(event, zbroker.Message) and event.topic == b"z.fence":
            break


def test_without_a_broker_commands_time_out(endpoints: Endpoints, clients: Clients) -> None:
    sub = clients.subscriber(endpoints.dead(), confirm_timeout=0.3)
    assert sub.recv(timeout=0.2) is None
    with pytest.raises(zbroker.Timeout):
        sub.subscribe("exact", b"x")
    # A Timeout is also the built-in TimeoutError.
    with pytest.raises(TimeoutError):
        sub.unsubscribe("exact", b"x")
    assert sub.filters == []

    pub = clients.publisher(
        [endpoints.dead(), endpoints.dead()], send_timeout=0.3, connect_timeout=0.1
    )
    with pytest.raises(zbroker.Timeout):
        pub.publish(b"t", b"p")


def test_close_and_context_managers(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    with zbroker.Subscriber([broker.sub_endpoint]) as sub:
        sub.subscribe("exact", b"c")
        with zbroker.Publisher([broker.pub_endpoint]) as pub:
            _, message = connect_probe(pub, sub, b"c")
            assert message.payload.startswith(b"probe-")
    with pytest.raises(zbroker.ClosedError):
        sub.recv(timeout=0)
    with pytest.raises(zbroker.ClosedError):
        sub.subscribe("exact", b"c")
    with pytest.raises(zbroker.ClosedError):
        pub.publish(b"c", b"")
    sub.close()
    pub.close()


def test_argument_checks(endpoints: Endpoints, clients: Clients) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        zbroker.Subscriber([])
    with pytest.raises(TypeError):
        zbroker.Publisher([b"tcp://127.0.0.1:1"])  # type: ignore[list-item]
    pub = clients.publisher(endpoints.dead(), send_timeout=0.1)
    with pytest.raises(ValueError, match="topic"):
        pub.publish(b"", b"x")
    with pytest.raises(TypeError):
        pub.publish("t", b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat"):
        zbroker.Subscriber(endpoints.dead(), heartbeat=10.0, broker_sub_timeout=10.0)
    # One endpoint as a plain string works too.
    sub = clients.subscriber(endpoints.dead())
    assert sub.endpoint.startswith(endpoints.transport)
