# -*- test-case-name: tests.test_control_policy -*-
"""
The control half's L{RelayPolicy}: what one link session consumes and
publishes on the control broker, and what happens to each message on the
way (L{msgmux.control.upstream}, L{msgmux.control.downstream}).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from msgmux.amqp.channel import Delivery
from msgmux.config import LinkConfig
from msgmux.control.canaries import Canaries
from msgmux.control.downstream import DownstreamRewrite
from msgmux.control.memory import LinkMemory
from msgmux.control.rewrite import CallRewriter
from msgmux.control.upstream import UpstreamChecks
from msgmux.message import Message
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.policy import Publication
from msgmux.routing import Destinations, Source, publish_topology, sources
from msgmux.stats import LinkStats

__all__ = ["ControlPolicy"]


class ControlPolicy:
    """The control half's decisions for one session of one link."""

    direction_out = "down"
    direction_in = "up"

    def __init__(
        self,
        config: LinkConfig,
        topology: OsloTopology,
        rewriter: CallRewriter,
        memory: LinkMemory,
        canaries: Canaries,
        clock: IReactorTime,
        stats: LinkStats,
    ) -> None:
        self.config = config
        self.topology = topology
        self.up = UpstreamChecks(config, rewriter, memory, canaries, Destinations(topology).of, clock, stats)
        self.down = DownstreamRewrite(config, rewriter, clock, stats)

    def sources(self) -> list[Source]:
        return sources(self.config.name, self.config.down, self.config.notifications_down, self.topology)

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        return publish_topology(self.config.up, self.config.notifications_up, self.topology)

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        return self.down.outbound(source, delivery)

    def inbound(self, message: Message) -> Publication | None:
        return self.up.inbound(message)

    def published(self, publication: Publication) -> None:
        self.up.published(publication)

    def publish_failed(self, publication: Publication) -> None:
        self.up.publish_failed(publication)
