# -*- test-case-name: tests.test_scripted_broker -*-
"""
msgmux's AMQP client (L{BrokerProtocol} and L{Channel}) against
L{tests.doubles.amqp.ScriptedBroker}, a peer that replays frames captured
from a real RabbitMQ, over iosim: login, topology, deliveries and
acknowledgements, publisher confirms, returns, channel errors, consumer
cancellation, heartbeats; and the double failing loudly on what RabbitMQ
would refuse.  L{BrokerService} over the double is in
L{tests.test_scripted_service}, the fixture's provenance in
L{tests.test_scripted_capture}.
"""

from __future__ import annotations

from typing import Any, Coroutine, TypeVar

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp import wire
from msgmux.amqp.channel import Channel, ChannelLost, Delivery, PublishRefused, PublishReturned
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol
from tests.doubles.amqp import (
    ACK,
    RETURN,
    ScriptedBroker,
    ScriptError,
    Settled,
    UnexpectedFrame,
)
from tests.doubles.amqp_frames import FrameSplitter

T = TypeVar("T")


class Connected:
    """A L{BrokerProtocol} and a L{ScriptedBroker} joined by an iosim pump."""

    def __init__(self, case: SynchronousTestCase, heartbeat: int = 0, beating: bool = False, **options: Any) -> None:
        """
        @param heartbeat: the client's heartbeat interval.
        @param beating: whether the broker sends heartbeats (on the same clock).
        @param options: for the L{ScriptedBroker}.
        """
        self.case = case
        self.clock = Clock()
        self.client, self.broker, self.pump = iosim.connectedServerAndClient(
            lambda: ScriptedBroker(clock=self.clock if beating else None, **options),
            lambda: BrokerProtocol(
                BrokerDelegate(), "tenant-a", heartbeat, self.clock, "guest", "secret", "msgmux test"
            ),
            clock=self.clock,
        )

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a client coroutine to its end, pumping bytes both ways."""
        result = defer.Deferred.fromCoroutine(coroutine)
        self.pump.flush()
        return self.case.successResultOf(result)

    def login(self) -> None:
        self.run(self.client.login())

    def channel(self) -> Channel:
        """Log in if needed and open a channel in confirm mode, with a consumer C{ctag} on C{q}."""
        if self.broker.vhost is None:
            self.login()
        channel = self.run(self.client.open_channel())
        self.run(channel.select_confirms())
        self.deliveries: list[Delivery] = []
        self.run(channel.consume("q", "ctag", self.deliveries.append))
        return channel


def outcomes(
    channel: Channel,
    count: int,
    results: list[Any] | None = None,
    exchange: str = "openstack",
    routing_key: str = "topic",
    properties: dict[str, Any] | None = None,
    body: bytes = b"x",
    mandatory: bool = False,
) -> list[Any]:
    """
    Publish C{count} messages through C{publish_then}.

    @param results: where their outcomes go (a new list by default).
    @return: C{results}.
    """
    results = [] if results is None else results
    for _ in range(count):
        channel.publish_then(
            exchange,
            routing_key,
            properties or {},
            body,
            mandatory,
            lambda argument, error: results.append(error),
            None,
        )
    return results


class LoginTests(SynchronousTestCase):
    def test_login(self) -> None:
        """The client logs in with PLAIN, advertises its capabilities, learns the broker's identity."""
        peer = Connected(self)
        peer.login()
        broker = peer.broker
        self.assertEqual((broker.username, broker.password, broker.vhost), ("guest", "secret", "tenant-a"))
        self.assertEqual(broker.client_properties["connection_name"], "msgmux test")
        self.assertTrue(broker.client_properties["capabilities"]["consumer_cancel_notify"])
        self.assertEqual(peer.client.server_properties["product"], "RabbitMQ")
        self.assertEqual(peer.client.server_properties["version"], broker.capture.version)
        self.assertEqual((broker.frame_max, peer.client.MAX_LENGTH), (131072, 131072))
        self.assertEqual(
            [r.method for r in broker.received], ["connection.start-ok", "connection.tune-ok", "connection.open"]
        )

    def test_refused_login(self) -> None:
        """Wrong credentials get RabbitMQ's connection.close 403: the login fails, the connection ends."""
        peer = Connected(self, credentials=("guest", "guest"))
        login = defer.Deferred.fromCoroutine(peer.client.login())
        peer.pump.flush()
        self.assertIn("ACCESS_REFUSED", str(self.failureResultOf(login).value))
        self.assertIsNotNone(peer.broker.lost)
        self.assertEqual(peer.broker.methods("connection.close-ok")[0].channel, 0)

    def test_heartbeats_keep_the_connection(self) -> None:
        """With heartbeats on, the broker's heartbeats keep a quiet connection alive, and the client's reach it."""
        peer = Connected(self, heartbeat=5, beating=True)
        peer.login()
        for _ in range(12):
            peer.clock.advance(5)
            peer.pump.flush()
        self.assertIsNone(peer.broker.lost)
        self.assertGreater(peer.broker.heartbeats_received, 0)

    def test_silent_broker_is_dropped(self) -> None:
        """The same connection without the broker's heartbeats is aborted by the client."""
        peer = Connected(self, heartbeat=5)
        peer.login()
        for _ in range(12):
            peer.clock.advance(5)
            peer.pump.flush()
        self.assertIsNotNone(peer.broker.lost)


