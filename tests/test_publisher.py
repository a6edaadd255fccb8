"""
Tests for L{msgmux.publisher.Publisher}: a message is settled only once the
broker confirmed it, what a lost channel had not confirmed goes again on
the next, returned replies are retried until their deadline, and a message
that makes the broker close the channel is found and refused instead of
looping.  A real L{Channel} in confirm mode writes to a C{StringTransport};
the broker's confirms and channel closes are played to its protocol.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.channel import Channel
from msgmux.policy import Publication
from msgmux.publisher import REPUBLISH_DELAY, Pending, Publisher
from msgmux.routing import Destination
from msgmux.stats import LinkStats
from tests.doubles import broker_closes_channel, broker_connection, clock, confirm, open_channel, published


def pending(seq: int, body: bytes = b"x", retry_until: float | None = None) -> Pending:
    # Replies (the publishes with a retry_until) are mandatory, as oslo sends them.
    destination = Destination("openstack", f"key-{seq}", mandatory=retry_until is not None)
    publication = Publication(destination, {}, body, retry_until=retry_until)
    return Pending(seq, publication, "rpc", len(body))


class PublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock()
        self.protocol, self.transport = broker_connection(self.clock)
        self.stats = LinkStats("tenant-a", self.clock)
        self.settled: list[tuple[int, bool]] = []
        self.refused: list[tuple[int, str]] = []
        self.publisher = Publisher(
            self.clock,
            self.stats,
            "up",
            "control",
            lambda p, ok: self.settled.append((p.seq, ok)),
            lambda p, reason, detail: self.refused.append((p.seq, reason)),
        )
        self.channel = self.confirming_channel(1)

    def confirming_channel(self, number: int) -> Channel:
        channel = open_channel(self.protocol, number)
        self.successResultOf(defer.Deferred.fromCoroutine(channel.select_confirms()))
        return channel

    def keys(self) -> list[str]:
        return [key for _, key, _, _ in published(self.transport)]

    def test_settled_on_confirm(self) -> None:
        """Nothing is settled before the broker's confirm."""
        self.publisher.channel_ready(self.channel)
        self.publisher.submit(pending(1))
        self.publisher.submit(pending(2))
        self.assertEqual(self.settled, [])
        confirm(self.protocol, 1, 2, multiple=True)
        self.assertEqual(self.settled, [(1, True), (2, True)])

    def test_republished_after_channel_loss(self) -> None:
        """What the lost channel had not confirmed is published again, in order, on the next one."""
        self.publisher.channel_ready(self.channel)
        for seq in (1, 2, 3):
            self.publisher.submit(pending(seq))
        confirm(self.protocol, 1, 1)
        self.publisher.channel_lost(self.channel)  # the connection went: no culprit
        self.transport.clear()
        self.publisher.submit(pending(4))
        self.assertEqual(self.keys(), [])
        self.publisher.channel_ready(self.confirming_channel(2))
        self.assertEqual(self.keys(), ["key-2", "key-3", "key-4"])

    def test_poison_is_found_and_refused(self) -> None:
        """
        A publish the broker closes the channel over is tried alone on the
        next channel; closing it again marks it: it is refused as poison,
        and the others are published and confirmed.
        """
        self.publisher.channel_ready(self.channel)
        for seq in (1, 2, 3):
            self.publisher.submit(pending(seq))
        broker_closes_channel(self.protocol, self.channel)
        self.publisher.channel_lost(self.channel)
        self.transport.clear()
        second = self.confirming_channel(2)
        self.publisher.channel_ready(second)
        self.assertEqual(self.keys(), ["key-1"])  # alone
        confirm(self.protocol, 2, 1)
        self.assertEqual(self.keys(), ["key-2"])  # the next suspect, alone
        broker_closes_channel(self.protocol, second)
        self.publisher.channel_lost(second)
        self.assertEqual(self.refused, [(2, "poison")])
        third = self.confirming_channel(3)
        self.publisher.submit(pending(4))
        self.publisher.channel_ready(third)
        self.assertEqual(self.keys(), ["key-3"])
        confirm(self.protocol, 3, 1)
        self.assertEqual(self.keys(), ["key-4"])
        confirm(self.protocol, 3, 2)
        self.assertEqual(self.settled, [(1, True), (3, True), (4, True)])

    def test_nacked_suspect_is_no_poison(self) -> None:
        """A suspect the broker nacks (without closing the channel) is retried like any nacked publish."""
        self.publisher.channel_ready(self.channel)
        self.publisher.submit(pending(1))
        broker_closes_channel(self.protocol, self.channel)
        self.publisher.channel_lost(self.channel)
        self.transport.clear()
        second = self.confirming_channel(2)
        self.publisher.channel_ready(second)
        confirm(self.protocol, 2, 1, ok=False)
        self.clock.advance(REPUBLISH_DELAY)
        confirm(self.protocol, 2, 2)
        self.assertEqual((self.settled, self.refused), ([(1, True)], []))

    def test_returned_until_its_deadline(self) -> None:
        """A reply the broker returns is tried again until retry_until, then dropped as undeliverable."""
        self.publisher.channel_ready(self.channel)
        self.publisher.submit(pending(1, retry_until=self.clock.seconds() + 1.0))
        for attempt in range(1, 10):
            self.channel.returned(312, "NO_ROUTE", "openstack", "key-1", {}, b"x")
            confirm(self.protocol, 1, attempt)
            self.clock.advance(0.25)
        self.assertEqual(self.settled, [(1, False)])
        self.assertEqual(self.stats.get("undeliverable", direction="up"), 1)
