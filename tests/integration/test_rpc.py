"""
oslo.messaging RPC through msgmux, with unmodified oslo clients and servers
on both brokers: cast, call, fanout, direct-to-server, replies, remote
exceptions, call-monitor heartbeats, timeouts, large and unicode payloads,
concurrency; downstream and upstream.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from lab.peer import OsloPeer, PeerFailure
from tests.integration.support import LabTestCase, fetch_metrics

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1", "agent-2"], fanout = true } ]
up = [ { topic = "q-reports", methods = ["report_state", "echo"] } ]
"""


async def settle(reactor: Any, seconds: float = 1.0) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def received(
    peer: OsloPeer, name: str, count: int, reactor: Any, timeout: float = 20.0, kwargs: Any = None
) -> list[dict[str, Any]]:
    """
    Wait until server C{name} recorded at least C{count} requests (with
    these C{kwargs}, if given).
    """
    waited = 0.0
    while True:
        got = await peer.request("received", name=name)
        matching = [r for r in got if kwargs is None or r["kwargs"] == kwargs]
        if len(matching) >= count or waited >= timeout:
            return got
        await settle(reactor, 0.2)
        waited += 0.2


class DownstreamTests(LabTestCase):
    """A control-network client, tenant-network servers."""

    async def _start(self) -> tuple[OsloPeer, OsloPeer]:
        await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await tenant.request("server", name="agent-2", topic="l3_agent", server="agent-2")
        return control, tenant

    async def test_call_cast_direct(self) -> None:
        """Calls and casts to the topic and to one server arrive once, with replies and context."""
        control, tenant = await self._start()
        context = {"user": "alice", "request_id": "req-1", "roles": ["admin"]}
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"a": 1}, context=context)
        self.assertEqual(reply["kwargs"], {"a": 1})
        self.assertEqual(reply["context"]["user"], "alice")
        self.assertEqual(reply["context"]["roles"], ["admin"])
        reply = await control.request("call", topic="l3_agent", server="agent-2", method="echo", kwargs={"b": 2})
        self.assertEqual(reply["server"], "agent-2")
        await control.request("cast", topic="l3_agent", server="agent-1", method="echo", kwargs={"direct": True})
        got = await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"direct": True})
        self.assertIn({"direct": True}, [r["kwargs"] for r in got])
        # A cast to agent-2 sent after it arrives after anything misrouted to agent-2's queue.
        await control.request("cast", topic="l3_agent", server="agent-2", method="echo", kwargs={"sentinel": True})
        got = await received(tenant, "agent-2", 1, self.lab.reactor, kwargs={"sentinel": True})
        self.assertIn({"sentinel": True}, [r["kwargs"] for r in got])
        self.assertNotIn({"direct": True}, [r["kwargs"] for r in got])

    async def test_fanout_reaches_every_server_once(self) -> None:
        """A fanout cast reaches each tenant server exactly once, and control-side servers too."""
        control, tenant = await self._start()
        await control.request("server", name="ctl-1", topic="l3_agent", server="ctl-1")
        await settle(self.lab.reactor)
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"fan": "out"})
        for peer, name in ((tenant, "agent-1"), (tenant, "agent-2"), (control, "ctl-1")):
            got = await received(peer, name, 1, self.lab.reactor)
            self.assertEqual([r["kwargs"] for r in got].count({"fan": "out"}), 1, name)
        await settle(self.lab.reactor)
        for peer, name in ((tenant, "agent-1"), (tenant, "agent-2")):
            got = await peer.request("received", name=name)
            self.assertEqual([r["kwargs"] for r in got].count({"fan": "out"}), 1, name)

    async def test_topic_competes_fairly(self) -> None:
        """Casts to a topic served on both sides are shared between them; none lost, none doubled."""
        control, tenant = await self._start()
        await control.request("server", name="ctl-1", topic="l3_agent", server="ctl-1")
        await settle(self.lab.reactor)
        count = 60
        await control.request("casts", topic="l3_agent", method="echo", count=count)
        seen: list[int] = []
        for _ in range(100):
            seen = []
            for peer, name in ((control, "ctl-1"), (tenant, "agent-1"), (tenant, "agent-2")):
                seen += [r["kwargs"]["i"] for r in await peer.request("received", name=name) if "i" in r["kwargs"]]
            if len(seen) >= count:
                break
            await settle(self.lab.reactor, 0.2)
        self.assertEqual(sorted(seen), list(range(count)))
        ctl = [r for r in await control.request("received", name="ctl-1") if "i" in r["kwargs"]]
        self.assertGreater(len(ctl), 0)
        self.assertLess(len(ctl), count)

    async def test_remote_exceptions(self) -> None:
        """Remote exceptions reach the caller exactly as from a server on the caller's own broker."""
        control, tenant = await self._start()
        await control.request("server", name="local", topic="local-topic", server="local")
        await settle(self.lab.reactor)
        for method, kwargs in (("boom", {}), ("custom", {"code": 42})):
            direct = await self.assertFailure(
                control.request("call", topic="local-topic", method=method, kwargs=kwargs), PeerFailure
            )
            relayed = await self.assertFailure(
                control.request("call", topic="l3_agent", method=method, kwargs=kwargs), PeerFailure
            )
            self.assertEqual(relayed.error, direct.error)
            self.assertEqual(relayed.kwargs, direct.kwargs)
            self.assertEqual(relayed.message.split("\n")[0].replace("agent-1", "X").replace("agent-2", "X"),
                             direct.message.split("\n")[0].replace("local", "X"))
        self.assertEqual(relayed.kwargs, {"code": 42})

    async def test_call_monitor_heartbeats(self) -> None:
        """A call longer than its call-monitor timeout succeeds: heartbeats cross the proxy."""
        control, tenant = await self._start()
        result = await control.request(
            "call", topic="l3_agent", method="sleep", kwargs={"seconds": 5}, timeout=30, call_monitor_timeout=2
        )
        self.assertEqual(result, 5)

    async def test_timeout(self) -> None:
        """
        A call outliving its timeout fails with MessagingTimeout, as on one
        broker, although the server got it; the reply that comes after the
        deadline is dropped by the control half and counted.
        """
        metrics = f"unix:{self.lab.path('sockets', f'control-metrics-{self.tag}.sock')}"
        await self.start_link(ROUTES, extra=f'metrics = "{metrics}"')
        control, tenant = await self.peers()
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        failure = await self.assertFailure(
            control.request("call", topic="l3_agent", method="sleep", kwargs={"seconds": 4}, timeout=2), PeerFailure
        )
        self.assertEqual(failure.error, "MessagingTimeout")
        self.assertEqual([r["method"] for r in await received(tenant, "agent-1", 1, self.lab.reactor)], ["sleep"])
        late = 'msgmux_messages_rejected_total{direction="up",half="control",link="tenant-a",reason="late-reply"} 1.0'
        waited = 0.0
        while late not in (text := await fetch_metrics(self.lab.reactor, metrics)) and waited < 20:
            await settle(self.lab.reactor, 0.2)
            waited += 0.2
        self.assertIn(late, text)

    async def test_expired_request_not_forwarded(self) -> None:
        """A call that timed out while the tenant half was away never reaches a server."""
        control_half, tenant_half = await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await tenant_half.stop()
        failure = await self.assertFailure(
            control.request("call", topic="l3_agent", method="echo", kwargs={"stale": True}, timeout=2), PeerFailure
        )
        self.assertEqual(failure.error, "MessagingTimeout")
        tenant_half = self.lab.spawn_half(
            self.lab.path("tenant-a-tenant.toml"), f"tenant-a-{self.tag}-tenant-2", in_tenant_network=True
        )
        await self.lab.wait_for_log(tenant_half, "tenant broker channel ready")
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"fresh": True})
        self.assertEqual(reply["kwargs"], {"fresh": True})
        kwargs = [r["kwargs"] for r in await tenant.request("received", name="agent-1")]
        self.assertNotIn({"stale": True}, kwargs)

    async def test_request_expiring_inside_msgmux_is_dropped(self) -> None:
        """
        A call whose deadline passes after msgmux took it from the broker
        (here: while the tenant half is frozen, the request waiting in the
        socket) is dropped by msgmux and counted, never published for a
        server to answer too late.
        """
        metrics = f"unix:{self.lab.path('sockets', f'tenant-metrics-{self.tag}.sock')}"
        control_half, tenant_half = await self.start_link(ROUTES, link_heartbeat=10.0, tenant_extra=f'metrics = "{metrics}"')
        control, tenant = await self.peers()
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await control.request("call", topic="l3_agent", method="echo", kwargs={"warm": True})
        tenant_half.signal("STOP")
        failure = await self.assertFailure(
            control.request("call", topic="l3_agent", method="echo", kwargs={"stale": True}, timeout=2), PeerFailure
        )
        self.assertEqual(failure.error, "MessagingTimeout")
        # msgmux's deadline started when the control half took the request,
        # a little after the client's: let it pass too.
        await settle(self.lab.reactor, 1.0)
        tenant_half.signal("CONT")
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"fresh": True})
        self.assertEqual(reply["kwargs"], {"fresh": True})
        kwargs = [r["kwargs"] for r in await tenant.request("received", name="agent-1")]
        self.assertEqual(kwargs, [{"warm": True}, {"fresh": True}])
        text = await fetch_metrics(self.lab.reactor, metrics)
        self.assertIn('msgmux_messages_expired_total{direction="down",half="tenant",link="tenant-a"} 1.0', text)

    async def test_large_and_unicode_payloads(self) -> None:
        """1 MiB arguments and nested unicode survive the round trip unchanged."""
        control, tenant = await self._start()
        big = "é" * (512 * 1024)  # 1 MiB as UTF-8
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"big": big}, timeout=60)
        self.assertEqual(reply["kwargs"]["big"], big)
        nested = {"naïve": ["日本語", {"emoji": "🙂", "n": [1, 2.5, None, True]}], "empty": {}}
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"nested": nested})
        self.assertEqual(reply["kwargs"]["nested"], nested)

    async def test_concurrent_calls(self) -> None:
        """50 concurrent calls each get their own reply."""
        control, tenant = await self._start()
        result = await control.request("calls", topic="l3_agent", count=50, threads=50)
        self.assertEqual(result["errors"], [])
        self.assertEqual(len(result["latencies"]), 50)


