"""
A throw-away PKI for the lab, made at test time with C{cryptography}.

Nothing here is kept between runs and nothing is a secret: every file is
generated into a fresh directory when a TLS lab (or a unit test) asks for it.
What it makes, all EC P-256, names valid for loopback only:

 - C{ca.pem}: the lab CA, which signs everything below unless stated;
 - C{server.pem}/C{server.key}: the brokers' certificate, for C{localhost}
   and the IP address C{127.0.0.1} (the names the lab's URLs use);
 - C{server-expired.*}: the same names, but its validity ended yesterday;
 - C{server-wrong-name.*}: valid, from the lab CA, for another name only;
 - C{client.pem}/C{client.key}: a client certificate whose common name is
   C{guest} (RabbitMQ's EXTERNAL login with C{ssl_cert_login_from =
   common_name} logs it in as that user);
 - C{client-expired.*}: the same, expired;
 - C{other-ca.pem} with C{other-client.*} and C{other-server.*}: a second,
   unrelated CA and certificates it signed (the "wrong CA" cases).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "msgmux lab"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@attrs.frozen
class _Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str) -> _Authority:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    def issue(
        self, common_name: str, names: tuple[str, ...] = (), server: bool = False, expired: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf certificate and its key; C{names} are DNS names or IP addresses."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        alternative: list[x509.GeneralName] = []
        for name in names:
            try:
                alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative.append(x509.DNSName(name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if alternative:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


@attrs.frozen
class Pki:
    """The paths of one generated PKI (see the module docstring)."""

    directory: str

    def path(self, name: str) -> str:
        """@return: the path of C{name}, e.g. C{"client.pem"}."""
        return os.path.join(self.directory, name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    def cert(self, name: str) -> str:
        """@return: the certificate of C{name} (C{"server"}, C{"client-expired"}...)."""
        return self.path(f"{name}.pem")

    def key(self, name: str) -> str:
        """@return: the private key of C{name}."""
        return self.path(f"{name}.key")


#: The names in the lab's server certificates: what the lab's URLs use.
SERVER_NAMES = ("localhost", "127.0.0.1")


def make_pki(directory: str, owner: str | None = None) -> Pki:
    """
    Generate the lab PKI into C{directory} (emptied first).

    @param owner: a user that must be able to read every file (the
        C{rabbitmq} user, for the broker's own certificate and key); the
        files are otherwise readable by their creator only, keys included.
    @return: the paths.
    """
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory, mode=0o755)
    ca = _Authority.create("msgmux lab CA")
    other = _Authority.create("another CA")
    files: dict[str, bytes] = {"ca.pem": _pem(ca.certificate), "other-ca.pem": _pem(other.certificate)}
    leaves = {
        "server": (ca, "localhost", SERVER_NAMES, True, False),
        "server-expired": (ca, "localhost", SERVER_NAMES, True, True),
        "server-wrong-name": (ca, "broker.invalid", ("broker.invalid",), True, False),
        "other-server": (other, "localhost", SERVER_NAMES, True, False),
        "client": (ca, "guest", (), False, False),
        "client-expired": (ca, "guest", (), False, True),
        "other-client": (other, "guest", (), False, False),
    }
    for name, (authority, common_name, names, server, expired) in leaves.items():
        certificate, key = authority.issue(common_name, names, server=server, expired=expired)
        files[f"{name}.pem"] = _pem(certificate)
        files[f"{name}.key"] = _pem_key(key)
    for name, content in files.items():
        path = os.path.join(directory, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name.endswith(".key") else 0o644)
        with os.fdopen(descriptor, "wb") as f:
            f.write(content)
    if owner is not None:
        user = pwd.getpwnam(owner)
        for name in [*files, ""]:
            os.chown(os.path.join(directory, name), user.pw_uid, user.pw_gid)
    return Pki(directory)
