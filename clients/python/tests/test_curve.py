"""CURVE: keys from `zbroker keygen`, per-key topic ACLs."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Tuple

import pytest

import zbroker

from conftest import BrokerFactory, Clients
from harness import WAIT, Broker, connect_probe


def _keygen(binary: Path, path: Path) -> str:
    subprocess.run(
        [str(binary), "keygen", str(path)],
        check=True,
        capture_output=True,
        timeout=WAIT,
    )
    return (path.parent / (path.name + ".pub")).read_text().strip()


def _curve_broker(
    make_broker: BrokerFactory, broker_bin: Path, tmp_path: Path, sub_acl: str
) -> Tuple[Broker, str]:
    """A CURVE broker whose key lists admit ``pub.key`` to every topic and
    ``sub.key`` to ``sub_acl``; returns it and the subscriber's public key."""
    _keygen(broker_bin, tmp_path / "broker.key")
    sub_public = _keygen(broker_bin, tmp_path / "sub.key")
    pub_public = _keygen(broker_bin, tmp_path / "pub.key")
    (tmp_path / "subscribers.keys").write_text(f"{sub_public}  {sub_acl}\n")
    (tmp_path / "publishers.keys").write_text(f"{pub_public}  prefix:\n")
    broker = make_broker(
        "--curve-secret-key",
        str(tmp_path / "broker.key"),
        "--publisher-keys",
        str(tmp_path / "publishers.keys"),
        "--subscriber-keys",
        str(tmp_path / "subscribers.keys"),
    )
    return broker, sub_public


def test_curve_keys_and_acl(
    make_broker: BrokerFactory, clients: Clients, broker_bin: Path, tmp_path: Path
) -> None:
    broker, sub_public = _curve_broker(make_broker, broker_bin, tmp_path, "prefix:net.")
    server = tmp_path / "broker.key.pub"
    sub_keys = zbroker.CurveKeys.from_files(server, tmp_path / "sub.key")
    assert sub_keys.public == sub_public
    assert sub_keys.secret not in repr(sub_keys)
    sub = clients.subscriber(broker.sub_endpoint, curve=sub_keys)
    sub.subscribe("pattern", b"net.*.port")
    with pytest.raises(zbroker.BrokerError) as info:
        sub.subscribe("prefix", b"other.")
    assert info.value.code == "unauthorized"

    pub = clients.publisher(
        broker.pub_endpoint, curve=zbroker.CurveKeys.from_files(server, tmp_path / "pub.key")
    )
    _, message = connect_probe(pub, sub, b"net.a.port")
    assert message.topic == b"net.a.port"

    # A client whose key is not listed gets nowhere.
    stranger = zbroker.CurveKeys.from_files(server, tmp_path / "pub.key")
    refused = clients.subscriber(broker.sub_endpoint, curve=stranger, confirm_timeout=0.5)
    with pytest.raises(zbroker.Timeout):
        refused.subscribe("prefix", b"net.")


def test_a_filter_revoked_by_a_key_list_reload_is_dropped(
    make_broker: BrokerFactory, clients: Clients, broker_bin: Path, tmp_path: Path
) -> None:
    broker, sub_public = _curve_broker(make_broker, broker_bin, tmp_path, "prefix:net. prefix:log.")
    subscribers = tmp_path / "subscribers.keys"
    server = tmp_path / "broker.key.pub"
    sub = clients.subscriber(
        broker.sub_endpoint, curve=zbroker.CurveKeys.from_files(server, tmp_path / "sub.key")
    )
    sub.subscribe("prefix", b"net.")
    sub.subscribe("prefix", b"log.")
    pub = clients.publisher(
        broker.pub_endpoint, curve=zbroker.CurveKeys.from_files(server, tmp_path / "pub.key")
    )

    # The key may keep net. only; the broker tells the subscriber, which
    # stops holding log. (so it would not subscribe to it again).
    subscribers.write_text(f"{sub_public}  prefix:net.\n")
    broker.signal(signal.SIGHUP)
    broker.wait_for_log("key lists reloaded")
    _, message = connect_probe(pub, sub, b"net.after")
    assert message.topic == b"net.after"
    assert sub.filters == [("prefix", b"net.")]
    assert not message.gap
