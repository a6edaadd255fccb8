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
from twisted.logger import LogEvent, globalLogPublisher
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from msgmux.link import codec
from msgmux.link.codec import MessageFrame
from msgmux.link.handshake import ControlLinkProtocol, TenantLinkProtocol
from msgmux.link.protocol import (
    ACK_EAGER,
    ACK_TIMEOUT,
    CLOSE_GRACE,
    FRAMES_PER_TURN,
    HANDSHAKE_TIMEOUT,
    IDLE_FRAME_BURST,
    SETTLE_DELAY,
    LinkState,
    MessageTooLarge,
)
from msgmux.message import Message, RpcAddress
from msgmux.pacing import TokenBucket
from tests.doubles import RecordingHandler

ROUTES: dict[str, Any] = {"down": [], "up": [], "notifications_down": [], "notifications_up": []}


def message(body: bytes = b"{}") -> Message:
    return Message(RpcAddress(None, "topic"), {"content_type": "application/json"}, body)


def msg(seq: int, body: bytes = b"") -> bytes:
    """A MSG frame's bytes."""
    return codec.encode(MessageFrame(seq, Message(RpcAddress(None, "t"), {}, body)))


def frames(transport: StringTransport) -> list[codec.Frame]:
    """What the protocol wrote, decoded (and cleared)."""
    decoded = codec.FrameDecoder().feed(transport.value())
    transport.clear()
    return decoded


def control_end(clock: Clock, max_body: int = 4096, handler: Any = None) -> tuple[ControlLinkProtocol, StringTransport]:
    control = ControlLinkProtocol(clock, 5.0, max_body, "a", lambda: ROUTES, lambda p: handler or RecordingHandler())
    transport = StringTransport()
    control.makeConnection(transport)
    return control, transport


