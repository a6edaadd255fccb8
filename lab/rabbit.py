"""
Network namespaces and private RabbitMQ nodes for the lab.

The lab reproduces the real topology on one machine: the machine's own
RabbitMQ plays the control broker, and a second RabbitMQ node runs inside a
network namespace of its own, where only processes started in that namespace
(the tenant half, tenant oslo services) can reach it.  Blocking code on
purpose: it runs before and after the reactor-driven parts, in tests through
a thread.

Facts this relies on (RabbitMQ 3.10 from Debian): a node started with
RABBITMQ_NODENAME/CONFIG_FILE/MNESIA_BASE/LOG_BASE pointing at private paths
and RABBITMQ_CONF_ENV_FILE=/dev/null ignores /etc/rabbitmq; inside a new
namespace it gets its own loopback, so its own epmd and port 5672; the Erlang
cookie is the rabbitmq user's (read, never written); SIGTERM stops it cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from lab.pki import Pki

RABBITMQ_USER = "rabbitmq"


class LabError(Exception):
    """The lab could not be set up."""


def run(argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, failing loudly with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result


class Namespace:
    """A network namespace with loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name

    def exists(self) -> bool:
        return self.name in run(["ip", "netns", "list"]).stdout.split()

    def pids(self) -> list[int]:
        if not self.exists():
            return []
        return [int(p) for p in run(["ip", "netns", "pids", self.name], check=False).stdout.split()]

    def create(self) -> None:
        """Create it, clearing whatever a crashed earlier run left."""
        if self.exists():
            self.delete()
        run(["ip", "netns", "add", self.name])
        run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"])

    def delete(self) -> None:
        """Kill every process inside, then remove the namespace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.exists():
            run(["ip", "netns", "del", self.name])

    def argv(self, argv: list[str]) -> list[str]:
        """@return: C{argv} wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.name] + argv


_PROBE = (
    "import socket,sys\n"
    "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=2)\n"
    "s.sendall(b'AMQP\\x00\\x00\\x09\\x01')\n"
    "sys.exit(0 if s.recv(7)[:1]==b'\\x01' else 1)\n"
)


_TLS_PROBE = (
    "import socket,ssl,sys\n"
    "c=ssl.create_default_context(cafile=sys.argv[2])\n"
    "s=c.wrap_socket(socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=2),server_hostname='localhost')\n"
    "s.sendall(b'AMQP\\x00\\x00\\x09\\x01')\n"
    "sys.exit(0 if s.recv(7)[:1]==b'\\x01' else 1)\n"
)


