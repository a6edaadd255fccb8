# -*- test-case-name: tests.test_calls -*-
"""
Outstanding calls of one link.

Every call the control half relays gets a Deferred that fires when the final
reply (C{ending: true}) passes back, or fails with
L{twisted.internet.defer.TimeoutError} at the call's deadline.  The Deferreds
drive the in-flight gauge and limit, the reply latency histogram and the
timeout counter.  Whether a reply is I{accepted} is decided by its signed
token (L{msgmux.oslo.tokens}), not by this table, so replies still route
after a restart or through another control half sharing the key.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from msgmux.stats import LinkStats

__all__ = ["CallTracker", "LATENCY_BUCKETS"]

#: Upper bounds (seconds) of the reply latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CallTracker:
    """
    @ivar latency: per direction, counts per bucket of L{LATENCY_BUCKETS}
        plus one for larger values, and the sum of observed seconds.
    """

    def __init__(self, clock: IReactorTime, stats: LinkStats) -> None:
        self.clock = clock
        self.stats = stats
        self._calls: dict[str, tuple[defer.Deferred[None], str]] = {}
        self._inflight: dict[str, int] = {}
        self.latency: dict[str, tuple[list[int], list[float]]] = {}

    def inflight(self, direction: str) -> int:
        """@return: calls relayed in C{direction} awaiting their final reply."""
        return self._inflight.get(direction, 0)

    def begin(self, token: str, deadline: float, direction: str) -> defer.Deferred[None]:
        """
        Track a relayed call.

        @param token: the call's reply token (unique per call).
        @param deadline: Unix time the caller gives up.
        @param direction: C{"down"} (control caller) or C{"up"} (tenant caller).
        @return: the call's Deferred (already wired to the statistics).
        """
        existing = self._calls.get(token)
        if existing is not None:
            return existing[0]
        started = self.clock.seconds()
        call: defer.Deferred[None] = defer.Deferred(lambda d: self._forget(token))
        call.addTimeout(max(0.0, deadline - started), self.clock)
        call.addCallbacks(self._answered, self._unanswered, (direction, started), None, (token, direction))
        self._calls[token] = (call, direction)
        self._adjust(direction, 1)
        return call

    def answered(self, token: str) -> bool:
        """
        The final reply for C{token} passed.

        @return: whether this tracker knew the call (another control half,
            or this one before a restart, may have relayed it).
        """
        entry = self._calls.pop(token, None)
        if entry is None:
            return False
        self._adjust(entry[1], -1)
        entry[0].callback(None)
        return True

    def cancel_all(self) -> None:
        """Forget every call (shutdown)."""
        for call, _ in list(self._calls.values()):
            call.cancel()

    def _answered(self, _: None, direction: str, started: float) -> None:
        elapsed = self.clock.seconds() - started
        buckets, total = self.latency.setdefault(direction, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0]))
        for index, bound in enumerate(LATENCY_BUCKETS):
            if elapsed <= bound:
                buckets[index] += 1
                break
        else:
            buckets[-1] += 1
        total[0] += elapsed
        self.stats.count("calls_answered", direction=direction)

    def _unanswered(self, failure: Failure, token: str, direction: str) -> Any:
        if self._calls.pop(token, None) is not None:
            self._adjust(direction, -1)
        if failure.check(defer.TimeoutError):
            self.stats.count("calls_timed_out", direction=direction)
            return None
        failure.trap(defer.CancelledError)
        return None

    def _forget(self, token: str) -> None:
        entry = self._calls.pop(token, None)
        if entry is not None:
            self._adjust(entry[1], -1)

    def _adjust(self, direction: str, change: int) -> None:
        value = self._inflight.get(direction, 0) + change
        self._inflight[direction] = value
        self.stats.gauges[f"inflight_calls_{direction}"] = value
