"""
Tests for L{msgmux.relay.Relay} without brokers, through its public
faces: the consumers it hands its channel (deliveries in), the session
handler its link calls (messages, acknowledgements, credit), and the
channel user its L{DeclaredChannel} calls (ready, lost).  The channel is a
real L{Channel} writing to a C{StringTransport}; the link is a
L{RecordingConnection}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp import wire
from msgmux.amqp.channel import Channel, ChannelLost
from msgmux.amqp.declared import Consumer
from msgmux.calls import CallTracker
from msgmux.config import NotificationRule, QueueOptions, RpcRule
from msgmux.control.canaries import Canaries
from msgmux.control.memory import LinkMemory
from msgmux.control.policy import ControlPolicy
from msgmux.control.rewrite import CallRewriter
from msgmux.message import Message, ReplyAddress, RpcAddress
from msgmux.oslo.tokens import TokenSigner
from msgmux.oslo.topology import OsloTopology
from msgmux.pacing import ImmediateCredit
from msgmux.relay import Relay
from msgmux.routing import LinkRoutes
from msgmux.stats import LinkStats
from msgmux.stream_offsets import OFFSET_HEADER, StreamPosition
from msgmux.tenant import TenantPolicy
from tests.doubles import (
    OSLO_PROPERTIES,
    RecordingConnection,
    broker_connection,
    clock,
    confirm,
    control_config,
    delivery,
    idle_broker,
    inner_of,
    one_link,
    open_channel,
    oslo_body,
    published,
)

ROUTES = LinkRoutes(
    "tenant-a",
    down=(RpcRule("l3_agent"),),
    up=(RpcRule("q-reports", fanout=True),),
    notifications_up=(NotificationRule("notifications", ("info",)),),
)


class RelayTestCase(SynchronousTestCase):
    """A tenant half's relay (the plain mirror policy), a channel, and the link double."""

    stream_fanout = False

    def setUp(self) -> None:
        self.clock = clock()
        self.connection = RecordingConnection(messages=0)
        self.stats = LinkStats("tenant-a", self.clock)
        self.streams: dict[str, StreamPosition] = {}
        options = QueueOptions(rabbit_transient_quorum_queue=self.stream_fanout, rabbit_stream_fanout=self.stream_fanout)
        policy = TenantPolicy(ROUTES, OsloTopology(options, "openstack"), self.clock)
        self.relay = Relay(
            self.connection, policy, idle_broker("tenant"), ImmediateCredit(self.connection), (10, 1000), self.clock, self.stats, self.streams
        )
        self.protocol, self.transport = broker_connection(self.clock)
        self.channel = self.new_channel()

    def new_channel(self, number: int = 1) -> Channel:
        channel = open_channel(self.protocol, number)
        self.relay.declarations()
        self.consumers = {consumer.queue: consumer for consumer in self.relay.consumers(channel)}
        return channel

    def deliver(self, queue: str, body: bytes, tag: int = 1, **properties: Any) -> None:
        consumer: Consumer = self.consumers[queue]
        consumer.deliver(delivery(self.channel, body, queue, properties, tag=tag))

    def settled(self) -> list[tuple[str, int]]:
        """The acks and rejects the channel wrote since the last call."""
        data, found, offset = self.transport.value(), [], 0
        self.transport.clear()
        while offset < len(data):
            _, _, size = wire.FRAME_HEAD.unpack_from(data, offset)
            payload = data[offset + 7 : offset + 7 + size]
            offset += 8 + size
            method = (payload[0] << 8 | payload[1], payload[2] << 8 | payload[3])
            if method in ((wire.BASIC, wire.BASIC_ACK), (wire.BASIC, wire.BASIC_REJECT)):
                tag = int.from_bytes(payload[4:12], "big")
                found.append(("ack" if method[1] == wire.BASIC_ACK else "reject", tag))
        return found


