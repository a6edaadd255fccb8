# -*- test-case-name: tests.test_stats -*-
"""
Per-link counters and rate-limited rejection logs.

The relay counts everything that happens to a message (relayed, rejected
with a reason, expired, returned...).  L{msgmux.metrics} exports the counters
to Prometheus; tests and C{msgmux status} read them directly.  Rejections are
also logged, but at most a few per reason per minute, so that a hostile or
broken peer cannot flood the log.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from msgmux.log_budget import LogBudget

__all__ = ["LinkStats"]

#: Rejections logged per reason and direction in one L{LOG_WINDOW}.
LOG_BURST = 5
LOG_WINDOW = 60.0

#: Characters of a rejection's detail that are logged (details quote what
#: the peer sent).
LOGGED_DETAIL = 300


class LinkStats:
    """
    Counters of one link, keyed by name and sorted label pairs.

    @ivar link_name: the link's name (a metric label).
    @ivar counts: C{(name, ((label, value), ...)) -> int}.
    @ivar gauges: current values (link state, in-flight calls...).
    """

    _log = Logger()

    def __init__(self, link_name: str, clock: IReactorTime) -> None:
        self.link_name = link_name
        self.clock = clock
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.gauges: dict[str, float] = {}
        self._log_budget = LogBudget(clock, LOG_BURST, LOG_WINDOW)

    def count(self, name: str, n: int = 1, **labels: str) -> None:
        """Add C{n} to counter C{name} with C{labels}."""
        self.counts[(name, tuple(sorted(labels.items())))] += n

    @staticmethod
    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        """
        @return: the key of counter C{name} with C{labels}, for hot paths that
            add to C{counts[key]} directly instead of building it each time.
        """
        return (name, tuple(sorted(labels.items())))

    def get(self, name: str, **labels: str) -> int:
        """
        @return: the sum of counter C{name} over all label sets that include
            C{labels}.
        """
        wanted = set(labels.items())
        return sum(v for (n, pairs), v in self.counts.items() if n == name and wanted <= set(pairs))

    def relayed(self, direction: str) -> int:
        """@return: messages relayed in C{direction}, not counting msgmux's own canaries."""
        return self.get("relayed", direction=direction) - self.get("relayed", direction=direction, kind="canary")

    def reject(self, direction: str, reason: str, detail: str, **fields: Any) -> None:
        """
        Count a rejected message and log it (rate-limited).

        @param direction: C{"up"} or C{"down"}.
        @param reason: a short reason code (a metric label).
        @param detail: what exactly was wrong, for the log.
        """
        self.count("rejected", direction=direction, reason=reason)
        log, held_back = self._log_budget.take((direction, reason))
        if held_back:
            self._log.warn(
                "Link {link}: {suppressed} more {direction} rejections ({reason}) in the last minute",
                link=self.link_name,
                suppressed=held_back,
                direction=direction,
                reason=reason,
            )
        if log:
            self._log.warn(
                "Link {link}: rejected {direction} message ({reason}): {detail}",
                link=self.link_name,
                direction=direction,
                reason=reason,
                detail=detail[:LOGGED_DETAIL],
                **fields,
            )
