# -*- test-case-name: tests.test_tls -*-
"""
TLS to a broker: certificate files in, Twisted client connection creators
out, and plain words for handshakes that fail.

Everything cryptographic is Twisted's (L{optionsForClientTLS}: pyOpenSSL for
the handshake, service_identity for the host name or IP address check).
This module only reads and checks the files a C{[control.tls]} or
C{[tenant.tls]} table names (L{load_material}: the configuration loader calls
it, so a missing file, a key that does not belong to its certificate or a CA
file that does not parse is a configuration error naming its key), keeps
them for new connections (L{TlsClient}, re-read on SIGHUP for certificate
rotation), and says why a handshake failed (L{TlsClient.explain}).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["TLS_VERSIONS", "Material", "TlsClient", "TlsConfig", "TlsFileError", "load_material"]

#: Accepted C{minimum_version} spellings (ours, and oslo's C{ssl_version}).
TLS_VERSIONS: dict[str, Any] = {
    "TLSv1.2": TLSVersion.TLSv1_2,
    "TLSv1_2": TLSVersion.TLSv1_2,
    "TLSv1.3": TLSVersion.TLSv1_3,
    "TLSv1_3": TLSVersion.TLSv1_3,
}

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@attrs.frozen
class TlsConfig:
    """
    TLS to one broker (the C{[control.tls]} or C{[tenant.tls]} table).

    @ivar ca_file: PEM file of the CAs that may sign the broker's
        certificate; L{None} trusts the system's CAs.
    @ivar cert_file: PEM client certificate (followed by any intermediate
        CAs), or L{None} for no client certificate.
    @ivar key_file: the PEM private key of C{cert_file} (unencrypted).
    @ivar verify: check the broker's certificate and that it names the host
        of the transport URL.  Off only for tests against throw-away brokers.
    @ivar minimum_version: the lowest TLS version offered (C{TLSv1.2} or
        C{TLSv1.3}).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    minimum_version: str = "TLSv1.2"