class UpstreamTests(LabTestCase):
    """A tenant-network client (an agent), control-network servers."""

    async def test_call_and_cast_up(self) -> None:
        """An agent's allowed call and cast reach the control server; the reply comes back down."""
        await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await settle(self.lab.reactor)
        reply = await tenant.request("call", topic="q-reports", method="report_state", kwargs={"agent": "a1"})
        self.assertEqual(reply, {"server": "q-server", "state": "ok"})
        await tenant.request("cast", topic="q-reports", method="echo", kwargs={"up": "cast"})
        got = await received(control, "q-server", 2, self.lab.reactor)
        self.assertEqual([r["kwargs"] for r in got], [{"agent": "a1"}, {"up": "cast"}])

    async def test_large_unicode_context_and_direct_up(self) -> None:
        """
        Upstream too: 1 MiB and nested unicode arguments and the context
        reach the control server and come back intact, to the topic and to
        one server of it.
        """
        routes = ROUTES.replace('{ topic = "q-reports", methods', '{ topic = "q-reports", servers = ["q-server"], methods')
        await self.start_link(routes)
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await settle(self.lab.reactor)
        big = "é" * (512 * 1024)  # 1 MiB as UTF-8
        nested = {"naïve": ["日本語", {"emoji": "🙂", "n": [1, 2.5, None, True]}], "empty": {}}
        context = {"user": "agent-1", "request_id": "req-up", "roles": ["service"]}
        reply = await tenant.request(
            "call", topic="q-reports", method="echo", kwargs={"big": big, "nested": nested}, context=context, timeout=60
        )
        self.assertEqual(reply["kwargs"], {"big": big, "nested": nested})
        self.assertEqual((reply["context"]["user"], reply["context"]["roles"]), ("agent-1", ["service"]))
        reply = await tenant.request("call", topic="q-reports", server="q-server", method="echo", kwargs={"direct": True})
        self.assertEqual((reply["server"], reply["kwargs"]), ("q-server", {"direct": True}))

    async def test_remote_exceptions_heartbeats_and_timeouts_up(self) -> None:
        """
        Upstream calls behave as on one broker too: a remote exception
        reaches the agent, call-monitor heartbeats keep a long call alive,
        and a call outliving its timeout fails with MessagingTimeout.
        """
        routes = ROUTES.replace('methods = ["report_state", "echo"]', 'methods = ["report_state", "echo", "boom", "sleep"]')
        await self.start_link(routes)
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await settle(self.lab.reactor)
        failure = await self.assertFailure(tenant.request("call", topic="q-reports", method="boom"), PeerFailure)
        self.assertEqual(failure.error, "ValueError")
        self.assertIn("boom from q-server", failure.message)
        result = await tenant.request(
            "call", topic="q-reports", method="sleep", kwargs={"seconds": 5}, timeout=30, call_monitor_timeout=2
        )
        self.assertEqual(result, 5)
        failure = await self.assertFailure(
            tenant.request("call", topic="q-reports", method="sleep", kwargs={"seconds": 4}, timeout=2), PeerFailure
        )
        self.assertEqual(failure.error, "MessagingTimeout")

    async def test_concurrent_calls_up(self) -> None:
        """50 concurrent agent calls each get their own reply."""
        await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await settle(self.lab.reactor)
        result = await tenant.request("calls", topic="q-reports", count=50, threads=50)
        self.assertEqual(result["errors"], [])


