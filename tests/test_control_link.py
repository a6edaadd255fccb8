"""
Tests for L{msgmux.control.link.ControlLink} and its socket's factory,
without brokers: who gets a session, how often, and what a connection that
never completes its handshake can do.
"""

from __future__ import annotations

import attrs
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from msgmux.control import ControlLink, ControlLinkFactory
from msgmux.control.factory import (
    HEAD_BYTES_PER_MESSAGE,
    MIN_HEAD_BYTE_RATE,
    head_budget,
)
from msgmux.control.link import SESSION_BURST
from msgmux.link import codec
from msgmux.link.handshake import ControlLinkProtocol
from msgmux.oslo.tokens import TokenSigner
from tests.doubles import clock, control_config, idle_broker, one_link

CONFIG = one_link('down = [ { topic = "l3_agent", servers = ["agent-1"] } ]')


def hello() -> bytes:
    return codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), "tenant-a", "test"))


class LinkTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock()
        self.config = control_config(CONFIG)
        self.link = ControlLink(self.config.links[0], self.config, idle_broker(), TokenSigner(b"k" * 32), self.clock)
        self.addCleanup(self.link.forget_calls)
        self.factory = ControlLinkFactory(self.link)

    def connect(self) -> tuple[ControlLinkProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def frames(self, transport: StringTransport) -> list[codec.Frame]:
        frames: list[codec.Frame] = codec.FrameDecoder().feed(transport.value())
        transport.clear()
        return frames


class AttachTests(LinkTestCase):
    def test_one_session_at_a_time(self) -> None:
        """A second tenant half is told the link is busy while the first holds it; the link is free again after."""
        first, _ = self.connect()
        first.dataReceived(hello())
        self.assertIsNotNone(self.link.relay)
        second, transport = self.connect()
        second.dataReceived(hello())
        self.assertEqual([f.code for f in self.frames(transport) if isinstance(f, codec.Close)], ["busy"])
        first.connectionLost()
        self.assertIsNone(self.link.relay)
        third, _ = self.connect()
        third.dataReceived(hello())
        self.assertIsNotNone(self.link.relay)
        third.connectionLost()

    def test_sessions_are_rate_limited(self) -> None:
        """After a burst, a link starts one session per second; each costs a channel on the control broker."""
        codes = []
        for _ in range(SESSION_BURST + 1):
            protocol, transport = self.connect()
            protocol.dataReceived(hello())
            closes = [f.code for f in self.frames(transport) if isinstance(f, codec.Close)]
            codes.append(closes[0] if closes else "welcome")
            protocol.connectionLost()
        self.assertEqual(codes, ["welcome"] * SESSION_BURST + ["busy"])
        self.clock.advance(1.0)
        protocol, _ = self.connect()
        protocol.dataReceived(hello())
        self.assertIsNotNone(self.link.relay)
        protocol.connectionLost()

    def test_peer_check(self) -> None:
        """A link supervised by msgmux takes only the process its supervisor started."""
        self.link.peer_check = lambda peer: None if peer == (100, 1, 1) else "not the supervised half"
        protocol, transport = self.connect()
        protocol.peer = (101, 1, 1)
        protocol.dataReceived(hello())
        closes = [f for f in self.frames(transport) if isinstance(f, codec.Close)]
        self.assertEqual([(f.code, f.detail) for f in closes], [("busy", "not the supervised half")])
        self.assertIsNone(self.link.relay)


class PendingConnectionTests(LinkTestCase):
    def test_removed_link_refuses_pending_handshakes(self) -> None:
        """A connection accepted before its link was removed cannot start a session, and is closed."""
        protocol, transport = self.connect()
        self.link.retire()
        self.factory.close_pending("removed", "gone")
        self.assertEqual(self.frames(transport), [codec.Close("removed", "gone")])
        late, _ = self.connect()
        late.dataReceived(hello())
        self.assertIsNone(late.session_id)
        self.assertIsNone(self.link.relay)

    def test_routes_are_read_at_hello(self) -> None:
        """A connection that waited through a reload is sent the routes in force when it says HELLO."""
        protocol, transport = self.connect()
        config = control_config(CONFIG.replace('servers = ["agent-1"]', 'servers = ["agent-2"]'))
        self.link.reconfigure(config.links[0], config)
        protocol.dataReceived(hello())
        welcome = self.frames(transport)[0]
        assert isinstance(welcome, codec.Welcome)
        self.assertEqual(welcome.routes, self.link.routes.to_wire())
        self.assertIn("agent-2", repr(welcome.routes))
        protocol.connectionLost()

    def test_handshakes_in_progress_are_limited(self) -> None:
        """At most four connections wait for their handshake; more are turned away and counted."""
        pending = [self.connect() for _ in range(4)]
        self.assertIsNone(self.factory.buildProtocol(None))
        self.assertEqual(self.link.stats.get("connections_refused"), 1)
        pending[0][0].connectionLost()
        self.assertIsNotNone(self.factory.buildProtocol(None))

    def test_connection_log_lines_are_rate_limited(self) -> None:
        """A local process that connects over and over gets a few log lines, then one that says how many were held back."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(100):
            protocol, _ = self.connect()
            protocol.connectionLost()
        self.clock.advance(10)
        protocol, _ = self.connect()
        protocol.connectionLost()
        connected = [e for e in events if "tenant half connected" in e.get("log_format", "")]
        held = [e for e in events if "held back" in e.get("log_format", "")]
        self.assertEqual(len(connected), 6)
        self.assertEqual([e["count"] for e in held], [95])


class HeadBudgetTests(LinkTestCase):
    def test_by_message_limits(self) -> None:
        """A link's head budget follows its message rate and burst, with a floor that lets a largest head through; its connections share it."""
        protocol, _ = self.connect()
        assert protocol.head_budget is not None
        limits = self.config.links[0].limits
        self.assertEqual(protocol.head_budget.rate, limits.max_rate * HEAD_BYTES_PER_MESSAGE)
        self.assertEqual(protocol.head_budget.burst, limits.burst * HEAD_BYTES_PER_MESSAGE)
        again, _ = self.connect()
        self.assertIs(again.head_budget, protocol.head_budget)  # one budget per link, not per connection
        slow = head_budget(attrs.evolve(limits, max_rate=1.0, burst=1), self.clock)
        self.assertEqual((slow.rate, slow.burst), (MIN_HEAD_BYTE_RATE, codec.MAX_HEAD))
