# -*- test-case-name: tests.test_relay -*-
"""
Copies of a message that arrive while the message itself is still on its
way to the broker.

When a peer's broker connection drops, that broker redelivers what the peer
had not acknowledged, and the peer sends it again: a I{copy} of a message
this half may still be holding, waiting for its own broker to come back or
to confirm.  Remembering only what the broker confirmed does not catch
such a copy (nothing was confirmed yet), so both would be published.

Nor may a copy simply be acknowledged: if this half then died before the
original was confirmed, the message would be lost.  So a copy waits for
its original and ends as the original does: settled once the original is
confirmed (or dropped, as expired or undeliverable), refused with the same
reason if it is refused.  If the session ends first, neither was
acknowledged, and the peer's broker redelivers the message once more.

The policy knows a copy by the identity of a publication it accepted and
has not yet heard the end of (L{msgmux.policy.Copy}), before it does
anything else with it (a copied call must not be tracked twice).  A peer
that sends unrelated messages under one identity only loses its own
messages; what waits here is bounded by the credit the peer was granted.
Pure code.
"""

from __future__ import annotations

from msgmux.publisher import Pending

__all__ = ["WaitingCopies"]


class WaitingCopies:
    """
    The copies of one session's messages in flight, by the identity of the
    message they copy.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def original(self, pending: Pending) -> None:
        """C{pending} goes to the publisher: copies of it may arrive."""
        identity = pending.publication.identity
        if identity is not None:
            self._copies[identity] = []

    def wait(self, identity: tuple[str, str], seq: int, body_bytes: int) -> bool:
        """
        The message C{seq} copies the one with C{identity}.

        @return: whether it waits; L{False} if no such message is in flight.
        """
        copies = self._copies.get(identity)
        if copies is None:
            return False
        copies.append((seq, body_bytes))
        return True

    def done(self, original: Pending) -> list[tuple[int, int]]:
        """
        C{original} was settled or refused.

        @return: the sequence numbers and body sizes of its copies, which
            end the same way.
        """
        identity = original.publication.identity
        if identity is None:
            return []
        return self._copies.pop(identity, [])

    def clear(self) -> None:
        """The session ended: the peer's broker redelivers all of them."""
        self._copies.clear()