def established(clock: Clock, handler: Any = None) -> tuple[ControlLinkProtocol, StringTransport]:
    """A control end whose session is up; what it wrote so far is cleared."""
    control, transport = control_end(clock, handler=handler)
    control.dataReceived(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "a", "t")))
    transport.clear()
    return control, transport


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
                max_body=4096,
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
        self.assertEqual(pair.control.session_id, pair.tenant.session_id)
        assert pair.tenant.welcome is not None
        self.assertEqual(pair.tenant.welcome.routes, ROUTES)
        self.assertEqual(pair.tenant.heartbeat, 5.0)
        self.assertEqual(pair.tenant.peer_max_body, 4096)
        self.assertIs(pair.control_handler.connection, pair.control)
        self.assertIs(pair.tenant_handler.connection, pair.tenant)

    def test_wrong_link_name(self) -> None:
        """A tenant half expecting another link is told so and the link closes."""
        pair = LinkPair(expected="tenant-b")
        self.assertFalse(pair.control.established)
        self.assertEqual(pair.tenant.close_code, "peer-closed")
        self.assertIn("wrong-link", pair.tenant.close_reason or "")
        self.assertIsNone(pair.control_handler.connection)

    def test_busy_link(self) -> None:
        """A second tenant half for a link that has one is refused with 'busy'."""
        pair = LinkPair(attach=lambda protocol: "link tenant-a already has a tenant half connected")
        self.assertIn("busy", pair.tenant.close_reason or "")
        self.assertFalse(pair.tenant.established)

    def test_unknown_version(self) -> None:
        """A HELLO offering only unknown versions is answered with CLOSE version."""
        control, transport = control_end(Clock())
        control.dataReceived(codec.encode(codec.Hello((99,), None, "future")))
        frame = frames(transport)[-1]
        assert isinstance(frame, codec.Close)
        self.assertEqual(frame.code, "version")
        self.assertTrue(transport.disconnecting)

    def test_version_1_peer(self) -> None:
        """A tenant half of link protocol version 1 is told, in its own framing, to upgrade."""
        control, transport = control_end(Clock())
        payload = cbor2.dumps([0, {"versions": [1], "link": "a", "software": "old"}])
        control.dataReceived(struct.pack(">I", len(payload)) + payload)
        data = transport.value()
        (length,) = struct.unpack(">I", data[:4])
        self.assertEqual(cbor2.loads(data[4 : 4 + length])[:2], [7, "version"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(control.close_code, "version")

    def test_handshake_timeout(self) -> None:
        """A peer that never says HELLO is disconnected after the handshake timeout."""
        clock = Clock()
        control, transport = control_end(clock)
        clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(control.close_code, "handshake-timeout")

    def test_message_before_handshake(self) -> None:
        """A MSG before HELLO is a protocol violation."""
        control, transport = control_end(Clock())
        control.dataReceived(msg(1))
        self.assertEqual(control.close_code, "unexpected-frame")

    def test_second_hello(self) -> None:
        """HELLO on an established session is a protocol violation."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), None, "again")))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "unexpected-frame")


class FlowTests(SynchronousTestCase):
    def test_no_credit_no_send(self) -> None:
        """Sending without credit is refused locally."""
        pair = LinkPair()
        self.assertFalse(pair.tenant.can_send(message()))
        self.assertRaises(RuntimeError, pair.tenant.send_message, message(), "token")

    def test_credit_send_ack(self) -> None:
        """Granted credit allows sending; ACKs return the senders' tokens, in one frame."""
        pair = LinkPair()
        pair.control.grant(3, 1000)
        pair.pump.flush()
        self.assertEqual((pair.tenant.sending.messages, pair.tenant.sending.body_bytes), (3, 1000))
        for token in ("a", "b", "c"):
            pair.tenant.send_message(message(token.encode()), token)
        pair.pump.flush()
        self.assertEqual([seq for seq, _ in pair.control_handler.received], [1, 2, 3])
        self.assertEqual([m.body for _, m in pair.control_handler.received], [b"a", b"b", b"c"])
        self.assertEqual((pair.tenant.sending.messages, pair.tenant.sending.body_bytes), (0, 997))
        self.assertEqual(pair.tenant.unacknowledged, 3)
        for seq, _ in pair.control_handler.received:
            pair.control.acknowledge(seq)
        pair.clock.advance(SETTLE_DELAY)
        pair.pump.flush()
        self.assertEqual(pair.tenant_handler.acknowledged, ["a", "b", "c"])
        self.assertEqual(pair.tenant.unacknowledged, 0)

    def test_byte_credit(self) -> None:
        """A message needs as much byte credit as its body is long."""
        pair = LinkPair()
        pair.control.grant(5, 10)
        pair.pump.flush()
        self.assertTrue(pair.tenant.can_send(message(b"x" * 10)))
        self.assertFalse(pair.tenant.can_send(message(b"x" * 11)))

    def test_reject_returns_token_and_reason(self) -> None:
        """REJECT hands the sender its token and the reason."""
        pair = LinkPair()
        pair.control.grant(1, 100)
        pair.pump.flush()
        pair.tenant.send_message(message(), "tok")
        pair.pump.flush()
        pair.control.refuse(1, "method")
        pair.pump.flush()
        self.assertEqual(pair.tenant_handler.refused, [("tok", "method")])

    def test_message_without_credit_is_violation(self) -> None:
        """A MSG beyond the granted credit, in messages or in bytes, closes the link (flow-control)."""
        pair = LinkPair()
        pair.tenant.transport.write(msg(1))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "flow-control")
        self.assertEqual(pair.control_handler.received, [])
        pair = LinkPair()
        pair.control.grant(5, 3)
        pair.pump.flush()
        pair.tenant.transport.write(msg(1, b"four"))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "flow-control")

    def test_bad_sequence_is_violation(self) -> None:
        """A MSG out of sequence closes the link."""
        pair = LinkPair()
        pair.control.grant(5, 100)
        pair.pump.flush()
        pair.tenant.transport.write(msg(2))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-sequence")

    def test_ack_for_unknown_message(self) -> None:
        """An ACK for a message never sent closes the link."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Ack((7,))))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-ack")

    def test_too_large_message(self) -> None:
        """A message above the peer's body limit is refused before using credit."""
        pair = LinkPair()
        pair.control.grant(1, 1 << 20)
        pair.pump.flush()
        self.assertRaises(MessageTooLarge, pair.tenant.send_message, message(b"x" * 5000), "t")
        self.assertEqual(pair.tenant.sending.messages, 1)
        self.assertEqual(pair.tenant.unacknowledged, 0)

    def test_head_too_large(self) -> None:
        """A message whose properties do not fit a MSG head is refused before using credit."""
        pair = LinkPair()
        pair.control.grant(1, 100)
        pair.pump.flush()
        huge = Message(RpcAddress(None, "t"), {"headers": {"x": "y" * codec.MAX_HEAD}}, b"")
        self.assertRaises(MessageTooLarge, pair.tenant.send_message, huge, "t")
        self.assertEqual((pair.tenant.sending.messages, pair.tenant.unacknowledged), (1, 0))

    def _with_messages(self, count: int) -> tuple[Clock, ControlLinkProtocol, StringTransport]:
        clock = Clock()
        control, transport = established(clock)
        control.receiving.grant(100, 1000)
        for seq in range(1, count + 1):
            control.dataReceived(msg(seq))
        return clock, control, transport

    def test_acks_are_batched(self) -> None:
        """A few acknowledgements wait up to SETTLE_DELAY and then travel in one ACK frame."""
        clock, control, transport = self._with_messages(3)
        for seq in range(1, 4):
            control.acknowledge(seq)
        clock.advance(0)
        self.assertEqual(transport.value(), b"")
        clock.advance(SETTLE_DELAY)
        self.assertEqual(frames(transport), [codec.Ack((1, 2, 3))])

    def test_many_acks_go_at_the_end_of_the_turn(self) -> None:
        """ACK_EAGER or more pending acknowledgements do not wait: the sender's prefetch must not run dry."""
        clock, control, transport = self._with_messages(ACK_EAGER)
        for seq in range(1, ACK_EAGER + 1):
            control.acknowledge(seq)
        self.assertEqual(transport.value(), b"")
        clock.advance(0)
        self.assertEqual(frames(transport), [codec.Ack(tuple(range(1, ACK_EAGER + 1)))])

    def test_settlements_ride_with_a_message(self) -> None:
        """Pending ACK and CREDIT go out in the same write as the next MSG, and nothing is sent again later."""
        clock, control, transport = self._with_messages(2)
        control.sending.granted(1, 100)
        control.acknowledge(1)
        control.grant(1, 2)
        control.send_message(message(b"reply"), "token")
        sent = frames(transport)
        self.assertEqual([type(f).__name__ for f in sent], ["Ack", "Credit", "MessageFrame"])
        self.assertEqual((sent[0], sent[1]), (codec.Ack((1,)), codec.Credit(1, 2)))
        clock.advance(SETTLE_DELAY)
        self.assertEqual(transport.value(), b"")

    def test_credit_runs_low(self) -> None:
        """Credit is granted at the end of the turn once the peer holds less than what waits to be granted."""
        clock, control, transport = self._with_messages(0)
        control.receiving.messages = 0
        control.grant(4, 40)
        clock.advance(0)
        self.assertEqual(frames(transport), [codec.Credit(4, 40)])
        control.grant(1, 10)  # the peer still holds 4: this can wait
        clock.advance(0)
        self.assertEqual(transport.value(), b"")
        clock.advance(SETTLE_DELAY)
        self.assertEqual(frames(transport), [codec.Credit(1, 10)])

    def test_unacknowledged_too_long(self) -> None:
        """A peer that never acknowledges a message loses the session once ACK_TIMEOUT passed (its broker redelivers)."""
        pair = LinkPair()
        pair.control.grant(2, 100)
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
        self.assertEqual(pair.tenant.close_code, "ack-timeout")

    def test_acknowledged_messages_never_time_out(self) -> None:
        """Steady traffic that is acknowledged keeps the session up however long it runs."""
        pair = LinkPair()
        pair.control.grant(1, 100)
        pair.pump.flush()
        for index in range(200):
            pair.tenant.send_message(message(), index)
            pair.pump.flush()
            pair.control.acknowledge(index + 1)
            pair.control.grant(1, 2)
            pair.clock.advance(2.0)
            pair.pump.flush()
        self.assertTrue(pair.tenant.established)


