"""Protocol v1 frames (docs/PROTOCOL.md): pure functions, no sockets."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

SUB = b"SUB"
UNSUB = b"UNSUB"
PING = b"PING"
PONG = b"PONG"
OK = b"OK"
ERR = b"ERR"
MSG = b"MSG"

#: The filter kinds protocol v1 defines.
KINDS = ("exact", "prefix", "pattern")

#: Text prefixes of the broker's unsolicited ``[ERR, limit, ...]`` notices:
#: the broker dropped this subscriber's filters.
NOTICE_PREFIXES = (b"expired:", b"cut-off:")
REVOKED_PREFIX = b"revoked: "

_HEADER_MIN = 12
_SEQ = struct.Struct(">Q")


@dataclass(frozen=True)
class Delivery:
    """``[MSG|seq|topic, payload]``."""

    seq: int
    topic: bytes
    payload: bytes


@dataclass(frozen=True)
class Pong:
    """``[PONG]``."""


@dataclass(frozen=True)
class Ok:
    """``[OK, verb, kind, filter]``."""

    verb: bytes
    kind: bytes
    filter: bytes


@dataclass(frozen=True)
class Err:
    """``[ERR, code, text]``."""

    code: bytes
    text: bytes

    def is_notice(self) -> bool:
        """An unsolicited notice (the broker forgot this subscriber), not an
        answer to a command."""
        return self.code == b"limit" and self.text.startswith(NOTICE_PREFIXES)

    def is_revocation(self) -> bool:
        """The broker's key lists were reloaded and took a filter back
        (``[ERR, unauthorized, "revoked: KIND:FILTER ..."]``): a notice,
        not an answer."""
        return self.code == b"unauthorized" and self.text.startswith(REVOKED_PREFIX)

    def revoked_filter(self) -> Optional[Tuple[str, bytes]]:
        """The ``(kind, filter)`` a revocation names, if it reads as one."""
        if not self.is_revocation():
            return None
        rest = self.text[len(REVOKED_PREFIX) :]
        end = rest.rfind(b" is no longer allowed")
        if end < 0:
            return None
        kind, sep, flt = rest[:end].partition(b":")
        if not sep or kind not in (b"exact", b"prefix", b"pattern"):
            return None
        return kind.decode("ascii"), flt


Reply = Union[Delivery, Pong, Ok, Err]


def command(verb: bytes, kind: str, filter: bytes) -> List[bytes]:
    """The frames of a ``SUB``/``UNSUB`` command."""
    return [verb, kind.encode("ascii"), filter]


def header(seq: int, topic: bytes) -> bytes:
    """A delivery header (the broker writes these; here for tests)."""
    return MSG + _SEQ.pack(seq) + topic


def parse(frames: Sequence[bytes]) -> Optional[Reply]:
    """Parses what the broker sent a subscriber; ``None`` if it is not v1."""
    n = len(frames)
    if n == 2 and len(frames[0]) >= _HEADER_MIN and frames[0][:3] == MSG:
        head = frames[0]
        (seq,) = _SEQ.unpack_from(head, 3)
        return Delivery(seq=seq, topic=bytes(head[11:]), payload=bytes(frames[1]))
    if n == 1 and frames[0] == PONG:
        return Pong()
    if n == 4 and frames[0] == OK and frames[1] in (SUB, UNSUB):
        return Ok(verb=bytes(frames[1]), kind=bytes(frames[2]), filter=bytes(frames[3]))
    if n == 3 and frames[0] == ERR:
        return Err(code=bytes(frames[1]), text=bytes(frames[2]))
    return None


def monitor_event(frames: Sequence[bytes]) -> Optional[Tuple[int, int]]:
    """``(event, value)`` from a libzmq socket monitor message."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return None
    event, value = struct.unpack("=HI", frames[0])
    return event, value
