# -*- test-case-name: tests.test_declared -*-
"""
A channel that keeps itself declared: open, set up, rebuilt after loss.

A relay needs one AMQP channel, with publisher confirms, its exchanges and
queues declared and its consumers started, for as long as its session
lasts, across broker reconnections and channel errors.  L{DeclaredChannel}
does that: it watches the broker connection, builds the channel from a
L{ChannelPlan} whenever there is a connection and no channel, and tries
again after L{REBUILD_DELAY} when building fails or the channel is lost.
Its user hears only that a channel is ready and that it was lost.

A declaration that differs from what the broker holds is handled by whom
it concerns.  msgmux's own queues (L{QueueSpec.owned}) are moved to their
new arguments (L{msgmux.amqp.migrate}) and the build goes on at once; an
auto-delete exchange that only msgmux's queues keep is let go and declared
anew; a queue msgmux's options no longer use (L{QueueSpec.retired}) is
consumed while it holds messages and deleted once empty.  What msgmux
shares with oslo services only the operator can change,
together with those services: the build fails with the operator's advice
(L{msgmux.amqp.mismatch.advice}: the queue or exchange, the property, the
oslo options behind it, what to do).

A build that keeps failing for the same reason is logged once, and again
when the reason changes or the channel finally comes up, instead of once a
second: once per episode.
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel, Delivery
from msgmux.amqp.migrate import MoveNeeded, QueueMover, declare_queue, mover_for
from msgmux.amqp.mismatch import DeclarationRefused, Inequivalent, advice, inequivalent
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.oslo.topology import ExchangeSpec, QueueSpec

__all__ = ["ChannelPlan", "ChannelUser", "Consumer", "DeclaredChannel", "REBUILD_DELAY", "declare_queue"]

#: Seconds between attempts to build a channel that failed or was lost.
REBUILD_DELAY = 1.0


@attrs.frozen
class Consumer:
    """
    One consumer to start on a built channel.

    @ivar arguments: C{basic.consume} arguments (e.g. a stream offset).
    """

    queue: str
    tag: str
    deliver: Callable[[Delivery], None]
    arguments: dict[str, object] = attrs.field(factory=dict)


class ChannelPlan(Protocol):
    """What to set up on each new channel."""

    def declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        """The exchanges and queues to declare, in order."""

    def consumers(self, channel: Channel) -> list[Consumer]:
        """
        The consumers to start, asked on every build (a stream consumer
        resumes where the previous channel left off).
        """


class ChannelUser(Protocol):
    """Who uses the channel."""

    def channel_ready(self, channel: Channel) -> None:
        """A channel is declared and consuming."""

    def channel_lost(self, channel: Channel, reason: Failure) -> None:
        """The ready channel is gone; the broker requeued its unacknowledged deliveries."""


class _ExchangeRefused(Exception):
    """The broker holds an exchange with other properties."""

    def __init__(self, exchange: ExchangeSpec, mismatch: Inequivalent) -> None:
        super().__init__(mismatch.text)
        self.exchange = exchange
        self.mismatch = mismatch


class DeclaredChannel:
    """
    One channel on one broker, with confirms, prefetch, declarations and
    consumers, kept up while started.

    @ivar channel: the ready channel, or L{None}.
    @ivar link_name: the link this channel is for (log lines name it).
    """

    _log = Logger()

    def __init__(self, broker: BrokerService, clock: IReactorTime, link_name: str, plan: ChannelPlan, user: ChannelUser) -> None:
        self.broker = broker
        self.clock = clock
        self.link_name = link_name
        self.plan = plan
        self.user = user
        self.channel: Channel | None = None
        # The channel the user was told is ready (a channel can be lost
        # while its consumers are being started, before that).
        self._announced: Channel | None = None
        self._wanted = False
        self._building = False
        self._rebuild: IDelayedCall | None = None
        self._failing: str | None = None

    # --- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Build a channel now if the broker is connected, and whenever it connects."""
        self._wanted = True
        self.broker.add_observer(self)  # calls broker_connected if connected

    def stop(self) -> None:
        """
        Close the channel (the broker requeues what was not acknowledged)
        and stop rebuilding.  The user hears no C{channel_lost}.
        """
        self._wanted = False
        self.broker.remove_observer(self)
        if self._rebuild is not None and self._rebuild.active():
            self._rebuild.cancel()
        self._rebuild = None
        channel, self.channel, self._announced = self.channel, None, None
        if channel is not None and channel.is_open:
            defer.Deferred.fromCoroutine(channel.close()).addErrback(lambda failure: None)

    async def cancel_consumers(self) -> None:
        """Stop consuming; deliveries already received stay valid."""
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        for tag in channel.consumer_tags():
            try:
                await channel.cancel(tag)
            except Exception:
                return  # the channel went: nothing more will be delivered on it

    # --- broker observer ---------------------------------------------------

    def broker_connected(self, protocol: BrokerProtocol) -> None:
        self._maybe_build()

    def broker_lost(self, reason: Failure) -> None:
        """The channel's own loss notification does the work."""

    # --- building -----------------------------------------------------------

    def _maybe_build(self) -> None:
        protocol = self.broker.protocol
        if self._wanted and self.channel is None and not self._building and protocol is not None:
            self._building = True
            defer.Deferred.fromCoroutine(self._build(protocol)).addBoth(self._built)

    def _built(self, result: object) -> None:
        self._building = False
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            if reason != self._failing:
                self._failing = reason
                self._log.error(
                    "Link {link}: could not set up the {broker} broker channel: {error}; retrying every {delay}s",
                    link=self.link_name,
                    broker=self.broker.name,
                    error=reason,
                    delay=REBUILD_DELAY,
                )
            self._schedule_rebuild()

    def _schedule_rebuild(self) -> None:
        if self._wanted and (self._rebuild is None or not self._rebuild.active()):
            self._rebuild = self.clock.callLater(REBUILD_DELAY, self._maybe_build)

    async def _build(self, protocol: BrokerProtocol) -> None:
        exchanges, queues = self.plan.declarations()
        mover = mover_for(self.broker)
        handled: set[str] = set()  # each queue is moved, each exchange let go, at most once per build
        while True:
            try:
                await self._build_once(protocol, exchanges, queues, mover)
                return
            except MoveNeeded as needed:
                if needed.queue.name in handled:
                    raise
                handled.add(needed.queue.name)
                await mover.move(protocol, needed)
            except _ExchangeRefused as refused:
                exchange = refused.exchange
                released = None if exchange.name in handled else await mover.release_exchange(protocol, exchange, queues)
                if not released:
                    held = released is False
                    raise DeclarationRefused(advice(refused.mismatch, exchange, str(self.broker.name), held=held)) from None
                handled.add(exchange.name)

    async def _build_once(
        self, protocol: BrokerProtocol, exchanges: list[ExchangeSpec], queues: list[QueueSpec], mover: QueueMover
    ) -> None:
        channel = await protocol.open_channel()
        try:
            await channel.select_confirms()
            await channel.qos(self.broker.config.prefetch)
            declared: set[str] = set()
            for exchange in exchanges:
                if exchange.name not in declared:
                    declared.add(exchange.name)
                    try:
                        await channel.declare_exchange(exchange.name, exchange.kind, exchange.durable, exchange.auto_delete)
                    except Exception as e:
                        mismatch = inequivalent(e)
                        if mismatch is None:
                            raise
                        raise _ExchangeRefused(exchange, mismatch) from None
            unused: set[str] = set()
            for queue in queues:
                if queue.retired:
                    if not await mover.retire(protocol, queue):
                        unused.add(queue.name)
                    continue
                if queue.owned:
                    await mover.declare(channel, queue)
                    continue
                try:
                    await declare_queue(channel, queue)
                except Exception as e:
                    mismatch = inequivalent(e)
                    if mismatch is None:
                        raise
                    raise DeclarationRefused(advice(mismatch, queue, str(self.broker.name))) from None
            if not self._wanted:
                await channel.close()
                return
            channel.lost_observers.append(lambda reason: self._lost(channel, reason))
            channel.cancel_observers.append(lambda tag: self._consumer_cancelled(channel, tag))
            self.channel = channel
            consumers = [consumer for consumer in self.plan.consumers(channel) if consumer.queue not in unused]
            for consumer in consumers:
                await channel.consume(consumer.queue, consumer.tag, consumer.deliver, consumer.arguments)
        except BaseException:
            await channel.close_after_failure()
            raise
        recovered = self._failing is not None
        self._failing = None
        self._log.info(
            "Link {link}: {broker} broker channel ready ({count} queues consumed){recovered}",
            link=self.link_name,
            broker=self.broker.name,
            count=len(consumers),
            recovered=" after failures" if recovered else "",
        )
        self._announced = channel
        self.user.channel_ready(channel)

    def _consumer_cancelled(self, channel: Channel, tag: str) -> None:
        """
        The broker cancelled a consumer (its queue was deleted, or a quorum
        queue's leader moved): start over on a new channel.
        """
        self._log.warn("Link {link}: the broker cancelled consumer {tag}; rebuilding", link=self.link_name, tag=tag)
        if channel.is_open:
            defer.Deferred.fromCoroutine(channel.close()).addErrback(lambda failure: None)

    def _lost(self, channel: Channel, reason: Failure) -> None:
        if self.channel is not channel:
            return
        self.channel = None
        if self._announced is not channel:
            return  # lost while its consumers started: the build fails and reports it
        self._announced = None
        if self._wanted:
            self._log.warn(
                "Link {link}: {broker} broker channel closed ({reason})",
                link=self.link_name,
                broker=self.broker.name,
                reason=reason.getErrorMessage(),
            )
            self._schedule_rebuild()
        self.user.channel_lost(channel, reason)
