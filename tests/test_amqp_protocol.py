"""
Tests for the hot path of L{msgmux.amqp.protocol.BrokerProtocol}: frames
split anywhere, deliveries assembled from several body frames, a malformed
content header costing one message and not the connection, publisher
confirms, returns, the capability-advertising start-ok, heartbeats.
The broker side is played with hand-encoded frames over C{StringTransport};
the protocol and channel are the real ones, as L{tests.doubles} builds them,
and the tests see them only through their public interface.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txamqp.protocol import AMQChannel

from msgmux.amqp import wire
from msgmux.amqp.channel import Channel, ChannelLost, Delivery, PublishRefused, PublishReturned
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol
from tests.doubles import broker_connection, open_channel


def make_protocol(clock: Clock | None = None, heartbeat: int = 0) -> tuple[BrokerProtocol, StringTransport, Channel]:
    """A real protocol writing to a C{StringTransport}, with channel 1 open on it."""
    protocol, transport = broker_connection(clock, heartbeat)
    return protocol, transport, open_channel(protocol)


def consume(test: SynchronousTestCase, channel: Channel, callback: Callable[[Delivery], None]) -> None:
    """Consume as C{ctag} (the consumer tag of L{deliver_frames}), the broker answering consume-ok at once."""
    test.successResultOf(defer.Deferred.fromCoroutine(channel.consume("q", "ctag", callback)))


def select_confirms(test: SynchronousTestCase, channel: Channel) -> None:
    """Put the channel in publisher-confirm mode, the broker answering select-ok at once."""
    test.successResultOf(defer.Deferred.fromCoroutine(channel.select_confirms()))


def return_frames(exchange: str, routing_key: str, body: bytes) -> bytes:
    """A basic.return (NO_ROUTE) with its content, as RabbitMQ sends it for an unroutable mandatory publish."""
    method = struct.pack(">HHH", 60, 50, 312) + wire.encode_shortstr("NO_ROUTE") + wire.encode_shortstr(exchange) + wire.encode_shortstr(routing_key)
    header = struct.pack(">HHQ", 60, 0, len(body)) + wire.encode_properties({})
    return wire.frame(wire.FRAME_METHOD, 1, method) + wire.frame(wire.FRAME_HEADER, 1, header) + wire.frame(wire.FRAME_BODY, 1, body)


def deliver_frames(tag: int, properties: dict[str, Any], body: bytes, frame_max: int = 131072, redelivered: bool = False) -> bytes:
    method = (
        struct.pack(">HH", 60, 60)
        + wire.encode_shortstr("ctag")
        + struct.pack(">QB", tag, 1 if redelivered else 0)
        + wire.encode_shortstr("openstack")
        + wire.encode_shortstr("l3_agent")
    )
    header = struct.pack(">HHQ", 60, 0, len(body)) + wire.encode_properties(properties)
    data = wire.frame(wire.FRAME_METHOD, 1, method) + wire.frame(wire.FRAME_HEADER, 1, header)
    for start in range(0, len(body), frame_max - 8):
        data += wire.frame(wire.FRAME_BODY, 1, body[start : start + frame_max - 8])
    return data


class DeliveryTests(SynchronousTestCase):
    @given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=6000), max_size=8))
    def test_split_anywhere(self, body: bytes, cuts: list[int]) -> None:
        """A delivery arrives intact however the TCP stream is cut, across several body frames."""
        protocol, transport, channel = make_protocol()
        got: list[Any] = []
        consume(self, channel, got.append)
        data = deliver_frames(7, {"content_type": "application/json", "headers": {"x": [1, "é"]}}, body, frame_max=512)
        data += deliver_frames(8, {}, b"second", frame_max=512)
        points = sorted({min(c, len(data)) for c in cuts})
        for start, end in zip([0] + points, points + [len(data)]):
            protocol.dataReceived(data[start:end])
        self.assertEqual([d.delivery_tag for d in got], [7, 8])
        self.assertEqual(got[0].body, body)
        self.assertEqual(got[0].properties, {"content_type": "application/json", "headers": {"x": [1, "é"]}})
        self.assertEqual((got[0].exchange, got[0].routing_key, got[0].error), ("openstack", "l3_agent", None))
        self.assertFalse(transport.disconnecting)

    def test_malformed_header_costs_one_message(self) -> None:
        """A content header that cannot be decoded marks that delivery as malformed; the connection lives on."""
        protocol, transport, channel = make_protocol()
        got: list[Any] = []
        consume(self, channel, got.append)
        good = deliver_frames(1, {"content_type": "text/plain"}, b"ok")
        bad = bytearray(deliver_frames(2, {"content_type": "text/plain"}, b"bad"))
        index = bad.index(b"text/plain")
        bad[index] = 0xFF  # invalid UTF-8 in a short string
        protocol.dataReceived(good + bytes(bad) + good)
        self.assertEqual([(d.delivery_tag, d.error is None) for d in got], [(1, True), (2, False), (1, True)])
        self.assertEqual(got[1].body, b"bad")
        self.assertFalse(transport.disconnecting)

    def test_consumer_failure_requeues(self) -> None:
        """A consumer callback that raises gets its delivery rejected with requeue, not lost."""
        protocol, transport, channel = make_protocol()

        def broken(delivery: Any) -> None:
            raise RuntimeError("bug")

        consume(self, channel, broken)
        protocol.dataReceived(deliver_frames(5, {}, b"x"))
        self.assertEqual(transport.value(), wire.encode_reject(1, 5, requeue=True))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bad_frame_end_aborts(self) -> None:
        """A frame without the frame-end octet is a broken connection: abort it."""
        protocol, transport, channel = make_protocol()
        frame = bytearray(wire.encode_ack(1, 1))
        frame[-1] = 0
        protocol.dataReceived(bytes(frame))
        self.assertTrue(transport.disconnecting)

    def test_undecodable_methods_abort(self) -> None:
        """
        Method frames too short for their ids or arguments, or of unknown
        classes, whether the hot path or txAMQP decodes them, abort the
        connection with a logged error instead of raising out of dataReceived.
        """
        payloads = [b"\x00\x3c", b"\x00\x0a\x00\x32", b"\x00\x0a\x00\x32\x01", b"\x00\x14\x00\x28", b"\xff\xff\xff\xff"]
        for payload in payloads:
            protocol, transport, channel = make_protocol()
            protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 0, payload))
            self.assertTrue(transport.disconnecting, payload)


class AckTests(SynchronousTestCase):
    def test_batches_become_one_multiple_ack(self) -> None:
        """Acks that leave nothing unsettled below them go out as one multiple ack naming an unacked tag."""
        protocol, transport, channel = make_protocol()
        consume(self, channel, lambda delivery: None)
        protocol.dataReceived(b"".join(deliver_frames(tag, {}, b"x") for tag in range(1, 7)))
        transport.clear()
        channel.ack_many([2, 1, 3])
        self.assertEqual(transport.value(), wire.encode_ack(1, 3, multiple=True))
        transport.clear()
        channel.ack_many([5, 6])  # 4 is still unsettled: these go one by one
        self.assertEqual(transport.value(), wire.encode_ack(1, 5) + wire.encode_ack(1, 6))
        transport.clear()
        channel.reject(4, requeue=False)
        channel.ack_many([])
        self.assertEqual(transport.value(), wire.encode_reject(1, 4, False))
        self.assertEqual(channel.lowest_unsettled, 7)
        self.assertEqual(channel.settled_ahead, 0)

    def test_multiple_ack_skips_settled_tags(self) -> None:
        """A multiple ack never names a tag the broker already settled."""
        protocol, transport, channel = make_protocol()
        consume(self, channel, lambda delivery: None)
        protocol.dataReceived(b"".join(deliver_frames(tag, {}, b"x") for tag in range(1, 5)))
        channel.ack_many([2])
        channel.reject(3, requeue=True)
        transport.clear()
        channel.ack_many([1])
        self.assertEqual(transport.value(), wire.encode_ack(1, 1, multiple=True))
        transport.clear()
        channel.ack_many([4])
        self.assertEqual(transport.value(), wire.encode_ack(1, 4, multiple=True))


class ConfirmTests(SynchronousTestCase):
    def test_publish_confirms(self) -> None:
        """Publishes get sequential tags; single, multiple and negative confirms resolve the right Deferreds."""
        protocol, transport, channel = make_protocol()
        select_confirms(self, channel)
        results: list[Any] = []
        for index in range(4):
            channel.publish("openstack", "t", {}, b"%d" % index).addBoth(results.append)
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 80, 2, 1)))
        self.assertEqual(results, [None, None])
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 120, 4, 0)))
        self.assertEqual(len(results), 3)
        self.assertTrue(results[2].check(PublishRefused))
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 80, 3, 0)))
        self.assertEqual(results[3], None)
        self.assertEqual(channel.unconfirmed, 0)

    def test_returned_mandatory_publish(self) -> None:
        """
        A basic.return belongs to a publish to its destination among those
        the next confirm settles, even when that confirm overtakes the
        confirms of earlier publishes to the same destination (RabbitMQ
        confirms an unroutable message at once, a routed one when its queue
        has it).
        """
        protocol, transport, channel = make_protocol()
        select_confirms(self, channel)
        results: list[Any] = []
        channel.publish("", "reply_a", {}, b"1", mandatory=True).addBoth(results.append)
        channel.publish("", "reply_b", {}, b"2", mandatory=True).addBoth(results.append)
        channel.publish("", "reply_b", {}, b"3", mandatory=True).addBoth(results.append)
        channel.publish("openstack", "t", {}, b"4").addBoth(results.append)
        protocol.dataReceived(return_frames("", "reply_b", b"3"))
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 80, 3, 0)))
        self.assertEqual(len(results), 1)
        self.assertTrue(results[0].check(PublishReturned))
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 80, 4, 1)))
        self.assertEqual(results[1:], [None, None, None])
        self.assertEqual((channel.unconfirmed_mandatory, channel.unmatched_returns), (0, 0))

    def test_return_of_a_batch(self) -> None:
        """When one multiple confirm settles several publishes to a returned destination, the latest is the returned one."""
        protocol, transport, channel = make_protocol()
        select_confirms(self, channel)
        results: list[Any] = []
        channel.publish("", "reply_b", {}, b"1", mandatory=True).addBoth(results.append)
        channel.publish("", "reply_b", {}, b"2", mandatory=True).addBoth(results.append)
        protocol.dataReceived(return_frames("", "reply_b", b"2"))
        protocol.dataReceived(wire.frame(wire.FRAME_METHOD, 1, struct.pack(">HHQB", 60, 80, 2, 1)))
        self.assertIsNone(results[0])
        self.assertTrue(results[1].check(PublishReturned))

    def test_delivery_callback_failure(self) -> None:
        """A delivery our consumer fails on is requeued once; failing again on its redelivery, it is dropped."""
        protocol, transport, channel = make_protocol()

        def broken(delivery: Any) -> None:
            raise RuntimeError("bug")

        consume(self, channel, broken)
        transport.clear()
        protocol.dataReceived(deliver_frames(1, {}, b"x"))
        protocol.dataReceived(deliver_frames(2, {}, b"x", redelivered=True))
        self.assertEqual(transport.value(), wire.encode_reject(1, 1, True) + wire.encode_reject(1, 2, False))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_channel_loss_fails_pending(self) -> None:
        """Unconfirmed publishes fail with ChannelLost when the connection goes."""
        protocol, transport, channel = make_protocol()
        select_confirms(self, channel)
        failures: list[Any] = []
        channel.publish("x", "y", {}, b"").addErrback(failures.append)
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertTrue(failures[0].check(ChannelLost))
        self.assertFalse(channel.is_open)

    def test_publish_frames(self) -> None:
        """A publish writes method, header and body frames for the channel, split at frame_max."""
        protocol, transport, channel = make_protocol()
        protocol.MAX_LENGTH = 1024
        channel.publish("ex", "key", {"delivery_mode": 2}, b"a" * 2500, mandatory=True)
        data = transport.value()
        types = []
        offset = 0
        while offset < len(data):
            kind, number, size = wire.FRAME_HEAD.unpack_from(data, offset)
            types.append((kind, number, size))
            offset += 8 + size
        self.assertEqual([t[0] for t in types], [1, 2, 3, 3, 3])
        self.assertEqual(sum(t[2] for t in types[2:]), 2500)
        self.assertTrue(all(t[2] <= 1016 for t in types[2:]))

    def test_returned_message_reaches_return_observers(self) -> None:
        """A returned message reaches the channel's return observers with its content."""
        protocol, transport, channel = make_protocol()
        returned: list[Any] = []
        channel.return_observers.append(lambda *args: returned.append(args))
        method = struct.pack(">HHH", 60, 50, 312) + wire.encode_shortstr("NO_ROUTE") + wire.encode_shortstr("") + wire.encode_shortstr("reply_x")
        header = struct.pack(">HHQ", 60, 0, 2) + wire.encode_properties({})
        protocol.dataReceived(
            wire.frame(1, 1, method) + wire.frame(2, 1, header) + wire.frame(3, 1, b"hi")
        )
        self.assertEqual(returned, [(312, "NO_ROUTE", "", "reply_x", {}, b"hi")])


