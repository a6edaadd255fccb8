# -*- test-case-name: tests.test_migrate -*-
"""
L{msgmux.amqp.migrate} and L{msgmux.amqp.drain} against the scripted
RabbitMQ peer: the exact AMQP dialogue of a move, with the test playing the
queues (delivering what the mover published to the holding queue back to
its consumer).  That real queues behave so is shown against RabbitMQ itself
in C{tests/integration/test_queue_moves.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.channel import PublishRefused
from msgmux.amqp.drain import POLL, QueueInUse
from msgmux.amqp.migrate import HOLDING_SUFFIX, MoveNeeded, QueueMover, funnel, holding_queue
from msgmux.oslo.topology import ExchangeSpec, QueueSpec
from tests.doubles.amqp import NACK, Published, load_capture
from tests.test_scripted_broker import Connected

OLD_TTL = (
    "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue '{name}' in vhost 'v':"
    " received '3600000' but current is '1800000'"
)

FANOUT = QueueSpec(
    name="l3_agent_fanout_0123",
    durable=True,
    auto_delete=False,
    arguments=(("x-expires", 3600000), ("x-queue-type", "quorum")),
    bindings=(("l3_agent_fanout", "l3_agent"),),
    owned=True,
)
REPLY = QueueSpec(name="reply_msgmux_tenant-a", durable=False, auto_delete=False, arguments=(("x-expires", 3600000),), owned=True)
HOLDING = FANOUT.name + HOLDING_SUFFIX


Message = tuple[dict[str, Any], bytes, str]  # properties, body, routing key


class Mover:
    """
    A logged-in client, a scripted broker and a L{QueueMover}, with the
    test playing the queues: what the client publishes waits in the queue
    it names (default exchange) or in the queues bound to the exchange it
    names (a fanout, as the mover's funnels are), with its routing key;
    whatever waits in a queue is delivered as soon as it has a consumer
    (except what is held back).
    """

    def __init__(self, case: SynchronousTestCase, **options: Any) -> None:
        self.case = case
        options.setdefault("auto_confirm", True)
        self.peer = Connected(case, **options)
        self.peer.login()
        self.broker = self.peer.broker
        self.mover = QueueMover("control")
        self.waiting: dict[str, list[Message]] = {}
        self.held: dict[str, int] = {}
        self._seen = 0

    def fill(self, queue: str, messages: list[Message], held: int = 0) -> None:
        """Put messages in a queue; the last C{held} are counted as ready but not delivered until L{release}."""
        self.waiting.setdefault(queue, []).extend(messages)
        self.held[queue] = held
        self._count(queue)

    def release(self, queue: str) -> None:
        self.held[queue] = 0
        self.flush()

    def _count(self, queue: str) -> None:
        self.broker.queue_counts[queue] = (len(self.waiting.get(queue, [])), 0)

    def needed(self, queue: QueueSpec) -> MoveNeeded:
        """Declare C{queue} as a half would, over a broker that holds it with an older TTL."""
        self.broker.refuse("queue.declare", 406, OLD_TTL.format(name=queue.name), queue=queue.name)
        channel = self.peer.run(self.peer.client.open_channel())
        declaring = defer.Deferred.fromCoroutine(self.mover.declare(channel, queue))
        self.peer.pump.flush()
        return self.case.failureResultOf(declaring, MoveNeeded).value

    def start(self, needed: MoveNeeded) -> defer.Deferred[None]:
        moving = defer.Deferred.fromCoroutine(self.mover.move(self.peer.client, needed))
        self.flush()
        return moving

    def flush(self, polls: int = 5) -> None:
        """
        Move bytes, route publishes and deliver until nothing happens, and
        let the mover look again (it waits L{POLL} between looks) at most
        C{polls} times.
        """
        for _ in range(polls + 1):
            while self.peer.pump.flush() or self._route() or self._deliver():
                pass
            if not self.peer.clock.getDelayedCalls():
                return
            self.peer.clock.advance(POLL)

    def bound(self, exchange: str) -> list[str]:
        """The queues bound to C{exchange} now, from the client's binds and unbinds."""
        queues: list[str] = []
        for r in self.broker.received:
            if r.method in ("queue.bind", "queue.unbind") and r.fields["exchange"] == exchange:
                if r.method == "queue.bind" and r.fields["queue"] not in queues:
                    queues.append(r.fields["queue"])
                elif r.method == "queue.unbind" and r.fields["queue"] in queues:
                    queues.remove(r.fields["queue"])
        return queues

    def _route(self) -> bool:
        new = self.broker.published[self._seen :]
        self._seen = len(self.broker.published)
        for published in new:
            targets = [published.routing_key] if published.exchange == "" else self.bound(published.exchange)
            for queue in targets:
                self.waiting.setdefault(queue, []).append((published.properties, published.body, published.routing_key))
                self._count(queue)
        return bool(new)

    def _deliver(self) -> bool:
        delivered = False
        consumed = {consumer.queue for consumer in self.broker.consumers.values()}
        for queue, messages in self.waiting.items():
            ready = len(messages) - self.held.get(queue, 0)
            if queue in consumed and ready > 0:
                for properties, body, routing_key in messages[:ready]:
                    self.broker.deliver(queue, properties, body, routing_key=routing_key)
                del messages[:ready]
                self._count(queue)
                delivered = True
        return delivered

    def published_to(self, queue: str) -> list[Published]:
        """What the mover published through C{queue}'s funnel exchange."""
        return [p for p in self.broker.published if p.exchange == funnel(queue).name]

    def methods(self, since: int = 0) -> list[tuple[str, str]]:
        """The queue, exchange and basic methods the client sent, with the queue or exchange each names."""
        return [
            (r.method + (" passive" if r.fields.get("passive") else ""), r.fields.get("queue") or r.fields.get("exchange", ""))
            for r in self.broker.received[since:]
            if r.method.split(".")[0] in ("queue", "basic", "exchange")
            and r.method not in ("basic.ack", "basic.qos", "basic.reject")
        ]


def steps(methods: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """
    The steps of a move, without its publishes and its looks at a queue
    (passive declares, as many as it takes), checking that a queue is
    deleted only right after a look at it (the first look of a move, at
    the queue with the old arguments, stays).
    """
    kept = []
    for index, (method, queue) in enumerate(methods):
        if method == "queue.delete":
            assert methods[index - 1] == ("queue.declare passive", queue), methods[: index + 1]
        if method == "basic.publish" or (method == "queue.declare passive" and kept):
            continue
        kept.append((method, queue))
    return kept


MESSAGES: list[Message] = [
    ({"content_type": "application/json", "delivery_mode": 2, "headers": {"n": i}}, b'{"i": %d}' % i, f"notifications.{p}")
    for i, p in enumerate(("info", "error", "info"))
]


class MoveTests(SynchronousTestCase):
    def test_move_keeps_every_message(self) -> None:
        """
        The queue's messages go to the holding queue, the queue is deleted
        and declared anew with its bindings, and the messages come back to
        it unchanged, each delivery acknowledged only after its copy was
        confirmed; the move is counted.
        """
        m = Mover(self)
        needed = m.needed(FANOUT)
        self.assertEqual(needed.mismatch and needed.mismatch.describe(), "x-expires 1800000 on the broker, 3600000 declared")
        m.fill(FANOUT.name, MESSAGES)
        since = len(m.broker.received)
        self.successResultOf(m.start(needed))
        into_holding, into_queue = funnel(HOLDING).name, funnel(FANOUT.name).name
        self.assertEqual(
            steps(m.methods(since)),
            [
                ("queue.declare passive", FANOUT.name),
                ("queue.declare", HOLDING),
                ("queue.bind", HOLDING),
                ("queue.unbind", FANOUT.name),
                ("exchange.declare", into_holding),
                ("queue.bind", HOLDING),
                ("basic.consume", FANOUT.name),
                ("queue.delete", FANOUT.name),
                ("queue.unbind", HOLDING),
                ("queue.declare", FANOUT.name),
                ("queue.bind", FANOUT.name),
                ("queue.unbind", HOLDING),
                ("exchange.declare", into_queue),
                ("queue.bind", FANOUT.name),
                ("basic.consume", HOLDING),
                ("queue.delete", HOLDING),
                ("queue.unbind", FANOUT.name),
            ],
        )
        self.assertEqual(m.bound(into_holding) + m.bound(into_queue), [])
        self.assertEqual(m.bound("l3_agent_fanout"), [FANOUT.name])
        [funnel_declare] = [r for r in m.broker.methods("exchange.declare") if r.fields["exchange"] == into_queue]
        self.assertEqual(
            (funnel_declare.fields["type"], funnel_declare.fields["durable"], funnel_declare.fields["auto-delete"]),
            ("fanout", False, True),
        )
        [holding_declare] = [
            r for r in m.broker.methods("queue.declare") if r.fields["queue"] == HOLDING and not r.fields["passive"]
        ]
        self.assertEqual(
            (holding_declare.fields["durable"], holding_declare.fields["arguments"]), (True, {"x-queue-type": "classic"})
        )
        new = [r for r in m.broker.methods("queue.declare") if r.fields["queue"] == FANOUT.name and not r.fields["passive"]][-1]
        self.assertEqual(
            (new.fields["durable"], new.fields["arguments"]), (True, {"x-expires": 3600000, "x-queue-type": "quorum"})
        )
        deletes = m.broker.methods("queue.delete")
        self.assertEqual([(d.fields["if-empty"], d.fields["if-unused"]) for d in deletes], [(False, False)] * 2)
        for queue in (HOLDING, FANOUT.name):
            moved = m.published_to(queue)
            self.assertEqual([(p.properties, p.body, p.routing_key, p.mandatory) for p in moved], [m + (True,) for m in MESSAGES])
        self.assertEqual(m.waiting[FANOUT.name], MESSAGES)  # routing keys (a notification's priority) kept
        self.assertEqual(sorted(s.delivery_tag for s in m.broker.settled if s.method == "ack"), [1, 2, 3, 4, 5, 6])
        self.assertEqual((m.mover.moves, m.mover.messages, m.mover.lost), ({FANOUT.name: 1}, {FANOUT.name: 3}, {}))
        self.assertEqual(m.broker.channels, {})  # the refused declaration closed its channel, the mover its own
        self.assertEqual(m.broker.unexpected, [])

    def test_waits_for_what_is_still_coming(self) -> None:
        """While the broker still has messages ready, the queue is not deleted: the mover looks again."""
        m = Mover(self)
        needed = m.needed(REPLY)
        m.fill(REPLY.name, MESSAGES, held=1)
        moving = m.start(needed)
        self.assertEqual(m.broker.methods("queue.delete"), [])
        self.assertGreater(len([r for r in m.broker.methods("queue.declare") if r.fields["passive"]]), 3)
        m.release(REPLY.name)
        self.successResultOf(moving)
        self.assertEqual([d.fields["queue"] for d in m.broker.methods("queue.delete")], [REPLY.name, REPLY.name + HOLDING_SUFFIX])
        self.assertEqual(m.waiting[REPLY.name], MESSAGES)
        self.assertEqual(m.mover.messages, {REPLY.name: 3})

    def test_other_consumers_stop_it(self) -> None:
        """A queue another process consumes is left alone: QueueInUse, nothing unbound or deleted."""
        m = Mover(self)
        needed = m.needed(FANOUT)
        m.broker.queue_counts[FANOUT.name] = (0, 1)
        failure = self.failureResultOf(m.start(needed), QueueInUse)
        self.assertIn("1 other consumer(s)", str(failure.value))
        self.assertEqual([r.method for r in m.broker.received if r.method in ("queue.unbind", "queue.delete")], [])
        self.assertEqual(m.mover.moves, {})

    def test_failed_copy_leaves_the_queue(self) -> None:
        """
        When the broker refuses a copy, the move stops before deleting the
        queue: the channel closes and the broker requeues what was not
        acknowledged.  The next attempt starts over.
        """
        m = Mover(self, auto_confirm=lambda published: NACK)
        needed = m.needed(REPLY)
        m.fill(REPLY.name, MESSAGES[:2])
        self.failureResultOf(m.start(needed), PublishRefused)
        self.assertEqual(m.broker.methods("queue.delete"), [])
        self.assertEqual([s.method for s in m.broker.settled], [])
        self.assertEqual(m.broker.channels, {})  # the mover's channel is closed: the broker requeues
        self.assertEqual(m.mover.moves, {})

    def test_unreadable_messages_are_dropped_and_counted(self) -> None:
        """A message whose properties cannot be published again is rejected (as the relay would) and counted."""
        m = Mover(self)
        needed = m.needed(REPLY)
        m.fill(REPLY.name, [({"delivery_mode": 7}, b"odd", REPLY.name), MESSAGES[0]])
        self.successResultOf(m.start(needed))
        self.assertEqual([p.body for p in m.published_to(REPLY.name)], [MESSAGES[0][1]])
        self.assertEqual([(s.method, s.requeue) for s in m.broker.settled], [("reject", False), ("ack", False), ("ack", False)])
        self.assertEqual((m.mover.messages, m.mover.unreadable), ({REPLY.name: 1}, {REPLY.name: 1}))

    def test_finish_an_interrupted_move(self) -> None:
        """
        A declaration that finds the holding queue with messages (the
        delete-if-empty is refused) finishes the move: only the holding
        queue is drained, into the queue.
        """
        m = Mover(self)
        holding = holding_queue(REPLY).name
        m.broker.refuse("queue.delete", 406, f"PRECONDITION_FAILED - queue '{holding}' in vhost 'v' not empty", queue=holding)
        channel = m.peer.run(m.peer.client.open_channel())
        declaring = defer.Deferred.fromCoroutine(m.mover.declare(channel, REPLY))
        m.flush()
        needed = self.failureResultOf(declaring, MoveNeeded).value
        self.assertTrue(needed.resume)
        [check] = m.broker.methods("queue.delete")
        self.assertEqual((check.fields["queue"], check.fields["if-empty"], check.fields["if-unused"]), (holding, True, True))
        m.fill(holding, MESSAGES[:2])
        since = len(m.broker.received)
        self.successResultOf(m.start(needed))
        self.assertEqual(
            steps(m.methods(since)),
            [
                ("queue.declare", REPLY.name),
                ("exchange.declare", funnel(REPLY.name).name),
                ("queue.bind", REPLY.name),
                ("basic.consume", holding),
                ("queue.delete", holding),
                ("queue.unbind", REPLY.name),
            ],
        )
        self.assertEqual([p.body for p in m.published_to(REPLY.name)], [b for _, b, _ in MESSAGES[:2]])

    def test_one_move_at_a_time(self) -> None:
        """A second move of the same queue waits for the first instead of running alongside it."""
        m = Mover(self)
        needed = m.needed(REPLY)
        m.fill(REPLY.name, MESSAGES, held=3)
        first = m.start(needed)
        second = m.start(needed)
        self.assertEqual(len(m.broker.methods("basic.consume")), 1)
        self.assertNoResult(second)
        channel = m.peer.run(m.peer.client.open_channel())
        declaring = defer.Deferred.fromCoroutine(m.mover.declare(channel, REPLY))
        self.assertFalse(self.failureResultOf(declaring, MoveNeeded).value.resume)
        m.release(REPLY.name)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(m.mover.moves, {REPLY.name: 1})

    def test_declare_without_mismatch(self) -> None:
        """An own queue that matches is declared and bound, and an empty holding queue, if any, is deleted."""
        m = Mover(self)
        channel = m.peer.run(m.peer.client.open_channel())
        m.peer.run(m.mover.declare(channel, FANOUT))
        self.assertEqual(m.methods(), [("queue.declare", FANOUT.name), ("queue.bind", FANOUT.name), ("queue.delete", HOLDING)])

    def test_other_refusals_pass(self) -> None:
        """A refusal that is not about differing arguments is not a move: it goes to the caller."""
        m = Mover(self)
        m.broker.refuse("queue.declare", 403, "ACCESS_REFUSED - access to queue 'x' refused")
        channel = m.peer.run(m.peer.client.open_channel())
        declaring = defer.Deferred.fromCoroutine(m.mover.declare(channel, REPLY))
        m.flush()
        failure = self.failureResultOf(declaring)
        self.assertNotIsInstance(failure.value, MoveNeeded)
        self.assertIn("ACCESS_REFUSED", failure.getErrorMessage())

    def test_captured_refusal_is_understood(self) -> None:
        """RabbitMQ's own text, as captured, names the differing argument and both values."""
        text = load_capture().find("channel.close", answers="queue.declare", reply_code=406).fields["reply-text"]
        m = Mover(self)
        m.broker.refuse("queue.declare", 406, text)
        channel = m.peer.run(m.peer.client.open_channel())
        declaring = defer.Deferred.fromCoroutine(m.mover.declare(channel, REPLY))
        m.flush()
        mismatch = self.failureResultOf(declaring, MoveNeeded).value.mismatch
        assert mismatch is not None
        self.assertEqual((mismatch.argument, mismatch.current, mismatch.declared), ("x-expires", "600000", "300000"))


class HoldingQueueTests(SynchronousTestCase):
    def test_name(self) -> None:
        """The holding queue is named after the queue, and stays within AMQP's 255 bytes."""
        self.assertEqual(holding_queue(REPLY).name, "reply_msgmux_tenant-a.msgmux-moving")
        self.assertEqual(funnel(REPLY.name).name, "msgmux.move.reply_msgmux_tenant-a")
        self.assertLessEqual(len(funnel("q" * 255).name), 255)
        long = QueueSpec(name="q" * 250, durable=False, auto_delete=False)
        other = QueueSpec(name="q" * 249 + "r", durable=False, auto_delete=False)
        self.assertLessEqual(len(holding_queue(long).name.encode()), 255)
        self.assertNotEqual(holding_queue(long).name, holding_queue(other).name)
        self.assertTrue(holding_queue(long).name.endswith(HOLDING_SUFFIX))


TOPIC_FANOUT = ExchangeSpec("l3_agent_fanout", "fanout", True, True)


class ReleaseExchangeTests(SynchronousTestCase):
    def test_released(self) -> None:
        """msgmux unbinds its queues (and their holding queues) from an auto-delete exchange, which is then declared anew."""
        m = Mover(self)
        released = defer.Deferred.fromCoroutine(m.mover.release_exchange(m.peer.client, TOPIC_FANOUT, [FANOUT, REPLY]))
        m.flush()
        self.assertTrue(self.successResultOf(released))
        self.assertEqual([r.fields["queue"] for r in m.broker.methods("queue.unbind")], [FANOUT.name, HOLDING])
        [declare] = m.broker.methods("exchange.declare")
        self.assertEqual((declare.fields["exchange"], declare.fields["durable"]), ("l3_agent_fanout", True))

    def test_held_by_others(self) -> None:
        """When other queues keep the exchange, msgmux binds its queue again and says so."""
        m = Mover(self)
        m.broker.refuse(
            "exchange.declare",
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'l3_agent_fanout' in vhost 'v':"
            " received 'true' but current is 'false'",
        )
        released = defer.Deferred.fromCoroutine(m.mover.release_exchange(m.peer.client, TOPIC_FANOUT, [FANOUT]))
        m.flush()
        self.assertIs(self.successResultOf(released), False)
        [bind] = m.broker.methods("queue.bind")
        self.assertEqual((bind.fields["queue"], bind.fields["exchange"]), (FANOUT.name, "l3_agent_fanout"))

    def test_not_ours(self) -> None:
        """An exchange that is not auto-delete, or that no queue of msgmux's is bound to, is not touched."""
        m = Mover(self)
        for exchange, queues in ((ExchangeSpec("openstack", "topic", True, False), [FANOUT]), (TOPIC_FANOUT, [REPLY])):
            released = defer.Deferred.fromCoroutine(m.mover.release_exchange(m.peer.client, exchange, queues))
            m.flush()
            self.assertIsNone(self.successResultOf(released))
        self.assertEqual(len(m.broker.received), 3)  # the login only


RETIRED = QueueSpec("l3_agent_fanout_0123", False, False, bindings=(("l3_agent_fanout", "l3_agent"),), owned=True, retired=True)


class RetireTests(SynchronousTestCase):
    def retire(self, m: Mover) -> defer.Deferred[bool]:
        retiring = defer.Deferred.fromCoroutine(m.mover.retire(m.peer.client, RETIRED))
        m.flush()
        return retiring

    def test_absent(self) -> None:
        """A retired queue that is not there is left at that, and not looked for again."""
        m = Mover(self)
        m.broker.refuse("queue.declare", 404, f"NOT_FOUND - no queue '{RETIRED.name}' in vhost 'v'", queue=RETIRED.name)
        self.assertIs(self.successResultOf(self.retire(m)), False)
        self.assertIs(self.successResultOf(self.retire(m)), False)
        self.assertEqual(m.methods(), [("queue.declare passive", RETIRED.name)])

    def test_with_messages(self) -> None:
        """One that still holds messages is unbound (it takes nothing more) and left to be consumed."""
        m = Mover(self)
        m.fill(RETIRED.name, MESSAGES)
        self.assertIs(self.successResultOf(self.retire(m)), True)
        self.assertEqual(m.methods(), [("queue.declare passive", RETIRED.name), ("queue.unbind", RETIRED.name)])

    def test_empty(self) -> None:
        """Once empty and unused, it is deleted: unbound, nothing can reach it any more."""
        m = Mover(self)
        self.assertIs(self.successResultOf(self.retire(m)), False)
        self.assertEqual(
            m.methods(),
            [("queue.declare passive", RETIRED.name), ("queue.unbind", RETIRED.name), ("queue.delete", RETIRED.name)],
        )
        self.assertIs(self.successResultOf(self.retire(m)), False)
        self.assertEqual(len(m.methods()), 3)

    def test_consumed_elsewhere(self) -> None:
        """One another process still consumes is neither consumed here nor deleted."""
        m = Mover(self)
        m.broker.queue_counts[RETIRED.name] = (2, 1)
        self.assertIs(self.successResultOf(self.retire(m)), False)
        self.assertEqual(m.broker.methods("queue.delete"), [])
