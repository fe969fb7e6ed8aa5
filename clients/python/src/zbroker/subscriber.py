"""The subscriber: a DEALER socket to the broker's subscriber endpoint that
keeps itself subscribed across broker restarts and failovers."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Deque, Dict, List, Optional, Tuple, Type, Union

import zmq

from . import _protocol
from ._sockets import CurveKeys, Endpoints, close_quietly, endpoint_list, millis, monitored
from ._sockets import read_events as _read_events
from .errors import BrokerError, ClosedError, Error, Timeout

log = logging.getLogger("zbroker")

# Reads per wakeup, so pings and timers keep running under a flood.
_READ_BATCH = 256
# libzmq's "no heartbeat timeout" (a day): see `_open`.
_NO_HEARTBEAT_TIMEOUT_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Message:
    """A message routed to this subscriber."""

    #: The topic it was published on.
    topic: bytes
    #: The payload, as published.
    payload: bytes
    #: The broker's sequence number for this subscriber; restarts at 1 on
    #: every new connection (so after each :class:`Resync`).
    seq: int
    #: Messages routed to this subscriber were lost just before this one (the
    #: broker dropped them, e.g. because this client read too slowly): ``seq``
    #: jumped.
    gap: bool


class ResyncReason(str, enum.Enum):
    """Why the subscriber re-subscribed."""

    #: The connection to the broker broke (e.g. the broker restarted) and a
    #: new one was made, to the same endpoint or, failing that, the next.
    RECONNECTED = "reconnected"
    #: The broker went silent (no PONG, no message): the subscriber opened a
    #: new connection to the next endpoint.
    BROKER_SILENT = "broker-silent"
    #: This client did not call into the subscriber for longer than the
    #: broker's ``--sub-timeout``, so the broker may have forgotten it.
    STALLED = "stalled"
    #: The broker said it dropped this subscriber's state (``expired:`` or
    #: ``cut-off:``); ``Resync.detail`` has its text.
    BROKER_FORGOT = "broker-forgot"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Resync:
    """Every filter is subscribed again after the broker lost them: messages
    may have been missed, so re-read any state built from them. Every message
    published after this event matches as before; messages received after it
    come from the new connection (``seq`` counts from 1 again)."""

    reason: ResyncReason
    #: The broker's notice for ``BROKER_FORGOT``, else empty.
    detail: str = ""


Event = Union[Message, Resync]

_Filter = Tuple[str, bytes]


class _Call:
    """A user's SUB or UNSUB waiting for its answer."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: Optional[Error] = None


class _InFlight:
    """A command sent on the current connection and not yet answered."""

    __slots__ = ("abandoned", "call", "filter", "resync", "verb")

    def __init__(
        self, verb: bytes, filter: _Filter, call: Optional[_Call] = None, resync: bool = False
    ) -> None:
        self.verb = verb
        self.filter = filter
        # The user's call waiting for the answer (None for pings and resync).
        self.call = call
        self.resync = resync
        # Nobody waits any more (timed out, or a resync was resent), but the
        # answer still comes, in order, and must be consumed.
        self.abandoned = False


