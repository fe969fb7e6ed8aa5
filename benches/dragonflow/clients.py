"""Publisher and receiver processes, forked by dfbench.py and driven over pipes.

Publishers (one process each, as neutron-server forks one API worker per
CPU): ZeroMQ PUSH connected to an ipc endpoint (zbroker, df-publisher-service)
or a redis-py client doing one ``PUBLISH`` per event (as Dragonflow's Redis
driver does). Each sends ``[topic, event]`` where the event is a msgpack
``DbUpdate`` dict stamped with the send time (workload.py).

Receivers: each process holds many subscriber sockets (one per simulated
controller) and only counts. Every socket's descriptor is in one epoll set
(``ZMQ_FD`` for ZeroMQ sockets, the TCP socket for Redis); a ready socket is
drained until it would block; every socket is also swept every 100 ms, in
case an edge was missed. ``zmq.Poller`` over hundreds of sockets costs two
system calls per socket per call, epoll only the ready ones. Modes:

- ``warmup``: records which of its topics each socket has seen;
- ``count``: counts deliveries (and, for protocol v1, ``seq`` gaps) and the
  time of the last one;
- ``latency``: also reads each delivery's send stamp (bytes 5-13 of the
  payload, no msgpack decoding) and keeps ``now - stamp`` in nanoseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import time
from array import array
from typing import Dict, List, Optional, Sequence, Tuple

import workload as wlmod

WARMUP, COUNT, LATENCY = "warmup", "count", "latency"
MAX_LATENCY_SAMPLES = 4_000_000  # per receiver process, per run
DRAIN_BOUND = 20_000  # messages per socket per turn, then the next socket
SWEEP_S = 0.1  # every socket is read this often even without a wake-up
RECV_SIZE = 262_144  # bytes per recv() from a Redis connection


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: be killed if the harness dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def cpu_seconds(pid: Optional[int] = None) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    path = f"/proc/{pid or 'self'}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# Publishers


class _ZmqSender:
    def __init__(self, endpoint: str) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        # Dragonflow sets nothing; a bounded wait only keeps the harness from
        # hanging forever if the system under test stops reading.
        self.sock.setsockopt(zmq.SNDTIMEO, 2000)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)

    def send(self, topic: bytes, data: bytes) -> bool:
        try:
            self.sock.send_multipart([topic, data])
            return True
        except self.zmq.Again:
            return False

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class _RespSender:
    """``PUBLISH`` written as RESP on a plain socket, one per event, each
    waiting for Redis' reply: what Dragonflow's ``redis.publish(topic, data)``
    does on the wire, at a fifth of redis-py's CPU (10 µs against 49 µs per
    call measured here), which would otherwise take the cores the systems
    under test need. ``--redis-client redis-py`` uses redis-py itself."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, topic: bytes, data: bytes) -> bool:
        try:
            self.sock.sendall(_resp(b"PUBLISH", topic, data))
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return False
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            return line[:1] == b":"
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class _RedisSender:
    def __init__(self, host: str, port: int) -> None:
        import redis

        self.redis = redis
        self.client = redis.Redis(host=host, port=port, socket_timeout=5.0)
        self.client.ping()

    def send(self, topic: bytes, data: bytes) -> bool:
        try:
            self.client.publish(topic, data)
            return True
        except self.redis.RedisError:
            return False

    def close(self) -> None:
        self.client.close()


