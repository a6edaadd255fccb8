"""
Tests for L{msgmux.amqp.broker.FailoverEndpoint}: the hosts of a transport
URL are tried in order, moving on after a failed attempt and staying with
the host of a connection that worked.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.broker import LOGIN_TIMEOUT, BrokerService, FailoverEndpoint
from msgmux.config import BrokerConfig, parse_transport_url
from tests.doubles.amqp import connect_pending


class FailoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        hosts, _ = parse_transport_url("rabbit://u:p@127.0.0.11:5672,127.0.0.12:5673,127.0.0.13/")
        self.reactor = MemoryReactorClock()
        self.endpoint = FailoverEndpoint(self.reactor, hosts, timeout=1)

    def attempt(self, succeed: bool) -> tuple[str, int]:
        """Start one connection attempt; @return: the host and port it went to."""
        attempt = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.reactor.advance(0)  # HostnameEndpoint resolves, then connects
        _, port, factory, _, _ = self.reactor.tcpClients[-1]
        target = (self.endpoint.current.host, port)
        if succeed:
            factory.buildProtocol(None).makeConnection(StringTransport())
            self.successResultOf(attempt)
        else:
            factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
            self.reactor.advance(1)
            self.failureResultOf(attempt)
        return target

    def test_failed_attempts_walk_the_hosts(self) -> None:
        """Failed attempts walk the list, wrapping around; a working host is tried again first."""
        self.assertEqual(self.attempt(False), ("127.0.0.11", 5672))
        self.assertEqual(self.attempt(False), ("127.0.0.12", 5673))
        self.assertEqual(self.attempt(True), ("127.0.0.13", 5672))
        self.assertEqual(self.endpoint.current.host, "127.0.0.13")
        self.assertEqual(self.attempt(True), ("127.0.0.13", 5672))
        self.endpoint.failed()  # e.g. the broker refused the login
        self.assertEqual(self.attempt(True), ("127.0.0.11", 5672))

    def test_credentials_follow_the_host(self) -> None:
        """Hosts without credentials in the URL use the previous host's."""
        hosts, _ = parse_transport_url("rabbit://a:1@h1,b:2@h2,h3/")
        self.assertEqual([(h.username, h.password) for h in hosts], [("a", "1"), ("b", "2"), ("b", "2")])


class LoginTimeoutTests(SynchronousTestCase):
    def test_silent_host_is_a_failed_attempt(self) -> None:
        """A host that accepts the connection but never answers the AMQP header is given up after LOGIN_TIMEOUT."""
        reactor = MemoryReactorClock()
        hosts, vhost = parse_transport_url("rabbit://u:p@127.0.0.1:5672,127.0.0.1:5673/")
        config = BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack", heartbeat=0)
        service = BrokerService(config, "control", reactor, retry_policy=lambda attempt: 1.0)
        silent = Factory.forProtocol(Protocol)
        reactor.listenTCP(5672, silent, interface="127.0.0.1")
        service.startService()
        reactor.advance(0)
        [pump] = connect_pending(reactor)
        pump.flush()
        reactor.advance(LOGIN_TIMEOUT - 1)
        pump.flush()
        self.assertFalse(pump.clientIO.disconnecting)
        reactor.advance(2)
        pump.flush()
        self.assertTrue(pump.clientIO.disconnecting)
        self.assertIsNone(service.protocol)
        reactor.advance(1.0)  # the retry goes to the next host
        self.assertEqual(reactor.tcpClients[-1][:2], ("127.0.0.1", 5673))
        self.successResultOf(service.stopService())


class TlsEndpointTests(SynchronousTestCase):
    def test_tls_wraps_each_attempt(self) -> None:
        """With TLS, each attempt is TLS over the same TCP connection, checked against that attempt's host."""
        import os

        from twisted.protocols.tls import TLSMemoryBIOFactory

        from lab.pki import make_pki
        from msgmux.amqp.tls import TlsClient, TlsConfig

        pki = make_pki(os.path.abspath(self.mktemp()))
        reactor = MemoryReactorClock()
        hosts, _ = parse_transport_url("rabbit://u:p@127.0.0.1:5671,localhost:5671/?ssl=1")
        tls = TlsClient(TlsConfig(ca_file=pki.ca), "control")
        endpoint = FailoverEndpoint(reactor, hosts, timeout=1, tls=tls)
        failed: list[str] = []
        endpoint.attempt_failed = lambda host, error: failed.append(host.host)
        for expected in ("127.0.0.1", "localhost"):
            attempt = endpoint.connect(Factory.forProtocol(Protocol))
            reactor.advance(0)
            host, port, factory, _, _ = reactor.tcpClients[-1]
            self.assertEqual(port, 5671)
            self.assertIsInstance(factory._wrappedFactory, TLSMemoryBIOFactory)
            self.assertEqual(endpoint.current.host, expected)
            factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
            reactor.advance(1)
            self.failureResultOf(attempt)
        self.assertEqual(failed, ["127.0.0.1", "localhost"])
