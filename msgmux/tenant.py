# -*- test-case-name: tests.test_relay -*-
"""
The tenant half: runs inside the tenant network, next to the tenant broker.

It holds no policy and no control-network credentials.  It connects to the
control half's socket (reconnecting with backoff), learns its routes from
WELCOME, and then mirrors oslo on the tenant broker (L{TenantPolicy}): it
consumes what the routes send up, and publishes what comes down exactly
where oslo would have.  Assume it is compromised: the control half
re-checks everything it sends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Delivery
from msgmux.config import TenantConfig
from msgmux.link.codec import Welcome
from msgmux.link.handshake import TenantLinkProtocol
from msgmux.link.protocol import LinkProtocol, SessionHandler
from msgmux.message import CanaryAddress, Message, ReplyAddress
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.pacing import ImmediateCredit
from msgmux.policy import Publication, Refusal
from msgmux.relay import Relay
from msgmux.routing import Destination, Destinations, LinkRoutes, Source, canary_queue_name, publish_topology, sources
from msgmux.stats import LinkStats
from msgmux.stream_offsets import StreamPosition

__all__ = ["TenantLink", "TenantLinkFactory", "TenantPolicy"]

#: Seconds a reply the tenant broker returns (its caller's queue is
#: missing) is tried again, at most, as oslo's own server does.
RETURN_RETRY_LIMIT = 60.0

#: Body bytes the tenant half lets the control half have in flight to it.
TENANT_WINDOW_BYTES = 64 * 1024 * 1024


class TenantPolicy:
    """One session seen from the tenant half: a mirror of oslo's own moves."""

    direction_out = "up"
    direction_in = "down"

    def __init__(self, routes: LinkRoutes, topology: OsloTopology, clock: IReactorTime) -> None:
        self.routes = routes
        self.topology = topology
        self.clock = clock
        self._destinations = Destinations(topology)

    def sources(self) -> list[Source]:
        return sources(self.routes.link, self.routes.up, self.routes.notifications_up, self.topology)

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        return publish_topology(self.routes.down, self.routes.notifications_down, self.topology)

    def outbound(self, source: Source, delivery: Delivery) -> Message:
        return Message(source.address_for(delivery.routing_key), delivery.properties, delivery.body)

    def inbound(self, message: Message) -> Publication:
        address = message.address
        if isinstance(address, CanaryAddress):
            return Publication(Destination("", canary_queue_name(self.routes.link)), dict(message.properties), message.body)
        if isinstance(address, ReplyAddress):
            if not address.queue:
                raise Refusal("malformed", "reply without a reply queue")
            retry_until = self.clock.seconds() + RETURN_RETRY_LIMIT
            if message.deadline is not None:
                retry_until = min(retry_until, message.deadline)
            return Publication(self._destinations.of(address), dict(message.properties), message.body, message.deadline, retry_until)
        return Publication(self._destinations.of(address), dict(message.properties), message.body, message.deadline)

    def published(self, publication: Publication) -> None:
        """Nothing to remember: the control half keeps the books."""

    def publish_failed(self, publication: Publication) -> None:
        """Nothing to undo."""


class TenantLink:
    """
    The tenant half's lasting state: its broker, counters and the relay of
    the session that is up.

    @ivar relay: the relay of the session that is up, or L{None}.
    @ivar routes: the routes of the latest session.
    """

    def __init__(self, config: TenantConfig, broker: BrokerService, clock: IReactorTime) -> None:
        self.config = config
        self.broker = broker
        self.clock = clock
        self.topology = OsloTopology(config.broker.queues, config.broker.exchange)
        self.stats = LinkStats(config.link or "tenant", clock)
        self.stats.gauges["link_up"] = 0
        self.relay: Relay | None = None
        self.routes: LinkRoutes | None = None
        self.streams: dict[str, StreamPosition] = {}

    def status(self) -> dict[str, Any]:
        """The link seen from the tenant half, for C{/status}."""
        relay = self.relay
        return {
            "link": self.stats.link_name,
            "socket": self.config.socket,
            "up": relay is not None,
            "session": relay.connection.session_id if relay is not None else None,
            "relayed": {d: self.stats.relayed(d) for d in ("down", "up")},
            "rejected": {d: self.stats.get("rejected", direction=d) for d in ("down", "up")},
        }

    async def drain(self, timeout: float) -> None:
        """Stop the session, if one is up, after in-flight messages settle (at most C{timeout} seconds)."""
        if self.relay is not None:
            await self.relay.drain(timeout)

    def relay_for(self, connection: LinkProtocol, welcome: Welcome) -> SessionHandler:
        """
        Build the session's relay from the routes in WELCOME.

        @raise ValueError: when the routes are malformed (the protocol then
            closes the link).
        """
        routes = LinkRoutes.from_wire(welcome.link, dict(welcome.routes))
        self.stats.link_name = welcome.link
        self.routes = routes
        relay = Relay(
            connection,
            TenantPolicy(routes, self.topology, self.clock),
            self.broker,
            ImmediateCredit(connection),
            (self.config.link_window, TENANT_WINDOW_BYTES),
            self.clock,
            self.stats,
            self.streams,
            self._ended,
        )
        self.relay = relay
        self.stats.count("sessions")
        return relay

    def _ended(self, relay: Relay) -> None:
        if self.relay is relay:
            self.relay = None


class TenantLinkFactory(Factory):
    """Builds the tenant end of the link for each connection attempt."""

    def __init__(self, link: TenantLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> TenantLinkProtocol:
        link = self.link
        protocol = TenantLinkProtocol(clock=link.clock, expected_link=link.config.link, handler_for=lambda welcome: link.relay_for(protocol, welcome))
        protocol.violation_observers.append(lambda code, detail: link.stats.count("protocol_violations", code=code))
        protocol.ended_observers.append(lambda code: link.stats.count("sessions_ended", reason=code))
        protocol.factory = self
        return protocol
