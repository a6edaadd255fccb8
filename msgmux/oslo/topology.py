# -*- test-case-name: tests.test_topology -*-
"""
The exchanges and queues oslo.messaging's rabbit driver declares, by option.

msgmux declares the same things oslo would, with the same flags and
arguments, because RabbitMQ refuses a second declaration that differs
(PRECONDITION_FAILED closes the channel).  Each function mirrors one place in
C{oslo_messaging/_drivers/impl_rabbit.py} (18.x), named in its docstring; the
layout was also checked against a live broker (C{docs/oslo-wire.md}).  Pure
code.
"""

from __future__ import annotations

from typing import Any

import attrs

from msgmux.config import QueueOptions

__all__ = ["ExchangeSpec", "OsloTopology", "QueueSpec"]


@attrs.frozen
class ExchangeSpec:
    """An exchange declaration."""

    name: str
    kind: str
    durable: bool
    auto_delete: bool


@attrs.frozen
class QueueSpec:
    """
    A queue declaration with its bindings.

    @ivar arguments: the C{x-} arguments, as sorted pairs (hashable).
    @ivar bindings: (exchange, routing key) pairs; the default exchange
        needs none.
    @ivar consume_arguments: C{basic.consume} arguments, as sorted pairs.
    @ivar owned: whether the queue is msgmux's own (its name is one no oslo
        service uses): msgmux may then replace it when its arguments change
        (L{msgmux.amqp.migrate}).  Queues oslo services share with msgmux
        are not: only the operator can change those, together with the
        services.
    @ivar retired: a queue of msgmux's own that its current options no
        longer use (the fanout queue, after a change to the fanout stream):
        not declared; what it still holds is relayed, then it is deleted.
    """

    name: str
    durable: bool
    auto_delete: bool
    arguments: tuple[tuple[str, Any], ...] = ()
    bindings: tuple[tuple[str, str], ...] = ()
    consume_arguments: tuple[tuple[str, Any], ...] = ()
    owned: bool = False
    retired: bool = False


