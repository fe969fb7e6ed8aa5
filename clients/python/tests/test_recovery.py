"""Keep-alive, broker restarts, silence, expiry, stalls and failover against
the real broker binary."""

from __future__ import annotations

import signal
import threading
import time
from typing import List

import zbroker
from zbroker import Resync, ResyncReason

from conftest import BrokerFactory, Clients, Endpoints
from harness import WAIT, connect_probe, drain_until

FENCE = b"sys.fence"


def _resyncs(events: List[zbroker.Event]) -> List[Resync]:
    return [e for e in events if isinstance(e, Resync)]


def _one_resync(
    events: List[zbroker.Event], first: zbroker.Message, reason: ResyncReason, old: bytes
) -> None:
    """``events`` then ``first`` are: messages on ``old`` (the old
    connection's, or late ones), exactly one Resync for ``reason``, then the
    new connection's messages, numbered from 1."""
    assert _resyncs(events) == [Resync(reason)], events
    at = events.index(Resync(reason))
    assert all(isinstance(e, zbroker.Message) and e.topic == old for e in events[:at]), events
    new = [*events[at + 1 :], first]
    assert all(isinstance(e, zbroker.Message) and e.topic in (old, first.topic) for e in new)
    seqs = [e.seq for e in new if isinstance(e, zbroker.Message)]
    assert seqs == list(range(1, len(new) + 1)), "a new connection numbers from 1"
    assert not any(isinstance(e, zbroker.Message) and e.gap for e in new)


def _nothing_more(sub: zbroker.Subscriber, pub: zbroker.Publisher, payload: bytes) -> None:
    """A fence through: no further Resync (nor anything else) was pending."""
    pub.publish(FENCE, payload)
    events = drain_until(sub, lambda m: m.topic == FENCE and m.payload == payload, "a fence")
    assert _resyncs(events) == [], events


def test_broker_restart_gives_one_resync_and_resubscribes_everything(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint, heartbeat=0.5)
    sub.subscribe("prefix", b"state.")
    sub.subscribe("exact", b"other")
    sub.subscribe("exact", FENCE)
    pub = clients.publisher(broker.pub_endpoint)
    others, _ = connect_probe(pub, sub, b"state.before")
    assert others == []

    # A crash: the new broker holds none of our filters, and libzmq would
    # reconnect within a second, before any PING goes unanswered.
    broker.restart()

    # Probes until one arrives through the new broker; before it, leftovers
    # of the old connection and exactly one Resync.
    events, first = connect_probe(pub, sub, b"state.after")
    _one_resync(events, first, ResyncReason.RECONNECTED, b"state.before")

    # Every filter is back, with none added.
    assert sub.filters == [("prefix", b"state."), ("exact", b"other"), ("exact", FENCE)]
    pub.publish(b"other", b"o")
    pub.publish(b"unrelated", b"u")
    pub.publish(FENCE, b"1")
    got = drain_until(sub, lambda m: m.topic == FENCE, "the fence")
    topics = [e.topic for e in got if isinstance(e, zbroker.Message)]
    assert [t for t in topics if t != b"state.after"] == [b"other", FENCE]
    assert _resyncs(got) == []
    _nothing_more(sub, pub, b"2")


def test_failover_skips_a_dead_first_endpoint(
    make_broker: BrokerFactory, clients: Clients, endpoints: Endpoints
) -> None:
    broker = make_broker()
    dead_sub, dead_pub = endpoints.dead(), endpoints.dead()
    sub = clients.subscriber([dead_sub, broker.sub_endpoint], connect_timeout=0.5)
    assert sub.endpoint == dead_sub
    sub.subscribe("exact", b"probe")
    assert sub.endpoint == broker.sub_endpoint
    pub = clients.publisher([dead_pub, broker.pub_endpoint], connect_timeout=0.5)
    others, _ = connect_probe(pub, sub, b"probe")
    assert pub.endpoint == broker.pub_endpoint
    # Nothing was lost: the first connection is no resync.
    assert others == []


