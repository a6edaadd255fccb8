# -*- test-case-name: tests.integration.test_rpc -*-
"""
The relay engine shared by both halves: one link session, one broker channel.

A L{Relay} lives as long as one link session.  While both the session and
its broker connection are up it owns one AMQP channel (publisher confirms on)
through which it:

 - consumes the queues of its half's I{outbound} routes and sends each
   delivery as a MSG frame when it has link credit; the delivery is acked on
   the broker only when the peer ACKs (that is, when the peer's broker
   confirmed it), and rejected without requeue when the peer REJECTs it;
 - publishes each MSG frame the peer sends, and ACKs it on the link when the
   broker confirms, returning one credit.  MSG frames that arrive while the
   channel is down wait (bounded by the credit this side granted) and are
   published when it is back.

Closing the channel (session over, broker gone) makes the broker requeue
whatever was not acknowledged, so a failure anywhere means redelivery, not
loss.  The halves plug their policy into L{Relay.outbound} and
L{Relay.inbound}.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp import wire
from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel, ChannelLost, Delivery, PublishReturned
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.link.codec import Address, CanaryAddress, Message, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.link.protocol import LinkProtocol, MessageTooLarge
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.routing import Destination, Source, destination
from msgmux.stats import LinkStats
from msgmux.streams import OFFSET_HEADER, StreamPosition

#: Seconds between attempts to rebuild a channel that failed.
REBUILD_DELAY = 1.0

#: Seconds before re-publishing a message the broker refused (nack).
REPUBLISH_DELAY = 1.0

#: Seconds between attempts to deliver a returned reply, and for how long at
#: most: oslo's own server waits 0.25 s between attempts, for 60 s
#: (missing_destination_retry_timeout).
RETURN_RETRY_DELAY = 0.25
RETURN_RETRY_LIMIT = 60.0

#: The REJECT reasons of docs/protocol.md.  A peer's reason outside this set
#: is counted as "other", so that it cannot mint metric series at will.
REJECT_REASONS = frozenset(
    ("route", "method", "too-large", "malformed", "inflight", "unsolicited-reply", "late-reply", "undeliverable", "internal")
)


class Refusal(Exception):
    """A message the policy refuses, with the reason code sent in REJECT."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@attrs.frozen
class Publication:
    """
    What to publish for one inbound message.

    @ivar deadline: Unix time after which the message is dropped rather than
        published; its remaining time becomes the AMQP C{expiration}.
    @ivar retry_until: for a mandatory publish (a reply), Unix time until
        which a publish the broker returns is tried again, as oslo's server
        retries a reply whose queue is missing; after it, the message is
        dropped and counted as undeliverable.
    @ivar unique_id: the oslo C{_unique_id}, where the half read it; handed
        to L{Relay.published} once the broker confirmed the publish.
    @ivar answers: for a call's final reply, the call's reply token; handed
        to L{Relay.published} likewise.
    """

    destination: Destination
    properties: dict[str, Any]
    body: bytes
    deadline: float | None = None
    retry_until: float | None = None
    unique_id: str | None = None
    answers: str | None = None


def kind_of(address: Address) -> str:
    """The C{kind} label of a message's counters."""
    if isinstance(address, RpcAddress):
        return "rpc"
    if isinstance(address, NotificationAddress):
        return "notification"
    if isinstance(address, CanaryAddress):
        return "canary"
    return "reply"


class _Inbound:
    __slots__ = ("seq", "publication", "kind")

    def __init__(self, seq: int, publication: Publication, kind: str) -> None:
        self.seq = seq
        self.publication = publication
        self.kind = kind


