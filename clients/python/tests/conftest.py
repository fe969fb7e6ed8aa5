"""Fixtures: the broker binary, brokers on free tcp ports and ipc paths, and
clients closed after each test."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, List, Sequence, Union

import pytest

import zbroker

from harness import Broker, HarnessError, broker_binary, free_tcp_endpoint

# The Dragonflow driver's tests need Dragonflow, which only the virtualenv of
# scripts/test-dragonflow has (scripts/test-python runs it after this suite).
collect_ignore_glob = [] if importlib.util.find_spec("dragonflow") else ["test_dragonflow*.py"]


@pytest.fixture(scope="session")
def broker_bin() -> Path:
    try:
        return broker_binary()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(params=["tcp", "ipc"])
def transport(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    # Short: an ipc path must fit in sockaddr_un (108 bytes).
    with tempfile.TemporaryDirectory(prefix="zbroker-py-") as d:
        yield Path(d)


class Endpoints:
    """Makes bind endpoints for one transport."""

    def __init__(self, transport: str, ipc_dir: Path) -> None:
        self.transport = transport
        self.ipc_dir = ipc_dir
        self._n = 0

    def bind(self) -> str:
        """An endpoint for a broker to bind (the system picks tcp ports)."""
        if self.transport == "tcp":
            return "tcp://127.0.0.1:*"
        self._n += 1
        return f"ipc://{self.ipc_dir}/{self._n}"

    def dead(self) -> str:
        """An endpoint nothing listens on."""
        if self.transport == "tcp":
            return free_tcp_endpoint()
        self._n += 1
        return f"ipc://{self.ipc_dir}/dead-{self._n}"


@pytest.fixture
def endpoints(transport: str, ipc_dir: Path) -> Endpoints:
    return Endpoints(transport, ipc_dir)


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(broker_bin: Path, endpoints: Endpoints) -> Iterator[BrokerFactory]:
    """``make_broker(*args)`` starts ``zbroker run`` with extra ``args``;
    every broker is stopped after the test (SIGTERM, then SIGKILL)."""
    brokers: List[Broker] = []

    def make(*args: str) -> Broker:
        broker = Broker(broker_bin, endpoints.bind(), endpoints.bind(), args)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


class Clients:
    """Makes publishers and subscribers, all closed after the test."""

    def __init__(self) -> None:
        self.made: List[Union[zbroker.Publisher, zbroker.Subscriber]] = []

    def subscriber(
        self, endpoints: Union[str, Sequence[str]], **options: Any
    ) -> zbroker.Subscriber:
        sub = zbroker.Subscriber(endpoints, **options)
        self.made.append(sub)
        return sub

    def publisher(self, endpoints: Union[str, Sequence[str]], **options: Any) -> zbroker.Publisher:
        pub = zbroker.Publisher(endpoints, **options)
        self.made.append(pub)
        return pub

    def close(self) -> None:
        for client in self.made:
            if isinstance(client, zbroker.Publisher):
                client.close(linger=0)
            else:
                client.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    made = Clients()
    yield made
    made.close()
