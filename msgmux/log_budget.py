# -*- test-case-name: tests.test_stats -*-
"""
Log lines a peer can trigger, a few at a time.

Whatever a peer can make happen over and over (refused messages,
connections that hang up at once) must not turn into a log line each time:
a hostile peer would fill the disk, or bury what the operator needs.  A
L{LogBudget} lets a few lines per key through in each window, and says how
many it held back when the next window opens.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

__all__ = ["LogBudget"]


class LogBudget:
    """At most C{burst} lines per key in each C{window} seconds."""

    def __init__(self, clock: IReactorTime, burst: int = 5, window: float = 60.0) -> None:
        self.clock = clock
        self.burst = burst
        self.window = window
        self._windows: dict[object, tuple[float, int]] = {}

    def take(self, key: object) -> tuple[bool, int]:
        """
        Ask to log one line for C{key}.

        @return: whether to log it, and how many lines for C{key} were held
            back in the window that just ended (to say so once).
        """
        now = self.clock.seconds()
        start, count = self._windows.get(key, (now, 0))
        held_back = 0
        if now - start >= self.window:
            held_back = max(0, count - self.burst)
            start, count = now, 0
        count += 1
        self._windows[key] = (start, count)
        return count <= self.burst, held_back
