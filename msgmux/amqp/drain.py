# -*- test-case-name: tests.test_migrate -*-
"""
Moving every message of one queue into another, then deleting the first.

L{drain} consumes the source queue and publishes each message as it was
delivered (properties, body and routing key, which tells a notification's
priority) to an exchange that routes to the target only, mandatory, with
publisher confirms; a delivery is acknowledged once its copy is confirmed.  Until the source is deleted, a failure leaves
every message in the source or the target (the few in flight in both:
duplicates, not loss), because the broker requeues what was not
acknowledged when the channel closes.

The source is deleted while msgmux's consumer still holds what the broker
delivered last.  RabbitMQ deletes the unacknowledged messages with the
queue, but their content is already here and is published all the same; the
broker's delete-ok counts the messages that were still waiting, which is
none unless they arrived faster than the prefetch window lets them out (it
is reported, never hidden).  C{queue.delete} with if-empty would leave no
such window, but RabbitMQ 3.10 answers it for a quorum queue with 540
NOT_IMPLEMENTED, a connection error.  No other consumer may share the
source: L{drain} gives up with L{QueueInUse} when there is one.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from msgmux.amqp.channel import Channel, Delivery, Unpublishable

__all__ = ["CANCEL_WAIT", "MOVE_PREFETCH", "DrainResult", "QueueInUse", "drain"]

#: The prefetch of a moving channel: what may be in flight at once.
MOVE_PREFETCH = 500

#: Seconds between looks at a source that still has messages waiting.
POLL = 0.05

#: Seconds to wait for RabbitMQ's basic.cancel of the consumer of a deleted
#: queue (it follows the delete-ok), after which no delivery can come.
CANCEL_WAIT = 5.0


class QueueInUse(Exception):
    """
    A queue to move has consumers other than msgmux's mover: another
    process (a msgmux half still on the old options) uses it.
    """

    def __init__(self, queue: str, consumers: int) -> None:
        super().__init__(
            f"queue '{queue}' has {consumers} other consumer(s), another msgmux process on the old options?;"
            " it is moved once they are gone"
        )
        self.queue = queue
        self.consumers = consumers


@attrs.frozen
class DrainResult:
    """
    @ivar moved: messages now in the target.
    @ivar unreadable: messages whose properties msgmux could not read or
        write again, dropped (as the relay would refuse them).
    @ivar lost: messages the deletion of the source took with it, or whose
        copy the broker did not confirm once the source was gone.
    """

    moved: int = 0
    unreadable: int = 0
    lost: int = 0


class _Mover:
    """The consumer of the source: publishes each delivery to the target, acknowledges it once confirmed."""

    def __init__(self, channel: Channel, tag: str, via: str) -> None:
        self.channel = channel
        self.tag = tag
        self.via = via
        self.moved = 0
        self.unreadable = 0
        self.lost = 0
        self.outstanding = 0
        self.error: Exception | None = None
        self.source_deleted = False
        self.cancelled: defer.Deferred[None] = defer.Deferred()
        self._idle: list[defer.Deferred[None]] = []

    def delivered(self, delivery: Delivery) -> None:
        if self.error is not None:
            return  # the channel is about to close and hand it back to the source
        if delivery.error is not None:
            self._unreadable(delivery)
            return
        try:
            confirmed = self.channel.publish(self.via, delivery.routing_key, delivery.properties, delivery.body, mandatory=True)
        except Unpublishable:
            self._unreadable(delivery)
            return
        self.outstanding += 1
        confirmed.addCallbacks(self._confirmed, self._failed, callbackArgs=(delivery,))

    def consumer_cancelled(self, tag: str) -> None:
        if tag == self.tag and not self.cancelled.called:
            self.cancelled.callback(None)

    def _unreadable(self, delivery: Delivery) -> None:
        delivery.reject(requeue=False)
        self.unreadable += 1

    def _confirmed(self, result: object, delivery: Delivery) -> None:
        delivery.ack()
        self.moved += 1
        self._settled()

    def _failed(self, failure: Any) -> None:
        if self.source_deleted:
            self.lost += 1  # its only copy was here
        elif self.error is None:
            self.error = failure.value
        self._settled()

    def _settled(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 or self.error is not None:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    async def idle(self) -> None:
        """Wait until every delivery so far is settled; raise what failed."""
        if self.outstanding and self.error is None:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._idle.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error


async def drain(channel: Channel, source: str, via: str, clock: IReactorTime) -> DrainResult:
    """
    Move everything in C{source} to the target queue and delete C{source}.

    @param channel: a channel in confirm mode with a prefetch, used by
        nothing else meanwhile.
    @param via: an exchange that routes every message to the target and
        nowhere else, whatever its routing key (a fanout exchange bound to
        it alone).
    @raise QueueInUse: when the source has another consumer.
    @raise Exception: when the broker refuses something; what was not moved
        is still in the source.
    """
    mover = _Mover(channel, f"msgmux-move-{source}"[:255], via)
    channel.cancel_observers.append(mover.consumer_cancelled)
    await channel.consume(source, mover.tag, mover.delivered)
    while True:
        await mover.idle()
        ready, consumers = await channel.queue_counts(source)
        if consumers > 1:
            raise QueueInUse(source, consumers - 1)
        if ready == 0:
            break
        await deferLater(clock, POLL)
    mover.source_deleted = True
    left = await channel.delete_queue(source)
    cancelled = mover.cancelled
    cancelled.addTimeout(CANCEL_WAIT, clock)
    try:
        await cancelled
    except defer.TimeoutError:
        pass
    await mover.idle()
    return DrainResult(mover.moved, mover.unreadable, left + mover.lost)
