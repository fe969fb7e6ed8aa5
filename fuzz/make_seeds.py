#!/usr/bin/env python3
"""Writes the hand-made seed corpus under fuzz/corpus/<target>/.

Each seed is one small scenario that reaches a path worth mutating from,
encoded by the same rules the targets decode with (fuzz_targets/common.rs
and the `Input:` paragraph of each target's doc comment). Rerun after
changing an encoding:

    python3 fuzz/make_seeds.py

It rewrites the named seeds and leaves any other file (saved crash
reproducers, for instance) alone.
"""

import os
import struct
from collections.abc import Sequence

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# common::PIECES, by index.
PIECES = [b"a", b"b", b"ab", b".", b".", b"*", b">", b"a.b"]


def frame(data: bytes) -> bytes:
    if len(data) < 255:
        return bytes([len(data)]) + data
    return b"\xff" + struct.pack("<H", len(data)) + data


def text(*pieces: bytes, most: int = 4) -> bytes:
    """Input::text: a piece count, then one index per piece; `most` is the
    target's max_pieces (the count is read modulo most + 1)."""
    assert len(pieces) <= most, pieces
    return bytes([len(pieces)] + [PIECES.index(p) for p in pieces])


def write(target: str, name: str, data: bytes) -> None:
    directory = os.path.join(ROOT, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# publish_frames: max_topic_len byte, then (count byte, frames...)*.
def message(*frames: bytes) -> bytes:
    return bytes([len(frames)]) + b"".join(frame(f) for f in frames)


def publish_frames() -> None:
    t = "publish_frames"
    write(t, "valid", b"\xff" + message(b"net.a.port", b"up"))
    write(t, "valid_empty_payload", b"\xff" + message(b"t", b""))
    write(t, "one_frame", b"\xff" + message(b"net.a"))
    write(t, "three_frames", b"\xff" + message(b"net.a", b"up", b"extra"))
    write(t, "no_frames", b"\xff" + message())
    write(t, "empty_topic", b"\xff" + message(b"", b"payload"))
    write(t, "topic_too_long", bytes([4]) + message(b"toolong", b"p"))
    write(t, "topic_at_limit", bytes([4]) + message(b"four", b"p"))
    write(t, "topic_over_default", b"\xff" + message(b"t" * 1025, b"p"))
    write(
        t,
        "mixed",
        bytes([8])
        + message(b"a", b"1")
        + message(b"")
        + message(b"abcdefghi", b"2")
        + message(b"b", b"3", b"4", b"5", b"6")
        + message(b"c", b"x" * 300),
    )


# subscriber_commands: max_filter_len byte, limits byte, then
# (routing id byte, count byte, frames...)*.
def command(who: int, *frames: bytes) -> bytes:
    return bytes([who, len(frames)]) + b"".join(frame(f) for f in frames)


def subscriber_commands() -> None:
    t = "subscriber_commands"
    roomy = bytes([32, 0b11111110])  # 3 subscribers, 4 filters each, 8 in all
    tight = bytes([8, 0])  # 1 subscriber, 1 filter
    write(t, "sub_prefix", roomy + command(0, b"SUB", b"prefix", b"net."))
    write(t, "sub_empty_prefix", roomy + command(1, b"SUB", b"prefix", b""))
    write(t, "sub_pattern", roomy + command(0, b"SUB", b"pattern", b"net.*.port"))
    write(t, "sub_tail", roomy + command(0, b"SUB", b"pattern", b"net.>"))
    write(t, "tail_not_last", roomy + command(0, b"SUB", b"pattern", b"net.>.x"))
    write(t, "empty_exact", roomy + command(0, b"SUB", b"exact", b""))
    write(t, "empty_pattern", roomy + command(0, b"SUB", b"pattern", b""))
    write(t, "filter_too_long", tight + command(0, b"SUB", b"exact", b"ninebytes"))
    write(t, "unknown_kind", roomy + command(0, b"SUB", b"glob", b"x"))
    write(t, "unknown_verb", roomy + command(0, b"sub", b"exact", b"x"))
    write(t, "empty_message", roomy + command(0))
    write(t, "ping", roomy + command(2, b"PING"))
    write(t, "ping_extra_frame", roomy + command(2, b"PING", b"x"))
    write(t, "sub_two_frames", roomy + command(0, b"SUB", b"exact"))
    write(t, "sub_four_frames", roomy + command(0, b"SUB", b"exact", b"x", b"y"))
    write(t, "five_frames", roomy + command(0, b"PING", b"", b"", b"", b""))
    write(
        t,
        "sub_then_unsub",
        roomy
        + command(0, b"SUB", b"exact", b"x")
        + command(0, b"SUB", b"exact", b"x")
        + command(0, b"UNSUB", b"exact", b"x")
        + command(0, b"UNSUB", b"exact", b"x"),
    )
    write(t, "unsub_unknown", roomy + command(3, b"UNSUB", b"prefix", b""))
    write(
        t,
        "limits",
        tight
        + command(0, b"SUB", b"exact", b"x")
        + command(0, b"SUB", b"exact", b"y")
        + command(1, b"PING")
        + command(1, b"HELLO"),
    )


# routing_model: operations (see Op::read).
def sub(kind: int, who: int, *pieces: bytes) -> bytes:
    return bytes([0, kind + 3 * who]) + text(*pieces, most=6)


def unsub_held(i: int) -> bytes:
    return bytes([3, i])


def unsub(kind: int, who: int, *pieces: bytes) -> bytes:
    return bytes([4, kind + 3 * who]) + text(*pieces, most=6)


def topic(*pieces: bytes) -> bytes:
    return bytes([5]) + text(*pieces, most=7)


def raw_topic(data: bytes) -> bytes:
    return bytes([0x87]) + frame(data)


def disconnect(who: int) -> bytes:
    return bytes([7, who])


EXACT, PREFIX, PATTERN = 0, 1, 2


def routing_model() -> None:
    t = "routing_model"
    a, b, ab, dot, star, tail, adotb = b"a", b"b", b"ab", b".", b"*", b">", b"a.b"
    write(
        t,
        "radix_split_merge",
        sub(EXACT, 0, a, b)
        + sub(PREFIX, 1, a)
        + sub(EXACT, 2, ab, b)
        + topic(a, b)
        + topic(ab, b)
        + topic(a)
        + unsub(PREFIX, 1, a)
        + topic(a, b)
        + disconnect(0)
        + disconnect(2),
    )
    write(
        t,
        "patterns",
        sub(PATTERN, 0, a, dot, star)
        + sub(PATTERN, 1, a, dot, tail)
        + sub(PATTERN, 2, tail)
        + sub(PATTERN, 3, star)
        + sub(PATTERN, 4, adotb)
        + topic(adotb)
        + topic(a, dot, b, dot, a)
        + topic(a)
        + topic()
        + topic(a, dot)
        + unsub_held(0)
        + topic(adotb)
        + disconnect(2),
    )
    write(
        t,
        "one_subscriber_many_filters",
        sub(EXACT, 5, adotb)
        + sub(PREFIX, 5)
        + sub(PREFIX, 5, a)
        + sub(PATTERN, 5, a, dot, star)
        + sub(PATTERN, 5, star, dot, b)
        + topic(adotb)
        + topic(b)
        + disconnect(5)
        + topic(adotb),
    )
    write(
        t,
        "empty_segments",
        sub(PATTERN, 0, a, dot, dot)
        + sub(PATTERN, 1, dot)
        + sub(PATTERN, 2, star, dot, star)
        + topic(a, dot, dot)
        + topic(dot)
        + topic(dot, tail)
        + raw_topic(b"\x00.\xff")
        + unsub(PATTERN, 1, dot)
        + unsub(PATTERN, 1, dot),
    )
    write(
        t,
        "duplicates",
        sub(PREFIX, 0, a)
        + sub(PREFIX, 0, a)
        + sub(PREFIX, 1, a)
        + unsub_held(1)
        + unsub_held(0)
        + topic(a),
    )


# broker_session: eight config bytes, then operations (see `run`).
DROP_NEW, DROP_OLD, DISCONNECT, BACKPRESSURE = 0, 1, 2, 3


RATES = [1, 2, 5, 20, 100, 1000, 5000, 2**32 - 1]


def config(policy, max_messages=2, max_bytes=64, total_quarters=64, limits=0xFF,
           lens=0xFF, timeout=50, disconnect_after=25, max_replies=4,
           rate=5000) -> bytes:
    return bytes([policy, max_messages, max_bytes, total_quarters, limits, lens,
                  timeout, disconnect_after, max_replies + 5 * RATES.index(rate)])


def s_cmd(peer: int, subscribe: bool, kind: int, *pieces: bytes) -> bytes:
    return bytes([0, peer, (0 if subscribe else 1) | (kind << 1)]) + text(*pieces)


def s_ping(peer: int) -> bytes:
    return bytes([2, peer])


def s_garbage(peer: int, *frames: bytes) -> bytes:
    return bytes([3, peer, len(frames)]) + b"".join(frame(f) for f in frames)


def s_pub(payload_len: int, *pieces: bytes) -> bytes:
    return bytes([4]) + text(*pieces) + bytes([payload_len])


def s_bad_pub(selector: int, *frames: bytes) -> bytes:
    return bytes([6, selector]) + b"".join(frame(f) for f in frames)


OPEN, FULL, GONE = 0, 1, 2


def s_mode(peer: int, mode: int, room: int = 0) -> bytes:
    return bytes([7, peer, mode if mode != 3 else 3 | (room << 2)])


def s_wait(quarter_ms: int) -> bytes:
    return bytes([8, quarter_ms])


S_FLUSH = bytes([9])
S_TICK = bytes([10])


def broker_session() -> None:
    t = "broker_session"
    a, b, dot, star, tail = b"a", b"b", b".", b"*", b">"
    write(
        t,
        "deliver",
        config(DROP_NEW)
        + s_cmd(0, True, PREFIX, a)
        + s_cmd(1, True, PATTERN, a, dot, star)
        + s_pub(4, a, dot, b)
        + s_pub(0, b)
        + s_cmd(0, False, PREFIX, a)
        + s_pub(4, a, dot, b),
    )
    for name, policy in (("full_drop_new", DROP_NEW), ("full_drop_old", DROP_OLD),
                         ("full_disconnect", DISCONNECT),
                         ("full_backpressure", BACKPRESSURE)):
        write(
            t,
            name,
            config(policy)
            + s_cmd(0, True, PREFIX)
            + s_cmd(1, True, EXACT, a)
            + s_mode(0, FULL)
            + s_pub(8, a)
            + s_pub(8, a)
            + s_ping(0)
            + s_pub(8, a)
            + s_pub(8, b)
            + s_wait(10)
            + S_TICK
            + s_mode(0, 3, room=1)
            + S_FLUSH
            + s_mode(0, OPEN)
            + S_FLUSH
            + s_pub(8, a),
        )
    write(
        t,
        "unreachable",
        config(DROP_NEW)
        + s_cmd(0, True, PATTERN, tail)
        + s_cmd(1, True, PATTERN, tail)
        + s_mode(0, GONE)
        + s_pub(2, a)
        + s_mode(0, OPEN)
        + s_cmd(0, True, PATTERN, tail)
        + s_pub(2, a),
    )
    write(
        t,
        "gone_while_queued",
        config(DROP_NEW)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, FULL)
        + s_pub(2, a)
        + s_garbage(0, b"HELLO")
        + s_mode(0, GONE)
        + S_FLUSH
        + s_pub(2, a),
    )
    write(
        t,
        "expiry",
        config(DROP_NEW, timeout=5)
        + s_cmd(0, True, PREFIX)
        + s_cmd(1, True, PREFIX)
        + s_wait(5)
        + s_ping(1)
        + s_wait(5)
        + S_TICK
        + s_pub(1, a)
        + s_wait(20)
        + S_TICK
        + S_TICK,
    )
    write(
        t,
        "cut_off",
        config(DISCONNECT, max_messages=1, disconnect_after=5)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, FULL)
        + s_pub(1, a)
        + s_pub(1, a)
        + s_wait(5)
        + S_TICK
        + s_mode(0, OPEN)
        + S_FLUSH
        + s_cmd(0, True, PREFIX)
        + s_pub(1, a),
    )
    write(
        t,
        "limits",
        config(DROP_NEW, limits=0)
        + s_cmd(0, True, EXACT, a)
        + s_cmd(0, True, EXACT, b)
        + s_cmd(1, True, EXACT, a)
        + s_ping(1)
        + s_cmd(0, False, EXACT, b)
        + s_cmd(0, True, PATTERN, a, dot, tail, dot)
        + s_cmd(0, True, PATTERN, tail, dot, a),
    )
    write(
        t,
        "garbage",
        config(DROP_OLD, lens=0xF3)
        + s_garbage(0)
        + s_garbage(0, b"SUB", b"exact")
        + s_garbage(1, b"SUB", b"glob", b"x")
        + s_garbage(1, b"PING", b"", b"", b"")
        + s_bad_pub(0)
        + s_bad_pub(1, b"a")
        + s_bad_pub(2, b"a", b"b")
        + s_pub(1)
        + s_pub(1, b"a.b", b"a.b"),
    )
    write(
        t,
        "command_rate",
        config(DROP_NEW, rate=1, limits=0)
        + s_ping(0) * 3
        + s_wait(125)
        + s_ping(0) * 2
        + s_wait(250)
        + s_ping(0) * 2,
    )
    write(
        t,
        "reply_bound",
        config(DROP_NEW, max_replies=1)
        + s_mode(0, FULL)
        + s_ping(0) * 3
        + s_cmd(0, True, PREFIX)
        + s_pub(1, a)
        + s_mode(0, OPEN)
        + S_FLUSH,
    )
    # Regression (crashes until fixed): under drop-old a publish pops the
    # PONG queued between two messages, so the PING is never answered.
    write(
        t,
        "regression_drop_old_evicts_reply",
        config(DROP_OLD, max_messages=1)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, FULL)
        + s_pub(1, a)
        + s_ping(0)
        + s_pub(1, a)
        + s_pub(1, a)
        + s_mode(0, OPEN)
        + S_FLUSH,
    )
    # Regression (crashes until fixed): a message too big for max_bytes is
    # dropped while the queue is empty, which sets full_since; nothing clears
    # it, so the first message queued 400 ms later gets the subscriber cut
    # off at the next sweep although its queue was non-empty for 0 ms.
    write(
        t,
        "regression_stale_full_since",
        config(DISCONNECT, max_messages=2, max_bytes=4, timeout=255,
               disconnect_after=25)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, FULL)
        + s_pub(8, a)
        + s_wait(100)
        + s_pub(1, a)
        + S_TICK,
    )
    # A malformed command whose ERR finds the peer unreachable: the broker
    # forgets it only at its next clean-up.
    write(
        t,
        "unreachable_on_error_reply",
        config(DROP_NEW, timeout=255)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, GONE)
        + s_garbage(0, b"HELLO")
        + s_wait(10)
        + S_TICK
        + s_cmd(1, True, PREFIX)
        + s_pub(1, a),
    )
    # drop-old under reply pressure: a PING beyond max_queued_replies pops
    # the queue from the front, messages included.
    write(
        t,
        "drop_old_reply_pressure",
        config(DROP_OLD, max_messages=4, max_replies=1)
        + s_cmd(0, True, PREFIX)
        + s_mode(0, FULL)
        + s_pub(1, a)
        + s_ping(0)
        + s_pub(1, a)
        + s_ping(0)
        + s_mode(0, OPEN)
        + S_FLUSH,
    )
    write(
        t,
        "bytes_bounds",
        config(DROP_OLD, max_messages=4, max_bytes=20, total_quarters=8)
        + s_cmd(0, True, PREFIX)
        + s_cmd(1, True, PREFIX)
        + s_mode(0, FULL)
        + s_mode(1, FULL)
        + s_pub(9, a)
        + s_pub(9, a)
        + s_pub(30, a)
        + s_ping(0)
        + s_pub(9, b)
        + s_mode(0, OPEN)
        + S_FLUSH,
    )


