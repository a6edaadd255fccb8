"""
Tests for L{msgmux.amqp.tls}: the files, the connection creators, what a
failed handshake is called, and re-reading the files.

Handshakes run in memory (L{twisted.test.iosim}) between Twisted's own TLS
client and server, with certificates made by L{lab.pki}.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from lab.pki import Pki, make_pki
from msgmux.amqp.attempts import ConnectFailures, classify
from msgmux.amqp.tls import TlsClient, TlsConfig, TlsFileError, load_material


class Recorder(Protocol):
    """Sends the AMQP header once connected; remembers how the connection ended."""

    reason: Failure | None = None
    received = b""

    def connectionMade(self) -> None:
        self.transport.write(b"AMQP\x00\x00\x09\x01")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionError("connection lost"))) -> None:
        self.reason = reason


class PlainAmqp(Protocol):
    """A broker port without TLS: answers anything with its protocol header and hangs up."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"AMQP\x00\x00\x09\x01")
        self.transport.loseConnection()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class HandshakeMixin:
    pki: Pki

    def server_options(self, name: str = "server", require_client: bool = False) -> Any:
        certificate = PrivateCertificate.loadPEM(_read(self.pki.cert(name)) + _read(self.pki.key(name)))
        if require_client:
            return certificate.options(Certificate.loadPEM(_read(self.pki.ca)))
        return certificate.options()

    def handshake(self, client: TlsClient, host: str, server: Any = None, plain: bool = False) -> tuple[Recorder, Any]:
        """Connect C{client} to an in-memory server; @return: the client protocol and its TLS transport."""
        clock = Clock()
        recorder = Recorder()
        client_tls = TLSMemoryBIOFactory(client.creator(host), True, Factory.forProtocol(lambda: recorder), clock=clock)
        if plain:
            server_factory: Any = Factory.forProtocol(PlainAmqp)
        else:
            server_factory = TLSMemoryBIOFactory(server or self.server_options(), False, Factory.forProtocol(Echo), clock=clock)
        tls_protocol = client_tls.buildProtocol(None)
        _, _, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None), lambda: tls_protocol, clock=clock)
        for _ in range(20):
            clock.advance(0)
            pump.pump()
        return recorder, tls_protocol


