# -*- test-case-name: tests.test_tls -*-
"""
Failed connection attempts to a broker: why, how often, and one log line
per episode.

A broker that cannot be reached, or whose certificate is wrong, fails every
attempt the same way until someone fixes it; backoff keeps trying for as
long as that takes.  A warning per attempt would bury the one line that
matters, so L{ConnectFailures} logs when a host starts failing for a reason,
when the reason changes, and when the host works again, and counts every
failed attempt by reason for the metrics
(C{msgmux_broker_connect_failures_total}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.logger import Logger
from txamqp.client import Closed

from msgmux.amqp.tls import TlsClient, unwrap

__all__ = ["ConnectFailures", "classify"]


def classify(failure: BaseException, tls: TlsClient | None, transport: Any, login_timeout: float) -> tuple[str, str]:
    """
    Name the reason a connection attempt failed.

    @param failure: what the attempt raised (the connection, TLS handshake
        or login).
    @param tls: the broker's TLS client, if it uses TLS.
    @param transport: the attempt's transport, or L{None} if none was made.
    @param login_timeout: the login deadline, for the message.
    @return: a short reason (a metric label) and a sentence for the log.
    """
    cause = unwrap(failure)
    if tls is not None:
        explained = tls.explain(cause, transport)
        if explained is not None:
            return explained
    if isinstance(cause, (defer.CancelledError, defer.TimeoutError)):
        return "timeout", f"no login within {login_timeout:.0f}s"
    if isinstance(cause, error.ConnectError):
        return "connect", f"cannot connect: {_short(cause)}"
    if isinstance(cause, (error.ConnectionDone, error.ConnectionLost)):
        return "lost", f"closed the connection before the login completed ({_short(cause)})"
    if isinstance(cause, Closed):
        return "login", f"refused the login: {_short(cause)}"
    return "other", f"failed: {_short(cause)}"


def _short(failure: BaseException) -> str:
    """A one-line description (txAMQP's reasons nest)."""
    text = " ".join(str(failure).split()) or type(failure).__name__
    return text if len(text) < 300 else text[:300] + "..."


class ConnectFailures:
    """
    The failed attempts of one broker connection.

    @ivar counts: failed attempts so far, by reason.
    """

    _log = Logger()

    def __init__(self, name: str) -> None:
        """@param name: the broker's name in logs and metrics."""
        self.name = name
        self.counts: dict[str, int] = {}
        self._episodes: dict[str, list[Any]] = {}

    def failed(self, address: str, reason: str, text: str) -> None:
        """
        Count a failed attempt on C{address}; log it if it starts an episode
        (the first failure there, or a different reason than the last).
        """
        self.counts[reason] = self.counts.get(reason, 0) + 1
        episode = self._episodes.get(address)
        if episode is not None and episode[0] == reason:
            episode[1] += 1
            return
        self._episodes[address] = [reason, 1]
        self._log.warn(
            "Broker {name} at {address}: {text} [{reason}]; retrying with backoff, logged again when this changes",
            name=self.name,
            address=address,
            text=text,
            reason=reason,
        )

    def succeeded(self, address: str) -> None:
        """An attempt on C{address} logged in: ends its failure episode."""
        episode = self._episodes.pop(address, None)
        if episode is not None:
            self._log.info(
                "Broker {name} at {address}: connected after {attempts} failed attempt(s) [{reason}]",
                name=self.name,
                address=address,
                attempts=episode[1],
                reason=episode[0],
            )

    def failing(self) -> dict[str, str]:
        """@return: the addresses failing now, with their reason."""
        return {address: episode[0] for address, episode in self._episodes.items()}