class OutboundTests(RelayTestCase):
    def test_replies_first(self) -> None:
        """With no credit, casts and replies wait; when credit comes, replies go first, each line in its order."""
        for tag, (queue, body) in enumerate(
            [("q-reports", b"cast-1"), ("reply_msgmux_tenant-a", b"reply-1"), ("q-reports", b"cast-2"), ("reply_msgmux_tenant-a", b"reply-2")], 1
        ):
            self.deliver(queue, body, tag)
        self.assertEqual(self.connection.sent, [])
        self.connection.messages = 3
        self.relay.credit_received()
        self.assertEqual([m.body for m, _ in self.connection.sent], [b"reply-1", b"reply-2", b"cast-1"])
        self.connection.messages = 1
        self.relay.credit_received()
        self.assertEqual(self.connection.sent[-1][0].body, b"cast-2")
        self.connection.messages = 1
        self.deliver("q-reports", b"cast-3", 5)  # nothing waits: straight out
        self.assertEqual(self.connection.sent[-1][0].body, b"cast-3")

    def test_byte_credit_holds_a_large_message(self) -> None:
        """A message larger than the byte credit waits for more, and what follows waits behind it."""
        self.connection.messages, self.connection.body_bytes = 10, 100
        self.deliver("q-reports", b"x" * 150, 1)
        self.deliver("q-reports", b"y", 2)
        self.assertEqual(self.connection.sent, [])
        self.connection.body_bytes = 200
        self.relay.credit_received()
        self.assertEqual([m.body for m, _ in self.connection.sent], [b"x" * 150, b"y"])

    def test_settled_when_the_peer_settles(self) -> None:
        """A delivery is acked when the peer ACKs it, rejected for good when the peer refuses it."""
        self.connection.messages = 2
        self.deliver("q-reports", b"a", 1)
        self.deliver("q-reports", b"b", 2)
        (_, first), (_, second) = self.connection.sent
        self.assertEqual(self.settled(), [])
        self.relay.messages_acknowledged([first])
        self.relay.message_refused(second, "made-up reason")
        self.assertEqual(self.settled(), [("ack", 1), ("reject", 2)])
        self.assertEqual(self.stats.get("relayed", direction="up", kind="rpc"), 1)
        self.assertEqual(self.stats.get("refused_by_peer", direction="up", reason="other"), 1)

    def test_closing_session_leaves_deliveries_to_the_broker(self) -> None:
        """Neither sent nor settled once the link is closing: the channel's close hands them back."""
        self.connection.messages = 5
        self.connection.open = False
        self.deliver("q-reports", b"a", 1)
        self.assertEqual((self.connection.sent, self.settled()), ([], []))


class StreamTests(RelayTestCase):
    stream_fanout = True

    def test_resume_at_first_unsettled(self) -> None:
        """A stream delivery arriving while the session closes is where the next channel resumes, its offset header stripped."""
        self.connection.messages = 5
        queue = "q-reports_fanout"
        self.deliver(queue, b"a", 1, headers={OFFSET_HEADER: 40})
        (message, token), = self.connection.sent
        self.assertNotIn(OFFSET_HEADER, message.properties.get("headers", {}))
        self.relay.messages_acknowledged([token])
        self.connection.open = False
        self.deliver(queue, b"b", 2, headers={OFFSET_HEADER: 41})
        self.relay.channel_lost(self.channel, Failure(ChannelLost("gone")))
        self.new_channel(2)
        consume = self.consumers[queue]
        self.assertEqual(consume.arguments[OFFSET_HEADER], 41)


class InboundTests(RelayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.protocol.fast_channels.clear()
        self.channel = open_channel(self.protocol)

    def test_waits_for_a_channel_then_publishes(self) -> None:
        """A message that arrives before the channel is published once it is ready; the window opens once."""
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {"delivery_mode": 2}, b"cast"))
        self.assertEqual(published(self.transport), [])
        self.relay.channel_ready(self.channel)
        self.assertEqual(published(self.transport), [("openstack", "l3_agent", {"delivery_mode": 2}, b"cast")])
        # Not in confirm mode: the publish counts as confirmed at once.
        self.assertEqual(self.connection.acknowledged, [1])
        self.assertEqual(self.connection.granted, [(10, 1000), (1, 4)])
        self.relay.channel_lost(self.channel, Failure(ChannelLost("gone")))
        self.relay.channel_ready(open_channel(self.protocol, 2))
        self.assertEqual(self.connection.granted, [(10, 1000), (1, 4)])

    def test_confirmed_before_acknowledged(self) -> None:
        """In confirm mode, the peer's message is acknowledged only when the broker confirms it; a nack is retried."""
        self.successResultOf(defer.Deferred.fromCoroutine(self.channel.select_confirms()))
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {}, b"one"))
        self.assertEqual(self.connection.acknowledged, [])
        confirm(self.protocol, 1, 1, ok=False)
        self.assertEqual(self.connection.acknowledged, [])
        self.assertEqual(self.stats.get("nacked", direction="down"), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(published(self.transport)), 2)
        confirm(self.protocol, 1, 2)
        self.assertEqual(self.connection.acknowledged, [1])

    def test_expired_before_publish(self) -> None:
        """A message past its deadline is not published; it is acknowledged, and its source acks it."""
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {}, b"late", self.clock.seconds() - 1))
        self.assertEqual(published(self.transport), [])
        self.assertEqual(self.connection.acknowledged, [1])
        self.assertEqual(self.stats.get("expired", direction="down"), 1)

    def test_in_time_carries_the_rest_as_expiration(self) -> None:
        """A message in time is published with the milliseconds it has left."""
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {}, b"call", self.clock.seconds() + 2.5))
        [(_, _, properties, _)] = published(self.transport)
        self.assertEqual(properties["expiration"], "2500")

    def test_refused_by_policy(self) -> None:
        """The policy's refusal goes back as REJECT with its reason, counted, and the credit comes back."""
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(ReplyAddress(None), {}, b"{}"))
        self.assertEqual(self.connection.refused, [(1, "malformed")])
        self.assertEqual(self.stats.get("rejected", direction="down", reason="malformed"), 1)
        self.assertEqual(self.connection.granted[-1], (1, 2))

    def test_unpublishable_property(self) -> None:
        """A property RabbitMQ would close the channel over is refused before it is written."""
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {"delivery_mode": 3}, b"x"))
        self.assertEqual(published(self.transport), [])
        self.assertEqual(self.connection.refused, [(1, "malformed")])


