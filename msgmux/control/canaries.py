# -*- test-case-name: tests.test_control_policy -*-
"""
Canaries: a link is healthy when messages move, not when sockets are up.

While a session is up, the control half puts a canary on the control broker
every C{canary_interval} seconds, in the link's own canary queue.  The
relay sends it down like any message; the tenant half publishes it on the
tenant broker, consumes it again and sends it up; the control half checks
it here.  A link whose newest canary back was sent within the last three
intervals is healthy.  Connection state alone says nothing: a link can be
up while a broker blocks or a channel is stuck.

Canaries are signed with the reply key, so a tenant half can neither make
one up nor keep one to replay later to fake its link's health.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from msgmux.oslo.tokens import TokenError, TokenSigner
from msgmux.policy import Refusal
from msgmux.stats import LinkStats

__all__ = ["CANARY_MAX_AGE", "Canaries"]

#: Canaries older than this when they come back are refused (a replay).
CANARY_MAX_AGE = 3600.0


class Canaries:
    """
    The canaries of one link.

    @ivar last_returned: when the newest canary that came back was sent
        (our clock), or L{None}.
    """

    def __init__(self, link_name: str, signer: TokenSigner, clock: IReactorTime, interval: float, stats: LinkStats) -> None:
        self.link_name = link_name
        self.signer = signer
        self.clock = clock
        self.interval = interval
        self.stats = stats
        self.last_returned: float | None = None
        self._loop: LoopingCall | None = None

    def start(self, send: Callable[[bytes], bool]) -> None:
        """
        Send a canary every interval while a session is up.

        @param send: puts a canary body on the control broker; returns
            whether it could (a session without a channel cannot).
        """
        self.stop()
        loop = LoopingCall(self._send, send)
        loop.clock = self.clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stop(self) -> None:
        """The session ended."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _send(self, send: Callable[[bytes], bool]) -> None:
        if send(self.signer.canary(self.link_name, self.clock.seconds())):
            self.stats.count("canaries_sent")

    def returned(self, body: bytes) -> None:
        """
        A canary came back up the link.

        @raise Refusal: when it is not a canary this control half sent for
            this link, or one too old to be anything but a replay.
        """
        try:
            sent = self.signer.verify_canary(self.link_name, body)
        except TokenError as e:
            raise Refusal("malformed", str(e)) from None
        now = self.clock.seconds()
        if not now - CANARY_MAX_AGE <= sent <= now:
            raise Refusal("malformed", "canary from the future or replayed")
        if self.last_returned is not None and sent <= self.last_returned:
            # A redelivered canary, or one the tenant half kept to replay:
            # health is the newest canary back, so this says nothing.
            self.stats.count("canaries_stale")
            return
        self.last_returned = sent
        self.stats.gauges["canary_round_trip_seconds"] = now - sent
        self.stats.count("canaries_returned")

    def healthy(self) -> bool:
        """Whether a canary sent within the last three intervals came back."""
        if self.last_returned is None:
            return False
        return self.clock.seconds() - self.last_returned <= 3 * self.interval

    def age(self) -> float | None:
        """@return: seconds since the newest canary back was sent, or L{None}."""
        return None if self.last_returned is None else self.clock.seconds() - self.last_returned