class TopologyTests(SynchronousTestCase):
    def test_declarations(self) -> None:
        """Declare, bind, qos, confirm.select and consume are answered; the broker sees their arguments."""
        peer = Connected(self)
        peer.login()
        channel = peer.run(peer.client.open_channel())
        peer.run(channel.select_confirms())
        peer.run(channel.qos(50))
        peer.run(channel.declare_exchange("openstack", "topic", durable=False, auto_delete=False))
        peer.run(channel.declare_queue("l3_agent", durable=False, auto_delete=False, arguments={"x-expires": 1800000}))
        peer.run(channel.bind_queue("l3_agent", "openstack", "l3_agent"))
        peer.run(channel.consume("l3_agent", "ctag-1", lambda delivery: None))
        broker = peer.broker
        self.assertEqual(
            [r.method for r in broker.received[3:]],
            [
                "channel.open",
                "confirm.select",
                "basic.qos",
                "exchange.declare",
                "queue.declare",
                "queue.bind",
                "basic.consume",
            ],
        )
        self.assertEqual(broker.methods("queue.declare")[0].fields["arguments"], {"x-expires": 1800000})
        self.assertEqual(broker.methods("basic.qos")[0].fields["prefetch-count"], 50)
        self.assertEqual(broker.consumers["ctag-1"].queue, "l3_agent")
        self.assertTrue(broker.channels[channel.number].confirming)
        self.assertEqual(broker.unexpected, [])

    def test_redeclare_without_answer(self) -> None:
        """An exchange.declare with no-wait set gets no answer, and the channel goes on working."""
        peer = Connected(self)
        channel = peer.channel()
        channel.redeclare_exchange("openstack", "topic", False, False)
        results = outcomes(channel, 1)
        peer.pump.flush()
        peer.broker.confirm(channel.number)
        peer.pump.flush()
        self.assertEqual(results, [None])
        self.assertTrue(peer.broker.methods("exchange.declare")[0].fields["no-wait"])

    def test_client_closes_channel(self) -> None:
        """channel.close 200 from the client is answered; the broker forgets the channel and its consumers."""
        peer = Connected(self)
        channel = peer.channel()
        peer.run(channel.close())
        self.assertEqual(peer.broker.methods("channel.close")[0].fields["reply-code"], 200)
        self.assertEqual((peer.broker.channels, peer.broker.consumers), ({}, {}))
        assert channel.lost_reason is not None
        self.assertTrue(channel.lost_reason.check(ChannelLost))


