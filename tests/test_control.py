"""
Tests for the control half's policy, L{msgmux.control.ControlRelay}, without
brokers: what a tenant half sends up is turned into a publication (stamped,
stripped, rewritten) or refused with the reason the protocol documents;
what goes down is rewritten for the reply path.  The integration tests in
C{tests/integration/test_trust.py} run the same policy against a real broker.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.channel import Delivery
from msgmux.config import parse
from msgmux.control import IDENTITY_HEADER, ControlLink, ControlLinkFactory, ControlRelay, RecentIds, TokenBucket
from msgmux.link import codec
from msgmux.link.codec import CanaryAddress, Message, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.oslo.tokens import TokenSigner
from msgmux.relay import Refusal
from msgmux.routing import sources

CONFIG = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"

[[control.links]]
name = "tenant-a"
socket = "/run/msgmux/tenant-a.sock"
down = [ { topic = "l3_agent", servers = ["agent-1"] } ]
up = [ { topic = "q-reports", methods = ["report_state"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info"] } ]

[control.links.limits]
max_inflight_calls = 1
max_message_size = 2048
"""

OSLO = {"content_type": "application/json", "content_encoding": "utf-8", "headers": {}, "delivery_mode": 2, "priority": 0}


def oslo_body(inner: dict[str, Any]) -> bytes:
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()


def inner_of(body: bytes) -> dict[str, Any]:
    return json.loads(json.loads(body)["oslo.message"])  # type: ignore[no-any-return]


class FakeBroker:
    """Only what ControlLink and ControlRelay touch before a channel exists."""

    name = "control"
    protocol = None

    def add_observer(self, observer: Any) -> None:
        pass

    def remove_observer(self, observer: Any) -> None:
        pass


class FakeChannel:
    def __init__(self) -> None:
        self.settled: list[tuple[int, str]] = []

    def ack(self, tag: int) -> None:
        self.settled.append((tag, "ack"))

    def reject(self, tag: int, requeue: bool) -> None:
        self.settled.append((tag, "reject"))


def make_relay(clock: Clock | None = None) -> tuple[ControlLink, ControlRelay, Clock]:
    clock = clock or Clock()
    clock.advance(1_700_000_000)
    config = parse(CONFIG).control
    assert config is not None
    link = ControlLink(config.links[0], config, FakeBroker(), TokenSigner(b"k" * 32), clock)  # type: ignore[arg-type]
    relay = ControlRelay(link, object())  # type: ignore[arg-type]
    return link, relay, clock


def up(address: Any, body: bytes, **properties: Any) -> Message:
    return Message(1, address, dict(OSLO, **properties), body)


class UpstreamPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.link, self.relay, self.clock = make_relay()

    def refused(self, message: Message) -> str:
        return self.assertRaises(Refusal, self.relay.inbound, message).reason  # type: ignore[no-any-return]

    def test_cast_is_stamped_and_stripped(self) -> None:
        """An allowed cast keeps its body and oslo's properties; headers become the identity alone."""
        body = oslo_body({"method": "report_state", "args": {}})
        message = up(
            RpcAddress(None, "q-reports"),
            body,
            headers={IDENTITY_HEADER: "tenant-b", "CC": ["nova"]},
            user_id="admin",
            reply_to="reply_x",
            cluster_id="c",
        )
        publication = self.relay.inbound(message)
        assert publication is not None
        self.assertEqual(publication.body, body)
        self.assertEqual(publication.properties["headers"], {IDENTITY_HEADER: "tenant-a"})
        self.assertEqual(
            set(publication.properties), {"content_type", "content_encoding", "headers", "delivery_mode", "priority"}
        )
        self.assertEqual((publication.destination.exchange, publication.destination.routing_key), ("openstack", "q-reports"))

    def test_refusals(self) -> None:
        """Each way of stepping outside the policy has its reason."""
        report = oslo_body({"method": "report_state"})
        cases = [
            (up(RpcAddress(None, "l3_agent"), report), "route"),
            (up(RpcAddress(None, "q-reports", "ctl-1"), report), "route"),
            (up(RpcAddress(None, "q-reports", None, True), report), "route"),
            (up(RpcAddress("nova", "q-reports"), report), "route"),
            (up(NotificationAddress(None, "notifications", "error"), oslo_body({})), "route"),
            (up(RpcAddress(None, "q-reports"), oslo_body({"method": "delete"})), "method"),
            (up(RpcAddress(None, "q-reports"), b"x" * 3000), "too-large"),
            (up(RpcAddress(None, "q-reports"), report, content_type="application/x-python-serialize"), "malformed"),
            (up(RpcAddress(None, "q-reports"), report, content_encoding="utf-16"), "malformed"),
            (up(RpcAddress(None, "q-reports"), report, expiration="1e3"), "malformed"),
            (up(RpcAddress(None, "q-reports"), report, headers={"compression": "application/x-gzip"}), "malformed"),
            (up(RpcAddress(None, "q-reports"), oslo_body({"method": "report_state", "_msg_id": 5, "_reply_q": "q"})), "malformed"),
            (up(ReplyAddress(), oslo_body({"_msg_id": "reply_abc", "result": 1, "ending": True})), "unsolicited-reply"),
            (up(CanaryAddress(), b'{"sent": 1}'), "malformed"),
        ]
        for message, reason in cases:
            self.assertEqual(self.refused(message), reason, message)

    def test_up_call_is_rewritten_and_limited(self) -> None:
        """An up call gets a token and the link's reply queue; calls beyond max_inflight_calls are refused."""
        call = oslo_body({"method": "report_state", "_msg_id": "m1", "_reply_q": "reply_agent"})
        publication = self.relay.inbound(up(RpcAddress(None, "q-reports"), call, expiration="30000"))
        assert publication is not None
        inner = inner_of(publication.body)
        self.assertEqual(inner["_reply_q"], "reply_msgmux_tenant-a")
        token = self.link.signer.verify("tenant-a", "up", inner["_msg_id"])
        self.assertEqual((token.msg_id, token.reply_queue), ("m1", "reply_agent"))
        self.assertEqual(publication.deadline, self.clock.seconds() + 30.0)
        self.assertEqual(self.link.calls.inflight("up"), 1)
        self.assertEqual(self.refused(up(RpcAddress(None, "q-reports"), call)), "inflight")
        self.link.calls.cancel_all()

    def test_reply_to_a_down_call(self) -> None:
        """A reply with a token of a call relayed down goes to the caller's queue with the original msg_id, mandatory."""
        token = self.link.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 10)
        publication = self.relay.inbound(up(ReplyAddress(), oslo_body({"_msg_id": token, "result": 3, "ending": True})))
        assert publication is not None
        self.assertEqual(inner_of(publication.body)["_msg_id"], "m9")
        self.assertEqual(
            (publication.destination.exchange, publication.destination.routing_key, publication.destination.mandatory),
            ("", "reply_caller", True),
        )
        self.assertEqual(publication.retry_until, self.clock.seconds() + 10)
        self.clock.advance(11)
        self.assertEqual(self.refused(up(ReplyAddress(), oslo_body({"_msg_id": token, "ending": True}))), "late-reply")

    def test_redelivered_duplicates_are_dropped(self) -> None:
        """A message whose _unique_id was published and confirmed before is not published again; unconfirmed ones are."""
        body = oslo_body({"method": "report_state", "_unique_id": "u-1"})
        first = self.relay.inbound(up(RpcAddress(None, "q-reports"), body))
        assert first is not None
        self.assertEqual(first.unique_id, "u-1")
        # Not confirmed yet: a redelivery may be the only copy that makes it.
        self.assertIsNotNone(self.relay.inbound(up(RpcAddress(None, "q-reports"), body)))
        self.relay.published(first)
        self.assertIsNone(self.relay.inbound(up(RpcAddress(None, "q-reports"), body)))
        note = oslo_body({"event_type": "x", "_unique_id": "u-2"})
        published = self.relay.inbound(up(NotificationAddress(None, "notifications", "info"), note))
        assert published is not None
        self.relay.published(published)
        self.assertIsNone(self.relay.inbound(up(NotificationAddress(None, "notifications", "info"), note)))
        self.assertEqual(self.link.stats.get("duplicates_dropped", direction="up"), 2)

    def test_canary(self) -> None:
        """A canary the control half signed comes back and makes the link healthy; it is not published."""
        body = self.link.signer.canary("tenant-a", self.clock.seconds())
        self.clock.advance(0.5)
        self.assertIsNone(self.relay.inbound(Message(1, CanaryAddress(), {"content_type": "application/json"}, body)))
        self.assertTrue(self.link.healthy())
        self.assertEqual(self.link.stats.gauges["canary_round_trip_seconds"], 0.5)

    def test_canary_replay_does_not_keep_the_link_healthy(self) -> None:
        """A canary sent again later is ignored: health follows the newest canary's send time."""
        body = self.link.signer.canary("tenant-a", self.clock.seconds())
        self.relay.inbound(Message(1, CanaryAddress(), {}, body))
        self.assertTrue(self.link.healthy())
        for _ in range(10):
            self.clock.advance(self.link.control.canary_interval)
            self.assertIsNone(self.relay.inbound(Message(1, CanaryAddress(), {}, body)))
        self.assertFalse(self.link.healthy())
        self.assertEqual(self.link.stats.get("canaries_stale"), 10)
        self.assertEqual(self.link.stats.get("canaries_returned"), 1)

    def test_answered_call_cannot_be_answered_again(self) -> None:
        """Once a call's final reply is confirmed, more replies with its token are dropped; heartbeats before it pass."""
        token = self.link.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 30)
        self.link.calls.begin(token, self.clock.seconds() + 30, "down")
        heartbeat = self.relay.inbound(up(ReplyAddress(), oslo_body({"_msg_id": token, "result": None, "ending": False})))
        assert heartbeat is not None
        self.assertIsNone(heartbeat.answers)
        final = self.relay.inbound(up(ReplyAddress(), oslo_body({"_msg_id": token, "result": 3, "ending": True})))
        assert final is not None
        self.assertEqual(final.answers, token)
        self.assertEqual(self.link.calls.inflight("down"), 0)
        self.relay.published(final)
        for body in ({"_msg_id": token, "result": 3, "ending": True}, {"_msg_id": token, "result": "forged", "ending": True}):
            self.assertIsNone(self.relay.inbound(up(ReplyAddress(), oslo_body(body))))
        self.assertEqual(self.link.stats.get("duplicates_dropped", direction="up"), 2)


