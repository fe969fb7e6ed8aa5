#!/usr/bin/env python3
"""Interoperability check for zbroker, written from docs/PROTOCOL.md alone.

Usage: python3 pyzmq_client.py PUB_ENDPOINT SUB_ENDPOINT

Speaks protocol v1 through pyzmq against a running broker: subscribes with
every filter kind, checks the replies and error codes, publishes matching and
non-matching topics (and binary payloads), and verifies that exactly the
matching messages arrive, once each, in publish order, with consecutive seq
numbers. A final "fence" message, on a topic the subscribers hold an exact
filter for, tells that everything published before it has arrived (one
publisher's messages are never reordered), so no sleeps are used for
synchronisation. Every wait is bounded; the script exits non-zero with a
message on the first failure and prints "interop: N passed, 0 failed" on
success.

Needs only the standard library and pyzmq (`pip install pyzmq`).
"""

import struct
import sys
import time

try:
    import zmq
except ImportError:
    sys.stderr.write("interop: FAIL: pyzmq is not installed (pip install pyzmq)\n")
    sys.exit(2)

# The whole run must finish well inside this; each wait is capped by it.
OVERALL_LIMIT_S = 20.0
# Longest single wait for a reply or a message.
RECV_LIMIT_S = 5.0
# Keep-alive: PING a subscriber that has been idle this long while waiting
# for messages (the broker forgets silent subscribers after --sub-timeout,
# which the Rust tests set to 2 s).
KEEPALIVE_S = 0.5

START = time.monotonic()
DEADLINE = START + OVERALL_LIMIT_S
PASSED = 0


class Failure(Exception):
    pass


def fail(msg):
    raise Failure(msg)


def check(cond, msg):
    global PASSED
    if not cond:
        fail(msg)
    PASSED += 1


def short(b, limit=60):
    """A readable repr of bytes, truncated for long payloads."""
    if isinstance(b, (bytes, bytearray)) and len(b) > limit:
        return "%r...(%d bytes)" % (bytes(b[:limit]), len(b))
    return repr(b)


def short_parts(parts):
    return "[" + ", ".join(short(p) for p in parts) + "]"


def remaining_ms(cap_s=RECV_LIMIT_S):
    left = min(DEADLINE - time.monotonic(), cap_s)
    if left <= 0:
        fail("overall time limit of %.0f s exceeded" % OVERALL_LIMIT_S)
    return int(left * 1000) + 1


# ---------------------------------------------------------------- protocol

def is_message(parts):
    # PROTOCOL.md: "a two-part message whose first part starts with MSG and
    # is at least 12 bytes long is a message; everything else is a reply."
    return len(parts) == 2 and len(parts[0]) >= 12 and parts[0][:3] == b"MSG"


def decode(parts):
    header, payload = parts
    (seq,) = struct.unpack(">Q", header[3:11])
    return seq, header[11:], payload


def describe_err(parts):
    if len(parts) == 3 and parts[0] == b"ERR" and parts[1] == b"limit":
        text = parts[2]
        if text.startswith(b"expired:"):
            return " (broker notice: this subscriber EXPIRED: %r)" % text
        if text.startswith(b"cut-off:"):
            return " (broker notice: this subscriber was CUT OFF: %r)" % text
    return ""