class ViolationTests(SynchronousTestCase):
    def test_garbage_closes_with_bad_frame(self) -> None:
        """Bytes that are not a frame close the link with bad-frame, and observers hear of it."""
        pair = LinkPair()
        pair.tenant.transport.write(struct.pack(">IB", 3, codec.ACK) + b"\xff\xff")
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")
        self.assertIn("peer closed: bad-frame", pair.tenant.close_reason or "")
        self.assertIsNotNone(pair.control_handler.ended)
        self.assertIsNotNone(pair.tenant_handler.ended)

    def test_oversized_frame(self) -> None:
        """A length prefix above the limit closes the link without waiting for the payload."""
        pair = LinkPair()
        pair.tenant.transport.write(struct.pack(">IB", 4 + codec.MAX_HEAD + 4096 + 2, codec.MSG))
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")

    def test_unknown_frame_type(self) -> None:
        """An unknown frame type closes the link."""
        pair = LinkPair()
        pair.tenant.transport.write(struct.pack(">IB", 2, 42) + b"\x80")
        pair.pump.flush()
        self.assertEqual(pair.violations[0][0], "bad-frame")

    def test_peer_close(self) -> None:
        """A CLOSE frame ends the session with the peer's reason."""
        pair = LinkPair()
        pair.tenant.close("shutdown", "bye")
        pair.pump.flush()
        self.assertEqual(pair.control.close_reason, "peer closed: shutdown: bye")
        self.assertEqual(pair.control.close_code, "peer-closed")
        self.assertEqual(pair.control_handler.ended, "peer closed: shutdown: bye")
        self.assertEqual(pair.violations, [])

    def test_idle_frame_flood(self) -> None:
        """Frames that carry no work beyond their budget close the session with frame-flood."""
        clock = Clock()
        control, transport = established(clock)
        control.dataReceived(codec.encode(codec.Heartbeat()) * (IDLE_FRAME_BURST - 1))
        clock.advance(1)
        self.assertEqual(control.state, LinkState.OPEN)
        flood = codec.encode(codec.Heartbeat()) * 200 + codec.encode(codec.Credit(0, 0)) * 200 + codec.encode(codec.Ack(()))
        control.dataReceived(flood)
        for _ in range(20):
            clock.advance(0)
        self.assertEqual(control.close_code, "frame-flood")

    def test_one_turn_handles_a_bounded_number_of_frames(self) -> None:
        """Frames beyond FRAMES_PER_TURN wait for the next turn of the reactor, with reading paused meanwhile."""
        clock = Clock()
        handler = RecordingHandler()
        control, transport = established(clock, handler)
        control.receiving.grant(1000, 1000)
        control.dataReceived(b"".join(msg(seq) for seq in range(1, 2 * FRAMES_PER_TURN + 2)))
        self.assertEqual(len(handler.received), FRAMES_PER_TURN)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(clock.getDelayedCalls()), 2)  # the heartbeat, and the rest of the backlog
        clock.advance(0)  # a fake clock runs the following turns at once
        self.assertEqual(len(handler.received), 2 * FRAMES_PER_TURN + 1)
        self.assertEqual(transport.producerState, "producing")

    def test_one_turn_decodes_a_bounded_number_of_head_bytes(self) -> None:
        """
        Heads are decoded as the turn's budget allows: two heads of 6 KiB
        take two turns, while small ones share one.
        """
        clock = Clock()
        handler = RecordingHandler()
        control, transport = established(clock, handler)
        control.receiving.grant(1000, 1000)
        big = {"headers": {"h": "x" * 6000}}
        data = b"".join(codec.encode(MessageFrame(seq, Message(RpcAddress(None, "t"), big, b""))) for seq in (1, 2))
        control.dataReceived(data + msg(3) + msg(4))
        self.assertEqual([seq for seq, _ in handler.received], [1])
        self.assertEqual(transport.producerState, "paused")
        calls = clock.getDelayedCalls()
        backlog = [c for c in calls if c.getTime() == clock.seconds()]
        self.assertEqual(len(backlog), 1)
        backlog[0].func(*backlog[0].args, **backlog[0].kw)  # the next turn, alone
        self.assertEqual([seq for seq, _ in handler.received], [1, 2, 3, 4])

    def test_head_budget(self) -> None:
        """
        With a head budget (the control half's, by the link's rate), a head
        beyond it waits, with reading paused, until the budget has refilled
        enough for it; heads within it do not wait.
        """
        clock = Clock()
        handler = RecordingHandler()
        control, transport = established(clock, handler)
        control.receiving.grant(1000, 1000)
        control.head_budget = TokenBucket(1000, 7000, clock)  # bytes per second, burst
        big = {"headers": {"h": "x" * 6000}}
        data = b"".join(codec.encode(MessageFrame(seq, Message(RpcAddress(None, "t"), big, b""))) for seq in (1, 2))
        control.dataReceived(data)
        self.assertEqual([seq for seq, _ in handler.received], [1])
        self.assertEqual(transport.producerState, "paused")
        clock.advance(4.0)
        self.assertEqual([seq for seq, _ in handler.received], [1])
        clock.advance(1.5)  # 6000 head bytes and a few more refilled
        self.assertEqual([seq for seq, _ in handler.received], [1, 2])
        self.assertEqual(transport.producerState, "producing")
        control.dataReceived(msg(3))
        self.assertEqual([seq for seq, _ in handler.received], [1, 2, 3])

    def test_head_budget_not_spent_before_the_handshake(self) -> None:
        """A MSG before HELLO closes the connection without being decoded or charged to the link's head budget."""
        clock = Clock()
        control, _ = control_end(clock)
        control.head_budget = budget = TokenBucket(1000, 8192, clock)
        big = {"headers": {"h": "x" * 6000}}
        control.dataReceived(codec.encode(MessageFrame(1, Message(RpcAddress(None, "t"), big, b""))))
        self.assertEqual(control.close_code, "unexpected-frame")
        self.assertEqual(budget.tokens, 8192)

    def test_slow_reader(self) -> None:
        """A peer that leaves more than MAX_UNREAD_OUTPUT of our output unread is disconnected with slow-reader."""
        clock = Clock()
        control, transport = established(clock)
        self.assertGreater(control.max_unread_output, 64 * 1024 * 1024)  # room for a full byte window
        control.max_unread_output = 10_000  # the same rule, smaller numbers
        control.pauseProducing()  # the transport says its buffer is full: the peer is not reading
        reject = len(codec.encode(codec.Reject(1, "route")))
        for seq in range(1, 10_000 // reject + 2):
            control.refuse(seq, "route")
            if control.state is not LinkState.OPEN:
                break
        self.assertEqual(control.close_code, "slow-reader")
        self.assertTrue(transport.disconnected)

    def test_peer_that_stops_reading(self) -> None:
        """
        While the peer reads nothing, the credit we owe it waits (so it
        cannot make us answer more messages); after three heartbeat
        intervals the session is closed as slow-reader.
        """
        clock = Clock()
        control, transport = established(clock)
        control.pauseProducing()
        control.grant(5, 500)
        clock.advance(1)
        self.assertNotIn(codec.Credit(5, 500), frames(transport))
        clock.advance(3 * 5.0 - 1.1)
        self.assertEqual(control.state, LinkState.OPEN)
        clock.advance(0.2)
        self.assertEqual(control.close_code, "slow-reader")
        self.assertTrue(transport.disconnected)

    def test_owed_credit_goes_once_the_peer_reads(self) -> None:
        """Credit held back while the peer did not read is sent when it catches up."""
        clock = Clock()
        control, transport = established(clock)
        control.pauseProducing()
        control.grant(5, 500)
        clock.advance(1)
        control.resumeProducing()
        clock.advance(0)
        self.assertEqual(frames(transport), [codec.Credit(5, 500)])

    def test_reading_peer_is_not_a_slow_reader(self) -> None:
        """Output the peer catches up on does not count."""
        clock = Clock()
        control, transport = established(clock)
        for _ in range(3):
            control.pauseProducing()
            for seq in range(1, 1000):
                control.refuse(seq, "route")
            control.resumeProducing()
        self.assertEqual(control.state, LinkState.OPEN)


class SessionEndTests(SynchronousTestCase):
    def test_logged_once_with_the_reason(self) -> None:
        """When a session ends, each half logs it once, with its reason code, and observers hear the code."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pair = LinkPair()
        codes: list[str] = []
        pair.control.ended_observers.append(codes.append)
        pair.clock.advance(5.0)
        pair.tenant.transport.abortConnection()  # the tenant side goes silent and away
        pair.pump.flush()
        ended = [e for e in events if e.get("log_format", "").startswith("Link {link}: session {session} ended")]
        self.assertEqual(sorted(e["code"] for e in ended), ["connection-lost", "connection-lost"])
        self.assertEqual(codes, ["connection-lost"])

    def test_no_session_no_end(self) -> None:
        """A connection that never completed its handshake has no session to end."""
        control, transport = control_end(Clock())
        codes: list[str] = []
        control.ended_observers.append(codes.append)
        control.connectionLost()
        self.assertEqual(codes, [])


class HandshakeLimitTests(SynchronousTestCase):
    def test_no_message_body_until_hello(self) -> None:
        """Before HELLO no MSG body is accepted; after it, up to the link's limit, announced in WELCOME."""
        control, transport = control_end(Clock(), max_body=10 * 1024 * 1024)
        self.assertEqual(control.decoder.max_body, 0)
        control.dataReceived(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "a", "t")))
        self.assertEqual(control.decoder.max_body, 10 * 1024 * 1024)
        welcome = frames(transport)[0]
        assert isinstance(welcome, codec.Welcome)
        self.assertEqual(welcome.max_body, 10 * 1024 * 1024)
        early, _ = control_end(Clock(), max_body=10 * 1024 * 1024)
        early.dataReceived(struct.pack(">IBI", 5 + 100 + 1, codec.MSG, 100))
        self.assertEqual(early.close_code, "bad-frame")

    def test_long_peer_text_is_cut_in_logs(self) -> None:
        """A peer's CLOSE detail is kept to a few hundred characters."""
        pair = LinkPair()
        pair.tenant.transport.write(codec.encode(codec.Close("x" * 100, "y" * 1000)))
        pair.pump.flush()
        self.assertLess(len(pair.control.close_reason or ""), 300)


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
        control, transport = established(clock)
        clock.advance(5.0)
        clock.advance(5.0)
        self.assertFalse(transport.disconnecting)
        clock.advance(5.0)
        clock.advance(5.0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(control.close_code, "heartbeat-timeout")
        self.assertIn(codec.Heartbeat(), frames(transport))


class ClosingTests(SynchronousTestCase):
    """Closing says why, sends nothing after, and does not wait forever for a peer that stops reading."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.control, self.transport = established(self.clock)

    def test_close_then_abort(self) -> None:
        """After CLOSE, no heartbeat follows; a connection still open after the grace period is aborted."""
        self.control.close("shutdown", "bye")
        self.assertEqual(frames(self.transport), [codec.Close("shutdown", "bye")])
        self.assertTrue(self.transport.disconnecting)
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

    def test_clean_close_cancels_every_timer(self) -> None:
        """A connection that closes in time leaves no timer behind."""
        self.control.grant(1, 1)
        self.control.close("shutdown", "bye")
        self.control.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
