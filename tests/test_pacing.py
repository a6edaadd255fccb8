"""
Tests for link credit pacing (L{msgmux.pacing}) with a fake clock: token
buckets, the tenant half's immediate credit, and the control half's credit
paid out of its message and byte buckets.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.pacing import ImmediateCredit, PacedCredit, TokenBucket
from msgmux.stats import LinkStats
from tests.doubles import RecordingConnection


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A bucket gives its burst at once, then rate tokens per second, never more than its burst."""
        clock = Clock()
        bucket = TokenBucket(10.0, 5, clock)
        self.assertEqual(bucket.take(8), 5)
        self.assertEqual(bucket.take(1), 0)
        self.assertAlmostEqual(bucket.seconds_until(1), 0.1)
        clock.advance(0.35)
        self.assertEqual(bucket.take(10), 3)
        clock.advance(100)
        self.assertEqual(bucket.take(10), 5)

    def test_wait_is_capped_by_the_burst(self) -> None:
        """Waiting for more tokens than the bucket holds means waiting for a full bucket."""
        bucket = TokenBucket(10.0, 5, Clock())
        bucket.take(5)
        self.assertAlmostEqual(bucket.seconds_until(50), 0.5)


class ImmediateCreditTests(SynchronousTestCase):
    def test_grants_until_stopped(self) -> None:
        """The tenant half grants credit back at once, and nothing once the session ended."""
        connection = RecordingConnection()
        credit = ImmediateCredit(connection)
        credit.settled(3, 300)
        credit.stop()
        credit.settled(1, 10)
        self.assertEqual(connection.granted, [(3, 300)])


class PacedCreditTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.connection = RecordingConnection()
        self.stats = LinkStats("tenant-a", self.clock)

    def paced(self, rate: float, burst: int, byte_rate: float, byte_burst: int) -> PacedCredit:
        return PacedCredit(self.connection, TokenBucket(rate, burst, self.clock), TokenBucket(byte_rate, byte_burst, self.clock), self.clock, self.stats)

    def test_one_payment_pending_while_throttled(self) -> None:
        """
        However many settlements arrive while the rate limit holds credit
        back, one timer pays what is owed; the session's end cancels it.
        """
        credit = self.paced(200.0, 10, 1e12, 1 << 40)
        credit.settled(256, 0)
        total = used = self.connection.total_granted()[0]
        self.assertEqual(total, 10)
        for _ in range(2000):  # two seconds of a tenant half using every credit at once
            self.connection.granted.clear()
            for _ in range(used):
                credit.settled(1, 0)
            self.assertLessEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(0.001)
            used = self.connection.total_granted()[0]
            total += used
        # 10 of burst, then about 200 per second
        self.assertGreaterEqual(total, 10 + 2 * 200 - 5)
        self.assertLessEqual(total, 10 + 2 * 200 + 5)
        credit.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bytes_are_paced_too(self) -> None:
        """Byte credit comes out of the byte bucket: a link cannot send more bytes per second than it allows."""
        credit = self.paced(1e6, 1_000_000, 1000.0, 4000)
        credit.settled(10, 10_000)
        self.assertEqual(self.connection.total_granted(), (10, 4000))
        self.clock.advance(3.9)
        self.assertEqual(self.connection.total_granted(), (10, 4000))
        self.clock.advance(0.1)  # the bucket is full again: the next 4000 bytes
        self.assertEqual(self.connection.total_granted(), (10, 8000))
        self.clock.advance(2)
        self.assertEqual(self.connection.total_granted(), (10, 10_000))
        self.assertEqual(self.clock.getDelayedCalls(), [])
