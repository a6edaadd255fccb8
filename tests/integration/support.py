"""
Shared set-up for the integration tests.

One lab (namespace plus tenant RabbitMQ node) serves the whole test run: it
starts on first use and stops when the test process exits.  Each test gets
fresh vhosts on both brokers, its own sockets and its own msgmux processes,
so tests cannot see each other's messages.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import uuid
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from lab.lab import HalfProcess, Lab
from lab.peer import OsloPeer
from msgmux.cli import client_endpoint

_lab: Lab | None = None
_tls_lab: Lab | None = None
_lab_lock = threading.Lock()


def skip_reason() -> str | None:
    """
    Why integration tests are skipped, or L{None}: only when they were not
    asked for.  Asked for (C{make test}), they fail on a machine that cannot
    run them, rather than pass by skipping.
    """
    if os.environ.get("MSGMUX_INTEGRATION") != "1":
        return "integration tests run with MSGMUX_INTEGRATION=1 (make test sets it)"
    return None


def missing_prerequisite() -> str | None:
    """What this machine lacks to run the integration tests, or L{None}."""
    if os.geteuid() != 0:
        return "integration tests need root (ip netns, a private RabbitMQ node)"
    if shutil.which("rabbitmq-server") is None or shutil.which("ip") is None:
        return "integration tests need rabbitmq-server and iproute2"
    return None


def _shared_lab() -> Lab:
    global _lab
    with _lab_lock:
        if _lab is None:
            lab = Lab(f"test{os.getpid() % 100000}", reactor)
            lab.up()
            atexit.register(lab.down)
            _lab = lab
        return _lab


def _free_port() -> int:
    """A loopback port free now, with its distribution port (+20000) free too."""
    import random
    import socket

    for _ in range(100):
        port = random.randrange(6000, 40000)
        try:
            for candidate in (port, port + 20000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


def _shared_tls_lab() -> Lab:
    global _tls_lab
    with _lab_lock:
        if _tls_lab is None:
            lab = Lab(
                f"tls{os.getpid() % 100000}",
                reactor,
                tls=("control", "tenant"),
                external=("tenant",),
                control_port=_free_port(),
            )
            lab.up()
            atexit.register(lab.down)
            _tls_lab = lab
        return _tls_lab


def shared_tls_lab() -> defer.Deferred[Lab]:
    """
    The run's TLS lab, started on first use: both brokers are private
    nodes that listen only for TLS (the control one on the host, on a free
    port), with a PKI made for the run; the tenant side logs in with
    EXTERNAL (its client certificate), the control side with PLAIN.
    """
    return threads.deferToThread(_shared_tls_lab)


async def fetch_metrics(reactor: Any, endpoint: str) -> str:
    """The Prometheus text a running half serves on C{endpoint} (an endpoint description)."""

    class Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            return client_endpoint(reactor, endpoint)

    response = await Agent.usingEndpointFactory(reactor, Endpoints()).request(b"GET", b"http://msgmux/metrics")
    body: bytes = await readBody(response)
    return body.decode()


def shared_lab() -> defer.Deferred[Lab]:
    """The run's lab, started on first use (in a thread: it blocks)."""
    return threads.deferToThread(_shared_lab)


def control_config(
    lab: Lab,
    vhost: str,
    socket: str,
    link: str,
    routes: str,
    limits: str = "",
    extra: str = "",
    queues: str = "",
    link_heartbeat: float = 1.0,
    broker: str | None = None,
    url: str | None = None,
) -> str:
    """
    Write a control half config; C{routes} is the TOML body of the link.

    @param broker: keys that reach the broker (TLS, login method) instead of
        the lab's; @param url: a transport URL instead of the lab's.

    @param link_heartbeat: short by default, so that tests which stop a half
        see the session end quickly; a test that freezes a half on purpose
        sets it longer than the freeze.
    """
    return lab.write(
        f"{link}-control.toml",
        f"""
[control]
transport_url = "{url or lab.url("control", vhost)}"
exchange = "openstack"
link_heartbeat = {link_heartbeat}
{lab.broker_options("control") if broker is None else broker}
{extra}

[control.queues]
{queues}

[[control.links]]
name = "{link}"
socket = "{socket}"
{routes}

[control.links.limits]
{limits}
""",
    )


def tenant_config(lab: Lab, vhost: str, socket: str, link: str, queues: str = "", extra: str = "") -> str:
    """Write a tenant half config."""
    return lab.write(
        f"{link}-tenant.toml",
        f"""
[tenant]
transport_url = "{lab.url("tenant", vhost)}"
exchange = "openstack"
socket = "{socket}"
link = "{link}"
{lab.broker_options("tenant")}
{extra}

[tenant.queues]
{queues}
""",
    )


class LabTestCase(TestCase):
    """
    A test with both brokers, fresh vhosts and cleanup of whatever it spawned.

    @ivar lab: the shared lab.
    @ivar control_vhost: this test's vhost on the control broker.
    @ivar tenant_vhost: this test's vhost on the tenant broker.
    """

    timeout = 120
    skip = skip_reason()
    #: Whether the test runs in the shared TLS lab instead of the plain one.
    tls = False

    async def _set_up(self) -> None:
        missing = missing_prerequisite()
        if missing is not None:
            raise RuntimeError(missing)
        self.lab = await (shared_tls_lab() if self.tls else shared_lab())
        self.tag = uuid.uuid4().hex[:8]
        self.control_vhost, self.tenant_vhost = await threads.deferToThread(self.lab.vhosts, self.tag)
        self.addCleanup(threads.deferToThread, self.lab.drop_vhosts, self.control_vhost, self.tenant_vhost)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.lab.stop_processes()))

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._set_up())

    def socket_path(self, link: str) -> str:
        return self.lab.path("sockets", f"{link}-{self.tag}.sock")

    async def start_link(
        self,
        routes: str,
        link: str = "tenant-a",
        limits: str = "",
        extra: str = "",
        queues: str = "",
        tenant_queues: str = "",
        wait: bool = True,
        link_heartbeat: float = 1.0,
        tenant_extra: str = "",
        control_broker: str | None = None,
        control_url: str | None = None,
    ) -> tuple[HalfProcess, HalfProcess]:
        """
        Start a control half and a tenant half for one link and wait until
        both have their broker channels.
        """
        socket = self.socket_path(link)
        control = self.lab.spawn_half(
            control_config(
                self.lab, self.control_vhost, socket, f"{link}", routes, limits, extra, queues, link_heartbeat, control_broker, control_url
            ),
            f"{link}-{self.tag}-control",
            in_tenant_network=False,
        )
        await self.lab.wait_for_log(control, "listening on")
        tenant = self.lab.spawn_half(
            tenant_config(self.lab, self.tenant_vhost, socket, link, tenant_queues, tenant_extra),
            f"{link}-{self.tag}-tenant",
            in_tenant_network=True,
        )
        if wait:
            await self.lab.wait_for_log(control, "control broker channel ready")
            await self.lab.wait_for_log(tenant, "tenant broker channel ready")
        return control, tenant

    async def peers(self, **rabbit: Any) -> tuple[OsloPeer, OsloPeer]:
        """An oslo peer on each broker (the tenant one inside the namespace)."""
        control = self.lab.spawn_peer("control", self.control_vhost, **rabbit)
        tenant = self.lab.spawn_peer("tenant", self.tenant_vhost, **rabbit)
        await control.ready
        await tenant.ready
        return control, tenant