class DrainTests(RelayTestCase):
    """A link removed at run time, or msgmux stopping, drains the session: what is in flight settles first."""

    def setUp(self) -> None:
        super().setUp()
        self.protocol.fast_channels.clear()
        self.channel = open_channel(self.protocol)
        self.consumers = {consumer.queue: consumer for consumer in self.relay.consumers(self.channel)}

    def drain(self, timeout: float) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.relay.drain(timeout))

    def test_waits_for_the_broker_then_closes(self) -> None:
        """The session closes only once what the peer sent is confirmed by the broker and acknowledged."""
        self.successResultOf(defer.Deferred.fromCoroutine(self.channel.select_confirms()))
        self.relay.channel_ready(self.channel)
        self.relay.message_received(1, Message(RpcAddress(None, "l3_agent"), {}, b"one"))
        drained = self.drain(5.0)
        self.clock.pump([0.05] * 20)
        self.assertNoResult(drained)
        self.assertIsNone(self.connection.closed)
        confirm(self.protocol, 1, 1)
        self.assertEqual(self.connection.acknowledged, [1])
        self.clock.advance(0.05)
        self.successResultOf(drained)
        self.assertEqual(self.connection.closed, ("shutdown", "msgmux is stopping"))

    def test_unsettled_at_the_timeout_is_left_to_the_broker(self) -> None:
        """A delivery the peer has not settled by the timeout is neither acked nor rejected: the channel's close requeues it."""
        self.connection.messages = 1
        self.deliver("q-reports", b"a", 1)
        self.assertEqual(len(self.connection.sent), 1)
        drained = self.drain(2.0)
        self.clock.pump([0.05] * 39)
        self.assertNoResult(drained)
        self.clock.pump([0.05] * 2)
        self.successResultOf(drained)
        self.assertEqual(self.connection.closed, ("shutdown", "msgmux is stopping"))
        self.assertEqual(self.settled(), [])


