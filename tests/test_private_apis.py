"""
Every private detail of Twisted and txAMQP that msgmux relies on
(L{msgmux._private_apis.RELIED_ON}) still exists in the installed versions.
When this fails after an upgrade, the named code needs a look before the
upgrade goes anywhere.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract, tcp, unix
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor
from twisted.protocols import tls
from twisted.trial.unittest import SynchronousTestCase
from txamqp.protocol import AMQChannel

from msgmux._private_apis import RELIED_ON
from tests.doubles import broker_connection


def _instance(owner: type, sockets: list[socket.socket]) -> Any:
    """A real instance of C{owner}, for attributes only instances have."""
    if issubclass(owner, tcp.Connection):
        left, right = socket.socketpair()
        sockets.extend((left, right))
        return unix.Server(left, Protocol(), None, None, 0, MemoryReactor())
    if owner is abstract.FileDescriptor:
        return abstract.FileDescriptor(MemoryReactor())
    if issubclass(owner, tls.TLSMemoryBIOProtocol):
        factory = tls.TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol), MemoryReactor())
        return owner(factory, Protocol())
    if owner is AMQChannel:
        return AMQChannel(1, None, None)
    protocol, _ = broker_connection(heartbeat=30)  # txAMQP keeps heartbeat timers only with heartbeats on
    return protocol


class RelianceTests(SynchronousTestCase):
    def test_every_private_name_exists(self) -> None:
        sockets: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in sockets])
        missing = []
        for reliance in RELIED_ON:
            holder = _instance(reliance.owner, sockets) if reliance.instance else reliance.owner
            if not hasattr(holder, reliance.name):
                missing.append(f"{reliance.owner.__module__}.{reliance.owner.__qualname__}.{reliance.name} ({reliance.why})")
        self.assertEqual(missing, [])