def _pairs(mapping: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


class OsloTopology:
    """
    oslo's declarations on one broker, given that broker's oslo options.

    @ivar exchange: oslo's C{control_exchange} on this broker.
    """

    def __init__(self, options: QueueOptions, exchange: str) -> None:
        self.options = options
        self.exchange = exchange

    @property
    def durable(self) -> bool:
        """C{Connection.durable}: quorum queues imply durability."""
        return self.options.amqp_durable_queues or self.options.rabbit_quorum_queue

    def _queue_arguments(self, ttl: int, quorum: bool, stream: bool = False) -> dict[str, Any]:
        """C{_get_queue_arguments}."""
        options = self.options
        if stream:
            args: dict[str, Any] = {"x-queue-type": "stream"}
            if ttl > 0:
                args["x-max-age"] = f"{ttl}s"
            return args
        args = {}
        if options.rabbit_ha_queues:
            args["x-ha-policy"] = "all"
        if quorum:
            args["x-queue-type"] = "quorum"
            if options.rabbit_quorum_delivery_limit:
                args["x-delivery-limit"] = options.rabbit_quorum_delivery_limit
            if options.rabbit_quorum_max_memory_length:
                args["x-max-in-memory-length"] = options.rabbit_quorum_max_memory_length
            if options.rabbit_quorum_max_memory_bytes:
                args["x-max-in-memory-bytes"] = options.rabbit_quorum_max_memory_bytes
        if ttl > 0:
            args["x-expires"] = ttl * 1000
        return args

    def topic_exchange(self, name: str | None = None) -> ExchangeSpec:
        """C{topic_send} / C{declare_topic_consumer}: the control exchange."""
        return ExchangeSpec(name or self.exchange, "topic", self.durable, self.options.amqp_auto_delete)

    def topic_queue(self, routing_key: str, exchange: str | None = None, queue: str | None = None) -> QueueSpec:
        """
        C{declare_topic_consumer}: a server's C{topic} or C{topic.server}
        queue, or a notification listener's queue (C{queue} is the pool).
        """
        return QueueSpec(
            name=queue or routing_key,
            durable=self.durable,
            auto_delete=self.options.amqp_auto_delete,
            arguments=_pairs(self._queue_arguments(0, self.options.rabbit_quorum_queue)),
            bindings=((exchange or self.exchange, routing_key),),
        )

    def pool_queue(self, pool: str, exchange: str | None, routing_keys: tuple[str, ...]) -> QueueSpec:
        """A notification listener pool: one topic queue bound to every C{topic.priority}."""
        queue = self.topic_queue(routing_keys[0], exchange, pool)
        return attrs.evolve(queue, bindings=tuple((exchange or self.exchange, key) for key in routing_keys))

    def notification_queue(self, routing_key: str, exchange: str | None = None) -> QueueSpec:
        """
        C{_publish_and_creates_default_queue}: the notifier creates
        C{topic.priority} so notifications wait for listeners.
        """
        return self.topic_queue(routing_key, exchange)

    def fanout_exchange(self, topic: str) -> ExchangeSpec:
        """C{fanout_send} / C{declare_fanout_consumer}."""
        durable = self.options.rabbit_transient_quorum_queue or self.options.rabbit_stream_fanout
        return ExchangeSpec(f"{topic}_fanout", "fanout", durable, True)

    def fanout_queue(self, topic: str, unique: str) -> QueueSpec:
        """
        C{declare_fanout_consumer}: one queue per server, expiring; with
        C{rabbit_stream_fanout} one shared stream read from its end.
        """
        options = self.options
        stream = options.rabbit_stream_fanout
        name = f"{topic}_fanout" if stream else f"{topic}_fanout_{unique}"
        return QueueSpec(
            name=name,
            durable=options.rabbit_transient_quorum_queue or stream,
            auto_delete=False,
            arguments=_pairs(
                self._queue_arguments(options.rabbit_transient_queues_ttl, options.rabbit_transient_quorum_queue, stream)
            ),
            bindings=((f"{topic}_fanout", topic),),
            consume_arguments=(("x-stream-offset", "last"),) if stream else (),
        )

    def reply_queue(self, name: str) -> QueueSpec:
        """
        C{declare_direct_consumer}: a caller's reply queue, reached through
        the default exchange (so it needs no binding).
        """
        options = self.options
        return QueueSpec(
            name=name,
            durable=options.rabbit_transient_quorum_queue,
            auto_delete=False,
            arguments=_pairs(
                self._queue_arguments(options.rabbit_transient_queues_ttl, options.rabbit_transient_quorum_queue)
            ),
        )


# What sets each property RabbitMQ compares when a queue or exchange is
# declared again, for the declarations oslo services share with msgmux
# (topic, server and notification queues, the fanout stream, exchanges).
_TOPIC_QUEUE_OPTIONS: dict[str, tuple[str, ...]] = {
    "durable": ("amqp_durable_queues", "rabbit_quorum_queue"),
    "auto_delete": ("amqp_auto_delete",),
    "x-queue-type": ("rabbit_quorum_queue",),
    "x-ha-policy": ("rabbit_ha_queues",),
    "x-delivery-limit": ("rabbit_quorum_delivery_limit",),
    "x-max-in-memory-length": ("rabbit_quorum_max_memory_length",),
    "x-max-in-memory-bytes": ("rabbit_quorum_max_memory_bytes",),
    "x-expires": ("rabbit_transient_queues_ttl",),
}
_STREAM_OPTIONS: dict[str, tuple[str, ...]] = {
    "durable": ("rabbit_stream_fanout",),
    "x-queue-type": ("rabbit_stream_fanout",),
    "x-max-age": ("rabbit_transient_queues_ttl",),
}
_EXCHANGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "durable": ("amqp_durable_queues", "rabbit_quorum_queue"),
    "auto_delete": ("amqp_auto_delete",),
}
_FANOUT_EXCHANGE_OPTIONS: dict[str, tuple[str, ...]] = {"durable": ("rabbit_transient_quorum_queue", "rabbit_stream_fanout")}


def shaping_options(argument: str, declared: QueueSpec | ExchangeSpec) -> tuple[str, ...]:
    """
    The options of L{msgmux.config.QueueOptions} (oslo's, by the same
    names) that decide one property of a declaration.

    @param argument: the property as RabbitMQ names it when it refuses a
        declaration (C{durable}, C{auto_delete}, C{x-expires}...).
    @param declared: what was declared.
    @return: the option names, none for a property no option sets.
    """
    if isinstance(declared, ExchangeSpec):
        table = _FANOUT_EXCHANGE_OPTIONS if declared.kind == "fanout" else _EXCHANGE_OPTIONS
    elif dict(declared.arguments).get("x-queue-type") == "stream":
        table = _STREAM_OPTIONS
    else:
        table = _TOPIC_QUEUE_OPTIONS
    return table.get(argument, ())
