"""
The lab: both networks on one machine, for tests, the demo and benchmarks.

 - control network: the host's network namespace and the machine's RabbitMQ
   (a private vhost per scenario);
 - tenant network: a network namespace with its own RabbitMQ node;
 - msgmux: the control half runs on the host, the tenant half inside the
   namespace, both as real C{twistd msgmux} processes; only a Unix socket in
   a shared directory connects them.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from lab.peer import REPO, OsloPeer, spawn_peer
from lab.pki import Pki, make_pki
from lab.rabbit import RABBITMQ_USER, Namespace, RabbitNode, SystemBroker

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class HalfProcess(ProcessProtocol):
    """A C{twistd msgmux} process."""

    def __init__(self, label: str, log_path: str) -> None:
        self.label = label
        self.log_path = log_path
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.ended.callback(self.exit_code)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str | int) -> None:
        """Send a signal by number or name (C{"HUP"}, C{"STOP"}...)."""
        if self.running:
            number = getattr(signal, f"SIG{name}") if isinstance(name, str) else name
            self.transport.signalProcess(number)

    def stop(self) -> defer.Deferred[int | None]:
        """SIGTERM (a clean twistd shutdown) and wait for the exit."""
        self.signal("TERM")
        return self.ended

    def kill(self) -> defer.Deferred[int | None]:
        """SIGKILL, as a crash would."""
        self.signal("KILL")
        return self.ended

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Lab:
    """
    One lab instance; several can coexist if their names differ.

    @ivar root: working directory (configs, sockets, logs, broker data).
    """

    def __init__(
        self,
        name: str,
        reactor: Any = None,
        private_control: bool = False,
        control_plugins: tuple[str, ...] = (),
        tls: tuple[str, ...] = (),
        external: tuple[str, ...] = (),
        control_port: int = 5673,
        keep_plain: bool = False,
    ) -> None:
        """
        @param private_control: run a private control broker node on the
            host (port C{control_port}) instead of using the machine's
            RabbitMQ, so that it can be killed and restarted (C{make faults}).
        @param tls: the brokers (C{"control"}, C{"tenant"}) that listen only
            for TLS, with certificates made at start (L{lab.pki}); a TLS
            control broker is a private node (the machine's RabbitMQ has no
            TLS listener).  msgmux halves and oslo peers on that side are
            configured for TLS.
        @param external: the sides whose msgmux half and oslo peers log in
            with EXTERNAL (their client certificate) instead of PLAIN.
        @param keep_plain: TLS brokers keep a plain listener too (on the
            port after the TLS one), for benchmarks comparing both.
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.name = name
        self.root = f"/tmp/msgmux-lab/{name}"
        self.namespace = Namespace(f"msgmux-{name}")
        #: The sides whose halves and oslo peers use TLS (a bench may switch
        #: between plain and TLS when the nodes keep both listeners).
        self.tls = tls
        self.external = external
        self.pki = Pki(f"{self.root}/pki") if tls else None
        tenant_pki = self.pki if "tenant" in tls else None
        self.tenant_node = RabbitNode(
            "tenant@localhost",
            f"{self.root}/tenant-rabbit",
            self.namespace,
            port=5672,
            pki=tenant_pki,
            tls_port=5671,
            plain=keep_plain,
        )
        self.control_node: RabbitNode | SystemBroker
        if private_control or "control" in tls:
            control_pki = self.pki if "control" in tls else None
            self.control_node = RabbitNode(
                f"msgmux-{name}-control@localhost",
                f"{self.root}/control-rabbit",
                None,
                port=control_port + 1 if control_pki and keep_plain else control_port,
                pki=control_pki,
                tls_port=control_port,
                plain=keep_plain,
            )
        else:
            self.control_node = SystemBroker()
        self.control_plugins = control_plugins
        self.processes: list[Any] = []

    # --- blocking set-up (call from a thread under a running reactor) -------

    def up(self) -> float:
        """Create the namespace and start the tenant broker; @return: seconds."""
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        if self.pki is not None:
            make_pki(self.pki.directory, owner=RABBITMQ_USER)
        self.namespace.create()
        self.tenant_node.prepare()
        started = self.tenant_node.start()
        if isinstance(self.control_node, RabbitNode):
            self.control_node.stop(kill=True)  # a leftover from a crashed run
            self.control_node.prepare(plugins=self.control_plugins)
            started += self.control_node.start()
        return started

    def down(self) -> None:
        """Stop the lab's brokers and remove the namespace."""
        self.tenant_node.stop()
        if isinstance(self.control_node, RabbitNode):
            self.control_node.stop()
        self.namespace.delete()

    def vhosts(self, tag: str | None = None) -> tuple[str, str]:
        """
        Fresh vhosts for one scenario: one on each broker.

        @return: (control vhost, tenant vhost).
        """
        tag = tag or uuid.uuid4().hex[:8]
        control, tenant = f"msgmux-{self.name}-{tag}-control", f"msgmux-{self.name}-{tag}-tenant"
        self.control_node.add_vhost(control)
        self.tenant_node.add_vhost(tenant)
        return control, tenant

    def drop_vhosts(self, control: str, tenant: str) -> None:
        self.control_node.delete_vhost(control)
        self.tenant_node.delete_vhost(tenant)

    def node(self, side: str) -> RabbitNode | SystemBroker:
        """@return: the broker of C{side} (C{"control"} or C{"tenant"})."""
        return self.control_node if side == "control" else self.tenant_node

    def url(self, side: str, vhost: str, query: bool = True) -> str:
        """
        @return: the transport URL of a vhost on that side's broker, TLS
            (C{?ssl=1} unless not C{query}) if the side is in L{tls}.
        """
        return self.node(side).url(vhost, tls=side in self.tls, query=query)

    def broker_options(self, side: str) -> str:
        """
        @return: TOML keys for a C{[control]} or C{[tenant]} section that
            reach that side's broker as the lab set it up: its TLS files as
            an inline C{tls} table, and the login method.
        """
        if side not in self.tls:
            return ""
        assert self.pki is not None
        lines = [
            f'tls = {{ ca_file = "{self.pki.ca}", cert_file = "{self.pki.cert("client")}", key_file = "{self.pki.key("client")}" }}'
        ]
        if side in self.external:
            lines.append('login_method = "EXTERNAL"')
        return "\n".join(lines)

    def oslo_options(self, side: str) -> dict[str, Any]:
        """@return: oslo.messaging rabbit options for a peer on that side's broker."""
        if side not in self.tls:
            return {}
        assert self.pki is not None
        options: dict[str, Any] = {
            "ssl": True,
            "ssl_ca_file": self.pki.ca,
            "ssl_cert_file": self.pki.cert("client"),
            "ssl_key_file": self.pki.key("client"),
        }
        if side in self.external:
            options["rabbit_login_method"] = "EXTERNAL"
        return options

    def path(self, *parts: str) -> str:
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def write(self, name: str, text: str) -> str:
        path = self.path(name)
        with open(path, "w") as f:
            f.write(text)
        return path

    # --- processes ----------------------------------------------------------

    def spawn_half(
        self, config_path: str, label: str, in_tenant_network: bool, logger: str | None = None
    ) -> HalfProcess:
        """
        Run C{twistd -n msgmux --config} on the host or inside the namespace.

        @param logger: a C{twistd --logger} observer factory; its output
            then goes to the process's stdout (L{HalfProcess.output}).
        """
        log_path = self.path("logs", f"{label}.log")
        if os.path.exists(log_path):
            os.remove(log_path)
        logging = [f"--logger={logger}"] if logger else [f"--logfile={log_path}"]
        argv = [TWISTD, "-n", "--pidfile="] + logging + ["msgmux", "--config", config_path]
        return self.spawn(argv, label, in_tenant_network, log_path)

    def spawn(
        self,
        argv: list[str],
        label: str,
        in_tenant_network: bool = False,
        log_path: str | None = None,
        environment_extra: dict[str, str] | None = None,
    ) -> HalfProcess:
        """Run any lab process (its output is kept in memory if no log is given)."""
        process = HalfProcess(label, log_path or self.path("logs", f"{label}.log"))
        if in_tenant_network:
            argv = self.namespace.argv(argv)
        environment = dict(os.environ, **(environment_extra or {}))
        environment["PYTHONPATH"] = REPO + os.pathsep + environment.get("PYTHONPATH", "")
        self.reactor.spawnProcess(process, argv[0], argv, env=environment, path=self.root)
        self.processes.append(process)
        return process

    def spawn_peer(self, side: str, vhost: str, exchange: str = "openstack", **rabbit: Any) -> OsloPeer:
        """An oslo peer on the control broker (C{side="control"}) or the tenant one."""
        label = f"oslo-{side}-{len(self.processes)}"
        rabbit = {**self.oslo_options(side), **rabbit}
        peer = spawn_peer(
            self.reactor,
            self.url(side, vhost, query=False),
            self.path("logs", f"{label}.log"),
            label,
            namespace=self.namespace.name if side == "tenant" else None,
            exchange=exchange,
            rabbit_options=rabbit,
        )
        self.processes.append(peer)
        return peer

    async def stop_processes(self) -> None:
        """Stop every process this lab started (twistd halves get SIGTERM)."""
        waits = []
        for process in self.processes:
            if isinstance(process, HalfProcess):
                if process.running:
                    waits.append(process.stop())
            else:
                waits.append(process.quit())
        self.processes = []
        results = await defer.DeferredList(waits, consumeErrors=True)
        del results

    async def start_halves(
        self, name: str, control_vhost: str, tenant_vhost: str, routes: str, control_extra: str = ""
    ) -> tuple[HalfProcess, HalfProcess]:
        """
        Start a control half on the host and a tenant half in the namespace
        for one link, and wait until both have their broker channels.

        @param name: the link name (configs, socket and logs are named after it).
        @param routes: the TOML body of the link (its route keys).
        @param control_extra: more C{[control]} keys.
        """
        socket = self.path("sockets", f"{name}.sock")
        control_config = self.write(
            f"{name}-control.toml",
            f'[control]\ntransport_url = "{self.url("control", control_vhost)}"\n{self.broker_options("control")}\n'
            f'{control_extra}\n\n[[control.links]]\nname = "{name}"\nsocket = "{socket}"\n{routes}\n',
        )
        tenant_config = self.write(
            f"{name}-tenant.toml",
            f'[tenant]\ntransport_url = "{self.url("tenant", tenant_vhost)}"\nsocket = "{socket}"\n'
            f'{self.broker_options("tenant")}\n',
        )
        control = self.spawn_half(control_config, f"{name}-control", in_tenant_network=False)
        await self.wait_for_log(control, "listening on")
        tenant = self.spawn_half(tenant_config, f"{name}-tenant", in_tenant_network=True)
        await self.wait_for_log(control, "control broker channel ready")
        await self.wait_for_log(tenant, "tenant broker channel ready")
        return control, tenant

    async def wait_for_log(self, process: HalfProcess, text: str, timeout: float = 30.0, count: int = 1) -> None:
        """Wait until C{text} appears C{count} times in a half's log."""
        waited = 0.0
        while process.log().count(text) < count:
            if not process.running:
                raise AssertionError(
                    f"{process.label} exited ({process.exit_code}) before logging {text!r}:\n"
                    f"{process.output.decode(errors='replace')[-2000:]}{process.log()[-3000:]}"
                )
            if waited > timeout:
                raise AssertionError(f"{process.label} did not log {text!r} within {timeout}s:\n{process.log()[-3000:]}")
            await task.deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1


def kill_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
