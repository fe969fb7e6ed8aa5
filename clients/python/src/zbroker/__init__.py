"""Python client for zbroker, a ZeroMQ pub/sub broker with server-side topic
filtering (protocol v1, docs/PROTOCOL.md).

>>> import zbroker
>>> with zbroker.Subscriber(["tcp://127.0.0.1:5571"]) as sub:  # doctest: +SKIP
...     sub.subscribe("pattern", b"net.*.port")  # returns once confirmed
...     with zbroker.Publisher(["tcp://127.0.0.1:5570"]) as pub:
...         pub.publish(b"net.a.port", b"up")
...     event = sub.recv(timeout=1.0)
...     if isinstance(event, zbroker.Message):
...         print(event.topic, event.payload, event.seq, event.gap)
...     elif isinstance(event, zbroker.Resync):
...         print("re-read state:", event.reason)

Needs only pyzmq.
"""

from __future__ import annotations

from ._sockets import CurveKeys
from .errors import BrokerError, ClosedError, Error, Timeout
from .publisher import Publisher
from .subscriber import Event, Message, Resync, ResyncReason, Subscriber

__version__ = "0.1.0"

#: The protocol version this client speaks.
PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION",
    "BrokerError",
    "ClosedError",
    "CurveKeys",
    "Error",
    "Event",
    "Message",
    "Publisher",
    "Resync",
    "ResyncReason",
    "Subscriber",
    "Timeout",
    "__version__",
]
