"""Tests for L{msgmux.stats.LinkStats}: counters by label, and rejection logs that a flood cannot fill."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from msgmux.stats import LOG_BURST, LOG_WINDOW, LinkStats


class LinkStatsTests(SynchronousTestCase):
    def test_counters(self) -> None:
        """Counters add up per label set; get() sums over the label sets that match."""
        stats = LinkStats("l", Clock())
        stats.count("relayed", direction="down", kind="rpc")
        stats.count("relayed", 2, direction="down", kind="canary")
        stats.count("relayed", direction="up", kind="rpc")
        self.assertEqual(stats.get("relayed"), 4)
        self.assertEqual(stats.get("relayed", direction="down"), 3)
        self.assertEqual(stats.relayed("down"), 1)  # canaries are not traffic
        self.assertEqual(stats.counts[LinkStats.key("relayed", kind="rpc", direction="up")], 1)

    def test_rejections_are_logged_sparingly(self) -> None:
        """A flood of rejections is counted in full but logged LOG_BURST times per minute, then summarised."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        stats = LinkStats("l", clock)
        for _ in range(100):
            stats.reject("up", "route", "x" * 10000)
        logged = [e for e in events if e.get("reason") == "route" and "detail" in e]
        self.assertEqual(len(logged), LOG_BURST)
        self.assertLessEqual(len(logged[0]["detail"]), 300)
        self.assertEqual(stats.get("rejected", direction="up", reason="route"), 100)
        clock.advance(LOG_WINDOW)
        stats.reject("up", "route", "again")
        summary = [e for e in events if e.get("suppressed")]
        self.assertEqual(summary[0]["suppressed"], 100 - LOG_BURST)
