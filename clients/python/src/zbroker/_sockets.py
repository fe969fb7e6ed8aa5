"""Socket plumbing shared by the publisher and the subscriber: CURVE keys,
endpoint lists and a socket with a monitor."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import zmq

from . import _protocol

Endpoints = Union[str, Sequence[str]]

_MONITOR_IDS = itertools.count()


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE credentials, Z85 text (40 characters each): the
    broker's public key, and this client's own key pair, whose public key the
    broker must list."""

    server_public: str
    public: str
    secret: str = field(repr=False)

    @classmethod
    def from_files(
        cls, server_public: Union[str, os.PathLike[str]], own_secret: Union[str, os.PathLike[str]]
    ) -> CurveKeys:
        """Reads the broker's public key file and this client's secret key
        file, both as written by ``zbroker keygen``."""
        secret = _read_key(own_secret, "secret")
        public = zmq.curve_public(secret.encode("ascii")).decode("ascii")
        return cls(server_public=_read_key(server_public, "public"), public=public, secret=secret)

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        socket.curve_serverkey = self.server_public.encode("ascii")
        socket.curve_publickey = self.public.encode("ascii")
        socket.curve_secretkey = self.secret.encode("ascii")


_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


def _read_key(path: Union[str, os.PathLike[str]], what: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if len(line) == 40 and all(c in _Z85 for c in line):
                return line
    raise ValueError(f"{os.fspath(path)}: no Z85 {what} key; create one with `zbroker keygen`")


def endpoint_list(endpoints: Endpoints) -> List[str]:
    """A single endpoint or a non-empty sequence of them, as a list."""
    result = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not result:
        raise ValueError("at least one endpoint is needed")
    for endpoint in result:
        if not isinstance(endpoint, str):
            raise TypeError(f"an endpoint is a str such as 'tcp://host:5571', not {endpoint!r}")
    return result


def millis(seconds: Optional[float]) -> int:
    """Seconds as libzmq milliseconds; ``None`` is -1 (no limit)."""
    if seconds is None:
        return -1
    return max(0, min(int(seconds * 1000), 2**31 - 1))


WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


def monitored(
    context: zmq.Context[zmq.Socket[bytes]], socket: zmq.Socket[bytes]
) -> zmq.Socket[bytes]:
    """Starts monitoring ``socket`` for disconnects and completed handshakes;
    returns the PAIR socket the events arrive on. Call before connecting."""
    address = f"inproc://zbroker-monitor-{os.getpid()}-{next(_MONITOR_IDS)}"
    socket.monitor(address, WATCHED)
    pair = context.socket(zmq.PAIR)
    pair.linger = 0
    pair.connect(address)
    return pair


def read_events(monitor: zmq.Socket[bytes]) -> List[Tuple[int, int]]:
    """Every monitor event waiting, without blocking."""
    events: List[Tuple[int, int]] = []
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return events
        event = _protocol.monitor_event(frames)
        if event is not None:
            events.append(event)


def close_quietly(*sockets: Optional[zmq.Socket[bytes]]) -> None:
    for socket in sockets:
        if socket is not None and not socket.closed:
            socket.close(linger=0)
