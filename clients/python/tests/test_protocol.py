"""Protocol v1 frame parsing, without a broker."""

from __future__ import annotations

from zbroker import _protocol as p


def test_parse_delivery() -> None:
    header = p.header(2**64 - 1, b"t")
    assert header == b"MSG" + b"\xff" * 8 + b"t"
    assert p.parse([header, b""]) == p.Delivery(seq=2**64 - 1, topic=b"t", payload=b"")
    # Too short to be a header (a topic is at least one byte), or not two parts.
    assert p.parse([b"MSG" + b"\x00" * 8, b"x"]) is None
    assert p.parse([header]) is None
    assert p.parse([header, b"", b""]) is None


def test_parse_replies() -> None:
    assert p.parse([b"PONG"]) == p.Pong()
    assert p.parse([b"OK", b"SUB", b"exact", b"a"]) == p.Ok(b"SUB", b"exact", b"a")
    assert p.parse([b"OK", b"FROB", b"exact", b"a"]) is None
    err = p.parse([b"ERR", b"bad-filter", b"too long"])
    assert err == p.Err(b"bad-filter", b"too long")
    assert isinstance(err, p.Err)
    assert not err.is_notice()
    assert p.Err(b"limit", b"expired: no command for 10000 ms").is_notice()
    assert p.Err(b"limit", b"cut-off: slow consumer").is_notice()
    assert not p.Err(b"limit", b"too many filters").is_notice()
    assert p.parse([b"PING"]) is None
    assert p.parse([]) is None


def test_command_frames() -> None:
    assert p.command(p.SUB, "pattern", b"a.*") == [b"SUB", b"pattern", b"a.*"]


def test_monitor_event() -> None:
    import struct

    assert p.monitor_event([struct.pack("=HI", 512, 7), b"tcp://x"]) == (512, 7)
    assert p.monitor_event([b"short", b""]) is None