def test_failover_to_the_second_broker_when_the_first_dies(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    first = make_broker()
    second = make_broker()
    sub = clients.subscriber(
        [first.sub_endpoint, second.sub_endpoint], heartbeat=0.5, connect_timeout=0.5
    )
    sub.subscribe("prefix", b"t.")
    sub.subscribe("exact", FENCE)
    pub = clients.publisher([first.pub_endpoint, second.pub_endpoint], connect_timeout=0.5)
    connect_probe(pub, sub, b"t.first")
    assert (sub.endpoint, pub.endpoint) == (first.sub_endpoint, first.pub_endpoint)

    first.kill()
    events, message = connect_probe(pub, sub, b"t.second")
    _one_resync(events, message, ResyncReason.RECONNECTED, b"t.first")
    assert (sub.endpoint, pub.endpoint) == (second.sub_endpoint, second.pub_endpoint)
    _nothing_more(sub, pub, b"1")


def test_silent_broker_is_noticed_without_a_disconnect(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint, heartbeat=0.2, broker_timeout=1.0)
    sub.subscribe("prefix", b"s.")
    sub.subscribe("exact", FENCE)
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"s.before")

    # A hung broker: the connection stays up, PINGs go unanswered.
    broker.signal(signal.SIGSTOP)
    try:
        # Well over broker_timeout, all inside recv (which does the pinging
        # and the checking), so the client has given up on that connection.
        assert sub.recv(timeout=3.0) is None
    finally:
        broker.signal(signal.SIGCONT)
    events, first = connect_probe(pub, sub, b"s.after")
    _one_resync(events, first, ResyncReason.BROKER_SILENT, b"s.before")
    _nothing_more(sub, pub, b"1")


def test_keepalive_pings_keep_the_subscription(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker("--sub-timeout", "2s")
    sub = clients.subscriber(broker.sub_endpoint, heartbeat=0.2)
    sub.subscribe("exact", b"k")
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"k")
    # Twice the broker's timeout with no command but the client's PINGs.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        event = sub.recv(timeout=deadline - time.monotonic())
        assert event is None or (isinstance(event, zbroker.Message) and event.topic == b"k"), event
    pub.publish(b"k", b"still")
    events = drain_until(sub, lambda m: m.payload == b"still", "a message after the wait")
    assert _resyncs(events) == []


def test_broker_forgetting_the_subscriber_gives_a_resync(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker("--sub-timeout", "2s")
    # PINGs far apart: the broker expires this subscriber and says so.
    sub = clients.subscriber(
        broker.sub_endpoint, heartbeat=20.0, broker_timeout=60.0, broker_sub_timeout=120.0
    )
    sub.subscribe("exact", b"f")
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"f")
    event = None
    deadline = time.monotonic() + WAIT
    while not isinstance(event, Resync):
        assert time.monotonic() < deadline, "no expiry notice"
        event = sub.recv(timeout=WAIT)
    assert event.reason == ResyncReason.BROKER_FORGOT
    assert event.detail.startswith("expired:"), event
    # Subscribed again: the next message arrives (well within the broker's
    # timeout, which the resync's SUB restarted).
    pub.publish(b"f", b"again")
    events = drain_until(sub, lambda m: m.payload == b"again", "a message after the resync")
    assert _resyncs(events) == []


def test_a_stalled_client_resubscribes(make_broker: BrokerFactory, clients: Clients) -> None:
    broker = make_broker()
    sub = clients.subscriber(
        broker.sub_endpoint, heartbeat=0.2, broker_timeout=1.0, broker_sub_timeout=1.0
    )
    sub.subscribe("prefix", b"x.")
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"x.before")
    # The application does not call into the subscriber for longer than the
    # broker's --sub-timeout (as the client was told it is): the scenario,
    # not a synchronisation.
    time.sleep(1.5)
    # Wait for the Resync before probing: a probe published now could still
    # reach the old connection (the broker need not have forgotten it yet),
    # and messages of the old connection rightly come before the Resync.
    before: List[zbroker.Event] = []
    deadline = time.monotonic() + WAIT
    while Resync(ResyncReason.STALLED) not in before:
        assert time.monotonic() < deadline, f"no Resync after a stall: {before!r}"
        event = sub.recv(timeout=0.1)
        if event is not None:
            before.append(event)
    events, first = connect_probe(pub, sub, b"x.after")
    _one_resync(before + events, first, ResyncReason.STALLED, b"x.before")


def test_subscribe_during_an_outage_completes_once_the_broker_is_back(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint, heartbeat=0.5, confirm_timeout=WAIT)
    sub.subscribe("prefix", b"old.")
    pub = clients.publisher(broker.pub_endpoint)
    connect_probe(pub, sub, b"old.before")

    broker.kill()
    # The broker comes back while (or before) the subscriber waits for its
    # answer; in any order the SUB is answered by the new broker.
    restart = threading.Thread(target=broker.start)
    restart.start()
    try:
        sub.subscribe("exact", b"new")
    finally:
        restart.join(timeout=WAIT)
    assert not restart.is_alive()
    assert sub.filters == [("prefix", b"old."), ("exact", b"new")]
    events, first = connect_probe(pub, sub, b"old.after")
    _one_resync(events, first, ResyncReason.RECONNECTED, b"old.before")
    pub.publish(b"new", b"n")
    got = drain_until(sub, lambda m: m.topic == b"new", "a message on the new filter")
    assert _resyncs(got) == []
