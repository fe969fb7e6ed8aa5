"""The publisher: a PUSH socket to the broker's publisher endpoint."""

from __future__ import annotations

import time
from types import TracebackType
from typing import List, Optional, Type

import zmq

from ._sockets import CurveKeys, Endpoints, close_quietly, endpoint_list, millis, monitored
from ._sockets import read_events as _read_events
from .errors import ClosedError, Timeout


class Publisher:
    """Publishes ``[topic, payload]`` messages to a broker over PUSH.

    ``endpoints`` is the broker's publisher endpoint (e.g.
    ``"tcp://127.0.0.1:5570"``) or a list of them, tried in turn.

    With one endpoint, messages published while the broker is down are queued
    (up to ``hwm``) and delivered once it is back; ``publish`` blocks up to
    ``send_timeout`` only when that queue is full. With several, a message is
    only queued on a live connection: while none is up, ``publish`` waits up
    to ``send_timeout`` and moves on to the next endpoint after
    ``connect_timeout`` without a connection, so no message is stranded on a
    broker that is gone.

    ``publish`` returning means libzmq holds the message for the broker; it
    reaches the broker unless this process exits, or the publisher is closed
    and ``linger`` passes, before the broker can take it (or the broker dies
    first). Not thread-safe: use one publisher per thread.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        send_timeout: Optional[float] = 5.0,
        linger: float = 5.0,
        hwm: int = 1000,
        connect_timeout: float = 2.0,
        curve: Optional[CurveKeys] = None,
        context: Optional[zmq.Context[zmq.Socket[bytes]]] = None,
    ) -> None:
        self._endpoints: List[str] = endpoint_list(endpoints)
        self._send_timeout = send_timeout
        self._linger = linger
        self._hwm = hwm
        self._connect_timeout = connect_timeout
        self._curve = curve
        self._own_context = context is None
        self._context: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if context is None else context
        )
        self._index = 0
        self._socket: Optional[zmq.Socket[bytes]] = None
        self._monitor: Optional[zmq.Socket[bytes]] = None
        self._connected = False
        self._since = time.monotonic()
        try:
            self._open()
        except BaseException:
            self.close(linger=0)
            raise

    @property
    def endpoint(self) -> str:
        """The endpoint this publisher currently uses."""
        return self._endpoints[self._index]

    def _open(self) -> None:
        socket = self._context.socket(zmq.PUSH)
        try:
            socket.sndhwm = self._hwm
            socket.linger = millis(self._linger)
            socket.heartbeat_ivl = 1000
            socket.heartbeat_timeout = 3000
            socket.reconnect_ivl = 100
            socket.reconnect_ivl_max = 1000
            if len(self._endpoints) > 1:
                # Queue only on live connections, so that failing over
                # strands nothing in the queue of a dead endpoint.
                socket.immediate = True
            if self._curve is not None:
                self._curve.apply(socket)
            monitor = monitored(self._context, socket)
            socket.connect(self.endpoint)
        except BaseException:
            socket.close(linger=0)
            raise
        self._socket, self._monitor = socket, monitor
        self._connected = False
        self._since = time.monotonic()

    def _maintain(self) -> None:
        assert self._monitor is not None
        for event, _ in _read_events(self._monitor):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                if self._connected:
                    self._since = time.monotonic()
                self._connected = False
        if (
            not self._connected
            and len(self._endpoints) > 1
            and time.monotonic() - self._since >= self._connect_timeout
        ):
            close_quietly(self._monitor, self._socket)
            self._index = (self._index + 1) % len(self._endpoints)
            self._open()

    def publish(self, topic: bytes, payload: bytes) -> None:
        """Queues ``[topic, payload]`` for the broker.

        Raises :class:`zbroker.Timeout` if it could not within
        ``send_timeout`` (the message was not sent), ``ValueError`` for an
        empty topic (the broker would drop it).
        """
        if self._socket is None:
            raise ClosedError("the publisher is closed")
        if not isinstance(topic, bytes) or not isinstance(payload, bytes):
            raise TypeError("topic and payload must be bytes")
        if not topic:
            raise ValueError("the topic must not be empty")
        deadline = None if self._send_timeout is None else time.monotonic() + self._send_timeout
        while True:
            self._maintain()
            socket = self._socket
            assert socket is not None
            assert self._monitor is not None
            try:
                # Both parts travel atomically: once the first is accepted,
                # the second cannot be refused.
                socket.send(topic, zmq.SNDMORE | zmq.NOBLOCK)
            except zmq.Again:
                pass
            else:
                socket.send(payload)
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Timeout(
                    f"could not queue a message for {self.endpoint} within "
                    f"{self._send_timeout} s; is the broker running?"
                )
            wake = deadline if deadline is not None else now + 3600.0
            if not self._connected and len(self._endpoints) > 1:
                wake = min(wake, self._since + self._connect_timeout)
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLOUT)
            poller.register(self._monitor, zmq.POLLIN)
            poller.poll(max(0, int((wake - now) * 1000)) + 1)

    def close(self, linger: Optional[float] = None) -> None:
        """Closes the socket, waiting up to ``linger`` seconds (default: the
        constructor's) to hand queued messages to the broker. Idempotent."""
        if self._socket is not None:
            wait = self._linger if linger is None else linger
            close_quietly(self._monitor)
            self._socket.close(linger=millis(wait))
            self._socket = None
            self._monitor = None
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
