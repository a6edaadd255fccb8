# -*- test-case-name: tests.test_declared -*-
"""
L{DeclaredChannel} when the broker holds declarations that differ from
msgmux's: its own queues are moved within the same build, an auto-delete
exchange only msgmux's queues keep is let go, and a refusal of what oslo
services share is logged once per episode with the operator's advice.
Over L{BrokerService} on a memory reactor whose connection iosim completes
to a L{ScriptedBroker}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel
from msgmux.amqp.declared import REBUILD_DELAY, Consumer, DeclaredChannel
from msgmux.amqp.migrate import mover_for
from msgmux.config import BrokerConfig, QueueOptions, parse_transport_url
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.reply_queues import ReplyQueueDeclarer
from msgmux.routing import reply_queue
from tests.doubles.amqp import ScriptedBroker, ScriptedBrokerFactory, connect_pending

TOPOLOGY = OsloTopology(QueueOptions(rabbit_transient_queues_ttl=3600), "openstack")
REPLY = reply_queue("tenant-a", TOPOLOGY)
FANOUT_EXCHANGE = TOPOLOGY.fanout_exchange("l3_agent")
FANOUT = QueueSpec(
    "l3_agent_fanout_0123", False, False, (("x-expires", 3600000),), ((FANOUT_EXCHANGE.name, "l3_agent"),), owned=True
)
SHARED = TOPOLOGY.topic_queue("l3_agent")
TTL = (
    "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue '{name}' in vhost 'v':"
    " received '3600000' but current is '1800000'"
)
DURABLE = (
    "PRECONDITION_FAILED - inequivalent arg 'durable' for {kind} '{name}' in vhost 'v': received '{new}' but current is '{old}'"
)


class Plan:
    """Declares what it is given and consumes its queues."""

    def __init__(self, exchanges: list[ExchangeSpec], queues: list[QueueSpec]) -> None:
        self.exchanges = exchanges
        self.queues = queues

    def declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        return self.exchanges, self.queues

    def consumers(self, channel: Channel) -> list[Consumer]:
        return [Consumer(queue.name, f"c-{index}", lambda delivery: None) for index, queue in enumerate(self.queues)]


class User:
    def __init__(self) -> None:
        self.ready: list[Channel] = []
        self.lost: list[Channel] = []

    def channel_ready(self, channel: Channel) -> None:
        self.ready.append(channel)

    def channel_lost(self, channel: Channel, reason: Failure) -> None:
        self.lost.append(channel)


class OverScriptedBroker(SynchronousTestCase):
    """A broker service connected to a scripted broker on a memory reactor, with the log kept."""

    def start(self, exchanges: list[ExchangeSpec], queues: list[QueueSpec]) -> None:
        """Connect a broker service to a scripted broker and start a declared channel on it; refusals set by C{refuse}."""
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.reactor = MemoryReactorClock()
        hosts, vhost = parse_transport_url("rabbit://guest:guest@127.0.0.1:5672/v")
        self.service = BrokerService(BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack"), "control", self.reactor)
        factory = ScriptedBrokerFactory(clock=self.reactor, auto_confirm=True)
        self.reactor.listenTCP(5672, factory, interface="127.0.0.1")
        self.service.startService()
        self.reactor.advance(0)
        [self.pump] = connect_pending(self.reactor)
        self.pump.flush()
        self.broker: ScriptedBroker = factory.brokers[0]
        self.user = User()
        self.declared = DeclaredChannel(self.service, self.reactor, "tenant-a", Plan(exchanges, queues), self.user)

    def go(self) -> None:
        self.declared.start()
        self.flush()

    def flush(self) -> None:
        """Move bytes; let the movers' short waits pass (not the rebuild delay)."""
        for _ in range(5):
            self.pump.flush()
            self.reactor.advance(0.05)
        self.pump.flush()

    def rebuild(self) -> None:
        self.reactor.advance(REBUILD_DELAY)
        self.flush()

    def logged(self, text: str) -> list[str]:
        messages = [formatEvent(event) for event in self.events]
        return [message for message in messages if text in message]


