# -*- test-case-name: tests.test_mismatch -*-
"""
L{msgmux.amqp.mismatch}: RabbitMQ's refusals read, and the advice given to
the operator for what msgmux shares with oslo services.  The texts are
RabbitMQ 3.10.8's, as captured or as it answered in C{lab} probes.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.mismatch import Inequivalent, advice, broker_refusal, inequivalent
from msgmux.config import QueueOptions
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, shaping_options
from tests.doubles.amqp import load_capture
from tests.test_scripted_broker import Connected

TOPOLOGY = OsloTopology(QueueOptions(rabbit_quorum_queue=True), "openstack")
DURABLE = (
    "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'l3_agent' in vhost 'v': received 'true' but current is 'false'"
)
TYPE = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'qq' in vhost 'v': received none"
    " but current is the value 'quorum' of type 'longstr'"
)


class ParseTests(SynchronousTestCase):
    def test_captured(self) -> None:
        """The captured refusals of a queue and an exchange declared again are read, values without quotes."""
        capture = load_capture()
        queue = Inequivalent.parse(capture.find("channel.close", answers="queue.declare", reply_code=406).fields["reply-text"])
        self.assertEqual(
            queue,
            Inequivalent(
                "queue",
                "capture.q",
                "msgmux-capture",
                "x-expires",
                "300000",
                "600000",
                queue.text if queue else "",
            ),
        )
        exchange = Inequivalent.parse(capture.find("channel.close", answers="exchange.declare").fields["reply-text"])
        assert exchange is not None
        self.assertEqual((exchange.kind, exchange.name, exchange.argument), ("exchange", "capture.x", "durable"))
        self.assertEqual((exchange.declared, exchange.current), ("true", "false"))

    def test_typed_and_absent_values(self) -> None:
        """A value shown with its type is read as the value; an absent one as none."""
        mismatch = Inequivalent.parse(TYPE)
        assert mismatch is not None
        self.assertEqual((mismatch.declared, mismatch.current), ("none", "quorum"))
        self.assertEqual(mismatch.describe(), "x-queue-type quorum on the broker, none declared")

    def test_other_texts(self) -> None:
        """Refusals that are not about one property differing are not mismatches."""
        for text in (
            "PRECONDITION_FAILED - invalid property 'non-durable' for queue 'qq' in vhost 'v'",
            "PRECONDITION_FAILED - queue 'q' in vhost 'v' not empty",
            "NOT_FOUND - no queue 'q' in vhost 'v'",
            "",
        ):
            self.assertIsNone(Inequivalent.parse(text), text)

    def test_from_the_channel(self) -> None:
        """What a refused declaration raises carries the broker's code and text."""
        peer = Connected(self)
        peer.login()
        channel = peer.run(peer.client.open_channel())
        peer.broker.refuse("queue.declare", 406, DURABLE)
        declaring = defer.Deferred.fromCoroutine(channel.declare_queue("l3_agent", True, False))
        peer.pump.flush()
        error = self.failureResultOf(declaring).value
        self.assertEqual(broker_refusal(error), (406, DURABLE))
        mismatch = inequivalent(error)
        self.assertEqual((mismatch.argument, mismatch.name) if mismatch else None, ("durable", "l3_agent"))
        self.assertIsNone(broker_refusal(ConnectionError("gone")))
        self.assertIsNone(inequivalent(ValueError()))


class AdviceTests(SynchronousTestCase):
    def test_shared_queue(self) -> None:
        """
        The advice names the queue, the property and both values, the oslo
        options behind it in the half's section, says that the services and
        msgmux change together and how to delete the queue, and quotes
        RabbitMQ.
        """
        mismatch = Inequivalent.parse(DURABLE)
        assert mismatch is not None
        text = advice(mismatch, TOPOLOGY.topic_queue("l3_agent"), "control")
        for part in (
            "queue 'l3_agent' differs on the control broker: durable is false there, msgmux declares true",
            "set by amqp_durable_queues, rabbit_quorum_queue in [control.queues]",
            "[oslo_messaging_rabbit]",
            "the services and msgmux must change together",
            "rabbitmqctl delete_queue --vhost 'v' 'l3_agent' --if-empty",
            "docs/operations.md, Changing queue options",
            "RabbitMQ: " + DURABLE,
        ):
            self.assertIn(part, text)

    def test_exchanges(self) -> None:
        """A plain exchange is deleted by the operator; an auto-delete one goes when its last queue is unbound."""
        text = (
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in vhost 'v':"
            " received 'true' but current is 'false'"
        )
        topic = Inequivalent.parse(text.format(name="openstack"))
        fanout = Inequivalent.parse(text.format(name="l3_agent_fanout"))
        assert topic is not None and fanout is not None
        plain = advice(topic, TOPOLOGY.topic_exchange(), "tenant")
        self.assertIn("rabbitmqadmin --vhost='v' delete exchange name='openstack'", plain)
        self.assertIn("amqp_durable_queues, rabbit_quorum_queue in [tenant.queues]", plain)
        held = advice(fanout, TOPOLOGY.fanout_exchange("l3_agent"), "tenant", held=True)
        self.assertIn("goes once no queue is bound to it; msgmux has unbound its own queues", held)
        self.assertIn("rabbitmqctl list_bindings --vhost 'v'", held)
        self.assertIn("rabbit_transient_quorum_queue, rabbit_stream_fanout", held)
        self.assertNotIn("msgmux has unbound", advice(fanout, TOPOLOGY.fanout_exchange("l3_agent"), "tenant"))

    def test_shaping_options(self) -> None:
        """Each property oslo's options set is traced back to them, per kind of declaration."""
        stream = OsloTopology(QueueOptions(rabbit_transient_quorum_queue=True, rabbit_stream_fanout=True), "openstack")
        queue = TOPOLOGY.topic_queue("l3_agent")
        self.assertEqual(shaping_options("x-queue-type", queue), ("rabbit_quorum_queue",))
        self.assertEqual(shaping_options("x-ha-policy", queue), ("rabbit_ha_queues",))
        self.assertEqual(shaping_options("x-delivery-limit", queue), ("rabbit_quorum_delivery_limit",))
        self.assertEqual(shaping_options("x-max-age", stream.fanout_queue("l3_agent", "x")), ("rabbit_transient_queues_ttl",))
        self.assertEqual(shaping_options("x-queue-type", stream.fanout_queue("l3_agent", "x")), ("rabbit_stream_fanout",))
        self.assertEqual(shaping_options("auto_delete", ExchangeSpec("openstack", "topic", False, True)), ("amqp_auto_delete",))
        self.assertEqual(shaping_options("x-something", queue), ())
