"""
The trust boundary against a hostile tenant half.

The control half runs in this process against the real control broker; the
"tenant half" is the test itself, speaking the link protocol frame by frame
(L{RawTenant}).  A probe queue on the control broker sees everything that
reaches the routed exchange, so the tests can check that nothing the policy
refuses gets there, and that what passes carries the link's identity.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from twisted.internet import defer, reactor, task

from lab.hostile import BrokerProbe, connect_raw, oslo_body
from msgmux.config import load
from msgmux.control import IDENTITY_HEADER
from msgmux.link import codec
from msgmux.message import Message, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.service import ControlHalf
from tests.integration.support import LabTestCase, control_config

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1"] } ]
up = [ { topic = "q-reports", methods = ["report_state"] }, { topic = "q-plugin", servers = ["ctl-1"], methods = ["sync"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info"] } ]
"""

REPORT = oslo_body({"method": "report_state", "args": {"agent": "a1"}, "_unique_id": "u1"})


class TrustTests(LabTestCase):
    async def _start(self, limits: str = "", routes: str = ROUTES, extra: str = "") -> tuple[ControlHalf, Any, BrokerProbe]:
        path = control_config(self.lab, self.control_vhost, self.socket_path("tenant-a"), "tenant-a", routes, limits, extra)
        control = load(path).control
        assert control is not None
        half = ControlHalf(control, reactor)
        half.start()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(half.stop()))
        probe = BrokerProbe(reactor, self.lab.control_node.url(self.control_vhost))
        await probe.start(
            "probe",
            [
                ("openstack", "topic", "q-reports"),
                ("openstack", "topic", "q-plugin.#"),
                ("openstack", "topic", "notifications.*"),
                ("openstack", "topic", "l3_agent.#"),
            ],
        )
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(probe.stop()))
        await half.broker.when_connected()
        return half, half.links["tenant-a"], probe

    async def _settle(self, seconds: float = 0.5) -> None:
        await task.deferLater(reactor, seconds, lambda: None)

    async def test_good_traffic_is_stamped(self) -> None:
        """A permitted cast reaches the control broker with the link's identity, whatever the tenant claimed."""
        half, link, probe = await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        # CC and BCC would make RabbitMQ route the message to more queues.
        headers = {IDENTITY_HEADER: "tenant-b", "other": 1, "CC": ["l3_agent.agent-1"], "BCC": ["q-plugin.ctl-1"]}
        seq = tenant.send_message(
            RpcAddress(None, "q-reports"), REPORT, {"headers": headers, "user_id": "admin", "reply_to": "reply_victim"}
        )
        self.assertEqual(await tenant.wait_outcome(seq), "ack")
        await tenant.wait_for(lambda: len(probe.received) == 1)
        await self._settle()
        self.assertEqual(len(probe.received), 1)
        delivery = probe.received[0]
        self.assertEqual(delivery.routing_key, "q-reports")
        self.assertEqual(delivery.properties["headers"], {IDENTITY_HEADER: "tenant-a"})
        self.assertNotIn("user_id", delivery.properties)
        self.assertNotIn("reply_to", delivery.properties)
        self.assertEqual(delivery.body, REPORT)
        self.assertEqual(link.stats.get("relayed", direction="up"), 1)

    async def test_acknowledged_only_once_confirmed(self) -> None:
        """
        A message the control broker refuses (a full queue with
        x-overflow=reject-publish answers with basic.nack) is not
        acknowledged to the tenant half: it is published again until the
        broker takes it, and only then ACKed.
        """
        half, link, probe = await self._start()
        protocol = await half.broker.when_connected()
        channel = await protocol.open_channel()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(channel.close()))
        full = {"x-max-length": 1, "x-overflow": "reject-publish"}
        await channel.declare_queue(f"full-{self.tag}", durable=False, auto_delete=False, arguments=full)
        await channel.bind_queue(f"full-{self.tag}", "openstack", "q-reports")
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        first = tenant.send_message(RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_unique_id": "f1"}))
        self.assertEqual(await tenant.wait_outcome(first), "ack")  # fills the queue
        second = tenant.send_message(RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_unique_id": "f2"}))
        await tenant.wait_for(lambda: link.stats.get("nacked", direction="up") >= 2)  # refused, retried, refused
        self.assertIsNone(tenant.outcome(second))
        await channel.txamqp_channel.queue_purge(queue=f"full-{self.tag}")  # room again
        self.assertEqual(await tenant.wait_outcome(second), "ack")
        self.assertEqual(link.stats.get("relayed", direction="up"), 2)

    async def test_policy_refusals(self) -> None:
        """Disallowed routes, methods, servers, fanout and malformed messages are refused, counted, and never published."""
        half, link, probe = await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        cases = [
            (RpcAddress(None, "l3_agent"), REPORT, {}, "route"),  # a down-only topic
            (RpcAddress("nova", "q-reports"), REPORT, {}, "route"),  # another exchange
            (RpcAddress(None, "q-reports", None, True), REPORT, {}, "route"),  # fanout not allowed
            (RpcAddress(None, "q-plugin", "ctl-2"), oslo_body({"method": "sync"}), {}, "route"),  # unlisted server
            (RpcAddress(None, "q-reports"), oslo_body({"method": "delete_everything"}), {}, "method"),
            (RpcAddress(None, "q-reports"), b"not json", {}, "malformed"),
            (RpcAddress(None, "q-reports"), oslo_body({"args": {}}), {}, "method"),  # no method at all
            (RpcAddress(None, "q-reports"), REPORT, {"expiration": "soon"}, "malformed"),
            (RpcAddress(None, "q-reports"), REPORT, {"expiration": "\u0663"}, "malformed"),  # an Arabic-Indic digit
            (NotificationAddress(None, "notifications", "error"), oslo_body({"event_type": "x"}), {}, "route"),
            (NotificationAddress(None, "secrets", "info"), oslo_body({"event_type": "x"}), {}, "route"),
            # What the server would decode differently from what msgmux checked:
            (RpcAddress(None, "q-reports"), REPORT, {"content_type": "application/x-python-serialize"}, "malformed"),
            (RpcAddress(None, "q-reports"), REPORT, {"content_encoding": "utf-7"}, "malformed"),
            (RpcAddress(None, "q-reports"), REPORT.decode().encode("utf-16"), {}, "malformed"),
            (RpcAddress(None, "q-reports"), REPORT, {"headers": {"compression": "application/x-gzip"}}, "malformed"),
            # A call msgmux would not rewrite, answered by oslo into any queue:
            (RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_msg_id": 1, "_reply_q": "reply_victim"}), {}, "malformed"),
            (RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_msg_id": "m1"}), {}, "malformed"),
        ]
        for address, body, properties, reason in cases:
            seq = tenant.send_message(address, body, properties)
            self.assertEqual(await tenant.wait_outcome(seq), reason, (address, body))
        # The session survived all of it and still carries good traffic.
        seq = tenant.send_message(RpcAddress(None, "q-plugin", "ctl-1"), oslo_body({"method": "sync"}))
        self.assertEqual(await tenant.wait_outcome(seq), "ack")
        await tenant.wait_for(lambda: len(probe.received) == 1)
        await self._settle()
        self.assertEqual([d.routing_key for d in probe.received], ["q-plugin.ctl-1"])
        self.assertEqual(link.stats.get("rejected", direction="up"), len(cases))
        self.assertEqual(link.stats.get("rejected", direction="up", reason="route"), 6)
        self.assertEqual(link.stats.get("rejected", direction="up", reason="method"), 2)
        self.assertEqual(link.stats.get("rejected", direction="up", reason="malformed"), 9)

    async def test_replies_only_for_real_calls(self) -> None:
        """Forged, foreign, garbage and late reply tokens are refused; nothing reaches the control broker."""
        half, link, probe = await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        from msgmux.oslo.tokens import TokenSigner

        now = time.time()
        tokens = {
            "reply_0123456789abcdef": "unsolicited-reply",  # a bare oslo reply queue name
            TokenSigner(b"x" * 32).issue("tenant-a", "down", "m1", "reply_victim", now + 60): "unsolicited-reply",
            half.signer.issue("tenant-b", "down", "m1", "reply_victim", now + 60): "unsolicited-reply",
            # The token of a call the tenant itself made (up) is no reply to a control caller.
            half.signer.issue("tenant-a", "up", "m1", "reply_victim", now + 60): "unsolicited-reply",
            half.signer.issue("tenant-a", "down", "m1", "reply_victim", now - 1): "late-reply",
        }
        for token, reason in tokens.items():
            body = oslo_body({"result": "pwned", "failure": None, "ending": True, "_msg_id": token})
            seq = tenant.send_message(ReplyAddress(), body)
            self.assertEqual(await tenant.wait_outcome(seq), reason)
        await self._settle()
        self.assertEqual(probe.received, [])
        self.assertEqual(link.stats.get("rejected", direction="up", reason="unsolicited-reply"), 4)
        self.assertEqual(link.stats.get("rejected", direction="up", reason="late-reply"), 1)

    async def test_reply_goes_only_to_its_caller(self) -> None:
        """A genuine reply reaches its caller's queue only: BCC cannot copy it into a server's queue."""
        half, link, probe = await self._start()
        caller = BrokerProbe(reactor, self.lab.control_node.url(self.control_vhost))
        await caller.start("reply_caller", [])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(caller.stop()))
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        token = half.signer.issue("tenant-a", "down", "m1", "reply_caller", time.time() + 60)
        body = oslo_body({"result": "ok", "failure": None, "ending": True, "_msg_id": token})
        seq = tenant.send_message(ReplyAddress(), body, {"headers": {"BCC": ["q-reports"], "CC": ["probe"]}})
        self.assertEqual(await tenant.wait_outcome(seq), "ack")
        await tenant.wait_for(lambda: len(caller.received) == 1)
        await self._settle()
        self.assertEqual(probe.received, [])
        inner = json.loads(json.loads(caller.received[0].body)["oslo.message"])
        self.assertEqual((inner["_msg_id"], inner["result"]), ("m1", "ok"))

    async def test_returned_reply_is_retried(self) -> None:
        """A reply whose caller's queue is missing is retried, as oslo's server does, and arrives once the queue exists."""
        half, link, probe = await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        token = half.signer.issue("tenant-a", "down", "m2", "reply_late", time.time() + 60)
        body = oslo_body({"result": "late", "failure": None, "ending": True, "_msg_id": token})
        seq = tenant.send_message(ReplyAddress(), body)
        await tenant.wait_for(lambda: link.stats.get("returned", direction="up") >= 2)
        self.assertIsNone(tenant.outcome(seq))  # still held: not acknowledged, not refused
        caller = BrokerProbe(reactor, self.lab.control_node.url(self.control_vhost))
        await caller.start("reply_late", [])
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(caller.stop()))
        self.assertEqual(await tenant.wait_outcome(seq), "ack")
        await tenant.wait_for(lambda: len(caller.received) == 1)
        self.assertEqual(link.stats.get("undeliverable", direction="up"), 0)

    async def test_forged_canary(self) -> None:
        """A canary the control half did not sign is refused and does not make the link healthy."""
        half, link, probe = await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        forged = json.dumps({"sent": time.time(), "link": "tenant-a"}).encode()
        seq = tenant.send_message(codec.CanaryAddress(), forged)
        self.assertEqual(await tenant.wait_outcome(seq), "malformed")
        self.assertFalse(link.healthy())

    async def test_size_and_inflight_limits(self) -> None:
        """
        A message over max_message_size (announced in WELCOME, which a real
        tenant half keeps to) ends the session before its body is buffered;
        calls over max_inflight_calls are refused and counted.
        """
        half, link, probe = await self._start("max_message_size = 4096\nmax_inflight_calls = 2")
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        welcome = next(f for f in tenant.frames if isinstance(f, codec.Welcome))
        self.assertEqual(welcome.max_body, 4096)
        big = oslo_body({"method": "report_state", "args": {"blob": "x" * 5000}})
        tenant.send_message(RpcAddress(None, "q-reports"), big)
        await tenant.closed
        frame = tenant.close_frame()
        assert frame is not None
        self.assertEqual(frame.code, "bad-frame")
        await task.deferLater(reactor, 1.0, lambda: None)  # the next session, after the link's session budget
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        outcomes = []
        for index in range(3):
            call = oslo_body({"method": "report_state", "_msg_id": f"m{index}", "_reply_q": "reply_agent", "_unique_id": f"u{index}"})
            outcomes.append(await tenant.wait_outcome(tenant.send_message(RpcAddress(None, "q-reports"), call, {"expiration": "30000"})))
        self.assertEqual(outcomes, ["ack", "ack", "inflight"])
        self.assertEqual(link.calls.inflight("up"), 2)
        await self._settle()
        self.assertEqual(len(probe.received), 2)
        # Relayed calls carry a token and the control half's reply queue, not the tenant's.
        for delivery in probe.received:
            inner = json.loads(json.loads(delivery.body)["oslo.message"])
            self.assertTrue(inner["_msg_id"].startswith("mmx2."))
            self.assertEqual(inner["_reply_q"], "reply_msgmux_tenant-a")

    async def test_protocol_violations_close_the_session(self) -> None:
        """
        Malformed CBOR, oversized frames, a message before the handshake
        completed and sending without credit close the session; the next
        one works.
        """
        half, link, probe = await self._start("max_message_size = 4096", extra="link_window = 1")
        attacks: list[Any] = [
            lambda t: t.send_raw(struct.pack(">IB", 5, codec.CLOSE) + b"\xff\x00\x01\x02"),  # not CBOR
            lambda t: t.send_raw(struct.pack(">IBI", 10 * 1024 * 1024, codec.MSG, 100)),  # far over max_body
            lambda t: t.send_raw(struct.pack(">IB", 3, codec.ACK) + b"\x81\x18"),  # truncated CBOR value
        ]
        for attack in attacks:
            tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
            attack(tenant)
            await tenant.closed
            frame = tenant.close_frame()
            assert frame is not None
            self.assertEqual(frame.code, "bad-frame")
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"), hello=False)
        # HELLO and a MSG in one write: no MSG body is taken before the handshake.
        tenant.send_raw(
            codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "eager"))
            + codec.encode(codec.MessageFrame(1, Message(RpcAddress(None, "q-reports"), {}, REPORT)))
        )
        await tenant.closed
        frame = tenant.close_frame()
        assert frame is not None
        self.assertEqual(frame.code, "bad-frame")
        # A window of one message: a second one before the first is settled has no credit.
        await task.deferLater(reactor, 1.0, lambda: None)
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        self.assertEqual(tenant.credit(), 1)
        tenant.send_message(RpcAddress(None, "q-reports"), REPORT)
        tenant.send_message(RpcAddress(None, "q-reports"), REPORT)
        await tenant.closed
        frame = tenant.close_frame()
        assert frame is not None
        self.assertEqual(frame.code, "flow-control")
        self.assertEqual(link.stats.get("protocol_violations"), 5)
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        self.assertEqual(await tenant.wait_outcome(tenant.send_message(RpcAddress(None, "q-reports"), REPORT)), "ack")

    async def test_rate_limit_withholds_credit(self) -> None:
        """
        A tenant that sends as fast as its credit allows is throttled; what
        it sends waits for credit and nothing is dropped.  (How much credit
        the bucket grants over time is checked against a fake clock in
        tests/test_pacing.py.)
        """
        half, link, probe = await self._start("max_rate = 20.0\nburst = 10")
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        sent = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            while sent < tenant.credit():
                # Each its own _unique_id, as oslo sends them (repeats are dropped as duplicates).
                tenant.send_message(RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_unique_id": f"r{sent}"}))
                sent += 1
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertGreater(sent, 10)  # beyond the burst
        self.assertGreater(link.stats.get("throttled"), 0)
        await tenant.wait_for(lambda: all(tenant.outcome(s) == "ack" for s in range(1, sent + 1)))
        await tenant.wait_for(lambda: len(probe.received) == sent)

    async def test_down_methods_restricted(self) -> None:
        """A down route listing methods relays only those; the others are dropped and counted."""
        routes = ROUTES.replace('servers = ["agent-1"] }', 'servers = ["agent-1"], methods = ["sync_routers"] }')
        half, link, probe = await self._start(routes=routes)
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        tenant.send(codec.Credit(10, 1 << 20))
        assert probe.channel is not None
        for method in ("delete_router", "sync_routers"):
            await probe.channel.publish(
                "openstack", "l3_agent", {"content_type": "application/json"}, oslo_body({"method": method, "args": {}})
            )
        await tenant.wait_for(lambda: any(isinstance(f, codec.MessageFrame) for f in tenant.frames))
        await self._settle()
        relayed = [f for f in tenant.frames if isinstance(f, codec.MessageFrame)]
        self.assertEqual(len(relayed), 1)
        self.assertIn(b"sync_routers", relayed[0].message.body)
        self.assertEqual(link.stats.get("rejected", direction="down", reason="method"), 1)

    async def test_second_tenant_is_refused(self) -> None:
        """While a tenant half holds the link, another one is turned away with 'busy'."""
        half, link, probe = await self._start()
        first = await connect_raw(reactor, self.socket_path("tenant-a"))
        second = await connect_raw(reactor, self.socket_path("tenant-a"), hello=False)
        second.send(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "intruder"))
        await second.closed
        self.assertEqual(second.close_frame().code, "busy")
        self.assertEqual(await first.wait_outcome(first.send_message(RpcAddress(None, "q-reports"), REPORT)), "ack")

    async def test_connections_before_handshake_are_limited(self) -> None:
        """Sockets that never say HELLO are capped, and get no room for large frames; the real tenant half still connects."""
        from msgmux.control.factory import MAX_PENDING_CONNECTIONS

        half, link, probe = await self._start()
        idle = [await connect_raw(reactor, self.socket_path("tenant-a"), hello=False) for _ in range(MAX_PENDING_CONNECTIONS)]
        refused = await connect_raw(reactor, self.socket_path("tenant-a"), hello=False)
        await refused.closed
        self.assertEqual(link.stats.get("connections_refused"), 1)
        idle[0].send_raw(struct.pack(">IB", 1024 * 1024, codec.MSG))  # a large frame before HELLO
        await idle[0].closed
        self.assertEqual(idle[0].close_frame().code, "bad-frame")
        for connection in idle[1:]:
            connection.transport.loseConnection()
            await connection.closed
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"))
        self.assertEqual(await tenant.wait_outcome(tenant.send_message(RpcAddress(None, "q-reports"), REPORT)), "ack")

    async def test_sessions_are_rate_limited(self) -> None:
        """A tenant half that reconnects in a loop gets 'busy' after a burst, instead of costing the control broker a channel each time."""
        from msgmux.control.link import SESSION_BURST

        half, link, probe = await self._start()
        codes = []
        for _ in range(SESSION_BURST + 1):
            tenant = await connect_raw(reactor, self.socket_path("tenant-a"), hello=False)
            tenant.send(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "flapping"))
            await tenant.wait_for(lambda: tenant.credit() > 0 or tenant.close_frame() is not None)
            close = tenant.close_frame()
            codes.append(close.code if close is not None else "welcome")
            tenant.transport.loseConnection()
            await tenant.closed
        self.assertEqual(codes, ["welcome"] * SESSION_BURST + ["busy"])
        self.assertEqual(link.stats.get("sessions_refused"), 1)

    async def test_tenant_cannot_claim_another_link(self) -> None:
        """A HELLO naming another link is refused."""
        await self._start()
        tenant = await connect_raw(reactor, self.socket_path("tenant-a"), hello=False)
        tenant.send(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-b", "confused"))
        await tenant.closed
        self.assertEqual(tenant.close_frame().code, "wrong-link")

