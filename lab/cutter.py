"""
A Unix socket pass-through whose connections can be cut on demand.

C{python -m lab.cutter LISTEN TARGET}: every connection to LISTEN is piped
to TARGET.  SIGUSR1 drops every connection at once (both ends see the
socket die, as with a broken link), new connections are accepted again
immediately.  Used by C{make faults} to cut the link without touching
either msgmux process.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint


class Pipe(protocol.Protocol):
    peer: Pipe | None = None
    pending: list[bytes]

    def __init__(self) -> None:
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        OPEN.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


OPEN: set[Pipe] = set()


class Inbound(Pipe):
    def connectionMade(self) -> None:
        OPEN.add(self)
        outbound = Pipe()
        outbound.peer = self
        self.peer = outbound

        def connected(_: Any) -> None:
            OPEN.add(outbound)
            for data in self.pending:
                outbound.transport.write(data)
            self.pending = []

        UNIXClientEndpoint(reactor, TARGET).connect(protocol.Factory.forProtocol(lambda: outbound)).addCallbacks(
            connected, lambda failure: self.transport.loseConnection()
        )


def cut(*args: Any) -> None:
    reactor.callFromThread(_cut)


def _cut() -> None:
    for pipe in list(OPEN):
        if pipe.transport is not None:
            pipe.transport.abortConnection()


if __name__ == "__main__":
    LISTEN, TARGET = sys.argv[1], sys.argv[2]
    if os.path.exists(LISTEN):
        os.remove(LISTEN)
    UNIXServerEndpoint(reactor, LISTEN, mode=0o660).listen(protocol.Factory.forProtocol(Inbound))
    signal.signal(signal.SIGUSR1, cut)
    print("ready", flush=True)
    reactor.run()
