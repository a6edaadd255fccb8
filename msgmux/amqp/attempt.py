# -*- test-case-name: tests.test_scripted_service -*-
"""
A connection attempt that can be given up without upsetting ClientService.

L{twisted.application.internet.ClientService} lets C{prepareConnection}
reject a connection (msgmux logs in there, TLS handshake included: a failed
login is a failed attempt, so backoff and failover apply), but its state
machine has no transition for a connection that goes while
C{prepareConnection} runs or after it failed: every refused login or failed
TLS handshake logged C{NoTransition} as a critical error.

L{AttemptFactory} puts an L{Attempt} between the transport and the protocol
ClientService built.  Until the login succeeds (L{Attempt.accept}), the end
of the connection is told only to msgmux's own protocol (whose login then
fails, which is the failed attempt ClientService hears of);
L{Attempt.abandon} closes a connection whose login failed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

__all__ = ["Attempt", "AttemptFactory"]


class Attempt(Protocol):
    """
    Passes everything on to C{inner} (ClientService's protocol), except the
    end of a connection that was never accepted: that goes to C{own} alone.
    """

    def __init__(self, inner: IProtocol, own: IProtocol) -> None:
        self.inner = inner
        self.own = own
        self.accepted = False

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("connection lost"))) -> None:
        (self.inner if self.accepted else self.own).connectionLost(reason)

    def accept(self) -> None:
        """The login succeeded: ClientService hears of this connection's end."""
        self.accepted = True

    def abandon(self) -> None:
        """End this connection; ClientService counts it as a failed attempt."""
        self.accepted = False
        if self.transport is not None:
            self.transport.abortConnection()


class AttemptFactory:
    """
    Wraps the factory ClientService hands its endpoint.

    @ivar latest: the attempt of the latest connection.
    """

    def __init__(self, factory: IProtocolFactory, own: Any) -> None:
        """
        @param own: returns msgmux's own protocol of the latest attempt (the
            one inside ClientService's).
        """
        self._factory = factory
        self._own = own
        self.latest: Attempt | None = None

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def buildProtocol(self, addr: IAddress) -> Attempt | None:
        inner = self._factory.buildProtocol(addr)
        if inner is None:
            return None
        self.latest = Attempt(inner, self._own())
        return self.latest