class Subscriber:
    """A DEALER subscriber tracking its expected seq and keep-alive PINGs."""

    def __init__(self, ctx, endpoint, name):
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(endpoint)
        self.next_seq = 1
        self.pending_pongs = 0  # keep-alive PINGs not yet answered
        self.last_sent = time.monotonic()

    def send(self, *frames):
        try:
            self.sock.send_multipart(list(frames))
        except zmq.Again:
            fail("%s: could not send %s within 5 s" % (self.name, short_parts(frames)))
        self.last_sent = time.monotonic()

    def recv(self, what):
        if not self.sock.poll(remaining_ms(), zmq.POLLIN):
            fail("%s: nothing received within %.0f s while waiting for %s"
                 % (self.name, RECV_LIMIT_S, what))
        return self.sock.recv_multipart(zmq.NOBLOCK)

    def reply(self, what):
        """The next reply, skipping answers to outstanding keep-alive PINGs
        (commands are answered in order, so those come first). A message
        here is a failure: every expected message has already been drained
        by a fence."""
        while True:
            parts = self.recv(what)
            if is_message(parts):
                seq, topic, payload = decode(parts)
                fail("%s: unexpected message (seq %d, topic %s, payload %s) while "
                     "waiting for %s" % (self.name, seq, short(topic), short(payload), what))
            if self.pending_pongs > 0 and parts == [b"PONG"]:
                self.pending_pongs -= 1
                continue
            return parts

    def expect_replies(self, commands_and_replies):
        """Sends all commands back to back, then checks the replies arrive in
        the same order. Each expected reply is a list of frames, or a tuple
        ("ERR", code) for an ERR with any non-empty UTF-8 text."""
        for command, _ in commands_and_replies:
            self.send(*command)
        for command, expected in commands_and_replies:
            what = "the reply to %s" % short_parts(command)
            got = self.reply(what)
            if isinstance(expected, tuple):
                code = expected[1]
                check(len(got) == 3 and got[0] == b"ERR" and got[1] == code,
                      "%s: sent %s, expected [ERR, %s, text], got %s%s"
                      % (self.name, short_parts(command), code.decode(),
                         short_parts(got), describe_err(got)))
                try:
                    text = got[2].decode("utf-8")
                except UnicodeDecodeError:
                    fail("%s: ERR text for %s is not UTF-8: %r"
                         % (self.name, short_parts(command), got[2]))
                check(len(text) > 0, "%s: ERR text for %s is empty"
                      % (self.name, short_parts(command)))
            else:
                check(got == expected,
                      "%s: sent %s, expected %s, got %s%s"
                      % (self.name, short_parts(command), short_parts(expected),
                         short_parts(got), describe_err(got)))

    def expect(self, command, expected):
        self.expect_replies([(command, expected)])

    def sub(self, kind, flt):
        self.expect([b"SUB", kind, flt], [b"OK", b"SUB", kind, flt])

    def unsub(self, kind, flt):
        self.expect([b"UNSUB", kind, flt], [b"OK", b"UNSUB", kind, flt])

    def close(self):
        self.sock.close(0)


def drain(subs, fence_topic, fence_payload):
    """Receives on all subscribers until each has seen the fence message.
    Returns {sub: [(seq, topic, payload), ...]} including the fence. PINGs
    idle subscribers meanwhile so the broker does not expire them."""
    got = {s: [] for s in subs}
    done = set()
    poller = zmq.Poller()
    by_sock = {}
    for s in subs:
        poller.register(s.sock, zmq.POLLIN)
        by_sock[s.sock] = s
    last_progress = time.monotonic()
    while len(done) < len(subs):
        now = time.monotonic()
        if now - last_progress > RECV_LIMIT_S:
            missing = [s.name for s in subs if s not in done]
            fail("fence %r not received by %s within %.0f s; received so far: %s"
                 % (fence_payload, ", ".join(missing), RECV_LIMIT_S,
                    "; ".join("%s: %d messages, last topics %s"
                              % (s.name, len(got[s]), [short(t, 30) for _, t, _ in got[s][-5:]])
                              for s in subs)))
        for s in subs:
            if now - s.last_sent > KEEPALIVE_S:
                s.send(b"PING")
                s.pending_pongs += 1
        events = dict(poller.poll(min(remaining_ms(), 100)))
        for sock in events:
            s = by_sock[sock]
            while True:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                last_progress = time.monotonic()
                if is_message(parts):
                    seq, topic, payload = decode(parts)
                    got[s].append((seq, topic, payload))
                    if topic == fence_topic and payload == fence_payload:
                        done.add(s)
                elif parts == [b"PONG"] and s.pending_pongs > 0:
                    s.pending_pongs -= 1
                else:
                    fail("%s: unexpected reply %s while receiving messages%s"
                         % (s.name, short_parts(parts), describe_err(parts)))
    return got


def verify(sub, received, expected, phase):
    """Exactly the expected (topic, payload) pairs, in order, once each, with
    seq continuing consecutively from the subscriber's previous one."""
    got_pairs = [(t, p) for _, t, p in received]
    if got_pairs != expected:
        lines = ["%s, %s: delivered messages differ from the expected ones" % (sub.name, phase)]
        n = max(len(got_pairs), len(expected))
        for i in range(n):
            e = expected[i] if i < len(expected) else None
            g = got_pairs[i] if i < len(got_pairs) else None
            mark = "  " if e == g else "!!"
            lines.append("  %s #%d expected %s got %s" % (
                mark, i,
                "-" if e is None else "(%s, %s)" % (short(e[0], 40), short(e[1], 20)),
                "-" if g is None else "(%s, %s)" % (short(g[0], 40), short(g[1], 20))))
        fail("\n".join(lines))
    check(len(got_pairs) == len(expected), "")  # counts the comparison above
    for i, (seq, topic, payload) in enumerate(received):
        check(seq == sub.next_seq,
              "%s, %s: message #%d (topic %s) has seq %d, expected %d (seq must count "
              "1,2,3,... with no gaps)" % (sub.name, phase, i, short(topic), seq, sub.next_seq))
        sub.next_seq += 1