class DeliveryTests(SynchronousTestCase):
    def test_delivery_reaches_consumer(self) -> None:
        """A scripted delivery reaches the consumer callback with its properties and body."""
        peer = Connected(self)
        channel = peer.channel()
        properties = {"content_type": "application/json", "delivery_mode": 2, "headers": {"x": [1, "é"]}}
        tag = peer.broker.deliver(
            "q", properties, b'{"a": 1}', exchange="openstack", routing_key="l3_agent", redelivered=True
        )
        peer.pump.flush()
        [delivery] = peer.deliveries
        self.assertEqual((delivery.consumer_tag, delivery.delivery_tag, delivery.redelivered), ("ctag", tag, True))
        self.assertEqual((delivery.exchange, delivery.routing_key), ("openstack", "l3_agent"))
        self.assertEqual((delivery.properties, delivery.body, delivery.error), (properties, b'{"a": 1}', None))
        self.assertEqual(delivery.channel, channel)

    def test_large_body_is_split(self) -> None:
        """A body larger than frame_max arrives in several body frames and is reassembled."""
        peer = Connected(self)
        peer.channel()
        body = bytes(range(256)) * 1200
        peer.broker.deliver("ctag", {}, body)
        peer.pump.flush()
        self.assertEqual(peer.deliveries[0].body, body)

    def test_ack_many_is_one_multiple_ack(self) -> None:
        """ack_many of consecutive tags reaches the broker as one basic.ack with multiple set."""
        peer = Connected(self)
        channel = peer.channel()
        for _ in range(4):
            peer.broker.deliver("ctag", {}, b"m")
        peer.pump.flush()
        channel.ack_many([2, 1, 3])
        peer.pump.flush()
        self.assertEqual(peer.broker.settled, [Settled(channel.number, "ack", 3, True, False)])
        self.assertEqual(peer.broker.outstanding(channel.number), {4})

    def test_reject(self) -> None:
        """A rejection reaches the broker with its requeue flag."""
        peer = Connected(self)
        channel = peer.channel()
        peer.broker.deliver("ctag", {}, b"m")
        peer.broker.deliver("ctag", {}, b"n")
        peer.pump.flush()
        peer.deliveries[1].reject(requeue=False)
        peer.deliveries[0].reject(requeue=True)
        peer.pump.flush()
        self.assertEqual(
            peer.broker.settled,
            [Settled(channel.number, "reject", 2, False, False), Settled(channel.number, "reject", 1, False, True)],
        )

    def test_double_ack_is_a_protocol_error(self) -> None:
        """Acknowledging a tag twice, which RabbitMQ punishes with a channel error, fails loudly."""
        peer = Connected(self)
        channel = peer.channel()
        peer.broker.deliver("ctag", {}, b"m")
        peer.pump.flush()
        peer.client.write_frames([wire.encode_ack(channel.number, 1), wire.encode_ack(channel.number, 1)])
        error = self.assertRaises(UnexpectedFrame, peer.pump.flush)
        self.assertIn("unknown delivery tag 1", str(error))
        self.assertEqual(peer.broker.unexpected, [error])

    def test_server_cancel(self) -> None:
        """A server-sent basic.cancel reaches the cancel observers and ends the consumer."""
        peer = Connected(self)
        channel = peer.channel()
        cancelled: list[str] = []
        channel.cancel_observers.append(cancelled.append)
        peer.broker.cancel_consumer("ctag")
        peer.pump.flush()
        self.assertEqual((cancelled, channel.consumer_tags()), (["ctag"], []))

    def test_client_cancel(self) -> None:
        """basic.cancel from the client is answered and ends the consumer at the broker."""
        peer = Connected(self)
        channel = peer.channel()
        peer.run(channel.cancel("ctag"))
        self.assertEqual((peer.broker.consumers, channel.consumer_tags()), ({}, []))