class CopyTests(SynchronousTestCase):
    """
    The control half's relay when the tenant broker redelivers messages the
    control half still holds: a copy waits for its original and ends as it
    does, so one message is published and neither is acknowledged early.
    """

    def setUp(self) -> None:
        self.clock = clock()
        config = control_config(one_link('up = [ { topic = "q-reports", methods = ["report_state"] } ]\n'))
        link = config.links[0]
        self.signer = TokenSigner(b"k" * 32)
        self.stats = LinkStats(link.name, self.clock)
        self.calls = CallTracker(self.clock, self.stats)
        self.addCleanup(self.calls.cancel_all)
        policy = ControlPolicy(
            link,
            OsloTopology(config.broker.queues, config.broker.exchange),
            CallRewriter(link.name, self.signer, self.calls, "reply_msgmux_tenant-a", self.clock),
            LinkMemory(),
            Canaries(link.name, self.signer, self.clock, 10.0, self.stats),
            self.clock,
            self.stats,
        )
        self.connection = RecordingConnection()
        self.relay = Relay(self.connection, policy, idle_broker(), ImmediateCredit(self.connection), (10, 1 << 20), self.clock, self.stats, {})
        self.protocol, self.transport = broker_connection(self.clock)
        self.channel = self.confirming_channel(1)

    def confirming_channel(self, number: int) -> Channel:
        channel = open_channel(self.protocol, number)
        self.successResultOf(defer.Deferred.fromCoroutine(channel.select_confirms()))
        return channel

    def cast(self, seq: int, unique_id: str = "u-1", **properties: Any) -> None:
        body = oslo_body({"method": "report_state", "_unique_id": unique_id})
        self.relay.message_received(seq, Message(RpcAddress(None, "q-reports"), dict(OSLO_PROPERTIES, **properties), body))

    def test_copy_settled_with_its_original(self) -> None:
        """A redelivered copy that arrives before the original is confirmed is not published, and is acknowledged with it."""
        self.relay.channel_ready(self.channel)
        self.cast(1)
        self.cast(2)  # the copy
        self.cast(3, unique_id="u-2")
        self.assertEqual([inner_of(body)["_unique_id"] for _, _, _, body in published(self.transport)], ["u-1", "u-2"])
        self.assertEqual(self.connection.acknowledged, [])
        confirm(self.protocol, 1, 1)
        self.assertEqual(self.connection.acknowledged, [1, 2])
        self.assertEqual(self.stats.get("duplicates_dropped", direction="up"), 1)
        self.assertEqual(self.stats.get("relayed", direction="up", kind="rpc"), 1)
        confirm(self.protocol, 1, 2)
        self.assertEqual(self.connection.acknowledged, [1, 2, 3])

    def test_copy_while_the_broker_is_away(self) -> None:
        """An original waiting for the next channel, and its copy: the message is published once on that channel."""
        self.relay.channel_ready(self.channel)
        self.cast(1)
        self.relay.channel_lost(self.channel, Failure(ChannelLost("connection lost")))
        self.cast(2)
        self.transport.clear()
        self.relay.channel_ready(self.confirming_channel(2))
        self.assertEqual(len(published(self.transport)), 1)
        confirm(self.protocol, 2, 1)
        self.assertEqual(self.connection.acknowledged, [1, 2])

    def test_copy_refused_with_its_original(self) -> None:
        """An original the broker would refuse takes its copies with it, with the same reason."""
        self.cast(1, delivery_mode=3)  # waits for a channel, which refuses it
        self.cast(2, delivery_mode=3)
        self.relay.channel_ready(self.channel)
        self.assertEqual(self.connection.refused, [(1, "malformed"), (2, "malformed")])
        self.assertEqual(self.connection.acknowledged, [])

    def test_copy_of_an_expired_call(self) -> None:
        """
        A copied call is not tracked as a second call; an original dropped as
        expired ends its copies too: both settled, nothing published.
        """
        body = oslo_body({"method": "report_state", "_msg_id": "m1", "_reply_q": "reply_x", "_unique_id": "u-1"})
        for seq in (1, 2):
            self.relay.message_received(seq, Message(RpcAddress(None, "q-reports"), dict(OSLO_PROPERTIES, expiration="1000"), body))
        self.assertEqual(self.calls.inflight("up"), 1)
        self.clock.advance(2)
        self.relay.channel_ready(self.channel)
        self.assertEqual(published(self.transport), [])
        self.assertEqual(self.connection.acknowledged, [1, 2])

    def test_session_end_leaves_copies_to_the_broker(self) -> None:
        """When the session ends first, neither the original nor the copy is acknowledged: the tenant broker keeps both."""
        self.relay.channel_ready(self.channel)
        self.cast(1)
        self.cast(2)
        self.relay.session_ended("connection-lost")
        confirm(self.protocol, 1, 1)
        self.assertEqual(self.connection.acknowledged, [])

    def test_final_reply_copy(self) -> None:
        """A second final reply to a call waits for the first, which alone reaches the caller."""
        token = self.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 30)
        self.calls.begin(token, self.clock.seconds() + 30, "down")
        self.relay.channel_ready(self.channel)
        for seq in (1, 2):
            body = oslo_body({"_msg_id": token, "result": seq, "ending": True})
            self.relay.message_received(seq, Message(ReplyAddress(None), dict(OSLO_PROPERTIES), body))
        [(_, _, _, body)] = published(self.transport)
        self.assertEqual(inner_of(body)["result"], 1)
        confirm(self.protocol, 1, 1)
        self.assertEqual(self.connection.acknowledged, [1, 2])

    def test_late_copy_of_a_final_reply(self) -> None:
        """A copy of a final reply that arrives after the call's deadline still waits for the first, not refused before it."""
        token = self.signer.issue("tenant-a", "down", "m9", "reply_caller", self.clock.seconds() + 30)
        self.calls.begin(token, self.clock.seconds() + 30, "down")
        self.relay.channel_ready(self.channel)
        body = oslo_body({"_msg_id": token, "result": 1, "ending": True})
        self.relay.message_received(1, Message(ReplyAddress(None), dict(OSLO_PROPERTIES), body))
        self.clock.advance(31)
        self.relay.message_received(2, Message(ReplyAddress(None), dict(OSLO_PROPERTIES), body))
        self.assertEqual((self.connection.acknowledged, self.connection.refused), ([], []))
        confirm(self.protocol, 1, 1)
        self.assertEqual(self.connection.acknowledged, [1, 2])