def publisher_main(
    conn, index: int, target: Tuple[str, str], wl: wlmod.Workload, redis_client: str = "resp"
) -> None:
    """One publisher process: waits for commands on ``conn``."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    idx, names, packed = wlmod.make_templates(wl, index, 4096)
    topics = wl.topics()
    warm = [
        wlmod.pack_event(wlmod.TS_PLACEHOLDER, "chassis", "warmup", "set", "x" * 64, t.decode())
        for t in topics
    ]
    kind, where = target
    if kind == "zmq":
        sender = _ZmqSender(where)
    else:
        host, port = where.rsplit(":", 1)
        if redis_client == "redis-py":
            sender = _RedisSender(host, int(port))
        else:
            sender = _RespSender(host, int(port))
    conn.send(("ready", index))
    stamp = wlmod.stamp
    now_ns = time.monotonic_ns
    mono = time.monotonic
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "warmup":
                failed = 0
                for t, data in zip(topics, warm):
                    if not sender.send(t, stamp(data, now_ns())):
                        failed += 1
                conn.send(("warmed", failed))
                continue
            # ("run", events_per_s or None, duration_s)
            _, rate, duration = cmd
            sent = [0] * len(topics)
            failed = 0
            n = len(packed)
            j = (index * 977) % n
            cpu0 = cpu_seconds()
            t0 = mono()
            end = t0 + duration
            first_ns = now_ns()
            i = 0
            while True:
                now = mono()
                if now >= end or failed:
                    break
                if rate:
                    burst = int((now - t0) * rate) + 1 - i
                    if burst <= 0:
                        time.sleep(min((i + 1) / rate - (now - t0), end - now, 0.01))
                        continue
                    burst = min(burst, 64)
                else:
                    burst = 32
                for _ in range(burst):
                    if not sender.send(names[j], stamp(packed[j], now_ns())):
                        failed += 1
                        break
                    sent[idx[j]] += 1
                    i += 1
                    j += 1
                    if j == n:
                        j = 0
            last_ns = now_ns()
            conn.send(
                {
                    "sent": sent,
                    "events": i,
                    "failed": failed,
                    "first_ns": first_ns,
                    "last_ns": last_ns,
                    "cpu_s": cpu_seconds() - cpu0,
                }
            )
    finally:
        sender.close()


# --------------------------------------------------------------------------
# Receivers


class _Stats:
    def __init__(self, nsock: int) -> None:
        self.mode = WARMUP
        self.counts = [0] * nsock
        self.last_ns = 0
        self.gaps = 0
        self.replies = 0
        self.closed = 0
        self.swept = 0
        self.lat = array("q")
        self.seen: List[set] = [set() for _ in range(nsock)]

    def reset(self, mode: str) -> None:
        self.mode = mode
        self.counts = [0] * len(self.counts)
        self.last_ns = 0
        self.gaps = 0
        self.replies = 0
        self.swept = 0
        self.lat = array("q")


class _ZmqReceivers:
    """DEALERs speaking protocol v1 (``native``) or plain SUB sockets."""

    def __init__(self, endpoint: str, subs: Sequence[Sequence[bytes]], native: bool) -> None:
        import zmq

        self.zmq = zmq
        self.native = native
        self.ctx = zmq.Context()
        self.socks = []
        for held in subs:
            s = self.ctx.socket(zmq.DEALER if native else zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            if not native:
                for t in held:
                    s.setsockopt(zmq.SUBSCRIBE, t)
            self.socks.append(s)
        if native:
            self._subscribe(subs)
        self.last_seq = [0] * len(self.socks)
        # Topics and headers are at most 1 KiB + 11; events at most a few KiB.
        self.hbuf = bytearray(2048)
        self.pbuf = bytearray(1 << 20)

    def _subscribe(self, subs: Sequence[Sequence[bytes]]) -> None:
        """``SUB exact`` for every topic; returns once every one is ``OK``."""
        zmq = self.zmq
        for s, held in zip(self.socks, subs):
            for t in held:
                s.send_multipart([b"SUB", b"exact", t])
        waiting = {i: len(held) for i, held in enumerate(subs)}
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + 60
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} DEALERs never got every OK")
            for s, _ in poller.poll(500):
                i = self.socks.index(s)
                while True:
                    try:
                        parts = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if parts[0] != b"OK":
                        raise RuntimeError(f"SUB refused: {parts!r}")
                    waiting[i] -= 1
                    if waiting[i] == 0:
                        del waiting[i]

    def fds(self) -> List[int]:
        return [s.getsockopt(self.zmq.FD) for s in self.socks]

    def drain(self, i: int, st: _Stats) -> bool:
        """Reads socket ``i`` until it would block; True if bounded out.

        Frames are read with ``recv_into`` into two reused buffers: no
        allocation per delivery (about 15 % less receiver CPU than ``recv``;
        ``recv_multipart`` or a ``ZMQ_EVENTS`` check per message cost more).
        """
        zmq = self.zmq
        s = self.socks[i]
        recv = s.recv_into
        hb, pb = self.hbuf, self.pbuf
        again = zmq.Again
        noblock = zmq.NOBLOCK
        n = 0
        bounded = False
        mode = st.mode
        try:
            if self.native:
                last = self.last_seq[i]
                gaps = 0
                lat = st.lat
                now_ns = time.monotonic_ns
                try:
                    while n < DRAIN_BOUND:
                        hn = recv(hb, flags=noblock)
                        if hn < 12 or hb[:3] != b"MSG":
                            st.replies += 1
                            while s.getsockopt(zmq.RCVMORE):
                                recv(pb)
                            continue
                        recv(pb)
                        seq = int.from_bytes(hb[3:11], "big")
                        if seq != last + 1:
                            gaps += seq - last - 1
                        last = seq
                        n += 1
                        if mode == LATENCY:
                            if len(lat) < MAX_LATENCY_SAMPLES:
                                lat.append(now_ns() - int.from_bytes(pb[5:13], "big"))
                        elif mode == WARMUP:
                            st.seen[i].add(bytes(hb[11:hn]))
                    bounded = True
                finally:
                    self.last_seq[i] = last
                    st.gaps += gaps
            elif mode == COUNT:
                while n < DRAIN_BOUND:
                    recv(hb, flags=noblock)
                    recv(pb)
                    n += 1
                bounded = True
            elif mode == LATENCY:
                lat = st.lat
                now_ns = time.monotonic_ns
                while n < DRAIN_BOUND:
                    recv(hb, flags=noblock)
                    recv(pb)
                    n += 1
                    if len(lat) < MAX_LATENCY_SAMPLES:
                        lat.append(now_ns() - int.from_bytes(pb[5:13], "big"))
                bounded = True
            else:
                seen = st.seen[i]
                while n < DRAIN_BOUND:
                    tn = recv(hb, flags=noblock)
                    recv(pb)
                    n += 1
                    seen.add(bytes(hb[:tn]))
                bounded = True
        except again:
            pass
        if n:
            st.counts[i] += n
            st.last_ns = time.monotonic_ns()
        return bounded

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


def _resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _RedisReceivers:
    """One TCP connection per subscriber, ``SUBSCRIBE``d to its channels;
    replies parsed by hiredis (the C parser redis-py uses when present)."""

    def __init__(self, host: str, port: int, subs: Sequence[Sequence[bytes]]) -> None:
        import hiredis

        self.socks: List[socket.socket] = []
        self.readers = []
        for held in subs:
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(_resp(b"SUBSCRIBE", *held))
            self.socks.append(s)
            self.readers.append(hiredis.Reader())
        for s, r, held in zip(self.socks, self.readers, subs):
            confirmed = 0
            while confirmed < len(held):
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("redis closed a subscriber during SUBSCRIBE")
                r.feed(data)
                while True:
                    m = r.gets()
                    if m is False:
                        break
                    if m[0] != b"subscribe":
                        raise RuntimeError(f"unexpected reply to SUBSCRIBE: {m!r}")
                    confirmed += 1
            s.setblocking(False)
        self.dead = [False] * len(self.socks)

    def fds(self) -> List[int]:
        return [s.fileno() for s in self.socks]

    def drain(self, i: int, st: _Stats) -> bool:
        if self.dead[i]:
            return False
        s = self.socks[i]
        r = self.readers[i]
        mode = st.mode
        n = 0
        lat = st.lat
        now_ns = time.monotonic_ns
        for _ in range(16):
            try:
                data = s.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                # Redis closes a subscriber past its output buffer limit.
                self.dead[i] = True
                st.closed += 1
                break
            r.feed(data)
            short = len(data) < RECV_SIZE
            while True:
                m = r.gets()
                if m is False:
                    break
                if m[0] != b"message":
                    st.replies += 1
                    continue
                n += 1
                if mode == LATENCY:
                    if len(lat) < MAX_LATENCY_SAMPLES:
                        lat.append(now_ns() - int.from_bytes(m[2][5:13], "big"))
                elif mode == WARMUP:
                    st.seen[i].add(m[1])
            if short:
                # The kernel had no more: epoll (level-triggered) says when
                # there is, without a failing recv() per wake-up.
                break
        if n:
            st.counts[i] += n
            st.last_ns = time.monotonic_ns()
        return False

    def close(self) -> None:
        for s in self.socks:
            s.close()


def receiver_main(
    conn,
    system: Tuple[str, str],
    subs: Sequence[Sequence[bytes]],
) -> None:
    """One receiver process holding ``len(subs)`` subscriber sockets."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kind, where = system
    try:
        if kind == "redis":
            host, port = where.rsplit(":", 1)
            rx = _RedisReceivers(host, int(port), subs)
        else:
            rx = _ZmqReceivers(where, subs, native=(kind == "native"))
    except Exception as e:
        conn.send(("error", repr(e)))
        return
    nsock = len(subs)
    st = _Stats(nsock)
    wanted = [set(h) for h in subs]
    ep = select.epoll()
    by_fd: Dict[int, int] = {}
    for i, fd in enumerate(rx.fds()):
        by_fd[fd] = i
        ep.register(fd, select.EPOLLIN)
    cfd = conn.fileno()
    ep.register(cfd, select.EPOLLIN)
    conn.send(("ready", nsock))
    pending: set = set()
    next_sweep = time.monotonic() + SWEEP_S
    cpu0 = cpu_seconds()
    try:
        while True:
            events = ep.poll(0 if pending else 0.05)
            ready = [by_fd[fd] for fd, _ in events if fd != cfd]
            ready.extend(pending)
            pending = set()
            for i in ready:
                if rx.drain(i, st):
                    pending.add(i)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_S
                before = sum(st.counts)
                for i in range(nsock):
                    if rx.drain(i, st):
                        pending.add(i)
                # An upper bound on missed wake-ups (what arrived since the
                # epoll_wait above also counts).
                st.swept += sum(st.counts) - before
            if not conn.poll():
                continue
            cmd = conn.recv()
            op = cmd[0]
            if op == "quit":
                break
            if op == "mode":
                st.reset(cmd[1])
                cpu0 = cpu_seconds()
                conn.send("ok")
            elif op == "stats":
                complete = sum(1 for i in range(nsock) if wanted[i] <= st.seen[i])
                conn.send(
                    {
                        "received": sum(st.counts),
                        "min_per_socket": min(st.counts) if st.counts else 0,
                        "last_ns": st.last_ns,
                        "gaps": st.gaps,
                        "replies": st.replies,
                        "closed": st.closed,
                        "swept": st.swept,
                        "complete": complete,
                        "cpu_s": cpu_seconds() - cpu0,
                    }
                )
            elif op == "latency":
                conn.send_bytes(st.lat.tobytes())
    finally:
        ep.close()
        rx.close()