class ConfirmTests(SynchronousTestCase):
    def test_confirm(self) -> None:
        """A publish is recorded as sent and its outcome waits for the broker's basic.ack."""
        peer = Connected(self)
        channel = peer.channel()
        results = outcomes(channel, 2, properties={"delivery_mode": 2}, body=b"hello")
        peer.pump.flush()
        self.assertEqual(results, [])
        [first, second] = peer.broker.published
        self.assertEqual((first.exchange, first.routing_key, first.mandatory), ("openstack", "topic", False))
        self.assertEqual((first.properties, first.body, first.tag, second.tag), ({"delivery_mode": 2}, b"hello", 1, 2))
        peer.broker.confirm(channel.number)
        peer.pump.flush()
        self.assertEqual(results, [None])
        peer.broker.confirm(channel.number)
        peer.pump.flush()
        self.assertEqual(results, [None, None])

    def test_multiple_confirm(self) -> None:
        """One basic.ack with multiple set settles every publish up to its tag."""
        peer = Connected(self)
        channel = peer.channel()
        results = outcomes(channel, 3)
        peer.pump.flush()
        peer.broker.confirm(channel.number, 2, multiple=True)
        peer.pump.flush()
        self.assertEqual((results, peer.broker.unconfirmed(channel.number)), ([None, None], [3]))

    def test_nack(self) -> None:
        """A basic.nack fails the publish with PublishRefused."""
        peer = Connected(self)
        channel = peer.channel()
        results = outcomes(channel, 1)
        peer.pump.flush()
        peer.broker.confirm(channel.number, ok=False)
        peer.pump.flush()
        self.assertIsInstance(results[0], PublishRefused)

    def test_return_then_ack(self) -> None:
        """basic.return then basic.ack, as RabbitMQ sends them for an unroutable mandatory publish: PublishReturned."""
        peer = Connected(self)
        channel = peer.channel()
        returned: list[Any] = []
        channel.return_observers.append(lambda *args: returned.append(args))
        results = outcomes(channel, 1, exchange="", routing_key="reply_x", mandatory=True, body=b"reply")
        peer.pump.flush()
        peer.broker.return_message(channel.number, "", "reply_x", {}, b"reply")
        peer.pump.flush()
        self.assertEqual(results, [])
        peer.broker.confirm(channel.number)
        peer.pump.flush()
        self.assertIsInstance(results[0], PublishReturned)
        self.assertEqual(returned, [(312, "NO_ROUTE", "", "reply_x", {}, b"reply")])

    def test_auto_confirm_policy(self) -> None:
        """An auto-confirm policy answers each publish as it completes: acked, or returned and acked."""
        peer = Connected(self, auto_confirm=lambda published: RETURN if published.routing_key == "gone" else ACK)
        channel = peer.channel()
        results = outcomes(channel, 1, routing_key="here", mandatory=True)
        outcomes(channel, 1, results, routing_key="gone", mandatory=True)
        peer.pump.flush()
        self.assertEqual(results[0], None)
        self.assertIsInstance(results[1], PublishReturned)
        self.assertEqual(peer.broker.unconfirmed(channel.number), [])

    def test_connection_loss_fails_pending(self) -> None:
        """Dropping the connection fails unconfirmed publishes with ChannelLost and closes the channel."""
        peer = Connected(self)
        channel = peer.channel()
        results = outcomes(channel, 2)
        peer.pump.flush()
        peer.broker.drop()
        peer.pump.flush()
        self.assertEqual([type(r) for r in results], [ChannelLost, ChannelLost])
        self.assertFalse(channel.is_open)


