# -*- test-case-name: tests.test_scripted_service -*-
"""
A connection attempt that can be given up without upsetting ClientService.

L{twisted.application.internet.ClientService} lets C{prepareConnection}
reject a connection (msgmux logs in there: a refused login is a failed
attempt, so backoff and failover apply), but it neither closes the rejected
connection nor expects to hear of it again: when the connection goes
afterwards, its state machine meets a disconnect in its waiting state and
logs C{NoTransition} as a critical error, on every refused login.

L{AttemptFactory} puts an L{Attempt} between the transport and the protocol
ClientService built.  Closing an attempt with L{Attempt.abandon} ends the
connection and tells only msgmux's own protocol, which is what a rejected
connection needs.
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
    end of a connection that was abandoned: that goes to C{own} alone.
    """

    def __init__(self, inner: IProtocol, own: IProtocol) -> None:
        self.inner = inner
        self.own = own
        self.abandoned = False

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("connection lost"))) -> None:
        (self.own if self.abandoned else self.inner).connectionLost(reason)

    def abandon(self) -> None:
        """End this connection; ClientService already counts it as a failed attempt."""
        self.abandoned = True
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
