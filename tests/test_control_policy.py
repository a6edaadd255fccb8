"""
Tests for the control half's policy on its own, without a relay, a link or
a broker: what a tenant half sends up is turned into a publication
(stamped, stripped, rewritten) or refused with the reason the protocol
documents; what goes down is rewritten for the reply path.  The integration
tests in C{tests/integration/test_trust.py} run the same policy against a
real broker.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from msgmux.calls import CallTracker
from msgmux.control.canaries import Canaries
from msgmux.control.memory import LinkMemory, RecentIds
from msgmux.control.policy import ControlPolicy
from msgmux.control.rewrite import CallRewriter
from msgmux.control.upstream import IDENTITY_HEADER
from msgmux.message import CanaryAddress, Message, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.oslo.tokens import TokenSigner
from msgmux.oslo.topology import OsloTopology
from msgmux.policy import Copy, Publication, Refusal
from msgmux.stats import LinkStats
from tests.doubles import OSLO_PROPERTIES, broker_connection, clock, control_config, delivery, inner_of, one_link, open_channel, oslo_body

CONFIG = one_link(
    'down = [ { topic = "l3_agent", servers = ["agent-1"] }, { topic = "dhcp_agent", methods = ["port_update"] } ]\n'
    'up = [ { topic = "q-reports", methods = ["report_state"] } ]\n'
    'notifications_up = [ { topic = "notifications", priorities = ["info"] } ]\n',
    "max_inflight_calls = 1\nmax_message_size = 4096\nmax_json_containers = 100\n",
)


class PolicyTestCase(SynchronousTestCase):
    """A policy for the session of link tenant-a, with its parts at hand."""

    def setUp(self) -> None:
        self.clock = clock()
        self.config = control_config(CONFIG)
        link = self.config.links[0]
        self.signer = TokenSigner(b"k" * 32)
        self.stats = LinkStats(link.name, self.clock)
        self.calls = CallTracker(self.clock, self.stats)
        self.addCleanup(self.calls.cancel_all)
        self.memory = LinkMemory()
        self.canaries = Canaries(link.name, self.signer, self.clock, 10.0, self.stats)
        rewriter = CallRewriter(link.name, self.signer, self.calls, "reply_msgmux_tenant-a", self.clock)
        topology = OsloTopology(self.config.broker.queues, self.config.broker.exchange)
        self.policy = ControlPolicy(link, topology, rewriter, self.memory, self.canaries, self.clock, self.stats)

    def up(self, address: Any, body: bytes, **properties: Any) -> Message:
        return Message(address, dict(OSLO_PROPERTIES, **properties), body)

    def inbound(self, message: Message) -> Publication:
        publication = self.policy.inbound(message)
        assert publication is not None, "the message ended in the policy"
        return publication

    def refused(self, message: Message) -> str:
        refusal: Refusal = self.assertRaises(Refusal, self.policy.inbound, message)
        return refusal.reason


class UpstreamTests(PolicyTestCase):
    def test_cast_is_stamped_and_stripped(self) -> None:
        """An allowed cast keeps its body and oslo's properties; headers become the identity alone."""
        body = oslo_body({"method": "report_state", "args": {}})
        message = self.up(
            RpcAddress(None, "q-reports"),
            body,
            headers={IDENTITY_HEADER: "tenant-b", "CC": ["nova"]},
            user_id="admin",
            reply_to="reply_x",
            cluster_id="c",
        )
        publication = self.inbound(message)
        self.assertEqual(publication.body, body)
        self.assertEqual(publication.properties["headers"], {IDENTITY_HEADER: "tenant-a"})
        self.assertEqual(set(publication.properties), {"content_type", "content_encoding", "headers", "delivery_mode", "priority"})
        self.assertEqual((publication.destination.exchange, publication.destination.routing_key), ("openstack", "q-reports"))

    def test_each_refusal_has_its_reason(self) -> None:
        """Each way of stepping outside the policy has its reason."""
        report = oslo_body({"method": "report_state"})
        cases = [
            (self.up(RpcAddress(None, "l3_agent"), report), "route"),
            (self.up(RpcAddress(None, "q-reports", "ctl-1"), report), "route"),
            (self.up(RpcAddress(None, "q-reports", None, True), report), "route"),
            (self.up(RpcAddress("nova", "q-reports"), report), "route"),
            (self.up(NotificationAddress(None, "notifications", "error"), oslo_body({})), "route"),
            (self.up(RpcAddress(None, "q-reports"), oslo_body({"method": "delete"})), "method"),
            (self.up(RpcAddress(None, "q-reports"), b"x" * 5000), "too-large"),
            (self.up(RpcAddress(None, "q-reports"), report, content_type="application/x-python-serialize"), "malformed"),
            (self.up(RpcAddress(None, "q-reports"), report, content_encoding="utf-16"), "malformed"),
            (self.up(RpcAddress(None, "q-reports"), report, expiration="1e3"), "malformed"),
            (self.up(RpcAddress(None, "q-reports"), report, headers={"compression": "application/x-gzip"}), "malformed"),
            (self.up(RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_msg_id": 5, "_reply_q": "q"})), "malformed"),
            (self.up(ReplyAddress(), oslo_body({"_msg_id": "reply_abc", "result": 1, "ending": True})), "unsolicited-reply"),
            (self.up(CanaryAddress(), b'{"sent": 1}'), "malformed"),
        ]
        for message, reason in cases:
            self.assertEqual(self.refused(message), reason, message)

    def test_method_refused_from_the_first_bytes(self) -> None:
        """
        A request laid out as oslo lays it out, with a method the route does
        not allow, is refused before its body is parsed: whatever follows
        (here, JSON that would not even parse) costs nothing.
        """
        body = oslo_body({"method": "delete", "args": {}})[:-3] + b"[" * 3000
        self.assertEqual(self.refused(self.up(RpcAddress(None, "q-reports"), body)), "method")

    def test_later_method_key_is_what_counts(self) -> None:
        """A leading allowed method does not let a later, forbidden one through: JSON takes the last key."""
        inner = '{"method": "report_state", "args": {}, "method": "delete"}'
        body = json.dumps({"oslo.version": "2.0", "oslo.message": inner}).encode()
        self.assertEqual(self.refused(self.up(RpcAddress(None, "q-reports"), body)), "method")

    def test_too_many_containers_refused_unparsed(self) -> None:
        """A body with more JSON arrays and objects than the link allows is refused before parsing."""
        inner = {"method": "report_state", "args": {"x": [[] for _ in range(150)]}}
        self.assertEqual(self.refused(self.up(RpcAddress(None, "q-reports"), oslo_body(inner))), "too-complex")
        self.assertEqual(self.stats.get("rejected"), 0)  # the relay counts refusals, not the policy

    def test_up_call_is_rewritten_and_limited(self) -> None:
        """An up call gets a token and the link's reply queue; calls beyond max_inflight_calls are refused."""
        call = oslo_body({"method": "report_state", "_msg_id": "m1", "_reply_q": "reply_agent"})
        publication = self.inbound(self.up(RpcAddress(None, "q-reports"), call, expiration="30000"))
        inner = inner_of(publication.body)
        self.assertEqual(inner["_reply_q"], "reply_msgmux_tenant-a")
        token = self.signer.verify("tenant-a", "up", inner["_msg_id"])
        self.assertEqual((token.msg_id, token.reply_queue), ("m1", "reply_agent"))
        self.assertEqual(publication.deadline, self.clock.seconds() + 30.0)
        self.assertEqual(self.calls.inflight("up"), 1)
        self.assertEqual(self.refused(self.up(RpcAddress(None, "q-reports"), call)), "inflight")

    def test_notification_with_call_fields_refused(self) -> None:
        """oslo's notifier never sets _msg_id or _reply_q: a notification with either is refused, whatever its type."""
        address = NotificationAddress(None, "notifications", "info")
        for inner in ({"event_type": "x", "_reply_q": 0}, {"event_type": "x", "_msg_id": []}, {"event_type": "x", "_msg_id": "m", "_reply_q": "q"}):
            self.assertEqual(self.refused(self.up(address, oslo_body(inner))), "malformed")
        self.inbound(self.up(address, oslo_body({"event_type": "x", "payload": {}})))

    def test_reply_to_a_down_call(self) -> None:
        """A reply with a token of a call relayed down goes to the caller's queue with the original msg_id, mandatory."""
        token = self.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 10)
        publication = self.inbound(self.up(ReplyAddress(), oslo_body({"_msg_id": token, "result": 3, "ending": True})))
        self.assertEqual(inner_of(publication.body)["_msg_id"], "m9")
        destination = publication.destination
        self.assertEqual((destination.exchange, destination.routing_key, destination.mandatory), ("", "reply_caller", True))
        self.assertEqual(publication.retry_until, self.clock.seconds() + 10)
        self.clock.advance(11)
        self.policy.publish_failed(publication)  # the first never reached the caller; another comes too late
        self.assertEqual(self.refused(self.up(ReplyAddress(), oslo_body({"_msg_id": token, "ending": True}))), "late-reply")

    def test_one_final_reply_per_call(self) -> None:
        """
        However the final replies arrive (several before the first is
        confirmed, or after), one reaches the caller; heartbeats before it
        pass, heartbeats after it end here.  Final replies before the first
        is confirmed are copies of it, which the relay holds until the first
        is done (tests.test_relay.CopyTests).
        """
        token = self.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 30)
        self.calls.begin(token, self.clock.seconds() + 30, "down")
        heartbeat = self.inbound(self.up(ReplyAddress(), oslo_body({"_msg_id": token, "result": None, "ending": False})))
        self.assertIsNone(heartbeat.identity)
        final = oslo_body({"_msg_id": token, "result": 3, "ending": True})
        first = self.inbound(self.up(ReplyAddress(), final))
        self.assertEqual(first.answers, token)
        self.assertEqual(self.calls.inflight("down"), 0)
        # More final replies in the same write, before the first is confirmed.
        for _ in range(4):
            copy: Copy = self.assertRaises(Copy, self.policy.inbound, self.up(ReplyAddress(), final))
            self.assertEqual(copy.identity, first.identity)
        self.assertIsNone(self.policy.inbound(self.up(ReplyAddress(), oslo_body({"_msg_id": token, "ending": False}))))
        self.policy.published(first)
        forged = oslo_body({"_msg_id": token, "result": "forged", "ending": True})
        self.assertIsNone(self.policy.inbound(self.up(ReplyAddress(), forged)))
        self.assertEqual(self.stats.get("duplicates_dropped", direction="up"), 2)

    def test_dropped_final_reply_does_not_block(self) -> None:
        """A final reply the broker never took leaves room for a redelivered one."""
        token = self.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 30)
        final = oslo_body({"_msg_id": token, "result": 3, "ending": True})
        first = self.inbound(self.up(ReplyAddress(), final))
        self.policy.publish_failed(first)
        self.inbound(self.up(ReplyAddress(), final))

    def test_redelivered_duplicates_are_dropped(self) -> None:
        """
        A message whose _unique_id was published and confirmed before is not
        published again; one that arrives while the first is on its way is a
        copy of it; one that arrives after the first was dropped is published.
        """
        body = oslo_body({"method": "report_state", "_unique_id": "u-1"})
        first = self.inbound(self.up(RpcAddress(None, "q-reports"), body))
        self.assertEqual(first.unique_id, "u-1")
        copy: Copy = self.assertRaises(Copy, self.policy.inbound, self.up(RpcAddress(None, "q-reports"), body))
        self.assertEqual(copy.identity, ("unique_id", "u-1"))
        self.policy.publish_failed(first)
        first = self.inbound(self.up(RpcAddress(None, "q-reports"), body))
        self.policy.published(first)
        self.assertIsNone(self.policy.inbound(self.up(RpcAddress(None, "q-reports"), body)))
        note = oslo_body({"event_type": "x", "_unique_id": "u-2"})
        published = self.inbound(self.up(NotificationAddress(None, "notifications", "info"), note))
        self.policy.published(published)
        self.assertIsNone(self.policy.inbound(self.up(NotificationAddress(None, "notifications", "info"), note)))
        self.assertEqual(self.stats.get("duplicates_dropped", direction="up"), 2)

    def test_returned_canary_makes_the_link_healthy(self) -> None:
        """A canary the control half signed comes back and makes the link healthy; it is not published."""
        body = self.signer.canary("tenant-a", self.clock.seconds())
        self.clock.advance(0.5)
        self.assertIsNone(self.policy.inbound(Message(CanaryAddress(), {"content_type": "application/json"}, body)))
        self.assertTrue(self.canaries.healthy())
        self.assertEqual(self.stats.gauges["canary_round_trip_seconds"], 0.5)

    def test_canary_replay_does_not_keep_the_link_healthy(self) -> None:
        """A canary sent again later is ignored: health follows the newest canary's send time."""
        body = self.signer.canary("tenant-a", self.clock.seconds())
        self.policy.inbound(Message(CanaryAddress(), {}, body))
        self.assertTrue(self.canaries.healthy())
        for _ in range(10):
            self.clock.advance(self.canaries.interval)
            self.assertIsNone(self.policy.inbound(Message(CanaryAddress(), {}, body)))
        self.assertFalse(self.canaries.healthy())
        self.assertEqual(self.stats.get("canaries_stale"), 10)
        self.assertEqual(self.stats.get("canaries_returned"), 1)


