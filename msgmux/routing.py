# -*- test-case-name: tests.test_routing -*-
"""
Routes: what one link carries, where each half consumes it and where it
publishes it.

The control half owns the policy (L{msgmux.config.LinkConfig}); it sends the
tenant half a L{LinkRoutes} in WELCOME.  Both halves then derive their broker
topology from the same routes with the roles swapped: the control half
consumes the I{down} routes and publishes the I{up} ones, the tenant half the
reverse.  Pure code.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from msgmux.config import LinkConfig, NotificationRule, RpcRule
from msgmux.message import Address, CanaryAddress, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec

__all__ = [
    "Destination",
    "Destinations",
    "LinkRoutes",
    "Source",
    "destination",
    "own_queue_names",
    "publish_topology",
    "reply_queue",
    "sources",
]

# Fixed so that a restarted half finds the fanout queue it used before.
_FANOUT_NAMESPACE = uuid.UUID("0b5c1f4e-7a3d-4b8e-9a51-6d2f0c8e4a17")


def canary_queue_name(link: str) -> str:
    """@return: the queue each half passes link C{link}'s canaries through."""
    return f"msgmux_canary_{link}"


def canary_queue(link: str) -> QueueSpec:
    """
    The canary queue: msgmux's own, not oslo's, so a plain transient queue
    that forgets stale canaries (one minute) and itself when unused.
    """
    return QueueSpec(
        name=canary_queue_name(link),
        durable=False,
        auto_delete=False,
        arguments=(("x-expires", 600000), ("x-message-ttl", 60000)),
        owned=True,
    )


def reply_queue_name(link: str) -> str:
    """
    @return: the queue msgmux consumes replies from, on both brokers, for
        calls relayed over C{link}.
    """
    return f"reply_msgmux_{link}"


def reply_queue(link: str, topology: OsloTopology) -> QueueSpec:
    """
    The reply queue of C{link} on one broker: declared as oslo declares a
    caller's reply queue, and msgmux's own.
    """
    return attrs.evolve(topology.reply_queue(reply_queue_name(link)), owned=True)