class ExplainTests(HandshakeMixin, SynchronousTestCase):
    """Each way a handshake fails gets its own reason and a sentence that says what to fix."""

    def setUp(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        self.client = TlsClient(TlsConfig(ca_file=self.pki.ca), "control")

    def failed(self, recorder: Recorder, transport: Any, client: TlsClient | None = None) -> tuple[str, str]:
        self.assertIsNotNone(recorder.reason, "the handshake did not fail")
        assert recorder.reason is not None
        return classify(recorder.reason.value, client or self.client, transport, 30)

    def test_success(self) -> None:
        """The right CA and a certificate naming the host: the data flows, by IP address and by name."""
        for host in ("127.0.0.1", "localhost"):
            recorder, _ = self.handshake(self.client, host)
            self.assertIsNone(recorder.reason)
            self.assertEqual(recorder.received, b"AMQP\x00\x00\x09\x01")

    def test_wrong_ca(self) -> None:
        """A broker certificate from another CA is untrusted, and the log line says to check ca_file."""
        reason, text = self.failed(*self.handshake(self.client, "127.0.0.1", self.server_options("other-server")))
        self.assertEqual(reason, "tls-untrusted")
        self.assertIn("ca_file", text)

    def test_expired(self) -> None:
        """An expired broker certificate is called expired, with its validity dates."""
        reason, text = self.failed(*self.handshake(self.client, "127.0.0.1", self.server_options("server-expired")))
        self.assertEqual(reason, "tls-expired")
        self.assertIn("expired", text)
        self.assertIn("UTC", text)

    def test_hostname(self) -> None:
        """A certificate for another name is a host name mismatch naming what the certificate is for."""
        reason, text = self.failed(*self.handshake(self.client, "127.0.0.1", self.server_options("server-wrong-name")))
        self.assertEqual(reason, "tls-hostname")
        self.assertIn("broker.invalid", text)

    def test_client_certificate_refused(self) -> None:
        """A broker requiring a client certificate we do not send (or do not send right) refuses us."""
        reason, text = self.failed(*self.handshake(self.client, "127.0.0.1", self.server_options(require_client=True)))
        self.assertEqual(reason, "tls-rejected")
        self.assertIn("client certificate", text)

    def test_plain_port(self) -> None:
        """A plain AMQP port where TLS is expected is called that."""
        reason, text = self.failed(*self.handshake(self.client, "127.0.0.1", plain=True))
        self.assertEqual(reason, "tls-not-tls")
        self.assertIn("plain AMQP port", text)

    def test_client_certificate_and_no_verify(self) -> None:
        """
        A client certificate is presented when the broker asks for one; with
        verify off, a certificate from any CA for any name is accepted.
        """
        pki = self.pki
        client = TlsClient(TlsConfig(ca_file=pki.ca, cert_file=pki.cert("client"), key_file=pki.key("client")), "tenant")
        recorder, _ = self.handshake(client, "localhost", self.server_options(require_client=True))
        self.assertIsNone(recorder.reason)
        self.assertEqual(recorder.received, b"AMQP\x00\x00\x09\x01")
        lax = TlsClient(TlsConfig(verify=False), "tenant")
        recorder, _ = self.handshake(lax, "127.0.0.1", self.server_options("server-wrong-name"))
        self.assertIsNone(recorder.reason)

    def test_not_tls_errors_are_left_alone(self) -> None:
        """Errors that are not TLS ones are not explained as TLS."""
        from twisted.internet.error import ConnectionRefusedError

        self.assertIsNone(self.client.explain(ConnectionRefusedError(), None))
        self.assertEqual(classify(ConnectionRefusedError(), self.client, None, 30)[0], "connect")


class ReloadTests(HandshakeMixin, SynchronousTestCase):
    """Certificate rotation: the files are re-read for new connections; broken new files change nothing."""

    def test_rotation(self) -> None:
        self.pki = make_pki(os.path.abspath(self.mktemp()))
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        paths = {name: os.path.join(directory, name) for name in ("ca.pem", "client.pem", "client.key")}
        shutil.copy(self.pki.path("other-ca.pem"), paths["ca.pem"])
        shutil.copy(self.pki.cert("client-expired"), paths["client.pem"])
        shutil.copy(self.pki.key("client-expired"), paths["client.key"])
        client = TlsClient(TlsConfig(paths["ca.pem"], paths["client.pem"], paths["client.key"]), "control")
        recorder, _ = self.handshake(client, "127.0.0.1")
        self.assertIsNotNone(recorder.reason)
        shutil.copy(self.pki.ca, paths["ca.pem"])
        shutil.copy(self.pki.cert("client"), paths["client.pem"])
        # A rotation caught halfway: the new certificate with the old key.
        self.assertFalse(client.reload())
        recorder, _ = self.handshake(client, "127.0.0.1")
        self.assertIsNotNone(recorder.reason)
        shutil.copy(self.pki.key("client"), paths["client.key"])
        self.assertTrue(client.reload())
        self.assertEqual(client.material, load_material(client.config))
        recorder, _ = self.handshake(client, "127.0.0.1", self.server_options(require_client=True))
        self.assertIsNone(recorder.reason)

    def test_unreadable_at_start(self) -> None:
        """A TlsClient cannot be made from files that cannot be used."""
        error = self.assertRaises(TlsFileError, TlsClient, TlsConfig(ca_file="/nonexistent"), "control")
        self.assertEqual(error.key, "ca_file")


class EpisodeTests(SynchronousTestCase):
    """One warning per failure episode, every attempt counted."""

    def test_episodes(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        failures = ConnectFailures("control")
        for _ in range(5):
            failures.failed("h:5671", "tls-expired", "expired")
        failures.failed("h2:5671", "connect", "refused")
        self.assertEqual(failures.failing(), {"h:5671": "tls-expired", "h2:5671": "connect"})
        failures.failed("h:5671", "tls-untrusted", "untrusted")
        failures.succeeded("h:5671")
        failures.succeeded("h:5671")
        texts = [e["log_format"] for e in events if e.get("log_namespace", "").startswith("msgmux.amqp.attempts")]
        self.assertEqual(len(texts), 4)  # expired, refused, untrusted, connected after
        self.assertEqual(failures.counts, {"tls-expired": 5, "connect": 1, "tls-untrusted": 1})
        self.assertEqual(failures.failing(), {"h2:5671": "connect"})
        self.assertEqual([e["attempts"] for e in events if "attempts" in e], [1])