class FakeLinkEnd:
    """The link end a relay talks to, recording credit grants."""

    established = True

    def __init__(self) -> None:
        self.granted = 0

    def grant(self, increment: int) -> None:
        self.granted += increment


class CreditPacingTests(SynchronousTestCase):
    def test_one_payment_pending_while_throttled(self) -> None:
        """
        However many settlements arrive while the rate limit holds credit
        back, one timer pays what is owed; the session's end cancels it.
        """
        clock = Clock()
        clock.advance(1_700_000_000)
        config = parse(CONFIG.replace("[control.links.limits]", "[control.links.limits]\nmax_rate = 200.0\nburst = 10")).control
        assert config is not None
        owner = ControlLink(config.links[0], config, FakeBroker(), TokenSigner(b"k" * 32), clock)  # type: ignore[arg-type]
        link = FakeLinkEnd()
        relay = ControlRelay(owner, link)  # type: ignore[arg-type]
        relay.return_credit(256)
        self.assertEqual(link.granted, 10)
        total = link.granted
        for _ in range(2000):  # two seconds of a tenant half using every credit at once
            used, link.granted = link.granted, 0
            for _ in range(used):
                relay.return_credit(1)
            self.assertLessEqual(len(clock.getDelayedCalls()), 1)
            clock.advance(0.001)
            total += link.granted
        # 10 of burst, then about 200 per second
        self.assertGreaterEqual(total, 10 + 2 * 200 - 5)
        self.assertLessEqual(total, 10 + 2 * 200 + 5)
        relay.session_ended("test")
        self.assertEqual(clock.getDelayedCalls(), [])


class PendingConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.link, _, self.clock = make_relay()
        self.factory = ControlLinkFactory(self.link)
        self.protocol = self.factory.buildProtocol(None)
        assert self.protocol is not None
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def welcome(self) -> codec.Frame:
        frames = codec.FrameDecoder(1 << 20).feed(self.transport.value())
        return frames[0]

    def test_removed_link_refuses_pending_handshakes(self) -> None:
        """A connection accepted before its link was removed cannot start a session, and is closed."""
        self.link.retired = True
        self.factory.close_pending("removed", "gone")
        self.assertEqual(self.welcome(), codec.Close("removed", "gone"))
        late = self.factory.buildProtocol(None)
        assert late is not None
        late.makeConnection(StringTransport())
        late.dataReceived(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "test")))
        self.assertIsNone(late.session)
        self.assertIsNone(self.link.relay)

    def test_routes_are_read_at_hello(self) -> None:
        """A connection that waited through a reload is sent the routes in force when it says HELLO."""
        config = parse(CONFIG.replace('servers = ["agent-1"]', 'servers = ["agent-2"]')).control
        assert config is not None
        self.link.reconfigure(config.links[0], config)
        self.protocol.dataReceived(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "test")))
        welcome = self.welcome()
        assert isinstance(welcome, codec.Welcome)
        self.assertEqual(welcome.routes, self.link.routes.to_wire())
        self.assertIn("agent-2", repr(welcome.routes))
        self.link.calls.cancel_all()
        self.protocol.connectionLost()


class DownstreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.link, self.relay, self.clock = make_relay()
        self.channel = FakeChannel()
        self.source = next(s for s in self.relay.sources() if s.queue.name == "l3_agent")

    def delivery(self, body: bytes, **properties: Any) -> Delivery:
        return Delivery(self.channel, "c", 7, False, "openstack", "l3_agent", dict(OSLO, **properties), body, None)  # type: ignore[arg-type]

    def test_call_gets_token_and_deadline(self) -> None:
        """A control call goes down with a token, the link's reply queue and its deadline; the call is tracked."""
        body = oslo_body({"method": "sync", "_msg_id": "c1", "_reply_q": "reply_caller"})
        message = self.relay.outbound(self.source, self.delivery(body, expiration="60000"))
        assert message is not None
        inner = inner_of(message.body)
        self.assertEqual(inner["_reply_q"], "reply_msgmux_tenant-a")
        self.assertEqual(self.link.signer.verify("tenant-a", "down", inner["_msg_id"]).reply_queue, "reply_caller")
        self.assertEqual(message.deadline, self.clock.seconds() + 60)
        self.assertEqual(self.link.calls.inflight("down"), 1)
        self.link.calls.cancel_all()

    def test_cast_passes_unparsed(self) -> None:
        """A cast is relayed byte for byte."""
        body = oslo_body({"method": "sync", "args": {"x": "é"}})
        message = self.relay.outbound(self.source, self.delivery(body))
        assert message is not None
        self.assertEqual(message.body, body)

    def test_dropped_downstream(self) -> None:
        """Loops back to the link, half calls and compressed bodies are refused at the source."""
        for delivery in (
            self.delivery(oslo_body({"method": "sync"}), headers={IDENTITY_HEADER: "tenant-a"}),
            self.delivery(oslo_body({"method": "sync", "_reply_q": "reply_x"})),
            self.delivery(b"\x1f\x8b...", headers={"compression": "application/x-gzip"}),
        ):
            self.assertIsNone(self.relay.outbound(self.source, delivery))
        self.assertEqual(self.channel.settled, [(7, "reject")] * 3)
        self.assertEqual(self.link.stats.get("rejected", direction="down"), 3)


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A bucket gives its burst at once, then rate tokens per second, never more than its burst."""
        clock = Clock()
        bucket = TokenBucket(10.0, 5, clock)
        self.assertEqual(bucket.take(8), 5)
        self.assertEqual(bucket.take(1), 0)
        self.assertAlmostEqual(bucket.seconds_until_one(), 0.1)
        clock.advance(0.35)
        self.assertEqual(bucket.take(10), 3)
        clock.advance(100)
        self.assertEqual(bucket.take(10), 5)


class SourcesTests(SynchronousTestCase):
    def test_down_sources(self) -> None:
        """The control half consumes the routed topic, its servers, its reply and canary queues."""
        link, relay, _ = make_relay()
        names = [s.queue.name for s in sources("tenant-a", link.config.down, (), link.topology)]
        self.assertEqual(names, ["l3_agent", "l3_agent.agent-1", "reply_msgmux_tenant-a", "msgmux_canary_tenant-a"])


class RecentIdsTests(SynchronousTestCase):
    def test_bounded(self) -> None:
        """Only the last `size` ids are remembered."""
        recent = RecentIds(3)
        for value in "abcd":
            recent.add(value)
        recent.add("d")
        self.assertEqual((len(recent), "a" in recent, "b" in recent, "d" in recent), (3, False, True, True))
