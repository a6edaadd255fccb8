# -*- test-case-name: tests.test_publisher -*-
"""
Publishing what the peer sent, until the broker confirmed it.

A L{Publisher} takes each message the policy accepted and publishes it on
the half's channel with publisher confirms.  It reports a message settled
only once the broker confirmed it (or it was given up for good), which is
when the relay ACKs it on the link.  Meanwhile:

 - while there is no channel, messages wait (bounded by the credit the half
   granted) and go out when one is ready;
 - a publish the broker I{returns} (a reply whose caller's queue is
   missing) is tried again every L{RETURN_RETRY_DELAY} until its
   C{retry_until}, as oslo's own server does;
 - a publish the broker I{nacks} is tried again after L{REPUBLISH_DELAY};
 - when the channel goes, what was not confirmed is published again on the
   next one (duplicates are possible, loss is not).

A message that makes the broker close the channel (a property or
destination the broker refuses) would otherwise loop: republished on every
new channel, closing it each time and taking every other message on it
along.  So when the broker closes the channel over an error, the messages
it had not confirmed become I{suspects}: on the next channel each is
published alone, and the next one only once it is confirmed.  A suspect
that makes the broker close the channel again while it is the only publish
in flight is the culprit: it is refused (C{poison}), counted and logged,
and the rest flows on.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from msgmux.amqp.channel import Channel, ChannelLost, PublishReturned, Unpublishable
from msgmux.policy import Publication
from msgmux.stats import LinkStats

__all__ = ["Publisher", "REPUBLISH_DELAY", "RETURN_RETRY_DELAY"]

#: Seconds before re-publishing a message the broker refused (nack).
REPUBLISH_DELAY = 1.0

#: Seconds between attempts to deliver a returned reply (oslo waits 0.25 s).
RETURN_RETRY_DELAY = 0.25


class Pending:
    """One message on its way to the broker."""

    __slots__ = ("seq", "publication", "kind", "body_bytes")

    def __init__(self, seq: int, publication: Publication, kind: str, body_bytes: int) -> None:
        """
        @param seq: its sequence number on the link.
        @param kind: its C{kind} counter label.
        @param body_bytes: the size of the body the peer sent (the byte
            credit it returns when settled).
        """
        self.seq = seq
        self.publication = publication
        self.kind = kind
        self.body_bytes = body_bytes


class Publisher:
    """
    Publishes one session's inbound messages on its half's broker.

    @ivar channel: the channel published on, or L{None} while there is none.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        stats: LinkStats,
        direction: str,
        broker: str,
        settled: Callable[[Pending, bool], None],
        refused: Callable[[Pending, str, str], None],
    ) -> None:
        """
        @param direction: the label of the messages published (C{"up"} on
            the control half).
        @param broker: the broker's name, for logs.
        @param settled: told of each message done with: published and
            confirmed (C{True}), or dropped as the broker's own policy
            drops it (C{False}: expired, or returned for too long).
        @param refused: told of each message refused for good, with a
            REJECT reason and the detail for the log.
        """
        self.clock = clock
        self.stats = stats
        self.direction = direction
        self.broker = broker
        self._settled = settled
        self._refused = refused
        self.channel: Channel | None = None
        self._unpublished: collections.deque[Pending] = collections.deque()
        self._unconfirmed: dict[int, Pending] = {}
        self._suspects: collections.deque[Pending] = collections.deque()
        self._stopped = False

    @property
    def busy(self) -> bool:
        """Whether anything is waiting to be published or confirmed."""
        return bool(self._unconfirmed or self._unpublished or self._suspects)

    def submit(self, pending: Pending) -> None:
        """Publish C{pending} as soon as possible."""
        if self.channel is None or self._suspects:
            self._unpublished.append(pending)
        else:
            self._publish(pending)

    def channel_ready(self, channel: Channel) -> None:
        """A new channel: publish what waits, suspects first and one at a time."""
        self.channel = channel
        channel.return_observers.append(self._returned)
        self._next()

    def _returned(self, code: int, text: str, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes) -> None:
        self.stats.count("returned", direction=self.direction)
        self._log.info(
            "Link {link}: broker returned a message for {exchange!r}/{key!r}: {code} {text}",
            link=self.stats.link_name,
            exchange=exchange,
            key=routing_key,
            code=code,
            text=text,
        )

    def channel_lost(self, channel: Channel) -> None:
        """The channel went: what it had not confirmed is published again on the next one."""
        if channel is not self.channel:
            return
        self.channel = None
        lost = sorted(self._unconfirmed.values(), key=lambda pending: pending.seq)
        self._unconfirmed.clear()
        if channel.closed_by_broker is None:
            # The connection went, or msgmux closed the channel: nothing
            # points at these messages.
            self._unpublished.extendleft(reversed([p for p in lost if p not in self._suspects]))
            return
        if len(lost) == 1 and self._suspects and lost[0] is self._suspects[0]:
            culprit = self._suspects.popleft()
            why = channel.lost_reason.getErrorMessage() if channel.lost_reason is not None else "?"
            self._refused(culprit, "poison", f"the {self.broker} broker closed the channel on it: {why}"[:300])
            return
        # Any of them may be why the broker closed the channel: try each alone.
        self._suspects.extend(p for p in lost if p not in self._suspects)

    def stop(self) -> None:
        """The session ended: forget everything (the peer's broker redelivers it)."""
        self._stopped = True
        self.channel = None
        self._unpublished.clear()
        self._unconfirmed.clear()
        self._suspects.clear()

    # --- publishing -----------------------------------------------------------

    def _next(self) -> None:
        """Publish what waits, suspects first, each suspect alone."""
        while self.channel is not None:
            if self._suspects:
                if self._unconfirmed or self._publish(self._suspects[0]):
                    return  # a suspect is in flight alone
            elif self._unpublished:
                self._publish(self._unpublished.popleft())
            else:
                return

    def _publish(self, pending: Pending) -> bool:
        """@return: whether C{pending} is now in flight (else it was settled or refused at once)."""
        channel = self.channel
        assert channel is not None
        publication = pending.publication
        properties = publication.properties
        if publication.deadline is not None:
            remaining = publication.deadline - self.clock.seconds()
            if remaining <= 0:
                self._forget_suspect(pending)
                self.stats.count("expired", direction=self.direction)
                self._settled(pending, False)
                return False
            properties = dict(properties, expiration=str(max(1, int(remaining * 1000))))
        target = publication.destination
        if target.redeclare is not None:
            spec = target.redeclare
            channel.redeclare_exchange(spec.name, spec.kind, spec.durable, spec.auto_delete)
        self._unconfirmed[pending.seq] = pending
        try:
            channel.publish_then(target.exchange, target.routing_key, properties, publication.body, target.mandatory, self._outcome, pending)
        except Unpublishable as e:
            del self._unconfirmed[pending.seq]
            self._forget_suspect(pending)
            self._refused(pending, "malformed", str(e))
            return False
        return True

    def _forget_suspect(self, pending: Pending) -> None:
        if self._suspects and self._suspects[0] is pending:
            self._suspects.popleft()

    def _outcome(self, pending: Pending, error: Exception | None) -> None:
        """The broker answered a publish (or its channel went)."""
        if isinstance(error, ChannelLost):
            return  # channel_lost decides what happens to it
        if self._unconfirmed.pop(pending.seq, None) is None:
            return
        # The broker answered it without closing the channel: whatever it
        # was, it was no poison.
        self._forget_suspect(pending)
        if error is None:
            self._settled(pending, True)
        elif isinstance(error, PublishReturned):
            retry_until = pending.publication.retry_until
            if retry_until is not None and self.clock.seconds() + RETURN_RETRY_DELAY < retry_until:
                self.clock.callLater(RETURN_RETRY_DELAY, self._retry, pending)
            else:
                # As oslo's server does after its retries: give up on it.
                self.stats.count("undeliverable", direction=self.direction)
                self._log.warn(
                    "Link {link}: no queue took a {kind} for {key!r} on the {broker} broker; dropped it",
                    link=self.stats.link_name,
                    kind=pending.kind,
                    key=pending.publication.destination.routing_key,
                    broker=self.broker,
                )
                self._settled(pending, False)
        else:
            self.stats.count("nacked", direction=self.direction)
            self._log.warn(
                "Link {link}: the {broker} broker refused a publish ({error}); retrying",
                link=self.stats.link_name,
                broker=self.broker,
                error=str(error),
            )
            self.clock.callLater(REPUBLISH_DELAY, self._retry, pending)
        self._next()

    def _retry(self, pending: Pending) -> None:
        if not self._stopped:
            self.submit(pending)