class Subscriber:
    """Receives messages from a broker's subscriber endpoint over DEALER.

    ``endpoints`` is the broker's subscriber endpoint (e.g.
    ``"tcp://127.0.0.1:5571"``) or a list of them: the subscriber uses one at
    a time and moves on to the next (round robin) when a connection cannot be
    made within ``connect_timeout`` or the broker goes silent. The broker
    need not be up yet.

    It sends ``PING`` every ``heartbeat`` seconds and watches the connection.
    When the broker restarts, goes silent, or says it forgot this
    subscriber, the subscriber opens a new connection, subscribes every
    filter it held again, and then :meth:`recv` returns a :class:`Resync`.

    Single-threaded and not thread-safe: it does all this inside
    :meth:`recv`, :meth:`subscribe` and :meth:`unsubscribe`, so call
    ``recv`` at least every ``heartbeat`` seconds (if it cannot, it
    re-subscribes and says so with ``Resync(STALLED)``).

    Options, all in seconds: ``heartbeat`` between PINGs (well under the
    broker's ``--sub-timeout``); ``broker_timeout``, the silence after which
    the broker is taken for gone; ``broker_sub_timeout``, the broker's
    ``--sub-timeout``; ``confirm_timeout``, how long ``subscribe`` and
    ``unsubscribe`` wait for the broker; ``connect_timeout``, how long to try
    one endpoint before the next. ``hwm`` is how many messages libzmq buffers
    here before the broker queues them.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        heartbeat: float = 2.0,
        broker_timeout: float = 7.0,
        broker_sub_timeout: float = 10.0,
        confirm_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        hwm: int = 1000,
        curve: Optional[CurveKeys] = None,
        context: Optional[zmq.Context[zmq.Socket[bytes]]] = None,
    ) -> None:
        self._endpoints: List[str] = endpoint_list(endpoints)
        if not 0 < heartbeat < min(broker_timeout, broker_sub_timeout):
            raise ValueError("need 0 < heartbeat < broker_timeout and broker_sub_timeout")
        if confirm_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("confirm_timeout and connect_timeout must be positive")
        self._heartbeat = heartbeat
        self._broker_timeout = broker_timeout
        self._broker_sub_timeout = broker_sub_timeout
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._hwm = hwm
        self._curve = curve
        self._own_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if context is None else context
        )
        # The filters held, in the order they were subscribed (a dict as an
        # ordered set).
        self._filters: Dict[_Filter, None] = {}
        self._in_flight: Deque[_InFlight] = deque()
        # The user's commands waiting for a connection to be sent on.
        self._unsent: List[_InFlight] = []
        self._inbox: Deque[Event] = deque()
        # Messages from a new connection, held until its Resync is reported.
        self._held: List[Message] = []
        self._last_seq = 0
        now = time.monotonic()
        self._last_ping = now
        self._last_heard = now
        self._last_tick = now
        self._opened_at = now
        # A resync is needed or under way; reported when the broker confirmed
        # every filter again.
        self._resync: Optional[Resync] = None
        self._resync_sent: Optional[float] = None
        # Not every resync SUB fitted in the send queue.
        self._resync_partial = False
        # The current socket completed a handshake with a broker.
        self._connected = False
        self._index = 0
        self._socket: Optional[zmq.Socket[bytes]] = None
        self._monitor: Optional[zmq.Socket[bytes]] = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ public API

    @property
    def endpoint(self) -> str:
        """The endpoint this subscriber currently uses."""
        return self._endpoints[self._index]

    @property
    def filters(self) -> List[Tuple[str, bytes]]:
        """The ``(kind, filter)`` pairs held (and subscribed again after a
        resync), in the order they were subscribed."""
        return list(self._filters)

    def subscribe(self, kind: str, filter: bytes) -> None:
        """Subscribes to ``filter`` of ``kind`` (``"exact"``, ``"prefix"`` or
        ``"pattern"``) and returns once the broker confirmed: every message
        published after this returns and matching the filter reaches this
        subscriber.

        Raises :class:`zbroker.BrokerError` if the broker refused (its
        ``code`` tells why), :class:`zbroker.Timeout` if no answer came within
        ``confirm_timeout`` (the filter may then be in effect or not).
        """
        self._command(_protocol.SUB, _check_filter(kind, filter))

    def unsubscribe(self, kind: str, filter: bytes) -> None:
        """Unsubscribes from ``filter`` of ``kind``; returns once the broker
        confirmed. Raises :class:`zbroker.BrokerError` with code
        ``not-subscribed`` if this subscriber did not hold it."""
        self._command(_protocol.UNSUB, _check_filter(kind, filter))

    def recv(self, timeout: Optional[float] = None) -> Optional[Event]:
        """Waits up to ``timeout`` seconds (``None``: without limit) for the
        next :class:`Message` or :class:`Resync`; ``None`` if none came."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        waited = False
        while True:
            self._maintain()
            if self._inbox:
                return self._inbox.popleft()
            now = time.monotonic()
            if waited and deadline is not None and now >= deadline:
                return None
            until = self._next_duty(now)
            if deadline is not None:
                until = min(until, deadline)
            # At least once, even with timeout=0: what already arrived counts.
            self._wait(until, greedy=False)
            waited = True

    def close(self) -> None:
        """Closes the connection (the broker forgets this subscriber).
        Idempotent."""
        close_quietly(self._monitor, self._socket)
        self._socket = None
        self._monitor = None
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    # ------------------------------------------------------------ commands

    def _check_open(self) -> None:
        if self._socket is None:
            raise ClosedError("the subscriber is closed")

    def _command(self, verb: bytes, flt: _Filter) -> None:
        self._check_open()
        self._maintain()
        call = _Call()
        entry = _InFlight(verb, flt, call=call)
        if self._connected:
            if not self._send(entry):
                raise Timeout("the broker is not reading commands (the send queue is full)")
        else:
            self._unsent.append(entry)
        deadline = time.monotonic() + self._confirm_timeout
        while not call.done:
            now = time.monotonic()
            if now >= deadline:
                entry.abandoned = True
                entry.call = None
                if entry in self._unsent:
                    self._unsent.remove(entry)
                state = "" if self._connected else f" (no connection to {self.endpoint})"
                raise Timeout(
                    f"no answer from the broker within {self._confirm_timeout} s{state}; "
                    "is it running at that endpoint?"
                )
            self._wait(min(deadline, self._next_duty(now)), greedy=True)
            self._maintain()
        if call.error is not None:
            raise call.error

    def _send(self, entry: _InFlight) -> bool:
        """Sends a command without blocking; False if it did not fit (the
        broker is not reading: the silence check will reconnect)."""
        assert self._socket is not None
        kind, flt = entry.filter
        try:
            self._socket.send_multipart(_protocol.command(entry.verb, kind, flt), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._in_flight.append(entry)
        return True

    def _send_resync(self, now: float) -> None:
        """Subscribes every filter again on the current connection."""
        for entry in self._in_flight:
            if entry.resync:
                entry.abandoned = True
        self._resync_partial = False
        for flt in self._filters:
            if not self._send(_InFlight(_protocol.SUB, flt, resync=True)):
                # Tried again after confirm_timeout, unless the silence check
                # reconnects first.
                self._resync_partial = True
                break
        self._resync_sent = now

    def _settle(self, entry: _InFlight, error: Optional[Error]) -> None:
        """Records the broker's answer to one of the user's commands."""
        if error is None or (
            isinstance(error, BrokerError)
            and error.code == "not-subscribed"
            and entry.verb == _protocol.UNSUB
        ):
            if entry.verb == _protocol.SUB:
                self._filters[entry.filter] = None
            else:
                self._filters.pop(entry.filter, None)
        if entry.call is not None:
            entry.call.done = True
            entry.call.error = error
            entry.call = None

    # ------------------------------------------------------------ upkeep

    def _next_duty(self, now: float) -> float:
        """The next time `_maintain` has something to do."""
        if not self._connected:
            # The monitor wakes the wait as soon as the handshake is done.
            nxt = now + self._heartbeat
            if len(self._endpoints) > 1:
                nxt = min(nxt, self._opened_at + self._connect_timeout)
            return max(now, nxt)
        nxt = min(self._last_ping + self._heartbeat, self._last_heard + self._broker_timeout)
        if self._resync_sent is not None:
            nxt = min(nxt, self._resync_sent + self._confirm_timeout)
        elif self._resync is not None:
            nxt = now
        return nxt

    def _request_resync(self, reason: ResyncReason, detail: str = "") -> None:
        """Something lost the broker's copy of our filters."""
        self._last_seq = 0
        self._resync_sent = None
        for entry in self._in_flight:
            if entry.resync:
                entry.abandoned = True
        if not self._filters and self._resync is None:
            return  # nothing was lost
        log.debug("zbroker: resync needed: %s %s", reason.value, detail)
        if self._resync is None:
            self._resync = Resync(reason, detail)

    def _maintain(self) -> None:
        """Reads the monitor, pings, notices a stalled client, a lost
        connection or a silent broker, fails over, and drives a resync to
        completion."""
        assert self._monitor is not None
        now = time.monotonic()
        since_tick = now - self._last_tick
        self._last_tick = now
        # Anything heard on this socket proves its handshake, even before the
        # monitor's event for it has been read (under load, it can come later).
        handshaken = self._connected or self._last_heard > self._opened_at
        if (
            handshaken
            and self._filters
            and (since_tick >= self._broker_sub_timeout - self._heartbeat)
        ):
            # The broker may have forgotten us, or closed the connection:
            # never write on a connection that may be dead while its input is
            # stalled (see `_open`), start afresh.
            self._drain()
            self._request_resync(ResyncReason.STALLED)
            self._reopen(self._index)
        elif since_tick >= self._heartbeat * 2:
            # This thread was not listening, so the broker's silence over that
            # time means nothing.
            self._last_heard = now

        for event, _ in _read_events(self._monitor):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._on_connected()
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                # The broker restarted or the connection broke. libzmq would
                # reconnect this socket by itself, and the new broker would
                # answer PINGs while holding none of our filters: open a new
                # connection and subscribe again. Messages already received
                # on this one come first.
                self._drain()
                self._request_resync(ResyncReason.RECONNECTED)
                self._reopen(self._index)
                # The new socket's events are read on the next round.
                break

        now = time.monotonic()
        if not self._connected:
            if len(self._endpoints) > 1 and now - self._opened_at >= self._connect_timeout:
                log.debug("zbroker: no connection to %s, trying the next endpoint", self.endpoint)
                self._reopen((self._index + 1) % len(self._endpoints))
            return

        if now - self._last_ping >= self._heartbeat:
            assert self._socket is not None
            try:
                # A full pipe means the broker is not reading; the silence
                # check handles that, so a PING that does not fit is no error.
                self._socket.send(_protocol.PING, zmq.NOBLOCK)
            except zmq.Again:
                pass
            else:
                self._in_flight.append(_InFlight(_protocol.PING, ("", b"")))
            self._last_ping = now

        if now - self._last_heard >= self._broker_timeout:
            log.debug("zbroker: %s silent for %.1f s", self.endpoint, now - self._last_heard)
            self._request_resync(ResyncReason.BROKER_SILENT)
            self._reopen((self._index + 1) % len(self._endpoints))
            return

        if self._resync is None:
            return
        if self._resync_sent is None or now - self._resync_sent >= self._confirm_timeout:
            self._send_resync(now)
        if not self._resync_partial and not any(
            e.resync and not e.abandoned for e in self._in_flight
        ):
            self._inbox.append(self._resync)
            self._inbox.extend(self._held)
            self._held.clear()
            self._resync = None
            self._resync_sent = None

    def _on_connected(self) -> None:
        if self._connected:
            return
        self._connected = True
        now = time.monotonic()
        self._last_heard = now
        self._last_ping = now
        log.debug("zbroker: connected to %s", self.endpoint)
        # The resync (in `_maintain`) goes first, then the user's commands.
        if self._resync is not None and self._resync_sent is None:
            self._send_resync(now)
        unsent, self._unsent = self._unsent, []
        for entry in unsent:
            if not self._send(entry):
                self._settle(entry, Timeout("the broker is not reading commands"))

    # ------------------------------------------------------------ sockets

    def _open(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        try:
            socket.rcvhwm = self._hwm
            socket.linger = 0
            # ZMTP heartbeats tell the broker we are alive even while this
            # thread is busy, but this side never times out on them: libzmq
            # 4.3 aborts (`Assertion failed: _input_stopped`,
            # zeromq/libzmq#3937) when a connecting socket's engine dies while
            # backpressure has stopped its input. Broker silence is judged by
            # PING/PONG instead, and recovery always opens a fresh socket.
            socket.heartbeat_ivl = millis(self._heartbeat)
            socket.heartbeat_timeout = _NO_HEARTBEAT_TIMEOUT_MS
            # Reconnect quickly after a broker restart.
            socket.reconnect_ivl = 100
            socket.reconnect_ivl_max = 1000
            if self._curve is not None:
                self._curve.apply(socket)
            monitor = monitored(self._context, socket)
            socket.connect(self.endpoint)
        except BaseException:
            socket.close(linger=0)
            raise
        self._socket, self._monitor = socket, monitor
        self._connected = False
        self._opened_at = time.monotonic()

    def _reopen(self, index: int) -> None:
        """Replaces the connection with a new one to ``endpoints[index]`` (a
        new subscriber at the broker, holding no filters). The user's
        unanswered commands are sent again on it."""
        close_quietly(self._monitor, self._socket)
        self._socket = self._monitor = None
        self._index = index
        self._last_seq = 0
        user: List[_InFlight] = []
        for entry in self._in_flight:
            if entry.call is None:
                continue  # pings, resyncs and abandoned commands
            if entry.verb == _protocol.UNSUB:
                # The new connection holds no filters: done.
                self._settle(entry, None)
            else:
                user.append(entry)
        self._in_flight.clear()
        self._unsent[:0] = user
        self._open()

    def _drain(self) -> None:
        """Handles what the current socket has already received."""
        assert self._socket is not None
        for _ in range(self._hwm + _READ_BATCH):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _wait(self, until: float, greedy: bool) -> None:
        """Waits until ``until`` for input, then handles what arrived. Unless
        ``greedy``, stops reading once an event is ready, so that a slow
        reader leaves messages in libzmq's queue (and the broker's) instead
        of here."""
        socket, monitor = self._socket, self._monitor
        assert socket is not None
        assert monitor is not None
        timeout_ms = max(0, int((until - time.monotonic()) * 1000 + 0.999))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        # Monitor events are handled by `_maintain`, which the callers run
        # next: data first keeps the old connection's messages ahead of a
        # resync.
        ready = dict(poller.poll(timeout_ms))
        if ready.get(socket):
            if not self._connected:
                self._on_connected()
            for _ in range(_READ_BATCH):
                if not greedy and self._inbox:
                    break
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(frames)

    # ------------------------------------------------------------ replies

    def _handle(self, frames: List[bytes]) -> None:
        self._last_heard = time.monotonic()
        reply = _protocol.parse(frames)
        if isinstance(reply, _protocol.Delivery):
            gap = reply.seq != self._last_seq + 1
            self._last_seq = reply.seq
            message = Message(reply.topic, reply.payload, reply.seq, gap)
            if self._resync is not None:
                self._held.append(message)
            else:
                self._inbox.append(message)
        elif isinstance(reply, _protocol.Pong):
            for entry in self._in_flight:
                if entry.verb == _protocol.PING:
                    self._in_flight.remove(entry)
                    break
        elif isinstance(reply, _protocol.Ok):
            self._on_ok(reply)
        elif isinstance(reply, _protocol.Err):
            self._on_err(reply)
        else:
            log.warning(
                "zbroker: ignored a message that is not protocol v1 (%d parts)", len(frames)
            )

    def _on_ok(self, reply: _protocol.Ok) -> None:
        flt = (reply.kind.decode("ascii", "replace"), reply.filter)
        for entry in self._in_flight:
            if entry.verb == reply.verb and entry.filter == flt:
                self._in_flight.remove(entry)
                if entry.call is not None or (entry.abandoned and not entry.resync):
                    # A command given up on still took effect: keep the
                    # filters as the broker holds them.
                    self._settle(entry, None)
                return
        log.debug("zbroker: an OK for no command waiting: %r", reply)

    def _on_err(self, reply: _protocol.Err) -> None:
        text = reply.text.decode("utf-8", "replace")
        revoked = reply.revoked_filter()
        if revoked is not None or reply.is_revocation():
            # Not an answer: the broker's key lists were reloaded and took
            # this filter back; subscribing again would be refused.
            if revoked is not None:
                self._filters.pop(revoked, None)
            log.warning("zbroker: the broker revoked a filter: %s", text)
            return
        if reply.is_notice():
            log.info("zbroker: the broker dropped this subscriber: %s", text)
            self._request_resync(ResyncReason.BROKER_FORGOT, text)
            return
        # Replies come in command order: an ERR answers the oldest command.
        if not self._in_flight:
            log.warning("zbroker: broker error with no command waiting: %s", text)
            return
        entry = self._in_flight.popleft()
        code = reply.code.decode("ascii", "replace")
        if entry.resync and not entry.abandoned:
            log.warning(
                "zbroker: the broker refused filter %s:%r on resubscribe (%s): %s",
                entry.filter[0],
                entry.filter[1],
                code,
                text,
            )
        elif entry.call is not None:
            self._settle(entry, BrokerError(code, text))
        elif entry.verb == _protocol.PING:
            log.warning("zbroker: the broker refused a PING (%s): %s", code, text)


def _check_filter(kind: str, filter: bytes) -> _Filter:
    if kind not in _protocol.KINDS:
        raise ValueError(f"kind must be one of {', '.join(_protocol.KINDS)}, not {kind!r}")
    if not isinstance(filter, bytes):
        raise TypeError(f"a filter is bytes, not {type(filter).__name__}")
    return (kind, filter)
