# -*- test-case-name: tests.test_timers -*-
"""
Named timers that can all be cancelled at once.

A connection keeps several timers (handshake, flush, abort...); when it
goes, every one of them must be cancelled, and forgetting one leaves a
callback that fires on a dead connection.  L{Timers} holds them by name, so
that a protocol states each timer once and cancels them all in one call.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Timers"]


class Timers:
    """The pending timers of one object, by name; at most one per name."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: dict[str, IDelayedCall] = {}

    def start(self, name: str, delay: float, function: Callable[..., Any], *args: Any) -> None:
        """Run C{function(*args)} after C{delay} seconds, replacing a pending timer of that name."""
        self.cancel(name)
        self._calls[name] = self.clock.callLater(delay, self._fire, name, function, args)

    def start_or_advance(self, name: str, delay: float, function: Callable[..., Any]) -> None:
        """Make timer C{name} fire within C{delay} seconds: start it, or bring a later one forward."""
        call = self._calls.get(name)
        if call is None:
            self._calls[name] = self.clock.callLater(delay, self._fire, name, function, ())
        elif call.getTime() - self.clock.seconds() > delay:
            call.reset(delay)

    def pending(self, name: str) -> bool:
        """Whether timer C{name} is waiting to fire."""
        return name in self._calls

    def cancel(self, name: str) -> None:
        """Cancel timer C{name}, if pending."""
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all(self) -> None:
        """Cancel every pending timer."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.active():
                call.cancel()

    def _fire(self, name: str, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._calls.pop(name, None)
        function(*args)