class ChannelTableTests(SynchronousTestCase):
    """
    A channel number is used again as soon as it is free, so the protocol's
    tables forget a channel only while they still hold that very channel.
    """

    def reuse_number(self) -> tuple[BrokerProtocol, Channel, Channel]:
        """Channel 1 closed by msgmux, and a new channel 1 opened since."""
        protocol, _, _ = make_protocol()
        del protocol.fast_channels[1]
        old = Channel(protocol, AMQChannel(1, protocol.outgoing, protocol))
        protocol.channels[1] = old.txamqp_channel
        protocol.fast_channels[1] = old
        protocol.forget_channel(old)
        new = Channel(protocol, AMQChannel(1, protocol.outgoing, protocol))
        protocol.channels[1] = new.txamqp_channel
        protocol.fast_channels[1] = new
        return protocol, old, new

    def assert_registered(self, protocol: BrokerProtocol, channel: Channel) -> None:
        self.assertIs(protocol.fast_channels[1], channel)
        self.assertIs(protocol.channels[1], channel.txamqp_channel)
        self.assertTrue(channel.is_open)

    def test_late_failure_of_a_forgotten_channel(self) -> None:
        """The broker's close of the old channel, reported late, leaves the new one registered."""
        protocol, old, new = self.reuse_number()
        protocol.channel_failed(old.txamqp_channel, Failure(ChannelLost("closed by the broker")))
        self.assert_registered(protocol, new)

    def test_forgetting_twice(self) -> None:
        """Forgetting the old channel again leaves the new one registered."""
        protocol, old, new = self.reuse_number()
        protocol.forget_channel(old)
        self.assert_registered(protocol, new)

    def test_in_the_order_txamqp_reports_it(self) -> None:
        """
        txAMQP first fails the method pending on the channel, whose caller
        may forget the channel and open another on the same number at once,
        and only then reports the broker's close: the new channel stays.
        """
        protocol, _, _ = make_protocol()
        del protocol.fast_channels[1]
        old = Channel(protocol, AMQChannel(1, protocol.outgoing, protocol))
        protocol.channels[1] = old.txamqp_channel
        protocol.fast_channels[1] = old
        reopened: list[Channel] = []

        def reopen(failure: Failure) -> None:
            protocol.forget_channel(old)
            new = Channel(protocol, AMQChannel(1, protocol.outgoing, protocol))
            protocol.channels[1] = new.txamqp_channel
            protocol.fast_channels[1] = new
            reopened.append(new)

        old.txamqp_channel.responses.get().addErrback(reopen)  # what a synchronous method awaits
        old.txamqp_channel.do_close(ChannelLost("closed by the broker"))
        self.assert_registered(protocol, reopened[0])

    def test_failure_of_the_registered_channel(self) -> None:
        """The broker's close of the channel that holds the number frees the number."""
        protocol, _, new = self.reuse_number()
        protocol.channel_failed(new.txamqp_channel, Failure(ChannelLost("closed by the broker")))
        self.assertNotIn(1, protocol.fast_channels)
        self.assertNotIn(1, protocol.channels)
        self.assertFalse(new.is_open)


