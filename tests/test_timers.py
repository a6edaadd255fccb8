"""Tests for L{msgmux.timers.Timers} with a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.timers import Timers


class TimersTests(SynchronousTestCase):
    def test_one_per_name(self) -> None:
        """Starting a timer again replaces it; it fires once, with its arguments, and is then not pending."""
        clock = Clock()
        timers = Timers(clock)
        fired: list[int] = []
        timers.start("t", 5, fired.append, 1)
        timers.start("t", 2, fired.append, 2)
        clock.advance(10)
        self.assertEqual(fired, [2])
        self.assertFalse(timers.pending("t"))

    def test_advance_only_forward(self) -> None:
        """start_or_advance brings a later timer forward, never pushes an earlier one back."""
        clock = Clock()
        timers = Timers(clock)
        fired: list[float] = []
        timers.start_or_advance("f", 5, lambda: fired.append(clock.seconds()))
        timers.start_or_advance("f", 1, lambda: fired.append(clock.seconds()))
        timers.start_or_advance("f", 3, lambda: fired.append(clock.seconds()))
        clock.advance(1)
        self.assertEqual(fired, [1.0])
        clock.advance(10)
        self.assertEqual(fired, [1.0])

    def test_cancel_all(self) -> None:
        """Cancelling all leaves nothing scheduled."""
        clock = Clock()
        timers = Timers(clock)
        for name in "abc":
            timers.start(name, 1, lambda: None)
        timers.cancel_all()
        self.assertEqual(clock.getDelayedCalls(), [])
