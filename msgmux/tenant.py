# -*- test-case-name: tests.integration.test_rpc -*-
"""
The tenant half: runs inside the tenant network, next to the tenant broker.

It holds no policy and no control-network credentials.  It connects to the
control half's socket (reconnecting with backoff), learns its routes from
WELCOME, and then mirrors oslo on the tenant broker: it consumes what the
routes send up, and publishes what comes down exactly where oslo would have.
Assume it is compromised: the control half re-checks everything it sends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Delivery
from msgmux.config import TenantConfig
from msgmux.link.codec import CanaryAddress, Message, ReplyAddress, Welcome
from msgmux.link.protocol import LinkProtocol, SessionHandler, TenantLinkProtocol
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.relay import RETURN_RETRY_LIMIT, Publication, Refusal, Relay
from msgmux.routing import Destination, LinkRoutes, Source, canary_queue_name, publish_topology, sources
from msgmux.stats import LinkStats
from msgmux.streams import StreamPosition

__all__ = ["TenantLink", "TenantLinkFactory", "TenantRelay"]


class TenantLink:
    """
    The tenant half's lasting state: its broker, counters and the session
    currently up.
    """

    _log = Logger()

    def __init__(self, config: TenantConfig, broker: BrokerService, clock: IReactorTime) -> None:
        self.config = config
        self.broker = broker
        self.clock = clock
        self.topology = OsloTopology(config.broker.queues, config.broker.exchange)
        self.stats = LinkStats(config.link or "tenant", clock)
        self.stats.gauges["link_up"] = 0
        self.relay: TenantRelay | None = None
        self.routes: LinkRoutes | None = None
        self.streams: dict[str, StreamPosition] = {}

    def status(self) -> dict[str, Any]:
        """The link seen from the tenant half, for C{/status}."""
        relay = self.relay if self.relay is not None and self.relay.active else None
        return {
            "link": self.stats.link,
            "socket": self.config.socket,
            "up": relay is not None,
            "session": relay.link.session if relay is not None else None,
            "relayed": {d: self.stats.relayed(d) for d in ("down", "up")},
            "rejected": {"down": self.stats.get("rejected", direction="down"), "up": self.stats.get("rejected", direction="up")},
        }

    def relay_for(self, protocol: TenantLinkProtocol, welcome: Welcome) -> SessionHandler:
        """
        Build the session's relay from the routes in WELCOME.

        @raise ValueError: when the routes are malformed (the protocol then
            closes the link).
        """
        routes = LinkRoutes.from_wire(welcome.link, dict(welcome.routes))
        if self.stats.link != welcome.link:
            self.stats.link = welcome.link
        self.routes = routes
        self.relay = TenantRelay(self, protocol, routes)
        self.stats.count("sessions")
        return self.relay


class TenantLinkFactory(Factory):
    """Builds the tenant end of the link for each connection attempt."""

    def __init__(self, link: TenantLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> TenantLinkProtocol:
        link = self.link
        protocol = TenantLinkProtocol(
            clock=link.clock,
            expected_link=link.config.link,
            handler_for=lambda welcome: link.relay_for(protocol, welcome),
        )
        protocol.violation_observers.append(lambda code, detail: link.stats.count("protocol_violations", code=code))
        protocol.factory = self
        return protocol


class TenantRelay(Relay):
    """One session seen from the tenant half: a mirror of oslo's own moves."""

    direction_out = "up"
    direction_in = "down"

    def __init__(self, owner: TenantLink, link: LinkProtocol, routes: LinkRoutes) -> None:
        super().__init__(link, owner.broker, owner.clock, owner.config.link_window, owner.stats, owner.streams)
        self.owner = owner
        self.routes = routes

    def topology(self) -> OsloTopology:
        return self.owner.topology

    def sources(self) -> list[Source]:
        return sources(self.routes.link, self.routes.up, self.routes.notifications_up, self.owner.topology)

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        return publish_topology(self.routes.down, self.routes.notifications_down, self.owner.topology)

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        return Message(0, source.address_for(delivery.routing_key), delivery.properties, delivery.body)

    def inbound(self, message: Message) -> Publication:
        if isinstance(message.address, CanaryAddress):
            return Publication(Destination("", canary_queue_name(self.routes.link)), dict(message.properties), message.body)
        if isinstance(message.address, ReplyAddress):
            if not message.address.queue:
                raise Refusal("malformed", "reply without a reply queue")
            retry_until = self.clock.seconds() + RETURN_RETRY_LIMIT
            if message.deadline is not None:
                retry_until = min(retry_until, message.deadline)
            return Publication(
                self._destination(message.address), dict(message.properties), message.body, message.deadline, retry_until
            )
        return Publication(self._destination(message.address), dict(message.properties), message.body, message.deadline)
