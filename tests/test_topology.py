"""
Tests for L{msgmux.oslo.topology}: for each oslo option combination the
declarations equal what oslo.messaging 18.3.1's rabbit driver declared on a
real broker (exchange and queue flags, C{x-} arguments, bindings).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import QueueOptions
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec

UNIQUE = "0123456789abcdef0123456789abcdef"
REPLY = f"reply_{UNIQUE}"
EXPIRES = {"x-expires": 1800000}
QUORUM = {"x-queue-type": "quorum"}


def pairs(mapping: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Arguments as L{QueueSpec} holds them: sorted pairs."""
    return tuple(sorted(mapping.items()))


def observed(topology: OsloTopology) -> dict[str, Any]:
    """Everything an oslo client, server, notifier and listener of topic C{demo} declare."""
    return {
        "exchange": topology.topic_exchange(),
        "topic": topology.topic_queue("demo"),
        "server": topology.topic_queue("demo.srv1"),
        "fanout_exchange": topology.fanout_exchange("demo"),
        "fanout": topology.fanout_queue("demo", UNIQUE),
        "reply": topology.reply_queue(REPLY),
        "notification": topology.notification_queue("notifications.info"),
        "pool": topology.pool_queue("mypool", None, ("notifications.info",)),
    }


def expected(
    durable: bool = False,
    auto_delete: bool = False,
    args: dict[str, Any] | None = None,
    fanout_exchange_durable: bool = False,
    fanout_name: str = f"demo_fanout_{UNIQUE}",
    fanout_durable: bool = False,
    fanout_args: dict[str, Any] | None = None,
    fanout_consume: tuple[tuple[str, Any], ...] = (),
    reply_durable: bool = False,
    reply_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The ground truth observed on a broker for the demo topic, as specs.

    @param durable: exchange C{openstack} and topic-like queues durable.
    @param auto_delete: exchange C{openstack} and topic-like queues auto-delete.
    @param args: topic-like queue arguments.
    """
    args = {} if args is None else args
    fanout_args = EXPIRES if fanout_args is None else fanout_args
    reply_args = EXPIRES if reply_args is None else reply_args

    def topic_like(name: str, key: str) -> QueueSpec:
        return QueueSpec(name, durable, auto_delete, pairs(args), (("openstack", key),))

    return {
        "exchange": ExchangeSpec("openstack", "topic", durable, auto_delete),
        "topic": topic_like("demo", "demo"),
        "server": topic_like("demo.srv1", "demo.srv1"),
        "fanout_exchange": ExchangeSpec("demo_fanout", "fanout", fanout_exchange_durable, True),
        "fanout": QueueSpec(fanout_name, fanout_durable, False, pairs(fanout_args), (("demo_fanout", "demo"),), fanout_consume),
        "reply": QueueSpec(REPLY, reply_durable, False, pairs(reply_args), ()),
        "notification": topic_like("notifications.info", "notifications.info"),
        "pool": topic_like("mypool", "notifications.info"),
    }


class GroundTruthTests(SynchronousTestCase):
    """Each oslo option combination declares exactly what oslo declared."""

    def check(self, options: QueueOptions, want: dict[str, Any]) -> None:
        """Compare every declaration, naming the ones that differ."""
        got = observed(OsloTopology(options, "openstack"))
        differ = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
        self.assertEqual(differ, {})

    def test_default_options_make_transient_expiring_queues(self) -> None:
        """Default options: transient, non-auto-delete, expiring fanout and reply queues."""
        self.check(QueueOptions(), expected())

    def test_durable(self) -> None:
        """amqp_durable_queues: the control exchange and topic-like queues are durable."""
        self.check(QueueOptions(amqp_durable_queues=True), expected(durable=True))

    def test_auto_delete(self) -> None:
        """amqp_auto_delete: the control exchange and topic-like queues auto-delete."""
        self.check(QueueOptions(amqp_auto_delete=True), expected(auto_delete=True))

    def test_ha(self) -> None:
        """rabbit_ha_queues: every queue carries x-ha-policy all."""
        ha = {"x-ha-policy": "all"}
        self.check(
            QueueOptions(rabbit_ha_queues=True),
            expected(args=ha, fanout_args={**ha, **EXPIRES}, reply_args={**ha, **EXPIRES}),
        )

    def test_quorum(self) -> None:
        """rabbit_quorum_queue with its limits: durable quorum topic-like queues; fanout and reply unchanged."""
        options = QueueOptions(
            rabbit_quorum_queue=True,
            rabbit_quorum_delivery_limit=5,
            rabbit_quorum_max_memory_length=100,
            rabbit_quorum_max_memory_bytes=1048576,
        )
        args = {**QUORUM, "x-delivery-limit": 5, "x-max-in-memory-length": 100, "x-max-in-memory-bytes": 1048576}
        self.check(options, expected(durable=True, args=args))

    def test_quorum_without_limits(self) -> None:
        """rabbit_quorum_queue alone sets only the queue type."""
        self.check(QueueOptions(rabbit_quorum_queue=True), expected(durable=True, args=QUORUM))

    def test_transient_quorum(self) -> None:
        """rabbit_transient_quorum_queue: durable fanout exchange, durable quorum fanout and reply queues."""
        args = {**QUORUM, **EXPIRES}
        self.check(
            QueueOptions(rabbit_transient_quorum_queue=True),
            expected(
                fanout_exchange_durable=True,
                fanout_durable=True,
                fanout_args=args,
                reply_durable=True,
                reply_args=args,
            ),
        )

    def test_ttl_zero(self) -> None:
        """rabbit_transient_queues_ttl = 0: fanout and reply queues never expire."""
        self.check(QueueOptions(rabbit_transient_queues_ttl=0), expected(fanout_args={}, reply_args={}))

    def test_ttl_sixty(self) -> None:
        """rabbit_transient_queues_ttl = 60: x-expires is in milliseconds."""
        ttl = {"x-expires": 60000}
        self.check(QueueOptions(rabbit_transient_queues_ttl=60), expected(fanout_args=ttl, reply_args=ttl))

    def test_stream_fanout(self) -> None:
        """rabbit_stream_fanout: one shared durable stream per topic, read from its end."""
        options = QueueOptions(rabbit_transient_quorum_queue=True, rabbit_stream_fanout=True)
        self.check(
            options,
            expected(
                fanout_exchange_durable=True,
                fanout_name="demo_fanout",
                fanout_durable=True,
                fanout_args={"x-queue-type": "stream", "x-max-age": "1800s"},
                fanout_consume=(("x-stream-offset", "last"),),
                reply_durable=True,
                reply_args={**QUORUM, **EXPIRES},
            ),
        )

    def test_stream_fanout_name_ignores_unique(self) -> None:
        """Every server of a topic shares the same stream, whatever its unique id."""
        topology = OsloTopology(QueueOptions(rabbit_transient_quorum_queue=True, rabbit_stream_fanout=True), "openstack")
        self.assertEqual(topology.fanout_queue("demo", "a"), topology.fanout_queue("demo", "b"))

    def test_durable_property(self) -> None:
        """Connection.durable: durable queues or quorum queues."""
        cases = [(QueueOptions(), False), (QueueOptions(amqp_durable_queues=True), True), (QueueOptions(rabbit_quorum_queue=True), True)]
        self.assertEqual([OsloTopology(o, "x").durable for o, _ in cases], [want for _, want in cases])


class NamingTests(SynchronousTestCase):
    """Exchange names, bindings and argument order."""

    def setUp(self) -> None:
        self.topology = OsloTopology(QueueOptions(rabbit_ha_queues=True), "nova")

    def test_configured_exchange(self) -> None:
        """Without a name the control exchange is the configured one."""
        self.assertEqual(self.topology.topic_exchange(), ExchangeSpec("nova", "topic", False, False))
        self.assertEqual(self.topology.topic_exchange("neutron").name, "neutron")

    def test_topic_queue_exchange(self) -> None:
        """A topic queue binds to the exchange it is given, else the configured one."""
        self.assertEqual(self.topology.topic_queue("t").bindings, (("nova", "t"),))
        self.assertEqual(self.topology.topic_queue("t", "neutron").bindings, (("neutron", "t"),))
        self.assertEqual(self.topology.topic_queue("t.s", "neutron", "q").name, "q")
        self.assertEqual(self.topology.notification_queue("n.info", "neutron").bindings, (("neutron", "n.info"),))

    def test_pool_bindings(self) -> None:
        """A listener pool queue is bound once per routing key."""
        queue = self.topology.pool_queue("pool", "neutron", ("n.info", "n.error"))
        self.assertEqual(queue.name, "pool")
        self.assertEqual(queue.bindings, (("neutron", "n.info"), ("neutron", "n.error")))
        self.assertEqual(self.topology.pool_queue("pool", None, ("n.info",)).bindings, (("nova", "n.info"),))

    def test_fanout_ignores_control_exchange(self) -> None:
        """Fanout exchanges are named after the topic only, and the queue is bound with the topic."""
        self.assertEqual(self.topology.fanout_exchange("t").name, "t_fanout")
        self.assertEqual(self.topology.fanout_queue("t", "u").bindings, (("t_fanout", "t"),))

    def test_arguments_sorted_and_hashable(self) -> None:
        """Arguments are sorted pairs, so equal declarations compare and hash equal."""
        queue = self.topology.fanout_queue("t", "u")
        self.assertEqual(queue.arguments, (("x-expires", 1800000), ("x-ha-policy", "all")))
        self.assertEqual(hash(queue), hash(self.topology.fanout_queue("t", "u")))