# index_limits: operations until the input ends (see Op::read); each pattern
# or topic is a Shape (see Shape::read).
MAX_SEGMENTS = 1024  # the broker's hard cap on pattern segments
MAX_LEN = 64 << 10  # its upper bound on filter and topic length

# Segment choices, by index into SEGMENTS (3 and 4 repeat "a" and "*"). In a
# topic, "*" and ">" are plain literals.
SEG_A, SEG_STAR, SEG_WIDE, SEG_B, SEG_EMPTY, SEG_GT = 0, 1, 2, 5, 6, 7

# near_topic's fills, by index: for a `mutate` choice.
FILL_A, FILL_B, FILL_X, FILL_EMPTY = 0, 1, 2, 3


def u16(n: int) -> bytes:
    """A 16-bit little-endian number."""
    return struct.pack("<H", n)


def shape(
    segments: int,
    *period: int,
    wide: int = 1,
    twists: Sequence[tuple[int, int]] = (),
    tail: bool = False,
) -> bytes:
    """Shape::read: `segments` segments cycling through the choices in
    `period`, the wide literal `wide` bytes of "w", each (position, choice)
    twist overriding the period there, and a final ".>" if `tail`."""
    assert 1 <= segments <= MAX_SEGMENTS and 1 <= wide <= 64, (segments, wide)
    assert 1 <= len(period) <= 4 and len(twists) <= 3, (period, twists)
    return (
        u16(segments - 1)
        + bytes([wide - 1, len(period) - 1, *period, len(twists)])
        + b"".join(u16(at) + bytes([choice]) for at, choice in twists)
        + bytes([int(tail)])
    )


