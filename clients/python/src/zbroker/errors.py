"""Exceptions raised by the zbroker clients."""

from __future__ import annotations

import builtins


class Error(Exception):
    """Base class of every exception this package raises on purpose."""


class BrokerError(Error):
    """The broker refused a command with ``[ERR, code, text]``.

    ``code`` is one of protocol v1's codes: ``bad-command``, ``bad-filter``,
    ``not-subscribed``, ``limit`` or ``unauthorized``; ``text`` is the
    broker's explanation.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"broker refused ({code}): {text}")
        self.code = code
        self.text = text

    def __reduce__(self) -> tuple[type[BrokerError], tuple[str, str]]:
        return (type(self), (self.code, self.text))


class Timeout(Error, builtins.TimeoutError):  # noqa: N818 (zbroker.Timeout reads well)
    """An operation did not complete in time: the broker is down, unreachable
    or overloaded. Also a :class:`TimeoutError`."""


class ClosedError(Error):
    """The client was closed."""
