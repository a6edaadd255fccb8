"""
Tests for L{msgmux.relay.Relay} without brokers: what waits for link credit
goes out in the right order, replies first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.channel import Delivery
from msgmux.link.codec import Message, ReplyAddress, RpcAddress
from msgmux.oslo.topology import QueueSpec
from msgmux.relay import Publication, Relay
from msgmux.routing import Destination
from msgmux.routing import Source
from msgmux.stats import LinkStats
from msgmux.streams import OFFSET_HEADER, StreamPosition


class FakeLink:
    established = True

    def __init__(self) -> None:
        self.send_credit = 0
        self.sent: list[bytes] = []

    def send_message(self, message: Message, token: Any) -> None:
        self.send_credit -= 1
        self.sent.append(message.body)


class OpenChannel:
    is_open = True


class PassThrough(Relay):
    def outbound(self, source: Source, delivery: Delivery) -> Message:
        return Message(0, source.address_for(delivery.routing_key), {}, delivery.body)


def delivery(body: bytes) -> Delivery:
    return Delivery(OpenChannel(), "c", 1, False, "", "k", {}, body, None)  # type: ignore[arg-type]


class CreditOrderTests(SynchronousTestCase):
    def test_replies_first(self) -> None:
        """With no credit, casts and replies wait; when credit comes, replies go first, each line in its order."""
        clock = Clock()
        link = FakeLink()
        relay = PassThrough(link, object(), clock, 10, LinkStats("l", clock))  # type: ignore[arg-type]
        casts = Source(QueueSpec("t", False, False), (), RpcAddress(None, "t"))
        replies = Source(QueueSpec("reply_msgmux_l", False, False), (), ReplyAddress())
        for body, source in ((b"cast-1", casts), (b"reply-1", replies), (b"cast-2", casts), (b"reply-2", replies)):
            relay._delivered(source, delivery(body))
        self.assertEqual(link.sent, [])
        link.send_credit = 3
        relay.credit_received()
        self.assertEqual(link.sent, [b"reply-1", b"reply-2", b"cast-1"])
        link.send_credit = 1
        relay.credit_received()
        self.assertEqual(link.sent[-1], b"cast-2")
        link.send_credit = 1
        relay._delivered(casts, delivery(b"cast-3"))  # nothing waits: straight out
        self.assertEqual(link.sent[-1], b"cast-3")


class RecordingChannel:
    """A channel that records how deliveries are settled."""

    is_open = True

    def __init__(self) -> None:
        self.settled: list[tuple[Any, ...]] = []

    def ack(self, tag: int) -> None:
        self.settled.append(("ack", tag))

    def reject(self, tag: int, requeue: bool) -> None:
        self.settled.append(("reject", tag, requeue))


class ClosingSessionTests(SynchronousTestCase):
    """
    Deliveries that arrive while the session closes are left to the broker:
    the channel closes with the session and hands them back.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.link = FakeLink()
        self.link.send_credit = 10
        self.relay = PassThrough(self.link, object(), self.clock, 10, LinkStats("l", self.clock))  # type: ignore[arg-type]
        self.channel = RecordingChannel()
        self.source = Source(QueueSpec("t", False, False), (), RpcAddress(None, "t"))

    def deliver(self, tag: int, redelivered: bool, headers: dict[str, Any] | None = None) -> Delivery:
        properties = {"headers": headers} if headers else {}
        return Delivery(self.channel, "c", tag, redelivered, "", "t", properties, b"x", None)  # type: ignore[arg-type]

    def test_link_closing(self) -> None:
        """Neither sent nor settled once the link is closing, fresh or redelivered."""
        self.link.established = False  # type: ignore[misc]
        self.relay._delivered(self.source, self.deliver(1, False))
        self.relay._delivered(self.source, self.deliver(2, True))
        self.assertEqual((self.link.sent, self.channel.settled), ([], []))

    def test_session_ended(self) -> None:
        """Neither sent nor settled after the session ended, while the channel's close is under way."""
        self.relay.active = False
        self.relay._delivered(self.source, self.deliver(1, True))
        self.assertEqual((self.link.sent, self.channel.settled), ([], []))

    def test_stream_resumes_at_unsent(self) -> None:
        """A stream message that arrived while closing is where the next session resumes."""
        position = StreamPosition()
        self.link.established = False  # type: ignore[misc]
        self.relay._stream_delivered(self.source, position, self.deliver(1, False, {OFFSET_HEADER: 41}))
        self.assertEqual(position.resume(), 41)


class ExpiryLink(FakeLink):
    """A link end that also records what the relay acknowledges and grants."""

    def __init__(self) -> None:
        super().__init__()
        self.acknowledged: list[int] = []
        self.granted = 0

    def acknowledge(self, seq: int) -> None:
        self.acknowledged.append(seq)

    def grant(self, increment: int) -> None:
        self.granted += increment


class PublishingChannel(RecordingChannel):
    """A channel that records publishes (their confirms never come)."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, dict[str, Any]]] = []

    def publish_then(self, exchange: str, key: str, properties: dict[str, Any], body: bytes, *rest: Any) -> None:
        self.published.append((key, properties))


class WithDeadline(Relay):
    """Gives every message, either way, the deadline the test sets."""

    deadline = 0.0

    def outbound(self, source: Source, delivery: Delivery) -> Message:
        return Message(0, source.address_for(delivery.routing_key), {}, delivery.body, self.deadline)

    def inbound(self, message: Message) -> Publication:
        return Publication(Destination("openstack", "t"), {}, message.body, self.deadline)


class ExpiryTests(SynchronousTestCase):
    """
    A call whose deadline passed while msgmux held it is dropped, counted,
    and settled at its source; one still in time carries what is left of
    its deadline as the AMQP expiration.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.link = ExpiryLink()
        self.link.send_credit = 10
        self.relay = WithDeadline(self.link, object(), self.clock, 10, LinkStats("l", self.clock))  # type: ignore[arg-type]
        self.channel = PublishingChannel()
        self.relay.channel = self.channel  # type: ignore[assignment]
        self.source = Source(QueueSpec("t", False, False), (), RpcAddress(None, "t"))

    def test_expired_while_waiting_for_credit(self) -> None:
        """Not sent on the link; acked on its broker, since nobody wants it any more."""
        self.link.send_credit = 0
        self.relay.deadline = 1001.0
        self.relay._delivered(self.source, Delivery(self.channel, "c", 1, False, "", "t", {}, b"late", None))  # type: ignore[arg-type]
        self.clock.advance(2)
        self.link.send_credit = 1
        self.relay.credit_received()
        self.assertEqual(self.link.sent, [])
        self.assertEqual(self.channel.settled, [("ack", 1)])
        self.assertEqual(self.relay.stats.get("expired", direction="out"), 1)

    def test_expired_before_publish(self) -> None:
        """Not published; acknowledged to the peer, which acks it at its source."""
        self.relay.deadline = 999.0
        self.relay.message_received(Message(1, RpcAddress(None, "t"), {}, b"late", 999.0))
        self.assertEqual(self.channel.published, [])
        self.assertEqual(self.link.acknowledged, [1])
        self.assertEqual(self.relay.stats.get("expired", direction="in"), 1)

    def test_in_time_carries_the_rest_as_expiration(self) -> None:
        """Published with the milliseconds it has left."""
        self.relay.deadline = 1002.5
        self.relay.message_received(Message(1, RpcAddress(None, "t"), {}, b"call", 1002.5))
        self.assertEqual(self.channel.published, [("t", {"expiration": "2500"})])
        self.assertEqual(self.link.acknowledged, [])
