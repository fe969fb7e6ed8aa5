"""Publishing and subscribing against the real broker: filter kinds,
unsubscribe, refusals, gaps, timeouts and closing."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest

import zbroker

from conftest import BrokerFactory, Clients
from harness import WAIT, connect_probe, drain_until

BINARY_TOPIC = b"bin\x00\xfftopic"
BIG = bytes((i * 131 + 7) % 256 for i in range(100 * 1024))

# (topic, payload) published in this order.
PUBLISHED: List[Tuple[bytes, bytes]] = [
    (b"alpha", b"a1"),
    (b"alphabet", b"-"),
    (b"ALPHA", b"-"),
    (b"log/app", b"l1"),
    (b"log", b"-"),
    (b"xlog/app", b"-"),
    (b"log/", b"l2"),
    (b"net.a.port", b"n1"),
    (b"net.b.port", b"n2"),
    (b"net.a.b.port", b"-"),
    (b"net.port", b"-"),
    (b"ev.a", b"e1"),
    (b"ev.a.b.c", b"e2"),
    (b"ev", b"-"),
    (b"a*", b"w1"),
    (b"ab", b"-"),
    (BINARY_TOPIC, b"\x00"),
    (b"blob", b""),
    (b"blob", BIG),
]

# Each subscriber's filters (plus the fence and probe, held by all) and the
# topics it must get, in publish order.
CASES: Dict[str, Tuple[List[Tuple[str, bytes]], List[bytes]]] = {
    "exact": (
        [("exact", b"alpha"), ("exact", BINARY_TOPIC), ("exact", b"blob")],
        [b"alpha", BINARY_TOPIC, b"blob", b"blob"],
    ),
    "prefix": (
        [("prefix", b"log/"), ("prefix", b"al")],
        [b"alpha", b"alphabet", b"log/app", b"log/"],
    ),
    "pattern": (
        # "a*" is no wildcard: it matches only the topic "a*".
        [("pattern", b"net.*.port"), ("pattern", b"ev.>"), ("pattern", b"a*")],
        [b"net.a.port", b"net.b.port", b"ev.a", b"ev.a.b.c", b"a*"],
    ),
    "mixed": (
        # net.b.port matches two filters and is delivered once.
        [("exact", b"net.b.port"), ("pattern", b"net.*.port"), ("prefix", b"ev.a")],
        [b"net.a.port", b"net.b.port", b"ev.a", b"ev.a.b.c"],
    ),
    "everything": ([("prefix", b"")], [t for t, _ in PUBLISHED]),
}

FENCE = b"sys.fence"
PROBE = b"sys.probe"


def _received(
    sub: zbroker.Subscriber, fence_payload: bytes, first_seq: int
) -> List[zbroker.Message]:
    """Messages up to the fence (excluded), probes left out; checks seq runs
    on from ``first_seq`` with no gap."""
    events = drain_until(
        sub, lambda m: m.topic == FENCE and m.payload == fence_payload, "the fence"
    )
    messages = [e for e in events if isinstance(e, zbroker.Message)]
    assert len(messages) == len(events), f"unexpected events: {events!r}"
    seqs = [m.seq for m in messages]
    assert seqs == list(range(first_seq, first_seq + len(seqs))), seqs
    assert not any(m.gap for m in messages)
    return [m for m in messages if m.topic not in (PROBE, FENCE)]


def test_each_filter_kind_delivers_exactly_the_matching_messages(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker()
    subs = {}
    for name, (filters, _) in CASES.items():
        sub = clients.subscriber(broker.sub_endpoint)
        for kind, flt in [("exact", PROBE), ("exact", FENCE), *filters]:
            sub.subscribe(kind, flt)
        assert sub.filters == [("exact", PROBE), ("exact", FENCE), *filters]
        subs[name] = sub
    pub = clients.publisher(broker.pub_endpoint)
    first = {}
    for name, sub in subs.items():
        others, probe = connect_probe(pub, sub, PROBE)
        assert others == []
        first[name] = probe.seq + 1
    for topic, payload in PUBLISHED:
        pub.publish(topic, payload)
    pub.publish(FENCE, b"1")
    for name, sub in subs.items():
        expected = CASES[name][1]
        got = _received(sub, b"1", first[name])
        assert [m.topic for m in got] == expected, name
        payloads = dict(PUBLISHED)
        for m in got:
            if m.topic != b"blob":
                assert m.payload == payloads[m.topic]
        if name == "exact":
            assert [m.payload for m in got if m.topic == b"blob"] == [b"", BIG]


def test_unsubscribe_stops_delivery(make_broker: BrokerFactory, clients: Clients) -> None:
    broker = make_broker()
    sub = clients.subscriber(broker.sub_endpoint)
    for kind, flt in [
        ("exact", PROBE),
        ("exact", FENCE),
        ("prefix", b"log/"),
        ("exact", b"net.b.port"),
        ("pattern", b"net.*.port"),
    ]:
        sub.subscribe(kind, flt)
    pub = clients.publisher(broker.pub_endpoint)
    _, probe = connect_probe(pub, sub, PROBE)

    sub.unsubscribe("prefix", b"log/")
    # Still matched by the pattern.
    sub.unsubscribe("exact", b"net.b.port")
    assert sub.filters == [("exact", PROBE), ("exact", FENCE), ("pattern", b"net.*.port")]
    for topic in [b"log/app", b"net.b.port", b"log/", b"net.a.port"]:
        pub.publish(topic, b"x")
    pub.publish(FENCE, b"1")
    got = _received(sub, b"1", probe.seq + 1)
    assert [m.topic for m in got] == [b"net.b.port", b"net.a.port"]

    sub.unsubscribe("pattern", b"net.*.port")
    pub.publish(b"net.a.port", b"gone")
    pub.publish(FENCE, b"2")
    events = drain_until(sub, lambda m: m.topic == FENCE and m.payload == b"2", "fence 2")
    assert [e.topic for e in events if isinstance(e, zbroker.Message)] == [FENCE]

    with pytest.raises(zbroker.BrokerError) as info:
        sub.unsubscribe("pattern", b"net.*.port")
    assert info.value.code == "not-subscribed"


def test_refused_commands_raise_broker_error_with_the_code(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    broker = make_broker("--max-filter-len", "16", "--max-filters-per-subscriber", "3")
    sub = clients.subscriber(broker.sub_endpoint)
    refused = [
        ("exact", b"x" * 17, "bad-filter"),
        ("exact", b"", "bad-filter"),
        ("pattern", b"a.>.b", "bad-filter"),
    ]
    for kind, flt, code in refused:
        with pytest.raises(zbroker.BrokerError) as info:
            sub.subscribe(kind, flt)
        assert info.value.code == code, (kind, flt)
        assert info.value.text, "the broker explains"
        assert code in str(info.value)
    with pytest.raises(zbroker.BrokerError) as info:
        sub.unsubscribe("exact", b"never-held")
    assert info.value.code == "not-subscribed"

    sub.subscribe("exact", b"x" * 16)
    sub.subscribe("prefix", b"a")
    sub.subscribe("prefix", b"a")  # held already: OK again
    sub.subscribe("pattern", b"b.*")
    with pytest.raises(zbroker.BrokerError) as info:
        sub.subscribe("pattern", b"c.*")
    assert info.value.code == "limit"
    assert sub.filters == [("exact", b"x" * 16), ("prefix", b"a"), ("pattern", b"b.*")]

    # Checked before anything is sent.
    with pytest.raises(ValueError, match="kind"):
        sub.subscribe("glob", b"x")
    with pytest.raises(TypeError):
        sub.subscribe("exact", "text")  # type: ignore[arg-type]
    # Commands still pair with their answers.
    sub.unsubscribe("prefix", b"a")
    assert sub.filters == [("exact", b"x" * 16), ("pattern", b"b.*")]


def test_dropped_messages_show_as_a_gap_in_seq(
    make_broker: BrokerFactory, clients: Clients
) -> None:
    # Tiny queues everywhere: a subscriber that does not read loses messages.
    broker = make_broker("--queue-max-messages", "4", "--sub-hwm", "4")
    sub = clients.subscriber(broker.sub_endpoint, hwm=4)
    sub.subscribe("prefix", b"bulk.")
    pub = clients.publisher(broker.pub_endpoint, send_timeout=WAIT)
    _, probe = connect_probe(pub, sub, b"bulk.probe")
    assert probe.seq >= 1

    # Far more than the socket buffers on both sides hold, while not reading.
    count = 400
    payload = b"p" * (64 * 1024)
    for i in range(count):
        pub.publish(b"bulk.data", b"%d:" % i + payload)
    # One publisher's messages stay in order, so a fence that arrives comes
    # after every bulk message was routed or dropped.
    others, fence = connect_probe(pub, sub, b"bulk.fence")
    received = [*others, fence]
    assert all(isinstance(m, zbroker.Message) for m in others), others
    messages = [m for m in received if isinstance(m, zbroker.Message)]
    _check_gaps(messages, probe.seq)
    bulk = [m for m in messages if m.topic == b"bulk.data"]
    indexes = [int(m.payload.split(b":", 1)[0]) for m in bulk]
    assert indexes == sorted(indexes)
    assert len(bulk) < count, "the broker dropped some messages"
    assert any(m.gap for m in messages)


def _check_gaps(messages: List[zbroker.Message], last_seq: int) -> None:
    missed = 0
    for m in messages:
        assert m.seq > last_seq
        assert m.gap == (m.seq != last_seq + 1), m
        missed += m.seq - last_seq - 1
        last_seq = m.seq
    assert missed > 0
