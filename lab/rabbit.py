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


class RabbitNode:
    """
    A private RabbitMQ node, optionally inside a namespace.

    @ivar directory: its data, logs and config (owned by the rabbitmq user).
    """

    def __init__(self, node: str, directory: str, namespace: Namespace | None = None, port: int = 5672) -> None:
        self.node = node
        self.directory = directory
        self.namespace = namespace
        self.port = port

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
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
        }

    def url(self, vhost: str = "/") -> str:
        """@return: the oslo transport URL of a vhost on this node."""
        from urllib.parse import quote

        return f"rabbit://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def prepare(self, plugins: tuple[str, ...] = (), fresh: bool = True) -> None:
        """Write config files (and wipe old data when C{fresh})."""
        if fresh and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        os.makedirs(f"{self.directory}/log", exist_ok=True)
        os.makedirs(f"{self.directory}/mnesia", exist_ok=True)
        with open(f"{self.directory}/rabbitmq.conf", "w") as f:
            f.write(
                f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                "loopback_users = none\n"
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

    def ctl(self, *args: str, check: bool = True) -> str:
        """Run C{rabbitmqctl} against the machine's broker."""
        return run(["rabbitmqctl", "-q"] + list(args), check=check).stdout

    def url(self, vhost: str = "/") -> str:
        from urllib.parse import quote

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