# ---------------------------------------------------------------- the test

def run(pub_endpoint, sub_endpoint):
    ctx = zmq.Context()
    try:
        _run(ctx, pub_endpoint, sub_endpoint)
    finally:
        ctx.destroy(linger=0)


def _run(ctx, pub_endpoint, sub_endpoint):
    s1 = Subscriber(ctx, sub_endpoint, "sub1")
    s2 = Subscriber(ctx, sub_endpoint, "sub2(all)")

    # A fresh subscriber: PING works before any SUB.
    s1.expect([b"PING"], [b"PONG"])

    # --- filters of all three kinds
    binary_topic = b"bin\x00\xfftopic"
    s1_filters = [
        (b"exact", b"sys.fence"),
        (b"exact", b"alpha"),
        (b"exact", b"net.b.port"),     # overlaps the pattern net.*.port
        (b"exact", b"blob"),
        (b"exact", binary_topic),
        (b"prefix", b"log/"),
        (b"pattern", b"net.*.port"),
        (b"pattern", b"ev.>"),
        (b"pattern", b"a*"),           # not a wildcard: matches only "a*"
        (b"pattern", b"x.*"),
    ]
    for kind, flt in s1_filters:
        s1.sub(kind, flt)

    # The empty prefix matches every topic (ZeroMQ SUB semantics).
    s2.sub(b"prefix", b"")

    # --- duplicates, errors, PING; pipelined to check reply order too
    s1.expect_replies([
        ([b"SUB", b"exact", b"alpha"], [b"OK", b"SUB", b"exact", b"alpha"]),
        ([b"PING"], [b"PONG"]),
        ([b"UNSUB", b"exact", b"never-held"], ("ERR", b"not-subscribed")),
        ([b"UNSUB", b"prefix", b"alpha"], ("ERR", b"not-subscribed")),
        ([b"SUB", b"glob", b"x"], ("ERR", b"bad-command")),
        ([b"SUB", b"exact"], ("ERR", b"bad-command")),
        ([b"FROB", b"exact", b"x"], ("ERR", b"bad-command")),
        ([b"SUB", b"exact", b""], ("ERR", b"bad-filter")),
        ([b"SUB", b"pattern", b""], ("ERR", b"bad-filter")),
        ([b"SUB", b"pattern", b"a.>.b"], ("ERR", b"bad-filter")),
        ([b"SUB", b"prefix", b"log/"], [b"OK", b"SUB", b"prefix", b"log/"]),
        ([b"PING"], [b"PONG"]),
    ])
    # One at a time as well.
    s1.expect([b"SUB", b"pattern", b"net.*.port"], [b"OK", b"SUB", b"pattern", b"net.*.port"])
    s1.expect([b"UNSUB", b"exact", b"not-held"], ("ERR", b"not-subscribed"))
    s1.expect([b"SUB", b"glob", b"x"], ("ERR", b"bad-command"))
    s1.expect([b"SUB", b"exact", b""], ("ERR", b"bad-filter"))
    s1.expect([b"PING"], [b"PONG"])
    s2.expect([b"PING"], [b"PONG"])

    # --- publish
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.setsockopt(zmq.SNDTIMEO, 5000)
    push.connect(pub_endpoint)

    def publish(*frames):
        try:
            push.send_multipart(list(frames))
        except zmq.Again:
            fail("publisher: could not send %s within 5 s" % short_parts(frames))

    big = bytes((i * 131 + 7) % 256 for i in range(100 * 1024))
    nuls = b"\x00payload\x00with\x00\x00NULs\xff\x00"
    long_topic = b"long." + b"t" * (1024 - 5)             # exactly 1024 bytes: valid
    too_long_topic = b"log/" + b"t" * (1025 - 4)          # 1025 bytes: dropped
    assert len(long_topic) == 1024 and len(too_long_topic) == 1025

    # (topic, payload, delivered to sub1?)
    phase1 = [
        (b"alpha", b"a1", True),
        (b"alphabet", b"no", False),
        (b"alph", b"no", False),
        (b"ALPHA", b"no", False),
        (b"log/app", b"l1", True),
        (b"log", b"no", False),
        (b"xlog/app", b"no", False),
        (b"log/", b"l2", True),
        (b"net.a.port", b"n1", True),
        (b"net.b.port", b"n2-once", True),    # exact + pattern: delivered once
        (b"net.a.b.port", b"no", False),
        (b"net.port", b"no", False),
        (b"net.a.portx", b"no", False),
        (b"ev.a", b"e1", True),
        (b"ev.a.b.c", b"e2", True),
        (b"ev", b"no", False),
        (b"evx.a", b"no", False),
        (b"ev.", b"e3", True),                # ">" matches the one empty segment
        (b"a*", b"w1", True),
        (b"ab", b"no", False),
        (b"a", b"no", False),
        (b"x.y", b"x1", True),
        (b"x.", b"x2", True),                 # "*" matches the one empty segment
        (b"x.y.z", b"no", False),
        (b"blob", b"", True),                 # empty payload
        (b"blob", nuls, True),
        (b"blob", big, True),                 # 100 KiB
        (binary_topic, b"\x00", True),
        (b"bin\x00\xff", b"no", False),
        (long_topic, b"long", False),
    ]
    for topic, payload, _ in phase1:
        publish(topic, payload)
    # Malformed publications: dropped by the broker, never delivered.
    publish(b"alpha")                               # one part
    publish(b"alpha", b"three", b"parts")           # three parts
    publish(b"", b"empty topic")                    # empty topic
    publish(too_long_topic, b"too long")            # topic over 1024 bytes
    phase1.append((b"alpha", b"a2", True))
    publish(b"alpha", b"a2")
    phase1.append((b"sys.fence", b"fence-1", True))
    publish(b"sys.fence", b"fence-1")

    got = drain([s1, s2], b"sys.fence", b"fence-1")
    verify(s1, got[s1], [(t, p) for t, p, m in phase1 if m], "phase 1")
    verify(s2, got[s2], [(t, p) for t, p, _ in phase1], "phase 1")
    # Nothing after the fence (no duplicates): the next reply is the PONG.
    s1.expect([b"PING"], [b"PONG"])
    s2.expect([b"PING"], [b"PONG"])

    # --- UNSUB
    s1.unsub(b"prefix", b"log/")
    s1.unsub(b"exact", b"net.b.port")   # still matched by pattern net.*.port
    s1.expect([b"UNSUB", b"prefix", b"log/"], ("ERR", b"not-subscribed"))
    s1.expect([b"PING"], [b"PONG"])

    phase2 = [
        (b"log/app", b"gone", False),
        (b"alpha", b"a3", True),
        (b"log/", b"gone", False),
        (b"net.b.port", b"n3", True),
        (b"blob", b"b4", True),
        (b"log/x.y", b"gone", False),
        (b"sys.fence", b"fence-2", True),
    ]
    for topic, payload, _ in phase2:
        publish(topic, payload)
    got = drain([s1, s2], b"sys.fence", b"fence-2")
    verify(s1, got[s1], [(t, p) for t, p, m in phase2 if m], "phase 2 (after UNSUB)")
    verify(s2, got[s2], [(t, p) for t, p, _ in phase2], "phase 2 (after UNSUB)")
    s1.expect([b"PING"], [b"PONG"])
    s2.expect([b"PING"], [b"PONG"])

    push.close(0)
    s1.close()
    s2.close()


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: python3 pyzmq_client.py PUB_ENDPOINT SUB_ENDPOINT\n")
        return 2
    try:
        run(argv[1], argv[2])
    except Failure as e:
        sys.stderr.write("interop: FAIL: %s\n" % e)
        print("interop: %d passed, 1 failed" % PASSED)
        return 1
    except Exception as e:  # an error in the script or in pyzmq
        import traceback
        traceback.print_exc()
        sys.stderr.write("interop: FAIL: unexpected %s: %s\n" % (type(e).__name__, e))
        print("interop: %d passed, 1 failed" % PASSED)
        return 1
    print("interop: %.2f s, libzmq %s, pyzmq %s"
          % (time.monotonic() - START, zmq.zmq_version(), zmq.__version__))
    print("interop: %d passed, 0 failed" % PASSED)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