class Relay:
    """
    Moves messages between one link session and one broker, at least once.

    @ivar direction_out: label of messages this half sends on the link
        (C{"down"} for the control half, C{"up"} for the tenant half).
    @ivar direction_in: label of messages it receives.
    """

    _log = Logger()
    direction_out = "out"
    direction_in = "in"

    def __init__(
        self,
        link: LinkProtocol,
        broker: BrokerService,
        clock: IReactorTime,
        window: int,
        stats: LinkStats,
        streams: dict[str, StreamPosition] | None = None,
    ) -> None:
        """
        @param streams: where to resume each stream queue this half consumes,
            kept by the half across sessions.
        """
        self.link = link
        self.broker = broker
        self.clock = clock
        self.window = window
        self.stats = stats
        self.channel: Channel | None = None
        self.active = True
        self._building = False
        self._granted = False
        self._rebuild_call: Any = None
        # Deliveries waiting for link credit.  Replies (and call-monitor
        # heartbeats) have their own line and go first: a caller gives up
        # when they are late, a cast behind them only waits.
        self._waiting: collections.deque[tuple[Message, Delivery]] = collections.deque()
        self._waiting_replies: collections.deque[tuple[Message, Delivery]] = collections.deque()
        self._unpublished: collections.deque[_Inbound] = collections.deque()
        self._unconfirmed: dict[int, _Inbound] = {}
        self._destinations: dict[Any, Destination] = {}
        self._streams = streams if streams is not None else {}
        # Delivery tag -> (position, offset) for stream deliveries of the
        # current channel.
        self._stream_tags: dict[int, tuple[StreamPosition, int]] = {}
        self._relayed_keys = {
            (direction, kind): LinkStats.key("relayed", direction=direction, kind=kind)
            for direction in (self.direction_in, self.direction_out)
            for kind in ("rpc", "notification", "reply", "canary")
        }

    # --- what the halves provide ------------------------------------------

    def sources(self) -> list[Source]:
        """The queues this half consumes."""
        raise NotImplementedError

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        """The exchanges and queues this half declares before publishing."""
        raise NotImplementedError

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        """
        Turn a delivery into a link message, or settle it and return L{None}.
        """
        raise NotImplementedError

    def inbound(self, message: Message) -> Publication | None:
        """
        Decide what to publish for a peer's message.

        @return: the publication, or L{None} when the message ends here
            (it is acknowledged at once).
        @raise Refusal: to refuse it for good.
        """
        raise NotImplementedError

    def topology(self) -> OsloTopology:
        """oslo's declarations on this half's broker."""
        raise NotImplementedError

    def _destination(self, address: Address) -> Destination:
        """Where C{address} goes on this half's broker (computed once per address)."""
        target = self._destinations.get(address)
        if target is None:
            target = self._destinations[address] = destination(address, self.topology())
        return target

    def return_credit(self, count: int) -> None:
        """Let the peer send C{count} more messages (the control half rate-limits)."""
        self.link.grant(count)

    def published(self, publication: Publication) -> None:
        """The broker confirmed C{publication}, which carries a C{unique_id} or C{answers}."""

    # --- session and broker lifecycle ---------------------------------------

    def session_started(self, link: LinkProtocol) -> None:
        self.broker.add_observer(self)
        self.stats.gauges["link_up"] = 1
        self._maybe_build()

    def session_ended(self, reason: str) -> None:
        self.active = False
        self.stats.gauges["link_up"] = 0
        self.broker.remove_observer(self)
        if self._rebuild_call is not None and self._rebuild_call.active():
            self._rebuild_call.cancel()
        self._waiting.clear()
        self._waiting_replies.clear()
        self._unpublished.clear()
        self._unconfirmed.clear()
        channel, self.channel = self.channel, None
        if channel is not None and channel.is_open:
            # Requeues every delivery the peer did not acknowledge.
            defer.Deferred.fromCoroutine(channel.close()).addErrback(lambda f: None)

    def broker_connected(self, protocol: BrokerProtocol) -> None:
        self._maybe_build()

    def broker_lost(self, reason: Failure) -> None:
        # The channel's own lost notification does the work.
        pass

    def _maybe_build(self) -> None:
        if self.active and self.channel is None and not self._building and self.broker.protocol is not None:
            self._building = True
            defer.Deferred.fromCoroutine(self._build(self.broker.protocol)).addBoth(self._built)

    def _built(self, result: object) -> None:
        self._building = False
        if isinstance(result, Failure):
            self._log.error(
                "Link {link}: could not set up the {broker} broker channel: {error}; retrying in {delay}s",
                link=self.stats.link,
                broker=self.broker.name,
                error=result.getErrorMessage(),
                delay=REBUILD_DELAY,
            )
            self._schedule_rebuild()

    def _schedule_rebuild(self) -> None:
        if self.active and (self._rebuild_call is None or not self._rebuild_call.active()):
            self._rebuild_call = self.clock.callLater(REBUILD_DELAY, self._maybe_build)

    async def _build(self, protocol: BrokerProtocol) -> None:
        channel = await protocol.open_channel()
        try:
            await channel.select_confirms()
            await channel.qos(self.broker.config.prefetch)
            exchanges, queues = self.publish_declarations()
            sources = self.sources()
            declared: set[str] = set()
            for exchange in exchanges + [e for s in sources for e in s.exchanges]:
                if exchange.name not in declared:
                    declared.add(exchange.name)
                    await channel.declare_exchange(exchange.name, exchange.kind, exchange.durable, exchange.auto_delete)
            for queue in queues + [s.queue for s in sources]:
                await declare_queue(channel, queue)
            if not self.active:
                await channel.close()
                return
            channel.lost_observers.append(lambda reason: self._channel_lost(channel, reason))
            channel.cancel_observers.append(lambda tag: self._consumer_cancelled(channel, tag))
            channel.return_observers.append(self._returned)
            self.channel = channel
            for index, source in enumerate(sources):
                tag = f"msgmux-{self.stats.link}-{index}"
                arguments = dict(source.queue.consume_arguments)
                deliver: Callable[[Delivery], None] = functools.partial(self._delivered, source)
                if OFFSET_HEADER in arguments:
                    position = self._streams.setdefault(source.queue.name, StreamPosition())
                    arguments[OFFSET_HEADER] = position.resume()
                    channel.settle_observer = self._stream_settled
                    deliver = functools.partial(self._stream_delivered, source, position)
                await channel.consume(source.queue.name, tag, deliver, arguments)
        except BaseException:
            if channel.is_open:
                await channel.close()
            raise
        self._log.info(
            "Link {link}: {broker} broker channel ready ({count} queues consumed)",
            link=self.stats.link,
            broker=self.broker.name,
            count=len(sources),
        )
        while self._unpublished and self.channel is channel:
            self._publish(self._unpublished.popleft())
        if not self._granted:
            self._granted = True
            self.return_credit(self.window)

    def _channel_lost(self, channel: Channel, reason: Failure) -> None:
        if self.channel is not channel:
            return
        self.channel = None
        self._stream_tags.clear()  # their positions resume at the first unsettled offset
        # Deliveries of the dead channel are void: the broker requeued them.
        self._waiting.clear()
        self._waiting_replies.clear()
        # Publishes without a confirm may or may not have happened: publish
        # them again (duplicates are possible, loss is not).
        retry = sorted(self._unconfirmed.values(), key=lambda entry: entry.seq)
        self._unconfirmed.clear()
        self._unpublished.extendleft(reversed(retry))
        if self.active:
            self._log.warn(
                "Link {link}: {broker} broker channel closed ({reason})",
                link=self.stats.link,
                broker=self.broker.name,
                reason=reason.getErrorMessage(),
            )
            self._schedule_rebuild()

    def _consumer_cancelled(self, channel: Channel, tag: str) -> None:
        self._log.warn("Link {link}: the broker cancelled consumer {tag}; rebuilding", link=self.stats.link, tag=tag)
        if channel.is_open:
            defer.Deferred.fromCoroutine(channel.close()).addErrback(lambda f: None)

    def _returned(self, code: int, text: str, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes) -> None:
        self.stats.count("returned", direction=self.direction_in)
        self._log.info(
            "Link {link}: broker returned a message for {exchange!r}/{key!r}: {code} {text}",
            link=self.stats.link,
            exchange=exchange,
            key=routing_key,
            code=code,
            text=text,
        )

    async def drain(self, timeout: float) -> None:
        """
        Stop taking new work and give what is in flight up to C{timeout}
        seconds to settle, then close the session.  Used at shutdown, so that
        a clean stop causes as few redeliveries as possible.
        """
        channel = self.channel
        if channel is not None and channel.is_open:
            for tag in channel.consumer_tags():
                try:
                    await channel.cancel(tag)
                except Exception:
                    break
        give_up = self.clock.seconds() + timeout
        while self.active and (self._unconfirmed or self._unpublished or self.link.unacknowledged):
            if self.clock.seconds() >= give_up:
                break
            await deferLater(self.clock, 0.05)
        self.link.close("shutdown", "msgmux is stopping")

    # --- outbound: broker -> link -----------------------------------------

    def _stream_delivered(self, source: Source, position: StreamPosition, delivery: Delivery) -> None:
        """A delivery from a stream: note its offset, and do not pass RabbitMQ's offset header on."""
        headers = delivery.properties.get("headers")
        offset = headers.pop(OFFSET_HEADER, None) if headers else None
        if type(offset) is int:
            position.delivered(offset)
            self._stream_tags[delivery.delivery_tag] = (position, offset)
        self._delivered(source, delivery)

    def _stream_settled(self, tag: int) -> None:
        entry = self._stream_tags.pop(tag, None)
        if entry is not None:
            entry[0].settled(entry[1])

    def _delivered(self, source: Source, delivery: Delivery) -> None:
        if not self.active or not self.link.established:
            # The session is closing and its channel will close with it,
            # which hands this delivery back to the broker: settling it here
            # would lose it (or, for a stream, move the resume point past it).
            return
        if delivery.error is not None:
            delivery.reject(requeue=False)
            self.stats.reject(self.direction_out, "malformed", delivery.error, queue=source.queue.name)
            return
        message = self.outbound(source, delivery)
        if message is None:
            return
        if self.link.send_credit <= 0 or self._waiting_replies or self._waiting:
            if type(message.address) is ReplyAddress:
                self._waiting_replies.append((message, delivery))
            else:
                self._waiting.append((message, delivery))
            self.credit_received()  # sends what it can, replies first
        else:
            self._send(message, delivery)

    def _send(self, message: Message, delivery: Delivery) -> None:
        if message.deadline is not None and self.clock.seconds() >= message.deadline:
            delivery.ack()
            self.stats.count("expired", direction=self.direction_out)
            return
        try:
            self.link.send_message(message, (delivery, kind_of(message.address)))
        except MessageTooLarge as e:
            delivery.reject(requeue=False)
            self.stats.reject(self.direction_out, "too-large", str(e))

    def credit_received(self) -> None:
        for waiting in (self._waiting_replies, self._waiting):
            while waiting and self.link.send_credit > 0:
                message, delivery = waiting.popleft()
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
            counts[self._relayed_keys[(self.direction_out, kind)]] += count

    def message_refused(self, token: tuple[Delivery, str], reason: str) -> None:
        delivery = token[0]
        delivery.reject(requeue=False)
        self.stats.count("refused_by_peer", direction=self.direction_out, reason=reason if reason in REJECT_REASONS else "other")

    # --- inbound: link -> broker ------------------------------------------

    def message_received(self, message: Message) -> None:
        try:
            publication = self.inbound(message)
        except Refusal as refusal:
            self.link.refuse(message.seq, refusal.reason)
            self.stats.reject(self.direction_in, refusal.reason, refusal.detail)
            self.return_credit(1)
            return
        except Exception:
            # A bug of ours, or input nobody foresaw: this message is
            # refused, the session and every other message carry on.
            self._log.failure("Link {link}: could not handle a message from the peer; refusing it", link=self.stats.link)
            self.link.refuse(message.seq, "internal")
            self.stats.reject(self.direction_in, "internal", "unexpected error (logged)")
            self.return_credit(1)
            return
        if publication is None:
            self._settled(message.seq)
            return
        entry = _Inbound(message.seq, publication, kind_of(message.address))
        if self.channel is None:
            self._unpublished.append(entry)
        else:
            self._publish(entry)

    def _publish(self, entry: _Inbound) -> None:
        channel = self.channel
        assert channel is not None
        publication = entry.publication
        properties = publication.properties
        if publication.deadline is not None:
            remaining = publication.deadline - self.clock.seconds()
            if remaining <= 0:
                self.stats.count("expired", direction=self.direction_in)
                self._settled(entry.seq)
                return
            properties = dict(properties, expiration=str(max(1, int(remaining * 1000))))
        target = publication.destination
        if target.redeclare is not None:
            spec = target.redeclare
            channel.redeclare_exchange(spec.name, spec.kind, spec.durable, spec.auto_delete)
        self._unconfirmed[entry.seq] = entry
        try:
            channel.publish_then(
                target.exchange, target.routing_key, properties, publication.body, target.mandatory, self._outcome, entry
            )
        except wire.WireError as e:
            del self._unconfirmed[entry.seq]
            self.link.refuse(entry.seq, "malformed")
            self.stats.reject(self.direction_in, "malformed", str(e))
            self.return_credit(1)

    def _outcome(self, entry: _Inbound, error: Exception | None) -> None:
        """The broker answered a publish (or its channel went)."""
        if error is None:
            if self._unconfirmed.pop(entry.seq, None) is not None:
                self.stats.counts[self._relayed_keys[(self.direction_in, entry.kind)]] += 1
                publication = entry.publication
                if publication.unique_id is not None or publication.answers is not None:
                    self.published(publication)
                self._settled(entry.seq)
            return
        if isinstance(error, ChannelLost):
            return  # _channel_lost moved it back to the unpublished queue
        if self._unconfirmed.pop(entry.seq, None) is None:
            return
        if isinstance(error, PublishReturned):
            retry_until = entry.publication.retry_until
            if retry_until is not None and self.clock.seconds() + RETURN_RETRY_DELAY < retry_until:
                self.clock.callLater(RETURN_RETRY_DELAY, self._retry, entry)
            else:
                # As oslo's server does after its retries: give up on it.
                self.stats.count("undeliverable", direction=self.direction_in)
                self._log.warn(
                    "Link {link}: no queue took a {kind} for {key!r} on the {broker} broker; dropped it",
                    link=self.stats.link,
                    kind=entry.kind,
                    key=entry.publication.destination.routing_key,
                    broker=self.broker.name,
                )
                self._settled(entry.seq)
            return
        self.stats.count("nacked", direction=self.direction_in)
        self._log.warn(
            "Link {link}: the {broker} broker refused a publish ({error}); retrying",
            link=self.stats.link,
            broker=self.broker.name,
            error=str(error),
        )
        self.clock.callLater(REPUBLISH_DELAY, self._retry, entry)

    def _settled(self, seq: int) -> None:
        if self.active:
            self.link.acknowledge(seq)
            self.return_credit(1)

    def _retry(self, entry: _Inbound) -> None:
        if not self.active:
            return
        if self.channel is None:
            self._unpublished.append(entry)
        else:
            self._publish(entry)


async def declare_queue(channel: Channel, queue: QueueSpec) -> None:
    """Declare a queue and its bindings."""
    await channel.declare_queue(queue.name, queue.durable, queue.auto_delete, arguments=dict(queue.arguments))
    for exchange, routing_key in queue.bindings:
        await channel.bind_queue(queue.name, exchange, routing_key)
