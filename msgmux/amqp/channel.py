# -*- test-case-name: tests.test_amqp_protocol,tests.test_migrate -*-
"""
One AMQP channel as msgmux uses it.

Synchronous methods go through the txAMQP channel (they are rare and
txAMQP's Deferred-per-method style suits them).  Messages go through the hot
path of L{msgmux.amqp.protocol.BrokerProtocol}: deliveries are handed to the
consumer's callback, publishes are written as pre-encoded frames and their
publisher confirms fire Deferreds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux._private_apis import txamqp_channel_closed
from msgmux.amqp import wire

if TYPE_CHECKING:
    from msgmux.amqp.protocol import BrokerProtocol


class ChannelLost(Exception):
    """The channel closed (broker error, connection loss or our own close)."""


class PublishRefused(Exception):
    """The broker nacked a publish (internal error or a queue refusing it)."""


class Unpublishable(ValueError):
    """
    A message AMQP cannot carry (a property or header value outside what
    the wire format allows); nothing was written.
    """


class PublishReturned(Exception):
    """
    The broker returned a mandatory publish: no queue was bound to take it
    (for a reply, the caller's reply queue does not exist right now).
    """


def check_publishable(properties: dict[str, Any]) -> None:
    """
    Refuse the property values RabbitMQ answers by closing the channel
    (PRECONDITION_FAILED), which would fail every other publish in flight
    on it.  Checked against RabbitMQ 3.10: a C{delivery_mode} other than 1
    or 2 (C{delivery_mode_unknown}), an C{expiration} that is negative, not
    an integer, or in other scripts' digits.  msgmux also keeps
    C{expiration} to 1-10 ASCII digits.

    @raise Unpublishable: naming the property.
    """
    mode = properties.get("delivery_mode")
    if mode is not None and mode not in (1, 2):
        raise Unpublishable(f"delivery_mode {mode!r} is neither 1 nor 2")
    expiration = properties.get("expiration")
    if expiration is not None:
        if type(expiration) is not str or not (0 < len(expiration) <= 10 and expiration.isascii() and expiration.isdigit()):
            raise Unpublishable(f"expiration {expiration!r} is not 1 to 10 digits of milliseconds"[:200])


def _fire(confirmed: defer.Deferred[None], error: Exception | None) -> None:
    if error is None:
        confirmed.callback(None)
    else:
        confirmed.errback(error)


class Delivery:
    """
    A message the broker delivered to one of our consumers.

    @ivar error: why the content header could not be decoded, or L{None};
        such a message must be rejected, not relayed.
    """

    __slots__ = (
        "channel",
        "consumer_tag",
        "delivery_tag",
        "redelivered",
        "exchange",
        "routing_key",
        "properties",
        "body",
        "error",
    )

    def __init__(
        self,
        channel: Channel,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        error: str | None,
    ) -> None:
        self.channel = channel
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body
        self.error = error

    def ack(self) -> None:
        """Acknowledge, if the channel it came on is still open."""
        self.channel.ack(self.delivery_tag)

    def reject(self, requeue: bool) -> None:
        """Reject, if the channel it came on is still open."""
        self.channel.reject(self.delivery_tag, requeue)


class Channel:
    """
    @ivar number: the channel id.
    @ivar txamqp_channel: txAMQP's object for the channel, which its
        synchronous methods go through (the protocol's tables hold it, and
        forget an entry only if it is still this one).
    @ivar lost_reason: why the channel closed, or L{None} while open.
    """

    _log = Logger()

    def __init__(self, protocol: BrokerProtocol, txchannel: Any) -> None:
        self.protocol = protocol
        self.number: int = txchannel.id
        self.txamqp_channel = txchannel
        self._consumers: dict[str, Callable[[Delivery], None]] = {}
        self._confirms: dict[int, tuple[Callable[[Any, Exception | None], None], Any]] = {}
        self._publish_tag = 0
        self._confirming = False
        # Mandatory publishes awaiting their confirm, by tag (in publish
        # order), with where they went; and the destinations of returns not
        # yet matched to a publish.  RabbitMQ sends basic.return just before
        # the basic.ack of the same message, and the ack of an unroutable
        # message can overtake those of earlier, routed ones; so a return
        # belongs to a publish to its destination among those the next ack
        # settles, not to the oldest one to that destination.
        self._mandatory: dict[int, tuple[str, str]] = {}
        self._returns: list[tuple[str, str]] = []
        # Delivery tags of a channel are consecutive from 1.  Every tag below
        # _low is settled (acked or rejected); _settled holds settled tags
        # above it.  This lets one basic.ack with multiple=True settle a
        # whole batch instead of a frame per message.
        self._low = 1
        self._settled: set[int] = set()
        #: Told the tag of every delivery as it is acknowledged or rejected.
        self.settle_observer: Callable[[int], None] | None = None
        self.lost_reason: Failure | None = None
        #: The reply code of the broker's C{channel.close}, when the broker
        #: closed this channel over an error (a publish or declaration it
        #: refused), rather than the connection going or msgmux closing it.
        self.closed_by_broker: int | None = None
        self.lost_observers: list[Callable[[Failure], None]] = []
        self.return_observers: list[Callable[[int, str, str, str, dict[str, Any], bytes], None]] = []
        self.cancel_observers: list[Callable[[str], None]] = []

    @property
    def is_open(self) -> bool:
        """Whether the channel can still be used."""
        return self.lost_reason is None

    @property
    def unconfirmed(self) -> int:
        """Publishes awaiting the broker's confirm."""
        return len(self._confirms)

    @property
    def unconfirmed_mandatory(self) -> int:
        """
        Mandatory publishes awaiting the broker's confirm, whose destination
        is kept until then to match a return to them.  Zero once every
        confirm arrived (anything else is a leak).
        """
        return len(self._mandatory)

    @property
    def unmatched_returns(self) -> int:
        """
        Returns not yet matched to a mandatory publish: RabbitMQ sends a
        C{basic.return} before the confirm of its publish, so a return waits
        for that confirm.  Zero once every confirm arrived (anything else is
        a leak).
        """
        return len(self._returns)

    @property
    def lowest_unsettled(self) -> int:
        """
        The lowest delivery tag not yet acknowledged or rejected (it may not
        have been delivered yet): every delivery below it is settled, which
        is what lets L{ack_many} acknowledge a batch with one C{multiple} ack.
        """
        return self._low

    @property
    def settled_ahead(self) -> int:
        """
        How many deliveries above L{lowest_unsettled} are settled: their tags
        are kept until the tags below them are settled, then forgotten.  Zero
        once every delivery received is settled (anything else is a leak).
        """
        return len(self._settled)

    # --- synchronous methods ----------------------------------------------

    async def declare_exchange(
        self, name: str, kind: str, durable: bool, auto_delete: bool, arguments: dict[str, Any] | None = None
    ) -> None:
        """Declare an exchange (fails the channel if it exists with other flags)."""
        await self.txamqp_channel.exchange_declare(
            exchange=name, type=kind, durable=durable, auto_delete=auto_delete, arguments=arguments or {}
        )

    async def declare_queue(
        self,
        name: str,
        durable: bool,
        auto_delete: bool,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """Declare a queue (fails the channel if it exists with other arguments)."""
        await self.txamqp_channel.queue_declare(
            queue=name, durable=durable, auto_delete=auto_delete, exclusive=exclusive, arguments=arguments or {}
        )

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind a queue to an exchange."""
        await self.txamqp_channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key, arguments={})

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """
        Remove a binding.  RabbitMQ answers unbind-ok for a binding, and
        even a queue, that does not exist.
        """
        await self.txamqp_channel.queue_unbind(queue=queue, exchange=exchange, routing_key=routing_key, arguments={})

    async def queue_counts(self, name: str) -> tuple[int, int]:
        """
        Look at a queue without declaring it (a passive declare, which
        RabbitMQ answers whatever the queue's arguments).

        @return: its messages ready for delivery (not those delivered and
            unacknowledged) and its consumers.
        @raise Exception: when the queue does not exist (404 closes the channel).
        """
        reply = await self.txamqp_channel.queue_declare(queue=name, passive=True)
        return int(reply.message_count), int(reply.consumer_count)

    async def delete_queue(self, name: str, if_unused: bool = False, if_empty: bool = False) -> int:
        """
        Delete a queue (RabbitMQ answers delete-ok for one that does not
        exist).  A condition that does not hold closes the channel (406).
        Never set C{if_unused} or C{if_empty} on a queue that may be a
        quorum queue: RabbitMQ 3.10 answers them with 540 NOT_IMPLEMENTED,
        which closes the whole connection.  The messages delivered and
        unacknowledged are deleted with the queue, whatever C{if_empty}.

        @return: how many messages went with it (RabbitMQ's count: those
            ready for delivery).
        """
        reply = await self.txamqp_channel.queue_delete(queue=name, if_unused=if_unused, if_empty=if_empty)
        return int(reply.message_count)

    async def qos(self, prefetch: int) -> None:
        """Limit unacknowledged deliveries per consumer."""
        await self.txamqp_channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, global_=False)

    async def select_confirms(self) -> None:
        """Put the channel in publisher-confirm mode."""
        await self.txamqp_channel.confirm_select()
        self._confirming = True

    async def consume(
        self,
        queue: str,
        consumer_tag: str,
        callback: Callable[[Delivery], None],
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """
        Start consuming with manual acknowledgement.

        @param callback: called with each L{Delivery}; registered before the
            consume is sent, so no delivery can arrive unobserved.
        @param arguments: C{basic.consume} arguments (e.g. a stream offset).
        """
        self._consumers[consumer_tag] = callback
        try:
            await self.txamqp_channel.basic_consume(
                queue=queue, consumer_tag=consumer_tag, no_ack=False, arguments=arguments or {}
            )
        except BaseException:
            self._consumers.pop(consumer_tag, None)
            raise

    def consumer_tags(self) -> list[str]:
        """The tags of the active consumers."""
        return list(self._consumers)

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; deliveries already received stay valid."""
        await self.txamqp_channel.basic_cancel(consumer_tag=consumer_tag)
        self._consumers.pop(consumer_tag, None)

    async def close(self) -> None:
        """
        Close the channel: the broker requeues what we did not acknowledge
        and drops our consumers.
        """
        if not self.is_open:
            return
        try:
            await self.txamqp_channel.channel_close(reply_code=200, reply_text="closing", class_id=0, method_id=0)
        finally:
            self.protocol.forget_channel(self)
            self.txamqp_channel.close(ChannelLost("closed by msgmux"))
            self.lost(Failure(ChannelLost("closed by msgmux")))

    async def close_after_failure(self) -> None:
        """
        Close the channel after something on it failed.

        A refused method closes the channel on the broker's side: txAMQP
        then marks it closed and tells the protocol, which forgets it;
        closing it again would fail and hide the first failure.  Otherwise
        it is closed here, and a failure to close (the connection going)
        changes nothing for the caller.
        """
        if not self.is_open or txamqp_channel_closed(self.txamqp_channel):
            return
        try:
            await self.close()
        except Exception:
            pass

    # --- hot path -----------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        mandatory: bool = False,
    ) -> defer.Deferred[None]:
        """
        Publish one message.

        @return: fires when the broker confirmed it (immediately when the
            channel is not in confirm mode); fails with L{PublishRefused} on a
            nack and L{ChannelLost} if the channel goes first.
        @raise Unpublishable: when the message cannot be encoded.
        """
        confirmed: defer.Deferred[None] = defer.Deferred()
        self.publish_then(exchange, routing_key, properties, body, mandatory, _fire, confirmed)
        return confirmed

    def publish_then(
        self,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        mandatory: bool,
        outcome: Callable[[Any, Exception | None], None],
        argument: Any,
    ) -> None:
        """
        Publish one message and call C{outcome(argument, error)} once the
        broker confirmed it (C{error} L{None}) or refused it or the channel
        went (C{error} a L{PublishRefused} or L{ChannelLost}).

        The relays' hot path: L{publish} wraps it in a Deferred, which costs
        more per message than this callback pair.

        @raise Unpublishable: when the message cannot be encoded.
        """
        if not self.is_open:
            outcome(argument, ChannelLost("channel is closed"))
            return
        check_publishable(properties)
        try:
            parts = wire.encode_publish(
                self.number, exchange, routing_key, properties, body, self.protocol.MAX_LENGTH, mandatory
            )
        except wire.WireError as e:
            raise Unpublishable(str(e)) from None
        self.protocol.write_message(parts)
        if not self._confirming:
            outcome(argument, None)
            return
        self._publish_tag += 1
        self._confirms[self._publish_tag] = (outcome, argument)
        if mandatory:
            self._mandatory[self._publish_tag] = (exchange, routing_key)

    def redeclare_exchange(self, name: str, kind: str, durable: bool, auto_delete: bool) -> None:
        """
        Declare an exchange without waiting for the answer, in front of the
        next publish (for auto-delete exchanges that may have vanished).
        """
        if self.is_open:
            self.protocol.write_frame(wire.encode_exchange_declare(self.number, name, kind, durable, auto_delete))

    def _settle(self, tag: int) -> None:
        if self.settle_observer is not None:
            self.settle_observer(tag)
        if tag != self._low:
            self._settled.add(tag)
            return
        low = tag + 1
        settled = self._settled
        while low in settled:
            settled.remove(low)
            low += 1
        self._low = low

    def ack(self, delivery_tag: int) -> None:
        """Acknowledge a delivery of this channel (ignored once it closed)."""
        self.ack_many([delivery_tag])

    def ack_many(self, tags: list[int]) -> None:
        """
        Acknowledge deliveries of this channel (ignored once it closed).

        Tags that, once settled, leave no unsettled tag below them go in one
        C{basic.ack} with C{multiple} set, naming the highest of them: that
        tag is still unacknowledged at the broker, as RabbitMQ requires, and
        every lower one is either in this batch or already settled.  The
        others are acknowledged one by one.
        """
        if not self.is_open or not tags:
            return
        for tag in tags:
            self._settle(tag)
        low = self._low
        number = self.number
        below = [tag for tag in tags if tag < low]
        frames = [wire.encode_ack(number, max(below), multiple=True)] if below else []
        frames.extend(wire.encode_ack(number, tag) for tag in tags if tag >= low)
        self.protocol.write_frames(frames)

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        """Reject a delivery of this channel (ignored once it closed)."""
        if self.is_open:
            self._settle(delivery_tag)
            self.protocol.write_frame(wire.encode_reject(self.number, delivery_tag, requeue))

    # --- called by the protocol ---------------------------------------------

    def confirmed(self, tag: int, multiple: bool, ok: bool) -> None:
        """The broker confirmed (or refused) publishes up to C{tag}."""
        confirms = self._confirms
        if multiple:
            # Tags were inserted in increasing order: stop at the first
            # larger one instead of scanning every pending publish.
            done = []
            for pending in confirms:
                if pending > tag:
                    break
                done.append(pending)
        else:
            done = [tag] if tag in confirms else []
        returned = self._match_returns(done) if self._returns else ()
        mandatory = self._mandatory
        for t in done:
            outcome, argument = confirms.pop(t)
            error: Exception | None = None if ok else PublishRefused(f"broker refused publish {t}")
            if mandatory and mandatory.pop(t, None) is not None and t in returned:
                error = PublishReturned(f"broker returned publish {t}: no queue took it")
            outcome(argument, error)

    def _match_returns(self, done: list[int]) -> set[int]:
        """
        @param done: the publish tags one confirm settles.
        @return: those of them the pending returns belong to: for each
            return, the latest publish to its destination in C{done} (a
            return that matches none waits for the next confirm).
        """
        returned: set[int] = set()
        unmatched = []
        for destination in self._returns:
            candidates = [t for t in done if t not in returned and self._mandatory.get(t) == destination]
            if candidates:
                returned.add(max(candidates))
            else:
                unmatched.append(destination)
        self._returns = unmatched
        return returned

    def delivered(
        self,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        error: str | None,
    ) -> None:
        """A message arrived for one of our consumers."""
        callback = self._consumers.get(consumer_tag)
        delivery = Delivery(self, consumer_tag, delivery_tag, redelivered, exchange, routing_key, properties, body, error)
        if callback is None:
            # A delivery racing our basic.cancel: give it back.
            delivery.reject(requeue=True)
            return
        try:
            callback(delivery)
        except Exception:
            # Requeued once; a message that fails again is dropped (or
            # dead-lettered by the queue's policy) instead of looping forever.
            self._log.failure(
                "Consumer {tag} failed on a delivery; {action}",
                tag=consumer_tag,
                action="dropping it (it failed before)" if redelivered else "requeueing it once",
            )
            delivery.reject(requeue=not redelivered)

    def returned(
        self, code: int, text: str, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes
    ) -> None:
        """The broker could not route a mandatory publish."""
        if len(self._returns) < len(self._mandatory) and (exchange, routing_key) in self._mandatory.values():
            self._returns.append((exchange, routing_key))
        for observer in list(self.return_observers):
            observer(code, text, exchange, routing_key, properties, body)

    def cancelled_by_broker(self, consumer_tag: str) -> None:
        """The broker cancelled one of our consumers."""
        self._consumers.pop(consumer_tag, None)
        for observer in list(self.cancel_observers):
            observer(consumer_tag)

    def lost(self, reason: Failure) -> None:
        """The channel is gone: fail what waits on it, tell the owner."""
        if self.lost_reason is not None:
            return
        self.lost_reason = reason
        self._consumers.clear()
        confirms, self._confirms = self._confirms, {}
        self._mandatory.clear()
        self._returns.clear()
        for outcome, argument in confirms.values():
            outcome(argument, ChannelLost(str(reason.value)))
        for observer in list(self.lost_observers):
            observer(reason)