@attrs.frozen
class LinkRoutes:
    """
    The routes of one link, as both halves need them.

    @ivar reply_queue: where each half receives replies to the calls it
        relays (see L{reply_queue_name}).
    """

    link: str
    down: tuple[RpcRule, ...] = ()
    up: tuple[RpcRule, ...] = ()
    notifications_down: tuple[NotificationRule, ...] = ()
    notifications_up: tuple[NotificationRule, ...] = ()

    @property
    def reply_queue(self) -> str:
        return reply_queue_name(self.link)

    @classmethod
    def from_link(cls, link: LinkConfig) -> LinkRoutes:
        """@return: the routes configured for C{link}."""
        return cls(link.name, link.down, link.up, link.notifications_down, link.notifications_up)

    def to_wire(self) -> dict[str, Any]:
        """
        @return: the WELCOME C{routes} map.  Allowed methods stay with the
            control half: the tenant half has no use for them.
        """

        def rpc(rule: RpcRule) -> dict[str, Any]:
            return {"topic": rule.topic, "servers": list(rule.servers), "fanout": rule.fanout, "exchange": rule.exchange}

        def notification(rule: NotificationRule) -> dict[str, Any]:
            return {"topic": rule.topic, "priorities": list(rule.priorities), "exchange": rule.exchange}

        return {
            "down": [rpc(r) for r in self.down],
            "up": [rpc(r) for r in self.up],
            "notifications_down": [notification(r) for r in self.notifications_down],
            "notifications_up": [notification(r) for r in self.notifications_up],
        }

    @classmethod
    def from_wire(cls, link: str, data: dict[str, Any]) -> LinkRoutes:
        """
        @param link: the link name from WELCOME.
        @param data: the WELCOME C{routes} map.
        @return: the routes.
        @raise ValueError: when the map is malformed.
        """
        try:
            return cls(
                link=link,
                down=tuple(_rpc_rule(item) for item in data["down"]),
                up=tuple(_rpc_rule(item) for item in data["up"]),
                notifications_down=tuple(_notification_rule(item) for item in data["notifications_down"]),
                notifications_up=tuple(_notification_rule(item) for item in data["notifications_up"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed routes: {e!r}") from None


def _text(value: object, optional: bool = False) -> Any:
    if (value is None and optional) or (isinstance(value, str) and value):
        return value
    raise TypeError(f"expected text, got {value!r}")


def _texts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return tuple(_text(item) for item in value)


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _rpc_rule(item: dict[str, Any]) -> RpcRule:
    return RpcRule(
        topic=_text(item["topic"]),
        servers=_texts(item["servers"]),
        fanout=_flag(item["fanout"]),
        exchange=_text(item["exchange"], optional=True),
    )


def _notification_rule(item: dict[str, Any]) -> NotificationRule:
    return NotificationRule(
        topic=_text(item["topic"]),
        priorities=_texts(item["priorities"]),
        exchange=_text(item["exchange"], optional=True),
    )


@attrs.frozen
class Source:
    """
    A queue one half consumes, and what its messages are.

    @ivar exchanges: to declare before the queue is bound.
    @ivar address: the address of every message from this queue, or L{None}
        for notification pools, whose address depends on the routing key.
    @ivar notification_rule: for notification pools, the rule.
    @ivar rpc_rule: for RPC queues, the rule (its allowed methods).
    """

    queue: QueueSpec
    exchanges: tuple[ExchangeSpec, ...]
    address: Address | None
    notification_rule: NotificationRule | None = None
    rpc_rule: RpcRule | None = None

    def address_for(self, routing_key: str) -> Address:
        """
        @param routing_key: the routing key a delivery from this queue carries.
        @return: its address on the link.
        """
        if self.address is not None:
            return self.address
        rule = self.notification_rule
        assert rule is not None
        priority = routing_key[len(rule.topic) + 1 :] if routing_key.startswith(rule.topic + ".") else routing_key
        return NotificationAddress(rule.exchange, rule.topic, priority)


def sources(
    link: str,
    rpc_rules: tuple[RpcRule, ...],
    notification_rules: tuple[NotificationRule, ...],
    topology: OsloTopology,
) -> list[Source]:
    """
    Everything one half consumes on its broker: the RPC queues an oslo
    server of each routed topic would consume, a listener pool per routed
    notification topic, and the half's own reply queue.  The fanout queues
    (unless oslo's fanout stream replaces them), pools, reply and canary
    queues are msgmux's own (L{QueueSpec.owned}); the others are shared
    with the oslo servers of their topics.  With the fanout stream, the
    fanout queue msgmux had before is listed as L{QueueSpec.retired}.

    @param link: the link name (queue names derive from it).
    @param rpc_rules: the RPC routes this half consumes.
    @param notification_rules: the notification routes this half consumes.
    @param topology: oslo's declarations on this half's broker.
    """
    found = []
    for rule in rpc_rules:
        exchange = topology.topic_exchange(rule.exchange)
        found.append(
            Source(
                topology.topic_queue(rule.topic, exchange.name),
                (exchange,),
                RpcAddress(rule.exchange, rule.topic),
                rpc_rule=rule,
            )
        )
        for server in rule.servers:
            found.append(
                Source(
                    topology.topic_queue(f"{rule.topic}.{server}", exchange.name),
                    (exchange,),
                    RpcAddress(rule.exchange, rule.topic, server),
                    rpc_rule=rule,
                )
            )
        if rule.fanout:
            unique = uuid.uuid5(_FANOUT_NAMESPACE, f"{link}/{rule.exchange}/{rule.topic}").hex
            fanout = topology.fanout_queue(rule.topic, unique)
            address = RpcAddress(rule.exchange, rule.topic, None, True)
            # The stream is every server's; a fanout queue of its own is msgmux's.
            stream = topology.options.rabbit_stream_fanout
            fanout = attrs.evolve(fanout, owned=not stream)
            found.append(Source(fanout, (topology.fanout_exchange(rule.topic),), address, rpc_rule=rule))
            if stream:
                # The queue of its own it had before the stream: relayed and deleted if still there.
                retired = QueueSpec(
                    f"{rule.topic}_fanout_{unique}", False, False, bindings=fanout.bindings, owned=True, retired=True
                )
                found.append(Source(retired, (), address, rpc_rule=rule))
    for rule in notification_rules:
        exchange = topology.topic_exchange(rule.exchange)
        pool = f"msgmux_{link}_{exchange.name}_{rule.topic}"
        keys = tuple(f"{rule.topic}.{priority}" for priority in rule.priorities)
        found.append(Source(attrs.evolve(topology.pool_queue(pool, exchange.name, keys), owned=True), (exchange,), None, rule))
    found.append(Source(reply_queue(link, topology), (), ReplyAddress()))
    found.append(Source(canary_queue(link), (), CanaryAddress()))
    return found


def own_queue_names(
    link: str,
    rpc_rules: tuple[RpcRule, ...],
    notification_rules: tuple[NotificationRule, ...],
    topology: OsloTopology,
) -> list[str]:
    """
    @return: the names of the queues of msgmux's own that one half consumes
        (L{sources}), for operators: these hold what msgmux moves itself
        when the queue options change, and must not be deleted by hand.
    """
    found = sources(link, rpc_rules, notification_rules, topology)
    return [source.queue.name for source in found if source.queue.owned and not source.queue.retired]


def publish_topology(
    rpc_rules: tuple[RpcRule, ...],
    notification_rules: tuple[NotificationRule, ...],
    topology: OsloTopology,
) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
    """
    What one half declares before publishing its routes: the exchanges (a
    publish to a missing exchange would close the channel) and, as oslo's
    notifier does, the default C{topic.priority} notification queues.
    """
    exchanges: dict[str, ExchangeSpec] = {}
    queues: dict[str, QueueSpec] = {}
    for rule in rpc_rules:
        exchange = topology.topic_exchange(rule.exchange)
        exchanges[exchange.name] = exchange
        if rule.fanout:
            fanout = topology.fanout_exchange(rule.topic)
            exchanges[fanout.name] = fanout
    for notification_rule in notification_rules:
        exchange = topology.topic_exchange(notification_rule.exchange)
        exchanges[exchange.name] = exchange
        for priority in notification_rule.priorities:
            queue = topology.notification_queue(f"{notification_rule.topic}.{priority}", exchange.name)
            queues[queue.name] = queue
    return list(exchanges.values()), list(queues.values())


@attrs.frozen
class Destination:
    """
    Where a message goes on the destination broker.

    @ivar redeclare: an auto-delete exchange to re-declare (pipelined, no
        round trip) before publishing, because it vanishes with its last
        binding and publishing to a missing exchange closes the channel.
    @ivar mandatory: ask the broker to return the message if no queue
        takes it (oslo does this for replies).
    """

    exchange: str
    routing_key: str
    mandatory: bool = False
    redeclare: ExchangeSpec | None = None


def destination(address: Address, topology: OsloTopology) -> Destination:
    """
    @param address: a message's link address.
    @param topology: oslo's declarations on the destination broker.
    @return: where oslo itself would have published it.
    """
    if isinstance(address, RpcAddress):
        if address.fanout:
            fanout = topology.fanout_exchange(address.topic)
            return Destination(fanout.name, "", redeclare=fanout)
        exchange = topology.topic_exchange(address.exchange)
        key = address.topic if address.server is None else f"{address.topic}.{address.server}"
        return Destination(exchange.name, key, redeclare=exchange if exchange.auto_delete else None)
    if isinstance(address, NotificationAddress):
        exchange = topology.topic_exchange(address.exchange)
        return Destination(
            exchange.name, f"{address.topic}.{address.priority}", redeclare=exchange if exchange.auto_delete else None
        )
    assert isinstance(address, ReplyAddress) and address.queue is not None
    return Destination("", address.queue, mandatory=True)


class Destinations:
    """
    L{destination} for one broker's topology, computed once per address:
    relayed traffic uses a handful of addresses over and over.
    """

    def __init__(self, topology: OsloTopology) -> None:
        self.topology = topology
        self._known: dict[Address, Destination] = {}

    def of(self, address: Address) -> Destination:
        """@return: where C{address} goes on this broker."""
        target = self._known.get(address)
        if target is None:
            if len(self._known) >= _DESTINATION_CACHE_LIMIT:
                self._known.clear()  # a peer cycling through addresses cannot grow it for ever
            target = self._known[address] = destination(address, self.topology)
        return target


_DESTINATION_CACHE_LIMIT = 4096