class DeclaredTests(OverScriptedBroker):
    def test_own_queue_moved_within_the_build(self) -> None:
        """
        A reply queue with an older TTL is moved and the channel comes up in
        the same build: no failure logged, no rebuild delay.
        """
        self.start([], [REPLY])
        self.broker.refuse("queue.declare", 406, TTL.format(name=REPLY.name), queue=REPLY.name)
        self.go()
        self.assertEqual(len(self.user.ready), 1)
        self.assertEqual(len(self.logged("Moving queue reply_msgmux_tenant-a on the control broker")), 1)
        self.assertEqual(len(self.logged("Moved queue reply_msgmux_tenant-a")), 1)
        self.assertEqual(self.logged("could not set up"), [])
        self.assertEqual(mover_for(self.service).moves, {REPLY.name: 1})
        self.assertEqual({consumer.queue for consumer in self.broker.consumers.values()}, {REPLY.name})

    def test_shared_queue_advice_once_per_episode(self) -> None:
        """
        A shared queue the broker holds with other arguments fails the
        build with the operator's advice, logged once however often the
        build is retried, and again in a later episode.
        """
        self.start([], [SHARED])
        refusal = DURABLE.format(kind="queue", name="l3_agent", new="false", old="true")
        for _ in range(4):
            self.broker.refuse("queue.declare", 406, refusal, queue="l3_agent")
        self.go()
        for _ in range(3):
            self.rebuild()
        self.assertEqual(self.user.ready, [])
        [logged] = self.logged("could not set up the control broker channel")
        self.assertIn("queue 'l3_agent' differs on the control broker: durable is true there, msgmux declares false", logged)
        self.assertIn("[control.queues]", logged)
        self.assertIn("RabbitMQ: " + refusal, logged)
        self.assertEqual(len([r for r in self.broker.methods("queue.declare") if r.fields["queue"] == "l3_agent"]), 4)
        self.rebuild()
        self.assertEqual(len(self.user.ready), 1)
        self.assertEqual(len(self.logged("broker channel ready (1 queues consumed) after failures")), 1)
        # The next episode is logged again.
        self.broker.refuse("queue.declare", 406, refusal, queue="l3_agent")
        self.broker.close_channel(self.user.ready[0].number, 320, "CONNECTION_FORCED")
        self.flush()
        self.rebuild()
        self.assertEqual(len(self.logged("could not set up the control broker channel")), 2)
        self.assertEqual(mover_for(self.service).moves, {})

    def test_retired_queue(self) -> None:
        """
        A retired queue is not declared: consumed while it holds messages,
        and neither consumed nor declared once it is gone.
        """
        retired = QueueSpec(FANOUT.name, False, False, bindings=FANOUT.bindings, owned=True, retired=True)
        self.start([], [REPLY, retired])
        self.broker.queue_counts[retired.name] = (2, 0)
        self.go()
        self.assertEqual({c.queue for c in self.broker.consumers.values()}, {REPLY.name, retired.name})
        self.assertFalse(
            [r for r in self.broker.methods("queue.declare") if r.fields["queue"] == retired.name and not r.fields["passive"]]
        )
        self.broker.refuse("queue.declare", 404, f"NOT_FOUND - no queue '{retired.name}' in vhost 'v'", queue=retired.name)
        self.broker.close_channel(self.user.ready[0].number, 320, "CONNECTION_FORCED")
        self.flush()
        self.rebuild()
        self.assertEqual(len(self.user.ready), 2)
        self.assertEqual({c.queue for c in self.broker.consumers.values()}, {REPLY.name})

    def test_auto_delete_exchange_let_go(self) -> None:
        """
        A fanout exchange that only msgmux's fanout queue keeps is let go
        (its queue unbound) and declared anew; the build goes on.
        """
        self.start([FANOUT_EXCHANGE], [FANOUT])
        self.broker.refuse(
            "exchange.declare", 406, DURABLE.format(kind="exchange", name=FANOUT_EXCHANGE.name, new="false", old="true")
        )
        self.go()
        self.assertEqual(len(self.user.ready), 1)
        self.assertEqual(
            [r.fields["queue"] for r in self.broker.methods("queue.unbind")], [FANOUT.name, FANOUT.name + ".msgmux-moving"]
        )
        self.assertEqual(len(self.logged("Exchange l3_agent_fanout on the control broker had other properties")), 1)
        self.assertEqual(self.logged("could not set up"), [])

    def test_auto_delete_exchange_held(self) -> None:
        """When other queues keep such an exchange, msgmux's queue is bound again and the advice says who holds it."""
        self.start([FANOUT_EXCHANGE], [FANOUT])
        refusal = DURABLE.format(kind="exchange", name=FANOUT_EXCHANGE.name, new="false", old="true")
        self.broker.refuse("exchange.declare", 406, refusal)
        self.broker.refuse("exchange.declare", 406, refusal)
        self.go()
        self.assertEqual(self.user.ready, [])
        [logged] = self.logged("could not set up the control broker channel")
        self.assertIn("msgmux has unbound its own queues", logged)
        binds: list[Any] = self.broker.methods("queue.bind")
        self.assertEqual([(b.fields["queue"], b.fields["exchange"]) for b in binds], [(FANOUT.name, FANOUT_EXCHANGE.name)])


class ReplyQueueDeclarerTests(OverScriptedBroker):
    """L{ReplyQueueDeclarer} declares through the broker's mover too."""

    def test_moved_on_connection(self) -> None:
        """
        A reply queue with an older TTL is moved as soon as the broker
        connection is up, without a session; one that cannot be moved (in
        use elsewhere) does not keep another link's reply queue undeclared.
        """
        self.start([], [])
        other = reply_queue("tenant-b", TOPOLOGY)
        self.broker.refuse("queue.declare", 406, TTL.format(name=REPLY.name), queue=REPLY.name)
        self.broker.refuse("queue.declare", 406, TTL.format(name=other.name), queue=other.name)
        self.broker.queue_counts[other.name] = (0, 1)  # another process consumes it
        declarer = ReplyQueueDeclarer(self.service, TOPOLOGY, lambda: ["tenant-a", "tenant-b"])
        declarer.start()
        self.flush()
        self.assertEqual(mover_for(self.service).moves, {REPLY.name: 1})
        [failed] = self.logged("Could not declare the reply queue")
        self.assertIn("reply_msgmux_tenant-b", failed)
        self.assertIn("1 other consumer(s)", failed)
        declared = [r.fields["queue"] for r in self.broker.methods("queue.declare") if not r.fields["passive"]]
        self.assertEqual(declared.count(REPLY.name), 3)  # refused, declared by the move, declared again
        self.assertEqual(self.broker.channels, {})  # every channel it opened is closed
        declarer.stop()
