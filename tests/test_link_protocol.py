"""
Tests for L{msgmux.link.protocol}: handshake, credit, sequence numbers,
acknowledgements, heartbeats and every way a peer can break the protocol.
Both ends run over Twisted's in-memory transports with a fake clock.
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from msgmux.link import codec
from msgmux.link.codec import Message, RpcAddress
from msgmux.link.protocol import (
    ACK_EAGER,
    CLOSE_GRACE,
    HANDSHAKE_TIMEOUT,
    SETTLE_DELAY,
    ControlLinkProtocol,
    LinkProtocol,
    MessageTooLarge,
    TenantLinkProtocol,
)

ROUTES = {"down": [], "up": [], "notifications_down": [], "notifications_up": []}


class RecordingHandler:
    """A session handler that writes down what happens."""

    def __init__(self) -> None:
        self.started: list[LinkProtocol] = []
        self.messages: list[Message] = []
        self.acked: list[Any] = []
        self.refused: list[tuple[Any, str]] = []
        self.credit_events = 0
        self.ended: list[str] = []

    def session_started(self, link: LinkProtocol) -> None:
        self.started.append(link)

    def message_received(self, message: Message) -> None:
        self.messages.append(message)

    def messages_acknowledged(self, tokens: list[Any]) -> None:
        self.acked.extend(tokens)

    def message_refused(self, token: Any, reason: str) -> None:
        self.refused.append((token, reason))

    def credit_received(self) -> None:
        self.credit_events += 1

    def session_ended(self, reason: str) -> None:
        self.ended.append(reason)


def message(body: bytes = b"{}") -> Message:
    return Message(0, RpcAddress(None, "topic"), {"content_type": "application/json"}, body)


class LinkPair:
    """A control end and a tenant end connected in memory."""

    def __init__(self, link_name: str = "tenant-a", expected: str | None = "tenant-a", attach: Any = None) -> None:
        self.clock = Clock()
        self.control_handler = RecordingHandler()
        self.tenant_handler = RecordingHandler()
        self.violations: list[tuple[str, str]] = []

        def make_control() -> ControlLinkProtocol:
            protocol = ControlLinkProtocol(
                self.clock,
                heartbeat=5.0,
                max_frame=4096,
                link_name=link_name,
                routes=lambda: ROUTES,
                attach=attach or (lambda p: self.control_handler),
            )
            protocol.violation_observers.append(lambda code, detail: self.violations.append((code, detail)))
            return protocol

        def make_tenant() -> TenantLinkProtocol:
            return TenantLinkProtocol(self.clock, expected, lambda welcome: self.tenant_handler)

        self.tenant, self.control, self.pump = connectedServerAndClient(make_control, make_tenant, clock=self.clock)


class HandshakeTests(SynchronousTestCase):
    def test_session_comes_up(self) -> None:
        """HELLO/WELCOME establishes the session on both ends with the control half's routes."""
        pair = LinkPair()
        self.assertTrue(pair.control.established)
        self.assertTrue(pair.tenant.established)
        self.assertEqual(pair.control.session, pair.tenant.session)
        self.assertEqual(pair.tenant.welcome.routes, ROUTES)
        self.assertEqual(pair.tenant.heartbeat, 5.0)
        self.assertEqual(pair.tenant.peer_max_frame, 4096)
        self.assertEqual(pair.control_handler.started, [pair.control])
        self.assertEqual(pair.tenant_handler.started, [pair.tenant])

    def test_wrong_link_name(self) -> None:
        """A tenant half expecting another link is told so and the link closes."""
        pair = LinkPair(expected="tenant-b")
        self.assertFalse(pair.control.established)
        self.assertIn("wrong-link", pair.tenant.close_reason)
        self.assertEqual(pair.control_handler.started, [])

    def test_busy_link(self) -> None:
        """A second tenant half for a link that has one is refused with 'busy'."""
        pair = LinkPair(attach=lambda protocol: "link tenant-a already has a tenant half connected")
        self.assertIn("busy", pair.tenant.close_reason)
        self.assertFalse(pair.tenant.established)

    def test_unknown_version(self) -> None:
        """A HELLO offering only unknown versions is answered with CLOSE version."""
        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(codec.encode(codec.Hello((99,), None, "future")))
        frame = codec.FrameDecoder().feed(transport.value())[-1]
        self.assertEqual(frame, codec.Close("version", frame.detail))
        self.assertTrue(transport.disconnecting)

    def test_handshake_timeout(self) -> None:
        """A peer that never says HELLO is disconnected after the handshake timeout."""
        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertIn("handshake-timeout", control.close_reason)

    def test_message_before_handshake(self) -> None:
        """A MSG before HELLO is a protocol violation."""
        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(codec.encode(Message(1, RpcAddress(None, "t"), {}, b"")))
        self.assertIn("unexpected-frame", control.close_reason)

    def test_second_hello(self) -> None:
        """HELLO on an established session is a protocol violation."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Hello((1,), None, "again")))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "unexpected-frame")


class FlowTests(SynchronousTestCase):
    def test_no_credit_no_send(self) -> None:
        """Sending without credit is refused locally."""
        pair = LinkPair()
        self.assertRaises(RuntimeError, pair.tenant.send_message, message(), "token")

    def test_credit_send_ack(self) -> None:
        """Granted credit allows sending; ACKs return the senders' tokens, in one frame."""
        pair = LinkPair()
        pair.control.grant(3)
        pair.pump.flush()
        self.assertEqual(pair.tenant.send_credit, 3)
        for token in ("a", "b", "c"):
            pair.tenant.send_message(message(token.encode()), token)
        pair.pump.flush()
        self.assertEqual([m.seq for m in pair.control_handler.messages], [1, 2, 3])
        self.assertEqual([m.body for m in pair.control_handler.messages], [b"a", b"b", b"c"])
        self.assertEqual(pair.tenant.send_credit, 0)
        self.assertEqual(pair.tenant.unacknowledged, 3)
        for m in pair.control_handler.messages:
            pair.control.acknowledge(m.seq)
        pair.clock.advance(SETTLE_DELAY)
        pair.pump.flush()
        self.assertEqual(pair.tenant_handler.acked, ["a", "b", "c"])
        self.assertEqual(pair.tenant.unacknowledged, 0)

    def test_refuse(self) -> None:
        """REJECT hands the sender its token and the reason."""
        pair = LinkPair()
        pair.control.grant(1)
        pair.pump.flush()
        pair.tenant.send_message(message(), "tok")
        pair.pump.flush()
        pair.control.refuse(1, "method")
        pair.pump.flush()
        self.assertEqual(pair.tenant_handler.refused, [("tok", "method")])

    def test_message_without_credit_is_violation(self) -> None:
        """A MSG beyond the granted credit closes the link (flow-control)."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(Message(1, RpcAddress(None, "t"), {}, b"")))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "flow-control")
        self.assertEqual(pair.control_handler.messages, [])

    def test_bad_sequence_is_violation(self) -> None:
        """A MSG out of sequence closes the link."""
        pair = LinkPair()
        pair.control.grant(5)
        pair.pump.flush()
        pair.tenant.transport.write(codec.encode(Message(2, RpcAddress(None, "t"), {}, b"")))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-sequence")

    def test_ack_for_unknown_message(self) -> None:
        """An ACK for a message never sent closes the link."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Ack((7,))))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-ack")

    def test_too_large_message(self) -> None:
        """A message above the peer's frame limit is refused before using credit."""
        pair = LinkPair()
        pair.control.grant(1)
        pair.pump.flush()
        self.assertRaises(MessageTooLarge, pair.tenant.send_message, message(b"x" * 5000), "t")
        self.assertEqual(pair.tenant.send_credit, 1)
        self.assertEqual(pair.tenant.unacknowledged, 0)

    def _control_with_messages(self, count: int) -> tuple[Clock, ControlLinkProtocol, StringTransport]:
        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(codec.encode(codec.Hello((1,), "a", "t")))
        transport.clear()
        control.receive_credit = 100
        for seq in range(1, count + 1):
            control.dataReceived(codec.encode(Message(seq, RpcAddress(None, "t"), {}, b"")))
        return clock, control, transport

    def test_acks_are_batched(self) -> None:
        """A few acknowledgements wait up to SETTLE_DELAY and then travel in one ACK frame."""
        clock, control, transport = self._control_with_messages(3)
        for seq in range(1, 4):
            control.acknowledge(seq)
        clock.advance(0)
        self.assertEqual(transport.value(), b"")
        clock.advance(SETTLE_DELAY)
        self.assertEqual(codec.FrameDecoder().feed(transport.value()), [codec.Ack((1, 2, 3))])

    def test_many_acks_go_at_the_end_of_the_turn(self) -> None:
        """ACK_EAGER or more pending acknowledgements do not wait: the sender's prefetch must not run dry."""
        clock, control, transport = self._control_with_messages(ACK_EAGER)
        for seq in range(1, ACK_EAGER + 1):
            control.acknowledge(seq)
        self.assertEqual(transport.value(), b"")
        clock.advance(0)
        self.assertEqual(codec.FrameDecoder().feed(transport.value()), [codec.Ack(tuple(range(1, ACK_EAGER + 1)))])

    def test_settlements_ride_with_a_message(self) -> None:
        """Pending ACK and CREDIT go out in the same write as the next MSG, and nothing is sent again later."""
        clock, control, transport = self._control_with_messages(2)
        control.send_credit = 1
        control.acknowledge(1)
        control.grant(1)
        control.send_message(message(b"reply"), "token")
        frames = codec.FrameDecoder().feed(transport.value())
        self.assertEqual([type(f).__name__ for f in frames], ["Ack", "Credit", "Message"])
        self.assertEqual((frames[0], frames[1]), (codec.Ack((1,)), codec.Credit(1)))
        transport.clear()
        clock.advance(SETTLE_DELAY)
        self.assertEqual(transport.value(), b"")

    def test_credit_runs_low(self) -> None:
        """Credit is granted at the end of the turn once the peer holds less than what waits to be granted."""
        clock, control, transport = self._control_with_messages(0)
        control.receive_credit = 0
        control.grant(4)
        clock.advance(0)
        self.assertEqual(codec.FrameDecoder().feed(transport.value()), [codec.Credit(4)])
        transport.clear()
        control.grant(1)  # the peer still holds 4: this can wait
        clock.advance(0)
        self.assertEqual(transport.value(), b"")
        clock.advance(SETTLE_DELAY)
        self.assertEqual(codec.FrameDecoder().feed(transport.value()), [codec.Credit(1)])

    def test_unacknowledged_too_long(self) -> None:
        """A peer that never acknowledges a message loses the session once ACK_TIMEOUT passed (its broker redelivers)."""
        from msgmux.link.protocol import ACK_TIMEOUT

        pair = LinkPair()
        pair.control.grant(2)
        pair.pump.flush()
        pair.tenant.send_message(message(), "held")
        pair.pump.flush()
        elapsed = 0.0
        while elapsed < ACK_TIMEOUT - 5:
            pair.clock.advance(5.0)
            pair.pump.flush()
            elapsed += 5.0
        self.assertTrue(pair.tenant.established)
        for _ in range(3):
            pair.clock.advance(5.0)
            pair.pump.flush()
        self.assertFalse(pair.tenant.established)
        self.assertIn("ack-timeout", pair.tenant.close_reason)

    def test_acknowledged_messages_never_time_out(self) -> None:
        """Steady traffic that is acknowledged keeps the session up however long it runs."""
        pair = LinkPair()
        pair.control.grant(1)
        pair.pump.flush()
        for index in range(200):
            pair.tenant.send_message(message(), index)
            pair.pump.flush()
            pair.control.acknowledge(index + 1)
            pair.control.grant(1)
            pair.clock.advance(2.0)
            pair.pump.flush()
        self.assertTrue(pair.tenant.established)
        self.assertLessEqual(len(pair.tenant._send_times), 2)