def il_sub(who: int, pattern: bytes) -> bytes:
    """Op::Subscribe: subscriber `who` (mod 8) takes the pattern `shape`."""
    return bytes([0, who]) + pattern


def il_unsub_held(i: int) -> bytes:
    """Op::UnsubscribeHeld: removes the i-th held pair in the model's order."""
    return bytes([3, i])


def il_unsub(who: int, pattern: bytes) -> bytes:
    """Op::Unsubscribe: subscriber `who` drops the pattern `shape`."""
    return bytes([4, who]) + pattern


def il_publish(topic: bytes) -> bytes:
    """Op::Publish: a topic `shape`."""
    return bytes([5]) + topic


def il_publish_near(
    held: int, fill: int = 0, extra: int = 0, mutate: tuple[int, int] | None = None
) -> bytes:
    """Op::PublishNear: a topic made from the held-th held pattern, `*`s
    filled from `fill` on, a final `>` made 1 + extra % 3 segments, and with
    mutate = (position, fill choice) one segment changed (one past the end:
    appended)."""
    if mutate is None:
        return bytes([6, held, fill, extra, 0])
    at, choice = mutate
    return bytes([6, held, fill, extra, 1 | choice << 1]) + u16(at)


def il_disconnect(who: int) -> bytes:
    """Op::Disconnect: removes every pair of subscriber `who` (mod 8)."""
    return bytes([7, who])


