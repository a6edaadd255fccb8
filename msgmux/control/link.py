# -*- test-case-name: tests.test_control_link -*-
"""
One link as the control half keeps it, across its sessions.

A L{ControlLink} holds what outlives a session of its link: the link's
configuration, its counters, its calls in flight, its canaries, what it
remembers so that nothing happens twice, its rate limits, and the relay of
the session currently up (at most one).  It decides whether a tenant half
that completed its handshake gets a session (L{ControlLink.attach}), and
builds that session's relay from its parts.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

from msgmux.amqp.broker import BrokerService
from msgmux.calls import CallTracker
from msgmux.config import ControlConfig, LinkConfig
from msgmux.control.canaries import Canaries
from msgmux.control.memory import LinkMemory
from msgmux.control.policy import ControlPolicy
from msgmux.control.rewrite import CallRewriter
from msgmux.link.protocol import LinkProtocol
from msgmux.oslo.tokens import TokenSigner
from msgmux.oslo.topology import OsloTopology
from msgmux.pacing import PacedCredit, TokenBucket
from msgmux.relay import Relay
from msgmux.routing import LinkRoutes, canary_queue_name
from msgmux.stats import LinkStats
from msgmux.stream_offsets import StreamPosition

__all__ = ["ControlLink", "SESSION_BURST", "SESSION_RATE"]

#: Sessions a link may start in a burst, and per second after it: each new
#: session opens a channel and declares topology on the control broker.
SESSION_BURST = 5
SESSION_RATE = 1.0


class ControlLink:
    """
    Everything about one link that outlives its sessions.

    @ivar relay: the relay of the session that is up, or L{None}.
    @ivar retired: set when the link is being removed: a connection accepted
        before that cannot start a session any more.
    """

    def __init__(self, config: LinkConfig, control: ControlConfig, broker: BrokerService, signer: TokenSigner, clock: IReactorTime) -> None:
        self.config = config
        self.control = control
        self.broker = broker
        self.signer = signer
        self.clock = clock
        self.routes = LinkRoutes.from_link(config)
        self.topology = OsloTopology(control.broker.queues, control.broker.exchange)
        self.stats = LinkStats(config.name, clock)
        self.stats.gauges["link_up"] = 0
        self.calls = CallTracker(clock, self.stats)
        self.canaries = Canaries(config.name, signer, clock, control.canary_interval, self.stats)
        self.memory = LinkMemory()
        self.streams: dict[str, StreamPosition] = {}
        self.relay: Relay | None = None
        self.retired = False
        #: Says why a connecting process may not be this link's tenant half
        #: (its C{SO_PEERCRED}), or L{None}: set when msgmux supervises it.
        self.peer_check: Callable[[tuple[int, int, int] | None], str | None] = lambda peer: None
        self._sessions = TokenBucket(SESSION_RATE, SESSION_BURST, clock)
        self._buckets()

    def _buckets(self) -> None:
        limits = self.config.limits
        self._message_bucket = TokenBucket(limits.max_rate, limits.burst, self.clock)
        # At least one largest message must fit, or it could never be paid for.
        byte_burst = max(limits.max_byte_rate, limits.max_message_size)
        self._byte_bucket = TokenBucket(limits.max_byte_rate, byte_burst, self.clock)

    @property
    def name(self) -> str:
        return self.config.name

    def status(self) -> dict[str, Any]:
        """The link now, for C{/status} and C{msgmux status}."""
        relay = self.relay
        connection = relay.connection if relay is not None else None
        age = self.canaries.age()
        return {
            "link": self.name,
            "socket": self.config.socket,
            "up": relay is not None,
            "healthy": self.healthy(),
            "session": connection.session_id if connection is not None else None,
            "peer": getattr(connection, "peer", None),
            "last_canary_age": None if age is None else round(age, 3),
            "canary_round_trip": self.stats.gauges.get("canary_round_trip_seconds"),
            "inflight_calls": {"down": self.calls.inflight("down"), "up": self.calls.inflight("up")},
            "relayed": {d: self.stats.relayed(d) for d in ("down", "up")},
            "rejected": {d: self.stats.get("rejected", direction=d) for d in ("down", "up")},
        }

    def healthy(self) -> bool:
        """Whether messages move: a recent canary went round both brokers."""
        return self.canaries.healthy()

    def reconfigure(self, config: LinkConfig, control: ControlConfig) -> None:
        """
        Take new routes and limits (SIGHUP).  A session in progress is
        closed so that the tenant half reconnects and learns the new routes;
        counters and calls in flight are kept.
        """
        self.config = config
        self.control = control
        self.routes = LinkRoutes.from_link(config)
        self.canaries.interval = control.canary_interval
        self._buckets()
        if self.relay is not None:
            self.relay.connection.close("reconfigured", "the control half reloaded its configuration; reconnect")

    def retire(self) -> None:
        """The link is being removed: no new session may start."""
        self.retired = True

    async def drain(self, timeout: float) -> None:
        """Stop the session, if one is up, after in-flight messages settle (at most C{timeout} seconds)."""
        if self.relay is not None:
            await self.relay.drain(timeout)

    def forget_calls(self) -> None:
        """Stop tracking calls in flight (the link is gone or msgmux stops)."""
        self.calls.cancel_all()

    def attach(self, connection: LinkProtocol) -> Relay | str:
        """
        A tenant half completed HELLO.

        @return: the relay for its session, or why there is none: the link
            was removed, another tenant half holds it, or it started too
            many sessions lately (each costs a channel and declarations on
            the control broker).
        """
        if self.retired:
            return f"link {self.name!r} was removed from the configuration"
        refused = self.peer_check(getattr(connection, "peer", None))
        if refused is not None:
            self.stats.count("sessions_refused")
            return refused
        if self.relay is not None:
            return f"link {self.name!r} already has a tenant half connected"
        if not self._sessions.take(1):
            self.stats.count("sessions_refused")
            return f"link {self.name!r} started {SESSION_BURST} sessions lately; retry in a second"
        rewriter = CallRewriter(self.name, self.signer, self.calls, self.routes.reply_queue, self.clock)
        policy = ControlPolicy(self.config, self.topology, rewriter, self.memory, self.canaries, self.clock, self.stats)
        credit = PacedCredit(connection, self._message_bucket, self._byte_bucket, self.clock, self.stats)
        window = (self.control.link_window, self.config.limits.max_inflight_bytes)
        relay = Relay(connection, policy, self.broker, credit, window, self.clock, self.stats, self.streams, self._ended)
        self.relay = relay
        self.stats.count("sessions")
        self.canaries.start(self._send_canary)
        return relay

    def _send_canary(self, body: bytes) -> bool:
        relay = self.relay
        if relay is None:
            return False
        return relay.publish_now("", canary_queue_name(self.name), {"content_type": "application/json"}, body)

    def _ended(self, relay: Relay) -> None:
        if self.relay is relay:
            self.relay = None
            self.canaries.stop()
