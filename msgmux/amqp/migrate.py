# -*- test-case-name: tests.test_migrate -*-
"""
msgmux's own queues follow its queue options, keeping what they hold.

A queue's arguments cannot change while it exists, and RabbitMQ refuses to
declare it again with others (406 PRECONDITION_FAILED, "inequivalent arg").
When the operator changes C{[control.queues]} or C{[tenant.queues]} (another
C{rabbit_transient_queues_ttl}, quorum queues), the queues that are msgmux's
own (L{QueueSpec.owned}: its reply, canary, fanout and notification pool
queues, whose names no oslo service uses) are still there with the old
arguments.  L{QueueMover} replaces such a queue with one of the same name and
the new arguments, through a holding queue C{<name>.msgmux-moving} (classic,
durable):

 1. the holding queue gets the queue's bindings, then the queue loses them
    (a message published in between reaches both: a duplicate, not a loss);
 2. the queue is drained into the holding queue and deleted
    (L{msgmux.amqp.drain}), through a fanout exchange of the move's own
    (C{msgmux.move.<target>}, bound to the target alone) so that each
    message keeps its routing key;
 3. the queue is declared with the new arguments and its bindings, and the
    holding queue loses its bindings;
 4. the holding queue is drained into the queue and deleted.

The name is the same throughout, which matters for the reply queue: every
call msgmux relays carries it, and servers answer to it by name.  It is
missing only between the deletion in 2 and the declaration in 3, a round
trip, and a reply published then is returned to its server, which publishes
it again (oslo servers for 60 s, msgmux's publisher likewise).

A move that stops halfway (connection lost, process killed) is finished
later: either the old queue still refuses the declaration and the move
starts over, or the holding queue is still there with messages, which
L{QueueMover.declare} notices (it deletes an empty, unused holding queue as
part of every declaration of an own queue) and finishes with steps 3 and 4.

An auto-delete exchange whose properties changed (the C{<topic>_fanout}
exchanges with C{rabbit_transient_quorum_queue}) stays as long as a queue is
bound to it, msgmux's own included: L{QueueMover.release_exchange} unbinds
msgmux's queues so that it can go and be declared anew.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Iterable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel
from msgmux.amqp.drain import MOVE_PREFETCH, DrainResult, QueueInUse, drain
from msgmux.amqp.mismatch import Inequivalent, broker_refusal, inequivalent
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.oslo.topology import ExchangeSpec, QueueSpec

__all__ = [
    "HOLDING_SUFFIX",
    "MoveNeeded",
    "QueueInUse",
    "QueueMover",
    "declare_queue",
    "funnel",
    "holding_queue",
    "mover_for",
]

HOLDING_SUFFIX = ".msgmux-moving"
_MAX_NAME = 255  # AMQP short string


async def declare_queue(channel: Channel, queue: QueueSpec) -> None:
    """Declare a queue and its bindings."""
    await channel.declare_queue(queue.name, queue.durable, queue.auto_delete, arguments=dict(queue.arguments))
    for exchange, routing_key in queue.bindings:
        await channel.bind_queue(queue.name, exchange, routing_key)


def _bounded(name: str, suffix: str, prefix: str = "") -> str:
    """C{prefix + name + suffix}, shortened with a digest of C{name} to fit an AMQP short string."""
    full = prefix + name + suffix
    if len(full.encode()) <= _MAX_NAME:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    room = _MAX_NAME - len(prefix.encode()) - len(suffix.encode()) - 17
    return prefix + name.encode()[:room].decode(errors="ignore") + "." + digest + suffix


def funnel(target: str) -> ExchangeSpec:
    """
    @return: the exchange a move publishes through to reach C{target}: a
        fanout exchange bound to the target alone, so that a message keeps
        its routing key (the default exchange would replace it with the
        queue's name, and a notification's routing key is its priority).
        Auto-delete: it goes with the binding at the end of the move.
    """
    return ExchangeSpec(_bounded(target, "", "msgmux.move."), "fanout", False, True)


def holding_queue(queue: QueueSpec) -> QueueSpec:
    """
    @return: where C{queue}'s messages wait while it is replaced: classic
        (never a quorum queue, whose deletion cannot be conditional),
        durable (persistent messages survive a broker restart), unbound.
    """
    name = _bounded(queue.name, HOLDING_SUFFIX)
    return QueueSpec(name=name, durable=True, auto_delete=False, arguments=(("x-queue-type", "classic"),))


class MoveNeeded(Exception):
    """
    One of msgmux's own queues must be moved before it can be declared.

    @ivar mismatch: what the broker holds that differs, or L{None} when an
        earlier move is to be finished (L{resume}) or is running.
    @ivar resume: the queue has its new arguments; its holding queue still
        has messages.
    """

    def __init__(self, queue: QueueSpec, mismatch: Inequivalent | None = None, resume: bool = False) -> None:
        if mismatch is not None:
            reason = f"queue '{queue.name}' has other arguments ({mismatch.describe()})"
        elif resume:
            reason = f"queue '{queue.name}' has messages left in {holding_queue(queue).name}"
        else:
            reason = f"queue '{queue.name}' is being moved"
        super().__init__(reason)
        self.queue = queue
        self.mismatch = mismatch
        self.resume = resume


class QueueMover:
    """
    Moves msgmux's own queues on one broker, one move per queue at a time.

    @ivar broker: the broker's name, for logs and metrics.
    @ivar moves: completed moves by queue name.
    @ivar messages: messages kept by those moves, by queue name.
    @ivar lost: messages RabbitMQ took with a deleted queue, by queue name
        (only if they came in faster than the mover could take them).
    @ivar unreadable: messages dropped because msgmux could not read their
        properties (the relay would have refused them), by queue name.
    """

    _log = Logger()

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.moves: dict[str, int] = {}
        self.messages: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.unreadable: dict[str, int] = {}
        self._moving: dict[str, list[defer.Deferred[None]]] = {}
        self._retired_gone: set[str] = set()

    async def declare(self, channel: Channel, queue: QueueSpec) -> None:
        """
        Declare one of msgmux's own queues with its bindings, and delete its
        holding queue if it is there, empty and unused.

        @raise MoveNeeded: when the queue must be moved first (the channel
            is then gone, or unused when a move of it is running here).
        """
        if queue.name in self._moving:
            raise MoveNeeded(queue)
        try:
            await declare_queue(channel, queue)
        except Exception as e:
            mismatch = inequivalent(e)
            if mismatch is None:
                raise
            await channel.close_after_failure()
            raise MoveNeeded(queue, mismatch) from None
        try:
            await channel.delete_queue(holding_queue(queue).name, if_unused=True, if_empty=True)
        except Exception as e:
            refusal = broker_refusal(e)
            if refusal is None or refusal[0] != 406:
                raise
            await channel.close_after_failure()
            raise MoveNeeded(queue, resume=True) from None

    async def move(self, protocol: BrokerProtocol, needed: MoveNeeded) -> None:
        """
        Move C{needed.queue} to its new arguments, or wait for the move of
        it already running.

        @raise QueueInUse: when another process consumes the queue.
        @raise Exception: when the broker refuses a step (nothing is lost:
            the next attempt starts from where this one stopped).
        """
        queue = needed.queue
        waiting = self._moving.get(queue.name)
        if waiting is not None:
            done: defer.Deferred[None] = defer.Deferred()
            waiting.append(done)
            await done
            return
        self._moving[queue.name] = []
        try:
            await self._move(protocol, queue, needed.mismatch, needed.resume)
        finally:
            for waiter in self._moving.pop(queue.name):
                waiter.callback(None)

    async def _move(self, protocol: BrokerProtocol, queue: QueueSpec, mismatch: Inequivalent | None, resume: bool) -> None:
        holding = holding_queue(queue)
        channel = await protocol.open_channel()
        try:
            await channel.select_confirms()
            await channel.qos(MOVE_PREFETCH)
            first = DrainResult()
            if not resume:
                ready, consumers = await channel.queue_counts(queue.name)
                if consumers:
                    raise QueueInUse(queue.name, consumers)
                self._log.info(
                    "Moving queue {queue} on the {broker} broker to new arguments ({change}), {ready} messages in it;"
                    " new declaration: durable={durable}, arguments={arguments}",
                    queue=queue.name,
                    broker=self.broker,
                    change=mismatch.describe() if mismatch is not None else "unknown",
                    ready=ready,
                    durable=queue.durable,
                    arguments=dict(queue.arguments),
                )
                await declare_queue(channel, holding)
                for exchange, routing_key in queue.bindings:
                    await channel.bind_queue(holding.name, exchange, routing_key)
                for exchange, routing_key in queue.bindings:
                    await channel.unbind_queue(queue.name, exchange, routing_key)
                first = await self._drain(channel, queue.name, holding.name, protocol.clock)
            else:
                self._log.info(
                    "Finishing the move of queue {queue} on the {broker} broker: messages wait in {holding}",
                    queue=queue.name,
                    broker=self.broker,
                    holding=holding.name,
                )
            await declare_queue(channel, queue)
            for exchange, routing_key in queue.bindings:
                await channel.unbind_queue(holding.name, exchange, routing_key)
            second = await self._drain(channel, holding.name, queue.name, protocol.clock)
        except BaseException:
            await channel.close_after_failure()
            raise
        await channel.close()
        self._count(queue.name, second.moved, first.lost + second.lost, first.unreadable + second.unreadable)
        log = self._log.error if first.lost or second.lost else self._log.info
        log(
            "Moved queue {queue} on the {broker} broker to its new arguments: {moved} messages kept"
            " ({drained} drained from the old queue), {lost} lost, {unreadable} unreadable dropped",
            queue=queue.name,
            broker=self.broker,
            moved=second.moved,
            drained=first.moved,
            lost=first.lost + second.lost,
            unreadable=first.unreadable + second.unreadable,
        )

    async def _drain(self, channel: Channel, source: str, target: str, clock: IReactorTime) -> DrainResult:
        """Drain C{source} into C{target} through the target's funnel exchange, which goes afterwards."""
        via = funnel(target)
        await channel.declare_exchange(via.name, via.kind, via.durable, via.auto_delete)
        await channel.bind_queue(target, via.name, "")
        result = await drain(channel, source, via.name, clock)
        await channel.unbind_queue(target, via.name, "")
        return result

    def _count(self, queue: str, moved: int, lost: int, unreadable: int) -> None:
        self.moves[queue] = self.moves.get(queue, 0) + 1
        self.messages[queue] = self.messages.get(queue, 0) + moved
        if lost:
            self.lost[queue] = self.lost.get(queue, 0) + lost
        if unreadable:
            self.unreadable[queue] = self.unreadable.get(queue, 0) + unreadable

    async def release_exchange(
        self, protocol: BrokerProtocol, exchange: ExchangeSpec, queues: Iterable[QueueSpec]
    ) -> bool | None:
        """
        Let an auto-delete exchange that has other properties on the broker
        go, so that it can be declared anew: unbind msgmux's own queues
        (and their holding queues) from it, then declare it.

        @param queues: the queues the caller declares; the owned ones bound
            to C{exchange} are unbound.
        @return: L{True} when the exchange is now declared as C{exchange}
            says; L{False} when other queues keep it (msgmux's queues are
            then bound to it again, so that they go on receiving until it
            can go); L{None} when it is not auto-delete or no queue of
            msgmux's is bound to it.
        """
        ours = [(q, key) for q in queues if q.owned for name, key in q.bindings if name == exchange.name]
        if not exchange.auto_delete or not ours:
            return None
        channel = await protocol.open_channel()
        try:
            for queue, key in ours:
                await channel.unbind_queue(queue.name, exchange.name, key)
                await channel.unbind_queue(holding_queue(queue).name, exchange.name, key)
            try:
                await channel.declare_exchange(exchange.name, exchange.kind, exchange.durable, exchange.auto_delete)
            except Exception as e:
                if inequivalent(e) is None:
                    raise
                await channel.close_after_failure()
                channel = await protocol.open_channel()
                for queue, key in ours:
                    await channel.bind_queue(queue.name, exchange.name, key)
                await channel.close()
                return False
        except BaseException:
            await channel.close_after_failure()
            raise
        await channel.close()
        self._log.info(
            "Exchange {exchange} on the {broker} broker had other properties and no queue but msgmux's: declared anew",
            exchange=exchange.name,
            broker=self.broker,
        )
        return True

    async def retire(self, protocol: BrokerProtocol, queue: QueueSpec) -> bool:
        """
        Deal with a queue msgmux's options no longer use
        (L{QueueSpec.retired}): unbind it, so that it takes nothing more, and
        delete it once it is empty and unused (nothing can reach it then).

        @return: whether it still holds messages for the caller to consume
            and relay (it is deleted on a later call, once they are gone).
        """
        if queue.name in self._retired_gone:
            return False
        channel = await protocol.open_channel()
        try:
            ready, consumers = await channel.queue_counts(queue.name)
        except Exception as e:
            refusal = broker_refusal(e)
            await channel.close_after_failure()
            if refusal is not None and refusal[0] == 404:
                self._retired_gone.add(queue.name)
                return False
            raise
        try:
            for exchange, routing_key in queue.bindings:
                await channel.unbind_queue(queue.name, exchange, routing_key)
            if ready == 0 and consumers == 0:
                await channel.delete_queue(queue.name)
                self._retired_gone.add(queue.name)
        except BaseException:
            await channel.close_after_failure()
            raise
        await channel.close()
        if queue.name in self._retired_gone:
            self._log.info(
                "Deleted queue {queue} on the {broker} broker: the queue options no longer use it, and it was empty",
                queue=queue.name,
                broker=self.broker,
            )
            return False
        if consumers:
            return False  # another process (on the old options) still relays it
        self._log.info(
            "Relaying the {ready} messages left in queue {queue} on the {broker} broker, which the queue options no"
            " longer use; it is deleted once empty",
            ready=ready,
            queue=queue.name,
            broker=self.broker,
        )
        return True


_movers: weakref.WeakKeyDictionary[BrokerService, QueueMover] = weakref.WeakKeyDictionary()


def mover_for(broker: BrokerService) -> QueueMover:
    """
    @return: the mover of C{broker}'s queues.  There is one per broker
        service, because two things declare msgmux's own queues on it (the
        reply queue keeper and each session's channel) and must never move
        the same queue at once; and its counts are the broker's.
    """
    mover = _movers.get(broker)
    if mover is None:
        mover = _movers[broker] = QueueMover(str(broker.name))
    return mover