def index_limits() -> None:
    t = "index_limits"
    a, b, star, wide, empty = SEG_A, SEG_B, SEG_STAR, SEG_WIDE, SEG_EMPTY

    # Patterns and a topic of 200 segments, many of them empty (".*..*."),
    # a near topic published for each held pattern, then two subscribers
    # leave.
    n = 200
    write(
        t,
        "empty_segments",
        il_sub(0, shape(n, empty, star))
        + il_sub(1, shape(n, empty, empty))
        + il_sub(2, shape(n - 1, star, empty, tail=True))
        + il_sub(3, shape(n, wide, empty, star, wide=3))
        + il_publish(shape(n, empty))
        + b"".join(il_publish_near(i) for i in range(4))
        + il_disconnect(0)
        + il_publish_near(0)
        + il_disconnect(2)
        + il_publish_near(1),
    )

    # As many 64-byte segments as fit in MAX_LEN: 1008, 65519 bytes.
    n = (MAX_LEN + 1) // (64 + 1)
    write(
        t,
        "max_bytes",
        il_sub(0, shape(n, wide, wide=64))
        + il_sub(1, shape(n, wide, wide=64, twists=[(1000, star)]))
        + il_sub(2, shape(n - 1, wide, wide=64, twists=[(0, star)], tail=True))
        + il_publish_near(0)
        + il_publish_near(1, mutate=(1000, FILL_B))
        + il_publish_near(2, extra=1)
        + il_unsub_held(1)
        + il_publish_near(0)
        + il_disconnect(0)
        + il_disconnect(1)
        + il_disconnect(2),
    )

    # 1024 segments, the cap (1023 and a final ">" for the tail pattern).
    n = MAX_SEGMENTS
    write(
        t,
        "max_segments",
        il_sub(0, shape(n, star))
        + il_sub(1, shape(n, a))
        + il_sub(2, shape(n - 1, star, tail=True))
        + il_sub(3, shape(n, a, star))
        + il_sub(4, shape(n, a, twists=[(n // 2, star)]))
        + il_publish_near(0)
        + il_publish_near(1)
        + il_publish_near(2, extra=2)
        + il_publish_near(3, fill=1)
        + il_publish_near(4, mutate=(n, FILL_A))
        + il_unsub_held(2)
        + il_publish_near(0)
        + il_unsub(0, shape(n, star))
        + il_publish(shape(n, a))
        + il_disconnect(3),
    )

    # "a.b.a.b..." patterns of 1024 segments, each with one "*" where the
    # others diverge (neighbours 10/11 and 499/500, both ends, none), plus
    # shorter ones ending inside an edge; near topics mutated along the way,
    # then every pair removed one by one, so edges split and merge back.
    n = MAX_SEGMENTS
    stars = [[(900, star)], [(10, star)], [(500, star)], [(11, star)]]
    stars += [[(499, star)], [(0, star)], [(n - 1, star)], []]
    write(
        t,
        "split_merge",
        b"".join(il_sub(who, shape(n, a, b, twists=at)) for who, at in enumerate(stars))
        + il_sub(6, shape(600, a, b, tail=True))
        + il_sub(5, shape(300, a, b))
        + b"".join(il_publish_near(k, fill=k, mutate=(97 * k, k)) for k in range(10))
        + b"".join(
            il_unsub_held(i) + il_publish_near(i)
            for i in (3, 0, 5, 1, 0, 2, 0, 1, 0, 0)
        ),
    )

    # Fifteen 16-segment patterns "a.a.*.a...a.wwwwwww", the "*" at each
    # position in turn: a topic of sixteen "a"s walks every one of them to
    # the last segment and misses, the costly walk the match cache keeps.
    n = 16
    all_a = il_publish(shape(n, a))
    write(
        t,
        "worst_case",
        b"".join(
            il_sub(i % 8, shape(n, a, wide=7, twists=[(i, star), (n - 1, wide)]))
            for i in range(n - 1)
        )
        + all_a
        + all_a
        + il_publish_near(3)
        + il_publish_near(5, mutate=(n - 1, FILL_X))
        + il_unsub_held(0)
        + all_a
        + il_disconnect(1)
        + all_a,
    )


# xpub_notices: three config bytes, then operations (see Op::read). Prefixes
# and topics are Input::text over the target's ALPHABET, not PIECES.
XPUB_ALPHABET = [b"a", b"b", b"ab", b"."]
INDEX_BYTES = [1 << 30] * 4 + [0, 100, 300, 600]  # by index, low 3 bits


def x_config(
    max_filter_len: int = 7,
    max_filters_total: int = 15,
    per_subscriber: int = 16,
    index_bytes: int = 1 << 30,
    late: bool = False,
) -> bytes:
    """Byte 0 max_filter_len (% 8), byte 1 max_filters_total (low nibble)
    and max_filters_per_subscriber - 1 (high nibble), byte 2 the index of
    max_index_bytes in INDEX_BYTES and, in bit 7, a front that opens only
    at X_OPEN."""
    assert 0 <= max_filter_len < 8 and 0 <= max_filters_total < 16, max_filter_len
    assert 1 <= per_subscriber <= 16, per_subscriber
    flags = INDEX_BYTES.index(index_bytes) | (0x80 if late else 0)
    return bytes([max_filter_len, max_filters_total | (per_subscriber - 1) << 4, flags])


def x_text(*pieces: bytes, most: int) -> bytes:
    """Input::text over XPUB_ALPHABET."""
    assert len(pieces) <= most, pieces
    return bytes([len(pieces)] + [XPUB_ALPHABET.index(p) for p in pieces])


def x_sub(*pieces: bytes) -> bytes:
    """A SUB socket's subscribe notice, 0x01 + prefix."""
    return bytes([0]) + x_text(*pieces, most=3)


def x_unsub(*pieces: bytes) -> bytes:
    """A SUB socket's unsubscribe notice, 0x00 + prefix."""
    return bytes([2]) + x_text(*pieces, most=3)


def x_raw(message: bytes) -> bytes:
    """Any message from the XPUB socket, as a frame."""
    return bytes([3]) + frame(message)


def x_dealer(who: int, subscribe: bool, *pieces: bytes) -> bytes:
    """DEALER `who` (of 3) sends [SUB|UNSUB, prefix, text]."""
    return bytes([4 if subscribe else 5, who]) + x_text(*pieces, most=3)


def x_pub(*pieces: bytes) -> bytes:
    """A publish; no pieces is the empty topic, which is malformed."""
    return bytes([6]) + x_text(*pieces, most=4)


X_OPEN = bytes([7])


def xpub_notices() -> None:
    t = "xpub_notices"
    a, b, ab, dot = b"a", b"b", b"ab", b"."
    # Two SUBs on "a", one on the empty prefix; unsubscribed one by one,
    # the last one twice.
    write(
        t,
        "counted",
        x_config()
        + x_sub(a)
        + x_sub(a)
        + x_sub()
        + x_pub(a, dot, b)
        + x_unsub(a)
        + x_pub(a)
        + x_unsub(a)
        + x_pub(a)
        + x_unsub()
        + x_unsub()
        + x_pub(b),
    )
    # Front and DEALERs on overlapping prefixes: shared, front-only and
    # DEALER-only messages, and the empty prefix from a DEALER.
    write(
        t,
        "dealers_interleaved",
        x_config()
        + x_dealer(0, True, a)
        + x_sub(a, dot)
        + x_pub(a, dot, b)
        + x_pub(ab)
        + x_dealer(0, False, a)
        + x_pub(a, dot)
        + x_dealer(1, True)
        + x_sub(b)
        + x_dealer(2, True, b)
        + x_pub(b, dot)
        + x_dealer(1, False)
        + x_dealer(1, False)
        + x_pub(),
    )
    # max_filter_len 2, three filters in all, one per DEALER: refusals by
    # length and by count, a held prefix counted past the limit, and
    # malformed notices.
    write(
        t,
        "limits",
        x_config(max_filter_len=2, max_filters_total=3, per_subscriber=1)
        + x_sub(ab, dot)
        + x_sub(a)
        + x_sub(b)
        + x_dealer(0, True, ab)
        + x_sub(dot)
        + x_sub(a)
        + x_dealer(0, True, a)
        + x_dealer(1, True, ab, dot)
        + x_unsub(a)
        + x_unsub(a)
        + x_sub(dot)
        + x_raw(b"")
        + x_raw(b"\x02a")
        + x_raw(b"\xffab")
        + x_raw(b"\x01abcdefgh")
        + x_pub(a, b),
    )
    # max_index_bytes of about one prefix: the empty prefix costs none.
    write(
        t,
        "index_bytes",
        x_config(index_bytes=100)
        + x_sub()
        + x_sub(a)
        + x_sub(b)
        + x_sub(ab)
        + x_dealer(0, True, dot)
        + x_unsub(a)
        + x_sub(ab)
        + x_pub(ab),
    )
    # The front opens after a DEALER subscribed; notices before are
    # malformed and uncounted; opening twice changes nothing.
    write(
        t,
        "opens_late",
        x_config(late=True)
        + x_dealer(0, True, a)
        + x_sub(a)
        + x_pub(a)
        + X_OPEN
        + x_sub(a)
        + x_pub(a)
        + X_OPEN
        + x_pub(a, b),
    )


if __name__ == "__main__":
    publish_frames()
    subscriber_commands()
    routing_model()
    broker_session()
    index_limits()
    xpub_notices()