class ChannelErrorTests(SynchronousTestCase):
    def test_refused_declare_fails_the_channel(self) -> None:
        """
        A queue.declare answered with channel.close 406 (inequivalent
        arguments) fails the declare and the channel: its owner hears of it,
        its unconfirmed publishes fail, the broker gets close-ok.
        """
        peer = Connected(self)
        channel = peer.channel()
        lost: list[Any] = []
        channel.lost_observers.append(lost.append)
        results = outcomes(channel, 1)
        text = "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'l3_agent'"
        peer.broker.refuse("queue.declare", 406, text)
        declare = defer.Deferred.fromCoroutine(
            channel.declare_queue("l3_agent", False, False, arguments={"x-expires": 1})
        )
        peer.pump.flush()
        self.assertIn("406", str(self.failureResultOf(declare).value))
        self.assertEqual(len(lost), 1)
        self.assertIn(text, str(lost[0].value))
        self.assertFalse(channel.is_open)
        self.assertIsInstance(results[0], ChannelLost)
        self.assertEqual(peer.broker.received[-1].method, "channel.close-ok")
        self.assertNotIn(channel.number, peer.broker.channels)
        close = [r for r in peer.broker.received if r.method == "queue.declare"]
        self.assertEqual(len(close), 1)

    def test_unsolicited_channel_close(self) -> None:
        """A channel.close the broker sends on its own (e.g. a queue deleted under a consumer's feet) fails the channel."""
        peer = Connected(self)
        channel = peer.channel()
        lost: list[Any] = []
        channel.lost_observers.append(lost.append)
        peer.broker.close_channel(channel.number, 404, "NOT_FOUND - no queue 'q'", 60, 20)
        peer.pump.flush()
        self.assertEqual(len(lost), 1)
        self.assertIn("NOT_FOUND", str(lost[0].value))
        self.assertEqual((peer.broker.channels, peer.broker.consumers), ({}, {}))

    def test_channel_reopened(self) -> None:
        """After a channel error the client opens a channel again and goes on."""
        peer = Connected(self)
        channel = peer.channel()
        peer.broker.close_channel(channel.number, 406, "PRECONDITION_FAILED - test")
        peer.pump.flush()
        again = peer.run(peer.client.open_channel())
        peer.run(again.declare_queue("q", False, False))
        self.assertEqual(list(peer.broker.channels), [again.number])

    def test_connection_close(self) -> None:
        """connection.close from the broker (320, a node shutting down) ends the connection and its channels."""
        peer = Connected(self)
        channel = peer.channel()
        peer.broker.close_connection()
        peer.pump.flush()
        self.assertFalse(channel.is_open)
        self.assertEqual(peer.broker.received[-1].method, "connection.close-ok")
        self.assertIsNotNone(peer.broker.lost)


class StrictnessTests(SynchronousTestCase):
    """The double fails loudly on what a real RabbitMQ would refuse or what it has no capture for."""

    def test_method_on_unopened_channel(self) -> None:
        peer = Connected(self)
        peer.login()
        peer.client.write_frame(wire.encode_ack(7, 1))
        error = self.assertRaises(UnexpectedFrame, peer.pump.flush)
        self.assertIn("channel that is not open", str(error))
        self.assertEqual(error.frame.channel, 7)

    def test_unscripted_method(self) -> None:
        peer = Connected(self)
        channel = peer.channel()
        channel.txamqp_channel.basic_recover(requeue=True)
        error = self.assertRaises(UnexpectedFrame, peer.pump.flush)
        self.assertIn("no answer to basic.recover", str(error))

    def test_content_without_publish(self) -> None:
        peer = Connected(self)
        channel = peer.channel()
        peer.client.write_frame(wire.frame(wire.FRAME_BODY, channel.number, b"stray"))
        self.assertRaises(UnexpectedFrame, peer.pump.flush)

    def test_method_inside_content(self) -> None:
        """A method frame between a publish and the end of its content is refused, as RabbitMQ refuses it."""
        peer = Connected(self)
        channel = peer.channel()
        [publish] = wire.encode_publish(channel.number, "openstack", "topic", {}, b"body", 131072)
        method, header, body = FrameSplitter(header=False).feed(publish)
        peer.client.write_frames([method.raw, header.raw, wire.encode_ack(channel.number, 1), body.raw])
        error = self.assertRaises(UnexpectedFrame, peer.pump.flush)
        self.assertIn("in the middle of a message's content", str(error))

    def test_channel_methods_before_open(self) -> None:
        peer = Connected(self)
        peer.client.write_frame(wire.frame(wire.FRAME_METHOD, 1, b"\x00\x14\x00\x0a\x00"))  # channel.open
        error = self.assertRaises(UnexpectedFrame, peer.pump.flush)
        self.assertIn("before connection.open", str(error))

    def test_only_varying_fields_change(self) -> None:
        """A captured reply's fixed fields cannot be rewritten."""
        peer = Connected(self)
        peer.channel()
        template = peer.broker.capture.find("basic.deliver")
        self.assertRaises(ScriptError, peer.broker._send_method, template, 1, consumer_tag="x", priority=3)
        self.assertRaises(ScriptError, peer.broker.confirm, 1)  # nothing published
        self.assertRaises(ScriptError, peer.broker.deliver, "nobody", {}, b"")
