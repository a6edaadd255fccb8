"""
msgmux with TLS-only brokers: real oslo.messaging clients and servers
(themselves on TLS, C{ssl = True}) on both sides, both halves over TLS, the
tenant half and tenant peers logging in with EXTERNAL (their client
certificate).  Then what goes wrong in TLS deployments, on the control
half's side: a wrong CA, an expired certificate (the broker's, then our
own), a certificate for another host, and TLS against a plain AMQP port.
Each must give one clear log line, failed attempts retried with backoff and
counted, no crash, and nothing lost once the problem is fixed.

All of it runs in one shared TLS lab (two private RabbitMQ nodes with TLS
listeners only, a PKI made for the run).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet import task, threads

from lab.lab import HalfProcess
from lab.peer import OsloPeer
from lab.rabbit import RabbitNode
from tests.integration.support import LabTestCase, control_config, fetch_metrics

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1", "agent-2"], fanout = true } ]
up = [ { topic = "q-reports", methods = ["report_state", "echo"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info"] } ]
"""


async def settle(reactor: Any, seconds: float = 1.0) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def received(peer: OsloPeer, name: str, count: int, reactor: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
    waited = 0.0
    while True:
        got = await peer.request("received", name=name)
        if len(got) >= count or waited >= timeout:
            return got
        await settle(reactor, 0.2)
        waited += 0.2


class TlsRelayTests(LabTestCase):
    """Everything crosses msgmux with both brokers on TLS only."""

    tls = True

    async def test_rpc_and_notifications_over_tls(self) -> None:
        """
        Calls, casts, direct casts and fanout down; calls, casts and
        notifications up: oslo on TLS on both brokers, msgmux on TLS to both,
        the tenant side logged in by certificate (EXTERNAL).
        """
        control_half, tenant_half = await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await tenant.request("server", name="agent-2", topic="l3_agent", server="agent-2")
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await control.request("listener", name="listener", topics=["notifications"], pool="tls")
        await settle(self.lab.reactor)

        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"a": 1}, context={"user": "alice"})
        self.assertEqual((reply["kwargs"], reply["context"]["user"]), ({"a": 1}, "alice"))
        reply = await control.request("call", topic="l3_agent", server="agent-2", method="echo", kwargs={"b": 2})
        self.assertEqual(reply["server"], "agent-2")
        await control.request("cast", topic="l3_agent", server="agent-1", method="echo", kwargs={"direct": True})
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"fan": "out"})
        result = await control.request("calls", topic="l3_agent", count=40, threads=8)
        self.assertEqual((result["errors"], len(result["latencies"])), ([], 40))

        reply = await tenant.request("call", topic="q-reports", method="report_state", kwargs={"agent": "a1"})
        self.assertEqual(reply, {"server": "q-server", "state": "ok"})
        await tenant.request("cast", topic="q-reports", method="echo", kwargs={"up": "cast"})
        await tenant.request("notify", topic="notifications", priority="info", event_type="agent.up", payload={"p": 1})

        agent_1 = [r["kwargs"] for r in await received(tenant, "agent-1", 2, self.lab.reactor)]
        self.assertIn({"direct": True}, agent_1)
        for name in ("agent-1", "agent-2"):
            got = [r["kwargs"] for r in await received(tenant, name, 1, self.lab.reactor)]
            self.assertEqual(got.count({"fan": "out"}), 1, name)
        got = [r["kwargs"] for r in await received(control, "q-server", 2, self.lab.reactor)]
        self.assertEqual(got, [{"agent": "a1"}, {"up": "cast"}])
        notifications = await received(control, "listener", 1, self.lab.reactor)
        self.assertEqual([(n["event_type"], n["payload"]) for n in notifications], [("agent.up", {"p": 1})])

        # What the brokers say about msgmux's connections: TLS on both,
        # EXTERNAL on the tenant broker (user from the certificate's CN).
        for side, half, mechanism in (("control", control_half, "PLAIN"), ("tenant", tenant_half, "EXTERNAL")):
            rows = await threads.deferToThread(
                self.lab.node(side).ctl, "list_connections", "client_properties", "auth_mechanism", "ssl", "user"
            )
            ours = [line for line in rows.splitlines() if f"msgmux {side}" in line]
            self.assertTrue(ours, rows)
            for line in ours:
                self.assertEqual(line.split("\t")[-3:], [mechanism, "true", "guest"], line)
            self.assertIn("over TLS", half.log())


