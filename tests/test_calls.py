"""
Tests for L{msgmux.calls.CallTracker}: each relayed call is a Deferred that
fires on its final reply or times out at its deadline, and drives the
in-flight gauge, the latency histogram and the counters.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.calls import LATENCY_BUCKETS, CallTracker
from msgmux.stats import LinkStats


def tracker() -> tuple[CallTracker, Clock]:
    clock = Clock()
    return CallTracker(clock, LinkStats("l", clock)), clock


class CallTrackerTests(SynchronousTestCase):
    def test_answered(self) -> None:
        """A final reply fires the call, frees its slot and lands in the latency histogram."""
        calls, clock = tracker()
        call = calls.begin("t1", 30.0, "down")
        self.assertEqual((calls.inflight("down"), calls.stats.gauges["inflight_calls_down"]), (1, 1))
        clock.advance(0.004)
        self.assertTrue(calls.answered("t1"))
        self.assertIsNone(self.successResultOf(call))
        self.assertEqual(calls.inflight("down"), 0)
        buckets, total = calls.latency["down"]
        self.assertEqual(buckets[LATENCY_BUCKETS.index(0.005)], 1)
        self.assertAlmostEqual(total[0], 0.004)
        self.assertEqual(calls.stats.get("calls_answered", direction="down"), 1)

    def test_timeout(self) -> None:
        """A call without a final reply by its deadline times out, is counted and frees its slot."""
        calls, clock = tracker()
        call = calls.begin("t1", 2.0, "up")
        clock.advance(1.9)
        self.assertNoResult(call)
        clock.advance(0.2)
        self.successResultOf(call)  # the timeout is handled, not left as an unhandled error
        self.assertEqual(calls.inflight("up"), 0)
        self.assertEqual(calls.stats.get("calls_timed_out", direction="up"), 1)
        self.assertFalse(calls.answered("t1"))  # a late reply finds nothing

    def test_unknown_and_repeated(self) -> None:
        """Replies to calls this tracker never saw are reported as unknown; beginning a call twice tracks it once."""
        calls, _ = tracker()
        self.assertFalse(calls.answered("nobody"))
        first = calls.begin("t1", 5.0, "down")
        self.assertIs(calls.begin("t1", 5.0, "down"), first)
        self.assertEqual(calls.inflight("down"), 1)
        calls.cancel_all()
        self.assertEqual(calls.inflight("down"), 0)
        self.successResultOf(first)

    def test_slow_answers_go_in_the_last_bucket(self) -> None:
        """Answers slower than the largest bucket are still counted."""
        calls, clock = tracker()
        calls.begin("t1", 600.0, "down")
        clock.advance(LATENCY_BUCKETS[-1] + 1)
        calls.answered("t1")
        self.assertEqual(calls.latency["down"][0][-1], 1)