class RabbitNode:
    """
    A private RabbitMQ node, optionally inside a namespace, optionally with
    a TLS listener.

    With C{pki}, the node listens for TLS on C{tls_port} with the PKI's
    server certificate (copied into its directory, so that tests can swap
    it: L{use_certificate}), asks clients for a certificate without
    requiring one, and offers the EXTERNAL login (plugin
    rabbitmq_auth_mechanism_ssl, user name from the certificate's common
    name); its plain listener on C{port} is then off unless C{plain} says
    otherwise.

    @ivar directory: its data, logs and config (owned by the rabbitmq user).
    @ivar port: the plain AMQP port, or L{None} for a TLS-only node.
    @ivar tls_port: the TLS port, or L{None}.
    """

    def __init__(
        self,
        node: str,
        directory: str,
        namespace: Namespace | None = None,
        port: int = 5672,
        pki: Pki | None = None,
        tls_port: int | None = None,
        plain: bool = False,
    ) -> None:
        self.node = node
        self.directory = directory
        self.namespace = namespace
        self.pki = pki
        self.tls_port = (tls_port or port) if pki is not None else None
        self.port: int | None = port if pki is None or plain else None
        if self.port is not None and self.port == self.tls_port:
            raise ValueError("the plain and TLS listeners need different ports")
        self._dist_port = max(p for p in (self.port, self.tls_port) if p is not None) + 20000

    def _argv(self, argv: list[str]) -> list[str]:
        return self.namespace.argv(argv) if self.namespace else argv

    def _environment(self) -> dict[str, str]:
        d = self.directory
        return {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_PID_FILE": f"{d}/rabbit.pid",
            "RABBITMQ_DIST_PORT": str(self._dist_port),
        }

    def url(self, vhost: str = "/", tls: bool | None = None, query: bool = True) -> str:
        """
        @param tls: the TLS listener (with C{?ssl=1}) or the plain one; by
            default TLS when the node has it.
        @param query: add C{?ssl=1} for TLS (oslo peers get TLS from their
            options instead).
        @return: the oslo transport URL of a vhost on this node.
        """
        from urllib.parse import quote

        use_tls = self.tls_port is not None if tls is None else tls
        port = self.tls_port if use_tls else self.port
        if port is None:
            raise ValueError(f"node {self.node} has no {'TLS' if use_tls else 'plain'} listener")
        suffix = "?ssl=1" if use_tls and query else ""
        return f"rabbit://guest:guest@127.0.0.1:{port}/{quote(vhost, safe='')}{suffix}"

    @property
    def tls_files(self) -> str:
        """The directory of the certificate, key and CA files the node reads."""
        return f"{self.directory}/tls"

    def use_certificate(self, name: str) -> None:
        """
        Make the node present another certificate of its PKI
        (C{"server-expired"}...) to new connections, as a broker operator
        rotating certificates would: replace the files, clear Erlang's PEM
        cache.
        """
        assert self.pki is not None
        for source, target in ((self.pki.cert(name), "server.pem"), (self.pki.key(name), "server.key")):
            shutil.copyfile(source, f"{self.tls_files}/{target}")
        run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", self.tls_files])
        self.ctl("eval", "ssl:clear_pem_cache().")

    def prepare(self, plugins: tuple[str, ...] = (), fresh: bool = True) -> None:
        """Write config files (and wipe old data when C{fresh})."""
        if fresh and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(f"{self.directory}/log", exist_ok=True)
        os.makedirs(f"{self.directory}/mnesia", exist_ok=True)
        listeners = f"listeners.tcp.default = 127.0.0.1:{self.port}\n" if self.port is not None else "listeners.tcp = none\n"
        if self.pki is not None:
            os.makedirs(self.tls_files, exist_ok=True)
            for source, target in ((self.pki.ca, "ca.pem"), (self.pki.cert("server"), "server.pem"), (self.pki.key("server"), "server.key")):
                shutil.copyfile(source, f"{self.tls_files}/{target}")
            listeners += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.tls_files}/ca.pem\n"
                f"ssl_options.certfile = {self.tls_files}/server.pem\n"
                f"ssl_options.keyfile = {self.tls_files}/server.key\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
                "ssl_options.versions.1 = tlsv1.3\n"
                "ssl_options.versions.2 = tlsv1.2\n"
                "auth_mechanisms.1 = PLAIN\n"
                "auth_mechanisms.2 = AMQPLAIN\n"
                "auth_mechanisms.3 = EXTERNAL\n"
                "ssl_cert_login_from = common_name\n"
            )
            plugins = tuple(plugins) + ("rabbitmq_auth_mechanism_ssl",)
        with open(f"{self.directory}/rabbitmq.conf", "w") as f:
            f.write(
                listeners + "loopback_users = none\n"
                "disk_free_limit.absolute = 50MB\n"
                "vm_memory_high_watermark.relative = 0.25\n"
                "log.file.level = warning\n"
            )
        with open(f"{self.directory}/enabled_plugins", "w") as f:
            f.write("[" + ",".join(plugins) + "].\n")
        run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", self.directory])
        os.chmod(self.directory, 0o755)

    def start(self, timeout: float = 90) -> float:
        """
        Start the node and wait until it speaks AMQP.

        @return: seconds it took.
        """
        started = time.monotonic()
        environment = self._environment()
        argv = ["env", "-i"] + [f"{k}={v}" for k, v in environment.items()]
        argv += ["runuser", "-u", RABBITMQ_USER, "--", "rabbitmq-server", "-detached"]
        run(self._argv(argv))
        while not self.ready():
            if time.monotonic() - started > timeout:
                raise LabError(f"RabbitMQ node {self.node} did not start in {timeout}s; see {self.directory}/log")
            time.sleep(0.25)
        return time.monotonic() - started

    def ready(self) -> bool:
        """Whether the node accepts AMQP connections (checked from its namespace)."""
        if self.port is None:
            assert self.pki is not None
            return run(self._argv(["python3", "-c", _TLS_PROBE, str(self.tls_port), self.pki.ca]), check=False).returncode == 0
        if self.namespace is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"AMQP\x00\x00\x09\x01")
                    return s.recv(7)[:1] == b"\x01"
            except OSError:
                return False
        return run(self._argv(["python3", "-c", _PROBE, str(self.port)]), check=False).returncode == 0

    def pid(self) -> int | None:
        try:
            with open(f"{self.directory}/rabbit.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self, kill: bool = False) -> None:
        """Stop the node (SIGTERM, or SIGKILL to simulate a crash) and wait for it."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def ctl(self, *args: str, check: bool = True) -> str:
        """Run C{rabbitmqctl} against this node."""
        argv = ["runuser", "-u", RABBITMQ_USER, "--", "rabbitmqctl", "-q", "-n", self.node] + list(args)
        return run(self._argv(argv), check=check).stdout

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost, check=False)

    def add_vhosts(self, vhosts: list[str], scratch: str) -> None:
        add_vhosts(self.ctl, vhosts, scratch)

    def delete_vhosts(self, vhosts: list[str]) -> None:
        delete_vhosts(self.ctl, vhosts)


def add_vhosts(ctl: Any, vhosts: list[str], scratch: str) -> None:
    """
    Many vhosts (guest may use them) in one C{rabbitmqctl} call, through a
    definitions file written to the directory C{scratch}: one call per vhost
    costs most of a second each.
    """
    definitions = {
        "vhosts": [{"name": vhost} for vhost in vhosts],
        "permissions": [{"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"} for vhost in vhosts],
    }
    path = os.path.join(scratch, f"vhosts-{os.getpid()}-{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(definitions, f)
    os.chmod(path, 0o644)
    try:
        ctl("import_definitions", path)
    finally:
        os.unlink(path)


def delete_vhosts(ctl: Any, vhosts: list[str]) -> None:
    """Delete many vhosts in one C{rabbitmqctl eval}."""
    names = ", ".join("<<" + json.dumps(vhost) + ">>" for vhost in vhosts)
    ctl("eval", f"[rabbit_vhost:delete(V, <<\"msgmux-lab\">>) || V <- [{names}]].", check=False)


class SystemBroker:
    """
    The machine's own RabbitMQ (127.0.0.1:5672), used as the control broker.
    The lab only adds and removes vhosts of its own there.
    """

    port = 5672
    tls_port = None
    pki = None

    def ctl(self, *args: str, check: bool = True) -> str:
        """Run C{rabbitmqctl} against the machine's broker."""
        return run(["rabbitmqctl", "-q"] + list(args), check=check).stdout

    def url(self, vhost: str = "/", tls: bool | None = None, query: bool = True) -> str:
        from urllib.parse import quote

        if tls:
            raise ValueError("the machine's RabbitMQ has no TLS listener in the lab")
        return f"rabbit://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost, check=False)

    def add_vhosts(self, vhosts: list[str], scratch: str) -> None:
        add_vhosts(self.ctl, vhosts, scratch)

    def delete_vhosts(self, vhosts: list[str]) -> None:
        delete_vhosts(self.ctl, vhosts)