class TlsFailureTests(LabTestCase):
    """
    The control half cannot complete the TLS handshake with its broker.
    Meanwhile agents keep casting up (the casts wait on the tenant broker);
    once the problem is fixed, every one of them reaches the control server.
    """

    tls = True
    timeout = 180

    async def _set_up(self) -> None:
        await super()._set_up()
        # Files this test may break and repair, copies of the lab's.
        self.files = self.lab.path(f"tls-{self.tag}")
        os.makedirs(self.files, exist_ok=True)
        pki = self.lab.pki
        assert pki is not None
        self.pki = pki
        for name in ("ca.pem", "client.pem", "client.key"):
            shutil.copyfile(pki.path(name), os.path.join(self.files, name))
        self.metrics = f"unix:{self.lab.path('sockets', f'control-metrics-{self.tag}.sock')}"
        self.addCleanup(threads.deferToThread, self.control_node().use_certificate, "server")

    def control_node(self) -> RabbitNode:
        """The lab's private TLS control broker (a TLS lab has no system broker)."""
        node = self.lab.control_node
        assert isinstance(node, RabbitNode)
        return node

    def file(self, name: str) -> str:
        return os.path.join(self.files, name)

    def install(self, source: str, target: str) -> None:
        shutil.copyfile(source, self.file(target))

    def broker_keys(self) -> str:
        return f'tls = {{ ca_file = "{self.file("ca.pem")}", cert_file = "{self.file("client.pem")}", key_file = "{self.file("client.key")}" }}'

    async def _broken(
        self, reason: str, url: str | None = None, broker_certificate: str | None = None
    ) -> tuple[HalfProcess, OsloPeer, OsloPeer]:
        """
        Start the link with the control half's broker connection failing
        for C{reason}; agents cast 20 messages up meanwhile.  Checks the one
        log line, the retries and the counter, and that the half lives.

        @param broker_certificate: what the control broker presents to new
            connections, once the oslo peers are connected.
        """
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        if broker_certificate is not None:
            await threads.deferToThread(self.control_node().use_certificate, broker_certificate)
        control_half, tenant_half = await self.start_link(
            ROUTES, extra=f'metrics = "{self.metrics}"', wait=False, control_broker=self.broker_keys(), control_url=url
        )
        await self.lab.wait_for_log(tenant_half, "tenant broker channel ready")
        for index in range(20):
            await tenant.request("cast", topic="q-reports", method="echo", kwargs={"i": index})
        await self.lab.wait_for_log(control_half, "Scheduling retry 3 ")
        self.assertTrue(control_half.running)
        log = control_half.log()
        episodes = re.findall(r"Broker control at [^:]+:\d+: (.*) \[([a-z-]+)\]; retrying with backoff", log)
        self.assertEqual([kind for _, kind in episodes], [reason], log[-3000:])
        text = await fetch_metrics(self.lab.reactor, self.metrics)
        count = re.search(r'msgmux_broker_connect_failures_total\{broker="control",reason="%s"\} (\d+)' % reason, text)
        assert count is not None, text
        self.assertGreaterEqual(float(count.group(1)), 3)
        self.assertIn('msgmux_broker_connected{broker="control"} 0.0', text)
        self.assertEqual(await control.request("received", name="q-server"), [])
        return control_half, control, tenant

    async def _all_arrive(self, control_half: HalfProcess, control: OsloPeer, reason: str) -> None:
        """After the fix: connected, the episode's end logged, all 20 casts delivered once, calls work."""
        await self.lab.wait_for_log(control_half, "control broker channel ready", timeout=60)
        self.assertIn(f"failed attempt(s) [{reason}]", control_half.log())
        got = await received(control, "q-server", 20, self.lab.reactor)
        self.assertEqual(sorted(r["kwargs"]["i"] for r in got), list(range(20)))

    async def test_wrong_ca(self) -> None:
        """ca_file holds another CA: untrusted; fixed by the right CA file and a SIGHUP."""
        self.install(self.pki.path("other-ca.pem"), "ca.pem")
        control_half, control, _ = await self._broken("tls-untrusted")
        self.assertIn("is ca_file the CA that signed", control_half.log())
        self.install(self.pki.ca, "ca.pem")
        control_half.signal("HUP")
        await self._all_arrive(control_half, control, "tls-untrusted")

    async def test_expired_client_certificate(self) -> None:
        """
        Our own certificate expired: the broker refuses it; a new
        certificate and key in the same files and a SIGHUP (rotation) fix it.
        """
        self.install(self.pki.cert("client-expired"), "client.pem")
        self.install(self.pki.key("client-expired"), "client.key")
        control_half, control, _ = await self._broken("tls-rejected")
        self.install(self.pki.cert("client"), "client.pem")
        self.install(self.pki.key("client"), "client.key")
        control_half.signal("HUP")
        await self.lab.wait_for_log(control_half, "TLS files re-read")
        await self._all_arrive(control_half, control, "tls-rejected")

    async def test_expired_broker_certificate(self) -> None:
        """The broker's certificate expired: fixed on the broker (a new certificate), msgmux reconnects by itself."""
        control_half, control, _ = await self._broken("tls-expired", broker_certificate="server-expired")
        self.assertIn("has expired", control_half.log())
        await threads.deferToThread(self.control_node().use_certificate, "server")
        await self._all_arrive(control_half, control, "tls-expired")

    async def test_hostname_mismatch(self) -> None:
        """The broker's certificate is for another host: fixed on the broker, msgmux reconnects by itself."""
        control_half, control, _ = await self._broken("tls-hostname", broker_certificate="server-wrong-name")
        self.assertIn("broker.invalid", control_half.log())
        await threads.deferToThread(self.control_node().use_certificate, "server")
        await self._all_arrive(control_half, control, "tls-hostname")

    async def test_plain_port(self) -> None:
        """
        TLS against a plain AMQP port (the machine's RabbitMQ): said so;
        fixed by correcting the URL and restarting the half.
        """
        plain = "rabbit://guest:guest@127.0.0.1:5672/?ssl=1"
        control_half, control, _ = await self._broken("tls-not-tls", url=plain)
        self.assertIn("a plain AMQP port?", control_half.log())
        await control_half.stop()
        fixed = control_config(
            self.lab,
            self.control_vhost,
            self.socket_path("tenant-a"),
            "tenant-a",
            ROUTES,
            extra=f'metrics = "{self.metrics}"',
            broker=self.broker_keys(),
        )
        again = self.lab.spawn_half(fixed, f"tenant-a-{self.tag}-control-2", in_tenant_network=False)
        await self._all_arrive_fresh(again, control)

    async def test_failover_past_a_host_without_tls(self) -> None:
        """
        A failed handshake is a failed attempt like any other: with a plain
        port listed first, the half logs it once and fails over to the next
        host, which works.
        """
        node = self.lab.control_node
        good = node.url(self.control_vhost)
        both = good.replace("@127.0.0.1:", "@127.0.0.1:5672,127.0.0.1:", 1)
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        control_half, _ = await self.start_link(ROUTES, extra=f'metrics = "{self.metrics}"', control_broker=self.broker_keys(), control_url=both)
        reply = await tenant.request("call", topic="q-reports", method="report_state", kwargs={"agent": "a1"})
        self.assertEqual(reply, {"server": "q-server", "state": "ok"})
        log = control_half.log()
        self.assertEqual(log.count("[tls-not-tls]; retrying with backoff"), 1, log[-3000:])
        self.assertIn("Broker control at 127.0.0.1:5672: no TLS on this port", log)
        self.assertIn(f"Connected to control broker at 127.0.0.1:{node.tls_port}", log)

    async def _all_arrive_fresh(self, control_half: HalfProcess, control: OsloPeer) -> None:
        await self.lab.wait_for_log(control_half, "control broker channel ready", timeout=60)
        got = await received(control, "q-server", 20, self.lab.reactor)
        self.assertEqual(sorted(r["kwargs"]["i"] for r in got), list(range(20)))