class QueueOptionTests(LabTestCase):
    """msgmux declares what oslo declares, whatever the options."""

    async def _roundtrip(self, queues: str, rabbit: dict[str, Any]) -> None:
        await self.start_link(ROUTES, queues=queues, tenant_queues=queues)
        control, tenant = await self.peers(**rabbit)
        # Servers declared after msgmux: a mismatch would fail here.
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await settle(self.lab.reactor)
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"x": 1})
        self.assertEqual(reply["kwargs"], {"x": 1})
        reply = await tenant.request("call", topic="q-reports", method="report_state")
        self.assertEqual(reply["state"], "ok")
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"f": 1})
        got = await received(tenant, "agent-1", 2, self.lab.reactor)
        self.assertIn({"f": 1}, [r["kwargs"] for r in got])

    async def test_durable_queues(self) -> None:
        """amqp_durable_queues on both brokers: no PRECONDITION_FAILED anywhere."""
        await self._roundtrip("amqp_durable_queues = true", {"amqp_durable_queues": True})

    async def test_quorum_queues(self) -> None:
        """Quorum queues (and transient quorum queues) on both brokers work."""
        await self._roundtrip(
            "rabbit_quorum_queue = true\nrabbit_transient_quorum_queue = true",
            {"rabbit_quorum_queue": True, "rabbit_transient_quorum_queue": True},
        )

    async def test_stream_fanout(self) -> None:
        """rabbit_stream_fanout (fanout through a stream, quorum transient queues) works on both brokers."""
        await self._roundtrip(
            "rabbit_transient_quorum_queue = true\nrabbit_stream_fanout = true",
            {"rabbit_transient_quorum_queue": True, "rabbit_stream_fanout": True, "rabbit_qos_prefetch_count": 64},
        )

    async def test_stream_fanout_resumes(self) -> None:
        """Fanout casts sent through a stream while the tenant half is away reach the servers once it is back."""
        queues = "rabbit_transient_quorum_queue = true\nrabbit_stream_fanout = true"
        rabbit = {"rabbit_transient_quorum_queue": True, "rabbit_stream_fanout": True, "rabbit_qos_prefetch_count": 64}
        control_half, tenant_half = await self.start_link(ROUTES, queues=queues, tenant_queues=queues)
        control, tenant = await self.peers(**rabbit)
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await settle(self.lab.reactor)
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"i": -1})
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"i": -1})
        await tenant_half.stop()
        for index in range(30):
            await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"i": index})
        tenant_half = self.lab.spawn_half(
            self.lab.path("tenant-a-tenant.toml"), f"tenant-a-{self.tag}-tenant-2", in_tenant_network=True
        )
        got = await received(tenant, "agent-1", 31, self.lab.reactor, timeout=30)
        seen = [r["kwargs"]["i"] for r in got if "i" in r["kwargs"]]
        self.assertEqual(sorted(seen), list(range(-1, 30)))

    async def test_mismatch_is_reported(self) -> None:
        """
        If msgmux's options differ from oslo's, the control half says so in
        its log, once however often it retries: what differs, the options
        behind it, what to do, and RabbitMQ's words.
        """
        control_peer = self.lab.spawn_peer("control", self.control_vhost, amqp_durable_queues=True)
        await control_peer.ready
        # An oslo server with durable queues declares l3_agent first...
        await control_peer.request("server", name="ctl-1", topic="l3_agent", server="ctl-1")
        # ... then msgmux, configured with oslo's defaults, cannot.
        control_half, _ = await self.start_link(ROUTES, wait=False)
        await self.lab.wait_for_log(control_half, "PRECONDITION_FAILED")
        await settle(self.lab.reactor, 3.5)  # three more attempts
        log = control_half.log()
        self.assertEqual(log.count("could not set up the control broker channel"), 1)
        self.assertIn(
            "exchange 'openstack' differs on the control broker: durable is true there, msgmux declares false"
            " (set by amqp_durable_queues, rabbit_quorum_queue in [control.queues])",
            log,
        )
        self.assertIn("make it equal to the [oslo_messaging_rabbit] options of the services on this broker", log)
        self.assertIn("RabbitMQ: PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'openstack'", log)