class TlsFileError(Exception):
    """
    A TLS file that cannot be used.

    @ivar key: the configuration key naming the file (C{ca_file}...).
    @ivar problem: what is wrong, in words.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@attrs.frozen
class Material:
    """
    The parsed contents of the TLS files, ready for new connections.

    @ivar authorities: the trusted CAs (empty: the system's).
    @ivar client: the client certificate with its key, or L{None}.
    @ivar chain: intermediate CAs sent after the client certificate.
    """

    authorities: tuple[Certificate, ...]
    client: PrivateCertificate | None
    chain: tuple[Any, ...] = ()


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsFileError(key, f"cannot read {path}: {e.strerror or e}") from None


def _certificates(key: str, path: str, data: bytes) -> list[Certificate]:
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TlsFileError(key, f"{path} holds no PEM certificate")
    certificates = []
    for block in blocks:
        try:
            certificates.append(Certificate.loadPEM(block))
        except (crypto.Error, ValueError) as e:
            raise TlsFileError(key, f"{path} holds a certificate that does not parse ({_openssl_text(e)})") from None
    return certificates


def load_material(config: TlsConfig) -> Material:
    """
    Read and check the files of C{config}.

    @return: what new connections use.
    @raise TlsFileError: naming the key of the first file that is missing,
        unreadable, not PEM, or (for C{key_file}) not the key of
        C{cert_file}.
    """
    authorities: tuple[Certificate, ...] = ()
    if config.ca_file is not None:
        authorities = tuple(_certificates("ca_file", config.ca_file, _read("ca_file", config.ca_file)))
    if config.cert_file is None:
        return Material(authorities, None)
    assert config.key_file is not None
    leaf, *chain = _certificates("cert_file", config.cert_file, _read("cert_file", config.cert_file))
    key_data = _read("key_file", config.key_file)
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_data, b"")
    except (crypto.Error, ValueError, TypeError) as e:
        raise TlsFileError(
            "key_file", f"{config.key_file} is not an unencrypted PEM private key ({_openssl_text(e)})"
        ) from None
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    try:
        context.use_certificate(leaf.original)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as e:
        raise TlsFileError(
            "key_file", f"{config.key_file} is not the private key of {config.cert_file} ({_openssl_text(e)})"
        ) from None
    client = PrivateCertificate.fromCertificateAndKeyPair(leaf, KeyPair(key))
    return Material(authorities, client, tuple(c.original for c in chain))


def _openssl_text(error: BaseException) -> str:
    """The reason texts of a pyOpenSSL error, without its list-of-tuples dress."""
    args = error.args[0] if error.args else None
    if isinstance(args, list) and args and all(isinstance(a, tuple) and len(a) == 3 for a in args):
        return "; ".join(reason for _, _, reason in args if reason) or "unknown OpenSSL error"
    return str(error) or type(error).__name__


#: Server alerts about our own certificate, as OpenSSL words them.
_REJECTED = ("alert certificate", "alert bad certificate", "alert unknown ca", "alert unsupported certificate", "alert access denied")
#: What OpenSSL says when the other end does not speak TLS at all.
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure", "unknown protocol", "http request")


class TlsClient:
    """
    The TLS side of one broker's connections: makes the connection creator
    for each new connection from the files as last read.

    @ivar material: the files' contents in use.
    """

    _log = Logger()

    def __init__(self, config: TlsConfig, name: str) -> None:
        """
        @param name: the broker's name in logs (C{control}, C{tenant}).
        @raise TlsFileError: when the files cannot be used.
        """
        self.config = config
        self.name = name
        self.material = load_material(config)
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}
        # The OpenSSL connection of each TLS transport, kept so that a
        # failed handshake can still be examined after Twisted let go of it.
        self._connections: weakref.WeakKeyDictionary[Any, SSL.Connection] = weakref.WeakKeyDictionary()

    def reload(self) -> bool:
        """
        Re-read the files (certificate rotation); connections made from now
        on use them, established ones are left alone.  Unusable files are
        logged and the previous ones kept.

        @return: whether the new files are in use.
        """
        try:
            material = load_material(self.config)
        except TlsFileError as e:
            self._log.error(
                "Broker {name}: kept the TLS files in use; the new ones cannot be used: {key}: {problem}",
                name=self.name,
                key=e.key,
                problem=e.problem,
            )
            return False
        changed = material != self.material
        self.material = material
        self._creators = {}
        self._log.info(
            "Broker {name}: TLS files re-read{what}", name=self.name, what="" if changed else " (unchanged)"
        )
        return True

    def creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """
        @param host: the host as written in the transport URL; with
            C{verify}, the broker's certificate must name it (a DNS name or
            an IP address).
        @return: the connection creator for a new connection to C{host}.
        """
        creator = self._creators.get(host)
        if creator is None:
            creator = self._creators[host] = _Remembering(self._make(host), self._connections)
        return creator

    def _make(self, host: str) -> IOpenSSLClientConnectionCreator:
        material = self.material
        options: dict[str, Any] = {"raiseMinimumTo": TLS_VERSIONS[self.config.minimum_version]}
        if material.chain:
            options["extraCertChain"] = list(material.chain)
        if not self.config.verify:
            if material.client is not None:
                options.update(privateKey=material.client.privateKey.original, certificate=material.client.original)
            return CertificateOptions(verify=False, **options)  # type: ignore[return-value]
        trust = trustRootFromCertificates(list(material.authorities)) if material.authorities else None
        return optionsForClientTLS(host, trust, material.client, extraCertificateOptions=options)

    # --- diagnosis ------------------------------------------------------------

    def explain(self, error: BaseException, transport: Any) -> tuple[str, str] | None:
        """
        Say why a TLS connection failed, if TLS is the reason.

        @param error: what ended the connection attempt.
        @param transport: the connection's TLS transport (its handle gives
            the certificates the broker sent).
        @return: a short reason for the failure counter (C{tls-untrusted},
            C{tls-expired}, C{tls-hostname}, C{tls-rejected}, C{tls-not-tls},
            C{tls}) and a sentence for the log, or L{None} when the failure
            was not a TLS one.
        """
        if type(error).__name__ == "VerificationError" and type(error).__module__.startswith("service_identity"):
            return "tls-hostname", f"the broker's certificate does not name this host ({_identities(self._peer_chain(transport))})"
        if not isinstance(error, SSL.Error):
            return None
        text = _openssl_text(error)
        if "certificate verify failed" in text:
            reason, detail = self._verify_detail(transport)
            return reason, f"the broker's certificate was not accepted: {detail}"
        if any(marker in text for marker in _REJECTED):
            return "tls-rejected", f"the broker refused our client certificate ({text})"
        if any(marker in text for marker in _NOT_TLS):
            return "tls-not-tls", f"no TLS on this port, a plain AMQP port? ({text})"
        return "tls", f"TLS handshake failed ({text})"

    def _verify_detail(self, transport: Any) -> tuple[str, str]:
        """
        Verify the certificates the broker sent again, against the same CAs,
        to learn what OpenSSL's "certificate verify failed" does not say.
        """
        chain = self._peer_chain(transport)
        if not chain:
            return "tls-untrusted", "certificate verify failed"
        store = crypto.X509Store()
        if self.material.authorities:
            for authority in self.material.authorities:
                store.add_cert(authority.original)
        else:
            store.set_default_paths()
        try:
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            code = e.errors[0] if e.errors else 0
            if code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
                return "tls-expired", f"{e} ({_validity(chain[0])})"
            return "tls-untrusted", f"{e} (is ca_file the CA that signed the broker's certificate?)"
        return "tls-untrusted", "certificate verify failed"


    def _peer_chain(self, transport: Any) -> list[Any]:
        """@return: the certificates the broker sent on C{transport}, leaf first."""
        connection = self._connections.get(transport) if transport is not None else None
        if connection is None:
            return []
        try:
            return list(connection.get_peer_cert_chain() or [])
        except SSL.Error:
            return []


@implementer(IOpenSSLClientConnectionCreator)
class _Remembering:
    """A connection creator that remembers which connection it made for which transport."""

    def __init__(self, creator: Any, connections: weakref.WeakKeyDictionary[Any, SSL.Connection]) -> None:
        self._creator = creator
        self._connections = connections

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._creator.clientConnectionForTLS(tlsProtocol)
        self._connections[tlsProtocol] = connection
        return connection


def _validity(certificate: Any) -> str:
    parsed = certificate.to_cryptography()
    return f"valid {parsed.not_valid_before_utc:%Y-%m-%d %H:%M} to {parsed.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def _identities(chain: list[Any]) -> str:
    if not chain:
        return "no certificate seen"
    try:
        names = chain[0].to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no subject alternative names"
    listed = [str(n) for n in names.get_values_for_type(x509.DNSName)]
    listed += [str(a) for a in names.get_values_for_type(x509.IPAddress)]
    return "it is for " + ", ".join(listed)


def unwrap(error: BaseException) -> BaseException:
    """
    @return: the exception under txAMQP's C{Closed(Failure)} wrapping, which
        is how a connection lost during the login reaches the login's caller.
    """
    while error.args and isinstance(error.args[0], Failure):
        error = error.args[0].value
    return error