class HandshakeTests(SynchronousTestCase):
    def test_protocol_header(self) -> None:
        """The client announces AMQP 0-9-1."""
        protocol = BrokerProtocol(BrokerDelegate(), "/", 0, Clock(), "user", "secret", "msgmux test")
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"AMQP\x00\x00\x09\x01")

    def test_start_ok_advertises_capabilities(self) -> None:
        """connection.start is answered with PLAIN credentials and the capabilities msgmux relies on."""
        protocol, transport, channel = make_protocol()
        server = wire.encode_table({"product": "RabbitMQ", "version": "3.10.8", "capabilities": {"publisher_confirms": True}})
        start = struct.pack(">HHBB", 10, 10, 0, 9) + server + struct.pack(">I", 5) + b"PLAIN" + struct.pack(">I", 5) + b"en_US"
        protocol.dataReceived(wire.frame(1, 0, start))
        self.assertEqual(protocol.server_properties["version"], "3.10.8")
        kind, number, size = wire.FRAME_HEAD.unpack_from(transport.value(), 0)
        payload = transport.value()[7 : 7 + size]
        self.assertEqual(struct.unpack_from(">HH", payload), (10, 11))
        properties, offset = wire.decode_table(payload, 4)
        self.assertEqual(properties["capabilities"]["consumer_cancel_notify"], True)
        self.assertEqual(properties["capabilities"]["connection.blocked"], True)
        self.assertEqual(properties["connection_name"], "msgmux test")
        self.assertIn(b"\x00user\x00secret", payload)

    def test_login_methods(self) -> None:
        """
        connection.start-ok names the configured mechanism: PLAIN and
        AMQPLAIN carry the credentials, EXTERNAL an empty response (the
        broker takes the identity from the TLS client certificate).
        """
        server = wire.encode_table({"product": "RabbitMQ"})
        start = struct.pack(">HHBB", 10, 10, 0, 9) + server + struct.pack(">I", 14) + b"PLAIN EXTERNAL" + struct.pack(">I", 5) + b"en_US"
        amqplain = wire.encode_table({"LOGIN": "user", "PASSWORD": "secret"})[4:]
        expected = {"PLAIN": b"\x00user\x00secret", "AMQPLAIN": amqplain, "EXTERNAL": b""}
        for method, response in expected.items():
            protocol = BrokerProtocol(BrokerDelegate(), "/", 0, Clock(), "user", "secret", "msgmux test", login_method=method)
            transport = StringTransport()
            protocol.makeConnection(transport)
            transport.clear()
            protocol.dataReceived(wire.frame(1, 0, start))
            _, _, size = wire.FRAME_HEAD.unpack_from(transport.value(), 0)
            payload = transport.value()[7 : 7 + size]
            _, offset = wire.decode_table(payload, 4)
            mechanism_length = payload[offset]
            self.assertEqual(payload[offset + 1 : offset + 1 + mechanism_length].decode(), method)
            offset += 1 + mechanism_length
            length = struct.unpack_from(">I", payload, offset)[0]
            self.assertEqual(payload[offset + 4 : offset + 4 + length], response, method)
            if method == "EXTERNAL":
                self.assertNotIn(b"secret", transport.value())

    def test_silent_broker_is_aborted(self) -> None:
        """With heartbeats on, a broker that sends nothing for three intervals is dropped; traffic keeps it alive."""
        clock = Clock()
        protocol, transport, channel = make_protocol(clock, heartbeat=10)
        protocol.started.fire()
        for _ in range(5):
            clock.advance(10)
            protocol.dataReceived(wire.frame(wire.FRAME_HEARTBEAT, 0, b""))
        self.assertFalse(transport.disconnecting)
        clock.advance(31)
        self.assertTrue(transport.disconnecting)