class ViolationTests(SynchronousTestCase):
    def test_garbage(self) -> None:
        """Bytes that are not a frame close the link with bad-frame, and observers hear of it."""
        pair = LinkPair()
        pair.tenant.transport.write(struct.pack(">I", 3) + b"\xff\xff\xff")
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")
        self.assertIn("peer closed: bad-frame", pair.tenant.close_reason)
        self.assertEqual(len(pair.control_handler.ended), 1)
        self.assertEqual(len(pair.tenant_handler.ended), 1)

    def test_oversized_frame(self) -> None:
        """A length prefix above the limit closes the link without waiting for the payload."""
        pair = LinkPair()
        pair.tenant.transport.write(struct.pack(">I", 5000))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")

    def test_unknown_frame_type(self) -> None:
        """A well-formed CBOR array with an unknown frame type closes the link."""
        pair = LinkPair()
        payload = cbor2.dumps([42, "what"])
        pair.tenant.transport.write(struct.pack(">I", len(payload)) + payload)
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")

    def test_peer_close(self) -> None:
        """A CLOSE frame ends the session with the peer's reason."""
        pair = LinkPair()
        pair.tenant.close("shutdown", "bye")
        pair.pump.flush()
        self.assertEqual(pair.control.close_reason, "peer closed: shutdown: bye")
        self.assertEqual(pair.control_handler.ended, ["peer closed: shutdown: bye"])
        self.assertEqual(pair.violations, [])


