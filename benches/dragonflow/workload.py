"""The Dragonflow-shaped workload: topics, who subscribes to what, and the events.

Dragonflow's neutron-server workers publish every northbound change as a
msgpack-encoded ``DbUpdate.to_dict()`` (``table``, ``key``, ``action``,
``value``, ``topic``) on the object's project (tenant) id, or on ``'D'``
(``SEND_ALL_TOPIC``) for what every controller needs; a local controller
subscribes to ``'D'`` and to the projects of the ports it hosts.

Project ids are Keystone-style: 32 lowercase hex digits. All are the same
length and none starts with ``'D'``, so a ZeroMQ prefix subscription selects
exactly what an exact filter or a Redis channel does.

Every event's msgpack map starts with a ``ts`` entry, the sender's
``time.monotonic_ns()`` as a msgpack uint64 (``0xcf`` + 8 bytes big-endian)
at a fixed offset, so a receiver can read it without decoding the event.
Events are packed once per template with a placeholder and the stamp is
spliced in at send time; the result is still exactly ``msgpack.packb`` of
the dict with the new ``ts``.
"""

from __future__ import annotations

import json
import random
import struct
import uuid
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import msgpack

SEND_ALL_TOPIC = b"D"
TS_OFFSET = 5  # fixmap marker, 0xa2 "ts", 0xcf: the uint64 starts at byte 5
TS_PLACEHOLDER = 1 << 63
TABLES = ("lport", "lswitch", "lrouter", "secgroup", "floatingip", "lflow")
ACTIONS = ("create", "set", "set", "set", "delete")


@dataclass(frozen=True)
class Workload:
    """Who holds what, fixed by a seed so every system gets the same."""

    subscribers: int
    projects: int
    projects_per_subscriber: int
    d_share: float
    min_size: int
    max_size: int
    seed: int

    def project_topics(self) -> List[bytes]:
        rng = random.Random(self.seed)
        return [
            uuid.UUID(int=rng.getrandbits(128), version=4).hex.encode()
            for _ in range(self.projects)
        ]

    def topics(self) -> List[bytes]:
        """Topic index 0 is 'D', 1..projects are the projects."""
        return [SEND_ALL_TOPIC, *self.project_topics()]

    def subscriptions(self) -> List[List[int]]:
        """Topic indexes each subscriber holds: 'D' and distinct projects.

        Project slots are dealt from a seeded permutation, round after round,
        so every project has the same number of holders (to within one) and
        no subscriber holds a project twice.
        """
        rng = random.Random(self.seed + 1)
        k = min(self.projects_per_subscriber, self.projects)
        order = list(range(self.projects))
        rng.shuffle(order)
        subs = []
        for i in range(self.subscribers):
            start = i * k
            held = [order[(start + j) % self.projects] + 1 for j in range(k)]
            subs.append([0, *held])
        return subs

    def holders(self) -> List[int]:
        """For each topic index, how many subscribers hold it."""
        counts = [0] * (self.projects + 1)
        for held in self.subscriptions():
            for t in held:
                counts[t] += 1
        return counts

    def mean_fanout(self) -> float:
        """Expected deliveries per event."""
        h = self.holders()
        project_mean = sum(h[1:]) / self.projects
        return self.d_share * h[0] + (1.0 - self.d_share) * project_mean


def _value(rng: random.Random, table: str, key: str, topic: str, size: int) -> str:
    """A JSON object of a Dragonflow model, padded to about ``size`` bytes."""
    obj = {
        "id": key,
        "topic": topic,
        "name": f"{table}-{rng.randrange(1 << 20):x}",
        "version": rng.randrange(1, 1000),
        "unique_key": rng.randrange(1, 1 << 24),
        "lswitch": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
        "macs": [":".join(f"{rng.randrange(256):02x}" for _ in range(6))],
        "ips": [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"],
        "enabled": True,
        "binding": {"type": "chassis", "chassis": f"compute-{rng.randrange(1000):04d}"},
        "security_groups": [],
    }
    text = json.dumps(obj, separators=(",", ":"))
    pad = size - len(text)
    if pad > 0:
        groups = [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(pad // 35 + 1)]
        obj["security_groups"] = groups
        text = json.dumps(obj, separators=(",", ":"))
        text = text[: max(size, 2)] if len(text) > size else text
    return text


def pack_event(ts: int, table: str, key: str, action: str, value: str, topic: str) -> bytes:
    return msgpack.packb(
        {"ts": ts, "table": table, "key": key, "action": action, "value": value, "topic": topic},
        use_bin_type=True,
    )


def make_templates(
    wl: Workload, publisher: int, count: int
) -> Tuple[List[int], List[bytes], List[bytes]]:
    """``count`` events for one publisher: topic indexes, topics, packed events.

    Topic: 'D' with probability ``d_share``, else a uniformly drawn project.
    The packed event (``ts`` placeholder included) is between ``min_size``
    and ``max_size`` bytes, uniformly.
    """
    rng = random.Random(wl.seed * 1000 + 17 + publisher)
    topics = wl.topics()
    idx: List[int] = []
    names: List[bytes] = []
    packed: List[bytes] = []
    for _ in range(count):
        t = 0 if rng.random() < wl.d_share else rng.randrange(1, wl.projects + 1)
        topic = topics[t].decode()
        table = rng.choice(TABLES)
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        action = rng.choice(ACTIONS)
        target = rng.randint(wl.min_size, wl.max_size)
        empty = len(pack_event(TS_PLACEHOLDER, table, key, action, "", topic))
        value = _value(rng, table, key, topic, max(target - empty - 3, 0))
        data = pack_event(TS_PLACEHOLDER, table, key, action, value, topic)
        # msgpack str headers are 1, 2 or 3 bytes: adjust to the exact target
        # (a header changing size on the way can take a step or two more).
        for _ in range(8):
            diff = target - len(data)
            if diff == 0 or len(value) + diff < 0:
                break
            value = value + " " * diff if diff > 0 else value[:diff]
            data = pack_event(TS_PLACEHOLDER, table, key, action, value, topic)
        assert data[TS_OFFSET - 1] == 0xCF, "ts must be a msgpack uint64 at a fixed offset"
        idx.append(t)
        names.append(topics[t])
        packed.append(data)
    return idx, names, packed


_TS = struct.Struct(">Q")


def stamp(template: bytes, ts: int) -> bytes:
    """The template with ``ts`` spliced in (ts must be >= 2**32)."""
    return template[:TS_OFFSET] + _TS.pack(ts) + template[TS_OFFSET + 8 :]


def read_stamp(payload: bytes) -> int:
    return int.from_bytes(payload[TS_OFFSET : TS_OFFSET + 8], "big")


def expected_deliveries(sent_per_topic: Sequence[int], holders: Sequence[int]) -> int:
    return sum(s * h for s, h in zip(sent_per_topic, holders))
