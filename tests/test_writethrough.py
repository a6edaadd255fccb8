"""
Tests for L{msgmux._writethrough}: urgent writes reach the socket at once
while the connection is quiet, lazy ones wait for the next turn or ride
along, and nothing is ever reordered or lost when the kernel takes only
part of a write.  Real socket pairs; the reactor is a L{MemoryReactorClock}
that records which transports wait to write.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from msgmux._writethrough import BUSY, Writer


def connected_pair(reactor: MemoryReactorClock) -> tuple[tcp.Connection, socket.socket]:
    """A Twisted socket transport for one end of a socket pair, and the raw other end."""
    ours, theirs = socket.socketpair()
    transport = tcp.Connection(ours, Protocol(), reactor)
    transport.connected = True
    theirs.setblocking(False)
    return transport, theirs


def received(sock: socket.socket) -> bytes:
    """Everything the raw end can read right now."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.transport, self.peer = connected_pair(self.reactor)
        self.addCleanup(self.transport.socket.close)
        self.addCleanup(self.peer.close)
        self.writer = Writer(self.reactor)

    def test_urgent_goes_at_once(self) -> None:
        """An urgent write on a quiet connection is on the wire before the reactor turns, with nothing left buffered."""
        self.writer.urgent(self.transport, [b"he", b"llo"])
        self.assertEqual(received(self.peer), b"hello")
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataBuffer), (b"", []))
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_lazy_waits(self) -> None:
        """A lazy write stays with the transport until the reactor finds the socket writable."""
        self.writer.lazy(self.transport, [b"ack"])
        self.assertEqual(received(self.peer), b"")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        self.assertEqual(received(self.peer), b"ack")

    def test_lazy_rides_with_urgent(self) -> None:
        """Waiting lazy writes go out with the next urgent one, in order."""
        self.writer.lazy(self.transport, [b"ack-"])
        self.writer.urgent(self.transport, [b"message"])
        self.assertEqual(received(self.peer), b"ack-message")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_busy_connection_batches(self) -> None:
        """Urgent writes closer than BUSY apart are left to Twisted, which sends a turn's writes together."""
        self.writer.urgent(self.transport, [b"one-"])
        self.reactor.advance(BUSY / 2)
        self.writer.urgent(self.transport, [b"two-"])
        self.writer.urgent(self.transport, [b"three"])
        self.assertEqual(received(self.peer), b"one-")
        self.transport.doWrite()
        self.assertEqual(received(self.peer), b"two-three")
        self.reactor.advance(BUSY)
        self.writer.urgent(self.transport, [b"-four"])
        self.assertEqual(received(self.peer), b"-four")

    def test_partial_send_keeps_order(self) -> None:
        """What the kernel does not take stays buffered, and later writes queue behind it."""
        big = bytes(range(256)) * 40000  # more than a socket buffer holds
        self.writer.urgent(self.transport, [b"head", big])
        self.assertIn(self.transport, self.reactor.getWriters())
        self.reactor.advance(1.0)
        self.writer.urgent(self.transport, [b"tail"])
        data = received(self.peer)
        while self.transport in self.reactor.getWriters():
            self.transport.doWrite()
            data += received(self.peer)
        self.assertEqual(data, b"head" + big + b"tail")

    def test_other_transports(self) -> None:
        """Transports that are not plain sockets get ordinary writes."""
        transport = StringTransport()
        self.writer.lazy(transport, [b"a"])
        self.writer.urgent(transport, [b"b", b"c"])
        self.assertEqual(transport.value(), b"abc")

    def test_closing_transport(self) -> None:
        """A transport that is closing is left to finish on its own."""
        self.transport.disconnecting = True
        self.writer.urgent(self.transport, [b"late"])
        self.assertEqual(received(self.peer), b"")
        self.assertEqual(self.transport._tempDataBuffer, [b"late"])


class TlsWriterTests(SynchronousTestCase):
    """Over TLS, an urgent write on a quiet connection is encrypted and sent at once, not on the next turn."""

    def test_urgent_write_over_tls(self) -> None:
        import os

        from twisted.internet.protocol import Factory
        from twisted.internet.ssl import PrivateCertificate
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from lab.pki import make_pki
        from msgmux.amqp.tls import TlsClient, TlsConfig

        pki = make_pki(os.path.abspath(self.mktemp()))
        reactor = MemoryReactorClock()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        received: list[bytes] = []

        class Receiver(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        with open(pki.cert("server"), "rb") as c, open(pki.key("server"), "rb") as k:
            server_options = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        client_tls = TLSMemoryBIOFactory(
            TlsClient(TlsConfig(ca_file=pki.ca), "control").creator("localhost"), True, Factory.forProtocol(Protocol), clock=reactor
        ).buildProtocol(None)
        server_tls = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Receiver), clock=reactor).buildProtocol(None)
        ends = []
        for sock, protocol in ((ours, client_tls), (theirs, server_tls)):
            sock.setblocking(False)
            transport = tcp.Connection(sock, protocol, reactor)
            transport.connected = True
            protocol.makeConnection(transport)
            ends.append(transport)

        def exchange() -> None:
            for _ in range(10):
                for end in ends:
                    end.doWrite()
                    end.doRead()

        exchange()  # the handshake
        self.assertEqual(received, [])
        Writer(reactor).urgent(client_tls, [b"AMQP", b"-urgent"])
        ends[1].doRead()  # nothing else runs: no reactor turn, no timed call
        self.assertEqual(b"".join(received), b"AMQP-urgent")
        Writer(reactor).lazy(client_tls, [b"-lazy"])
        ends[1].doRead()
        self.assertEqual(b"".join(received), b"AMQP-urgent")  # lazy writes wait for the turn
        reactor.advance(0)
        exchange()
        self.assertEqual(b"".join(received), b"AMQP-urgent-lazy")