class DownstreamTests(PolicyTestCase):
    def setUp(self) -> None:
        super().setUp()
        protocol, _ = broker_connection(self.clock)
        self.channel = open_channel(protocol)
        self.source = next(s for s in self.policy.sources() if s.queue.name == "l3_agent")

    def outbound(self, body: bytes, source: Any = None, **properties: Any) -> Message | None:
        d = delivery(self.channel, body, "l3_agent", dict(OSLO_PROPERTIES, **properties), tag=7)
        return self.policy.outbound(source or self.source, d)

    def test_call_gets_token_and_deadline(self) -> None:
        """A control call goes down with a token, the link's reply queue and its deadline; the call is tracked."""
        message = self.outbound(oslo_body({"method": "sync", "_msg_id": "c1", "_reply_q": "reply_caller"}), expiration="60000")
        assert message is not None
        inner = inner_of(message.body)
        self.assertEqual(inner["_reply_q"], "reply_msgmux_tenant-a")
        self.assertEqual(self.signer.verify("tenant-a", "down", inner["_msg_id"]).reply_queue, "reply_caller")
        self.assertEqual(message.deadline, self.clock.seconds() + 60)
        self.assertEqual(self.calls.inflight("down"), 1)

    def test_cast_passes_unparsed(self) -> None:
        """A cast is relayed byte for byte."""
        body = oslo_body({"method": "sync", "args": {"x": "é"}})
        message = self.outbound(body)
        assert message is not None
        self.assertEqual(message.body, body)

    def test_refused_downstream(self) -> None:
        """Loops back to the link, half calls and compressed bodies are refused at the source."""
        cases = [
            (oslo_body({"method": "sync"}), {"headers": {IDENTITY_HEADER: "tenant-a"}}, "loop"),
            (oslo_body({"method": "sync", "_reply_q": "reply_x"}), {}, "malformed"),
            (b"\x1f\x8b...", {"headers": {"compression": "application/x-gzip"}}, "malformed"),
        ]
        for body, properties, reason in cases:
            refusal: Refusal = self.assertRaises(Refusal, self.outbound, body, **properties)
            self.assertEqual(refusal.reason, reason)

    def test_restricted_methods_down(self) -> None:
        """A down route with methods lets only those through."""
        source = next(s for s in self.policy.sources() if s.queue.name == "dhcp_agent")
        self.assertIsNotNone(self.outbound(oslo_body({"method": "port_update"}), source))
        refusal: Refusal = self.assertRaises(Refusal, self.outbound, oslo_body({"method": "port_delete"}), source)
        self.assertEqual(refusal.reason, "method")

    def test_late_reply_ends_here(self) -> None:
        """A control server's reply after its tenant caller's deadline is consumed and counted, not sent."""
        token = self.signer.issue("tenant-a", "up", "m1", "reply_agent", self.clock.seconds() + 5)
        reply_source = next(s for s in self.policy.sources() if s.queue.name == "reply_msgmux_tenant-a")
        self.clock.advance(6)
        self.assertIsNone(self.outbound(oslo_body({"_msg_id": token, "result": 1, "ending": True}), reply_source))
        self.assertEqual(self.stats.get("late_replies", direction="down"), 1)

    def test_sources(self) -> None:
        """The control half consumes the routed topics, their servers, its reply and canary queues."""
        names = [s.queue.name for s in self.policy.sources()]
        self.assertEqual(names, ["l3_agent", "l3_agent.agent-1", "dhcp_agent", "reply_msgmux_tenant-a", "msgmux_canary_tenant-a"])


class RecentIdsTests(SynchronousTestCase):
    def test_only_the_latest_ids_are_remembered(self) -> None:
        """Only the last `size` ids are remembered."""
        recent = RecentIds(3)
        for value in "abcd":
            recent.add(value)
        recent.add("d")
        self.assertEqual((len(recent), "a" in recent, "b" in recent, "d" in recent), (3, False, True, True))
