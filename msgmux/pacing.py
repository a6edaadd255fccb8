# -*- test-case-name: tests.test_pacing -*-
"""
Link credit: how fast a half lets its peer send.

Credit (docs/protocol.md) comes in messages and in body bytes: the peer may
send a message only while it holds at least one message credit and as many
byte credits as the body is long.  A half returns credit as it settles what
it received, so the credit it granted bounds what it holds in memory.

The tenant half returns credit at once (L{ImmediateCredit}).  The control
half pays it out of two token buckets, one for messages (C{max_rate}) and one
for bytes (C{max_byte_rate}) (L{PacedCredit}): a tenant that sends faster
simply waits, and its messages stay on the tenant broker.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from msgmux.stats import LinkStats

__all__ = ["CreditPacer", "ImmediateCredit", "PacedCredit", "TokenBucket"]

#: Shortest wait before a throttled link is paid again: keeps a link that
#: is always short of tokens from costing a timer per message.
MIN_PAYMENT_DELAY = 0.005

#: Byte credit a throttled link waits to accumulate before the next payment,
#: so that slow byte pacing does not cost a CREDIT frame per few bytes.
BYTE_PAYMENT = 64 * 1024


class CreditGrantee(Protocol):
    """The link connection credit is granted on."""

    def grant(self, messages: int, body_bytes: int) -> None:
        """Let the peer send C{messages} more messages with C{body_bytes} more body bytes."""


class CreditPacer(Protocol):
    """Returns credit for settled messages."""

    def settled(self, messages: int, body_bytes: int) -> None:
        """Messages with this many body bytes were settled (or, at the start, the window opens)."""

    def stop(self) -> None:
        """The session ended: no more credit."""


class TokenBucket:
    """Classic token bucket: C{rate} tokens per second, at most C{burst} saved."""

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self._updated = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now

    def take(self, wanted: int) -> int:
        """@return: how many of C{wanted} tokens were available (and taken)."""
        self._refill()
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def take_all(self, wanted: float) -> bool:
        """@return: whether C{wanted} tokens were available (then all are taken; else none)."""
        self._refill()
        if self.tokens < wanted:
            return False
        self.tokens -= wanted
        return True

    def seconds_until(self, wanted: float) -> float:
        """@return: how long until C{wanted} tokens (at most the burst) are available."""
        self._refill()
        if self.rate <= 0:
            return float("inf")
        return max(0.0, (min(wanted, self.burst) - self.tokens) / self.rate)


class ImmediateCredit:
    """Grants credit back as soon as messages settle."""

    def __init__(self, connection: CreditGrantee) -> None:
        self._connection: CreditGrantee | None = connection

    def settled(self, messages: int, body_bytes: int) -> None:
        if self._connection is not None:
            self._connection.grant(messages, body_bytes)

    def stop(self) -> None:
        self._connection = None


class PacedCredit:
    """
    Grants credit back as the link's token buckets allow, and comes back for
    the rest; at most one payment is ever scheduled, however many
    settlements arrive while the link is throttled.
    """

    def __init__(
        self, connection: CreditGrantee, messages: TokenBucket, body_bytes: TokenBucket, clock: IReactorTime, stats: LinkStats
    ) -> None:
        self._connection: CreditGrantee | None = connection
        self._messages = messages
        self._bytes = body_bytes
        self._clock = clock
        self._stats = stats
        self._owed_messages = 0
        self._owed_bytes = 0
        self._payment: IDelayedCall | None = None

    def settled(self, messages: int, body_bytes: int) -> None:
        self._owed_messages += messages
        self._owed_bytes += body_bytes
        if self._payment is not None and self._payment.active():
            return  # already throttled: the pending payment pays this too
        self._pay()

    def stop(self) -> None:
        self._connection = None
        if self._payment is not None and self._payment.active():
            self._payment.cancel()
        self._payment = None

    def _pay(self) -> None:
        self._payment = None
        connection = self._connection
        if connection is None:
            return
        messages = self._messages.take(self._owed_messages) if self._owed_messages else 0
        body_bytes = self._bytes.take(self._owed_bytes) if self._owed_bytes else 0
        self._owed_messages -= messages
        self._owed_bytes -= body_bytes
        if messages or body_bytes:
            connection.grant(messages, body_bytes)
        if self._owed_messages or self._owed_bytes:
            self._stats.count("throttled")
            wait = max(
                self._messages.seconds_until(1) if self._owed_messages else 0.0,
                self._bytes.seconds_until(min(self._owed_bytes, BYTE_PAYMENT)) if self._owed_bytes else 0.0,
            )
            self._payment = self._clock.callLater(max(MIN_PAYMENT_DELAY, wait), self._pay)
