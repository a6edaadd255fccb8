# -*- test-case-name: tests.test_relay -*-
"""
The message flow of one link session: broker channel <-> link, at least once.

A L{Relay} lives as long as one link session.  It owns one
L{DeclaredChannel} on its half's broker and moves messages both ways:

 - I{outbound}: deliveries from the queues its policy consumes go to the
   peer as MSG frames when the link has credit (replies and call-monitor
   heartbeats first: a caller gives up when they are late, a cast only
   waits).  A delivery is acked on the broker only when the peer ACKs it
   (its broker confirmed the publish), and rejected when the peer refuses
   it;
 - I{inbound}: each MSG the peer sends goes to the L{Publisher}, and is
   ACKed on the link once the broker confirmed it, which also returns its
   credit.  A copy of a message still in flight (the peer's broker
   redelivered it) waits for it in L{WaitingCopies} and ends as it does.

What each message becomes is the L{RelayPolicy}'s business; how fast the
peer may send is the L{CreditPacer}'s.  Closing the channel (session over,
broker gone) makes the broker requeue whatever was not acknowledged, so a
failure anywhere means redelivery, not loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel, Delivery
from msgmux.amqp.declared import Consumer, DeclaredChannel
from msgmux.copies import WaitingCopies
from msgmux.link.interfaces import LinkConnection, MessageTooLarge
from msgmux.message import Message, kind_of
from msgmux.oslo.topology import ExchangeSpec, QueueSpec
from msgmux.outbox import Outbox
from msgmux.pacing import CreditPacer
from msgmux.policy import REJECT_REASONS, Copy, Refusal, RelayPolicy
from msgmux.publisher import Pending, Publisher
from msgmux.routing import Source
from msgmux.stats import LinkStats
from msgmux.stream_offsets import StreamPosition, StreamReader

__all__ = ["Relay"]


class Relay:
    """
    Moves messages between one link session and one broker channel.

    @ivar ended: whether the session is over; an ended relay does nothing.
    """

    _log = Logger()

    def __init__(
        self,
        connection: LinkConnection,
        policy: RelayPolicy,
        broker: BrokerService,
        credit: CreditPacer,
        window: tuple[int, int],
        clock: IReactorTime,
        stats: LinkStats,
        streams: dict[str, StreamPosition],
        ended: Callable[[Relay], None] = lambda relay: None,
    ) -> None:
        """
        @param window: the messages and body bytes the peer may send before
            anything is settled, granted once the first channel is ready.
        @param streams: where to resume each stream queue, kept by the half
            across sessions.
        @param ended: told when the session ended.
        """
        self.connection = connection
        self.policy = policy
        self.credit = credit
        self.clock = clock
        self.stats = stats
        self.ended = False
        self._window: tuple[int, int] | None = window
        self._on_ended = ended
        self._streams = streams
        self._sources: list[Source] = []
        self._waiting = Outbox()
        self.declared = DeclaredChannel(broker, clock, stats.link_name, plan=self, user=self)
        self.publisher = Publisher(clock, stats, policy.direction_in, broker.name, self._published, self._refused)
        self._copies = WaitingCopies()
        self._relayed = {
            (direction, kind): LinkStats.key("relayed", direction=direction, kind=kind)
            for direction in (policy.direction_in, policy.direction_out)
            for kind in ("rpc", "notification", "reply", "canary")
        }

    # --- the session (what the link connection calls) -------------------------

    def session_started(self, connection: LinkConnection) -> None:
        self.stats.gauges["link_up"] = 1
        self.declared.start()

    def session_ended(self, reason: str) -> None:
        self.ended = True
        self.stats.gauges["link_up"] = 0
        self.credit.stop()
        self.declared.stop()  # the broker requeues every delivery the peer did not settle
        self.publisher.stop()
        self._copies.clear()
        self._waiting.clear()
        self._on_ended(self)

    async def drain(self, timeout: float) -> None:
        """
        Stop consuming and give what is in flight up to C{timeout} seconds
        to settle, then close the session: a clean stop causes as few
        redeliveries as possible.
        """
        await self.declared.cancel_consumers()
        give_up = self.clock.seconds() + timeout
        while not self.ended and (self.publisher.busy or self.connection.unacknowledged):
            if self.clock.seconds() >= give_up:
                break
            await deferLater(self.clock, 0.05)
        self.connection.close("shutdown", "msgmux is stopping")

    # --- the channel (what DeclaredChannel calls) -----------------------------

    def declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        exchanges, queues = self.policy.publish_declarations()
        self._sources = self.policy.sources()
        exchanges = exchanges + [exchange for source in self._sources for exchange in source.exchanges]
        return exchanges, queues + [source.queue for source in self._sources]

    def consumers(self, channel: Channel) -> list[Consumer]:
        reader = StreamReader(self._streams)  # where streams resume, and settlement back to it
        channel.settle_observer = reader.settled
        return [
            reader.consumer(source.queue, f"msgmux-{self.stats.link_name}-{index}", functools.partial(self._delivered, source))
            for index, source in enumerate(self._sources)
        ]

    def channel_ready(self, channel: Channel) -> None:
        if self._window is not None:
            messages, body_bytes = self._window
            self._window = None
            self.credit.settled(messages, body_bytes)
        self.publisher.channel_ready(channel)

    def channel_lost(self, channel: Channel, reason: Failure) -> None:
        # Deliveries of the dead channel are void: the broker requeued them.
        self._waiting.clear()
        self.publisher.channel_lost(channel)

    def publish_now(self, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes) -> bool:
        """
        Publish a message of msgmux's own (a canary), without confirms.

        @return: whether there was a channel to publish it on.
        """
        channel = self.declared.channel
        if self.ended or channel is None:
            return False
        channel.publish_then(exchange, routing_key, properties, body, False, _ignore_outcome, None)
        return True

    # --- outbound: broker -> link -------------------------------------------

    def _delivered(self, source: Source, delivery: Delivery) -> None:
        if self.ended or not self.connection.established:
            # The session is closing and its channel will close with it,
            # which hands this delivery back to the broker: settling it here
            # would lose it (or, for a stream, move the resume point past it).
            return
        direction = self.policy.direction_out
        if delivery.error is not None:
            delivery.reject(requeue=False)
            self.stats.reject(direction, "malformed", delivery.error, queue=source.queue.name)
            return
        try:
            message = self.policy.outbound(source, delivery)
        except Refusal as refusal:
            delivery.reject(requeue=False)
            self.stats.reject(direction, refusal.reason, refusal.detail)
            return
        if message is None:
            delivery.ack()
        elif self._waiting or not self.connection.can_send(message):
            self._waiting.add(message, delivery)
            self.credit_received()  # sends what it can, replies first
        else:
            self._send(message, delivery)

    def _send(self, message: Message, delivery: Delivery) -> None:
        if message.deadline is not None and self.clock.seconds() >= message.deadline:
            delivery.ack()
            self.stats.count("expired", direction=self.policy.direction_out)
            return
        try:
            self.connection.send_message(message, (delivery, kind_of(message.address)))
        except MessageTooLarge as e:
            delivery.reject(requeue=False)
            self.stats.reject(self.policy.direction_out, "too-large", str(e))

    def credit_received(self) -> None:
        for message, delivery in self._waiting.ready(self.connection.can_send):
            if delivery.channel.is_open:
                self._send(message, delivery)

    def messages_acknowledged(self, tokens: list[tuple[Delivery, str]]) -> None:
        by_channel: dict[Channel, list[int]] = {}
        kinds: dict[str, int] = {}
        for delivery, kind in tokens:
            by_channel.setdefault(delivery.channel, []).append(delivery.delivery_tag)
            kinds[kind] = kinds.get(kind, 0) + 1
        for channel, tags in by_channel.items():
            channel.ack_many(tags)
        counts = self.stats.counts
        for kind, count in kinds.items():
            counts[self._relayed[(self.policy.direction_out, kind)]] += count

    def message_refused(self, token: tuple[Delivery, str], reason: str) -> None:
        token[0].reject(requeue=False)
        reason = reason if reason in REJECT_REASONS else "other"
        self.stats.count("refused_by_peer", direction=self.policy.direction_out, reason=reason)

    # --- inbound: link -> broker ----------------------------------------------

    def message_received(self, seq: int, message: Message) -> None:
        try:
            publication = self.policy.inbound(message)
        except Refusal as refusal:
            self._refuse(seq, len(message.body), refusal.reason, refusal.detail)
            return
        except Copy as copy:
            # The policy and the copies are of this session and learn of
            # every original together (below, and in _published/_refused),
            # so an original is always found; the refusal is for a bug.
            if not self._copies.wait(copy.identity, seq, len(message.body)):
                self._log.error("Link {link}: a copy of a message not in flight; refusing it", link=self.stats.link_name)
                self._refuse(seq, len(message.body), "internal", "copy of a message not in flight")
            return
        except Exception:
            # A bug of ours, or input nobody foresaw: this message is
            # refused, the session and every other message carry on.
            self._log.failure("Link {link}: could not handle a message from the peer; refusing it", link=self.stats.link_name)
            self._refuse(seq, len(message.body), "internal", "unexpected error (logged)")
            return
        if publication is None:
            self._settle(seq, len(message.body))
            return
        pending = Pending(seq, publication, kind_of(message.address), len(message.body))
        self._copies.original(pending)
        self.publisher.submit(pending)

    def _published(self, pending: Pending, confirmed: bool) -> None:
        if self.ended:
            return
        if confirmed:
            self.stats.counts[self._relayed[(self.policy.direction_in, pending.kind)]] += 1
            self.policy.published(pending.publication)
        else:
            self.policy.publish_failed(pending.publication)
        self._settle(pending.seq, pending.body_bytes)
        for seq, body_bytes in self._copies.done(pending):
            self.stats.count("duplicates_dropped", direction=self.policy.direction_in)
            self._settle(seq, body_bytes)

    def _refused(self, pending: Pending, reason: str, detail: str) -> None:
        if not self.ended:
            self.policy.publish_failed(pending.publication)
            for seq, body_bytes in [(pending.seq, pending.body_bytes), *self._copies.done(pending)]:
                self._refuse(seq, body_bytes, reason, detail)

    def _refuse(self, seq: int, body_bytes: int, reason: str, detail: str) -> None:
        self.connection.refuse(seq, reason)
        self.stats.reject(self.policy.direction_in, reason, detail)
        self.credit.settled(1, body_bytes)

    def _settle(self, seq: int, body_bytes: int) -> None:
        if not self.ended:
            self.connection.acknowledge(seq)
            self.credit.settled(1, body_bytes)


def _ignore_outcome(argument: object, error: Exception | None) -> None:
    """A canary lost on the way is what the health check is for."""