class HandshakeLimitTests(SynchronousTestCase):
    def test_small_frames_until_hello(self) -> None:
        """Before HELLO the control half accepts only small frames; after it, the link's limit."""
        from msgmux.link.protocol import HANDSHAKE_MAX_FRAME

        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 10 * 1024 * 1024, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        self.assertEqual(control.decoder.max_frame, HANDSHAKE_MAX_FRAME)
        control.dataReceived(codec.encode(codec.Hello((1,), "a", "t")))
        self.assertEqual(control.decoder.max_frame, 10 * 1024 * 1024)
        welcome = codec.FrameDecoder().feed(transport.value())[0]
        self.assertEqual(welcome.max_frame, 10 * 1024 * 1024)

        early = ControlLinkProtocol(clock, 5.0, 10 * 1024 * 1024, "a", lambda: ROUTES, lambda p: RecordingHandler())
        early.makeConnection(StringTransport())
        early.dataReceived(struct.pack(">I", HANDSHAKE_MAX_FRAME + 1))
        self.assertIn("bad-frame", early.close_reason)

    def test_long_peer_text_is_cut_in_logs(self) -> None:
        """A peer's CLOSE detail is kept to a few hundred characters."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Close("x" * 100, "y" * 100000)))
        pair.pump.flush()
        self.assertLess(len(pair.control.close_reason), 300)


class HeartbeatTests(SynchronousTestCase):
    def test_idle_link_sends_heartbeats(self) -> None:
        """An idle established link writes HEARTBEAT frames and stays up."""
        pair = LinkPair()
        for _ in range(10):
            pair.clock.advance(5.0)
            pair.pump.flush()
        self.assertTrue(pair.control.established)
        self.assertTrue(pair.tenant.established)

    def test_silent_peer_is_dropped(self) -> None:
        """A peer silent for three heartbeat intervals is disconnected."""
        clock = Clock()
        control = ControlLinkProtocol(clock, 5.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        transport = StringTransport()
        control.makeConnection(transport)
        control.dataReceived(codec.encode(codec.Hello((1,), "a", "t")))
        clock.advance(5.0)
        clock.advance(5.0)
        self.assertFalse(transport.disconnecting)
        clock.advance(5.0)
        clock.advance(5.0)
        self.assertTrue(transport.disconnecting)
        self.assertIn("heartbeat-timeout", control.close_reason)
        frames = codec.FrameDecoder().feed(transport.value())
        self.assertIn(codec.Heartbeat(), frames)


class ClosingTests(SynchronousTestCase):
    """Closing says why, sends nothing after, and does not wait forever for a peer that stops reading."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.control = ControlLinkProtocol(self.clock, 1.0, 4096, "a", lambda: ROUTES, lambda p: RecordingHandler())
        self.transport = StringTransport()
        self.control.makeConnection(self.transport)
        self.control.dataReceived(codec.encode(codec.Hello((1,), "a", "t")))
        self.transport.clear()

    def test_close_then_abort(self) -> None:
        """After CLOSE, no heartbeat follows; a connection still open after the grace period is aborted."""
        self.control.close("shutdown", "bye")
        self.assertEqual(codec.FrameDecoder().feed(self.transport.value()), [codec.Close("shutdown", "bye")])
        self.assertTrue(self.transport.disconnecting)
        self.transport.clear()
        self.clock.advance(CLOSE_GRACE - 0.1)  # several heartbeat intervals
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnected)
        self.control.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peer_close_then_abort(self) -> None:
        """A CLOSE from the peer is honoured the same way."""
        self.control.dataReceived(codec.encode(codec.Close("shutdown", "peer leaves")))
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(CLOSE_GRACE + 0.1)
        self.assertTrue(self.transport.disconnected)

    def test_clean_close_cancels_the_abort(self) -> None:
        """A connection that closes in time leaves no timer behind."""
        self.control.close("shutdown", "bye")
        self.control.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
