# -*- test-case-name: tests.test_link_flow -*-
"""
Sequence numbers and credit of one link session, without I/O.

Each direction of a session has a sender and a receiver.  L{SendWindow} is
our view as a sender: the credit the peer granted (messages and body
bytes), the next sequence number, and what the peer has not settled yet
(with, to within a second, when it was sent).  L{ReceiveWindow} is our view
as a receiver: the next sequence number we expect and the credit the peer
still holds.  Anything the peer does that the protocol forbids raises
L{ProtocolViolation}, which closes the session.
"""

from __future__ import annotations

import collections
from typing import Any

__all__ = ["MAX_CREDIT_BYTES", "MAX_CREDIT_MESSAGES", "ProtocolViolation", "ReceiveWindow", "SendWindow"]

#: The most credit a peer may grant.  More could only be a hostile peer's
#: way to make us count beyond any sense.
MAX_CREDIT_MESSAGES = 1 << 20
MAX_CREDIT_BYTES = 1 << 40


class ProtocolViolation(Exception):
    """The peer broke the protocol; the session closes with C{code}."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class SendWindow:
    """
    What we may send, and what the peer has not settled.

    @ivar messages: message credit left.
    @ivar body_bytes: body byte credit left.
    @ivar max_unsettled_bytes: body bytes we keep unsettled at most,
        whatever the peer granted: a peer that grants much and reads
        nothing cannot make us buffer more than this (one message more
        than this is allowed when nothing is unsettled, so that any single
        message can go).
    """

    def __init__(self, max_unsettled_bytes: int) -> None:
        self.messages = 0
        self.body_bytes = 0
        self.max_unsettled_bytes = max_unsettled_bytes
        self.unsettled_bytes = 0
        self._next_seq = 1
        self._unsettled: dict[int, tuple[Any, int]] = {}
        # (seq, when sent) for at most one message per second, oldest first:
        # the age of the oldest unsettled message to within a second, in
        # bounded memory.
        self._send_times: collections.deque[tuple[int, float]] = collections.deque()

    @property
    def next_seq(self) -> int:
        """The sequence number the next message will have."""
        return self._next_seq

    def __len__(self) -> int:
        """Messages sent and not settled."""
        return len(self._unsettled)

    def can_send(self, body_length: int) -> bool:
        """Whether a message with a body of C{body_length} bytes may go now."""
        if self.messages <= 0 or self.body_bytes < body_length:
            return False
        return not self._unsettled or self.unsettled_bytes + body_length <= self.max_unsettled_bytes

    def sent(self, body_length: int, token: Any, now: float) -> int:
        """
        A message goes out (the caller checked L{can_send}).

        @param token: handed back when the peer settles it.
        @return: its sequence number.
        """
        seq = self._next_seq
        self._next_seq += 1
        self.messages -= 1
        self.body_bytes -= body_length
        self.unsettled_bytes += body_length
        self._unsettled[seq] = (token, body_length)
        times = self._send_times
        if not times or now - times[-1][1] >= 1.0:
            times.append((seq, now))
        return seq

    def granted(self, messages: int, body_bytes: int) -> None:
        """
        The peer granted credit.

        @raise ProtocolViolation: C{flow-control}, beyond the most credit
            anyone needs.
        """
        if self.messages + messages > MAX_CREDIT_MESSAGES or self.body_bytes + body_bytes > MAX_CREDIT_BYTES:
            raise ProtocolViolation("flow-control", f"credit beyond {MAX_CREDIT_MESSAGES} messages or {MAX_CREDIT_BYTES} bytes")
        self.messages += messages
        self.body_bytes += body_bytes

    def settled(self, seq: int) -> Any:
        """
        The peer settled C{seq} (ACK or REJECT).

        @return: its token.
        @raise ProtocolViolation: C{bad-ack}, when C{seq} is not outstanding.
        """
        entry = self._unsettled.pop(seq, None)
        if entry is None:
            raise ProtocolViolation("bad-ack", f"ACK or REJECT for {seq}, which is not outstanding")
        self.unsettled_bytes -= entry[1]
        return entry[0]

    def oldest_unsettled(self, now: float) -> tuple[int, float] | None:
        """
        @return: the oldest unsettled message and (to within a second, never
            less) how long ago it was sent, or L{None}.
        """
        # Dicts keep insertion order, and sequence numbers are inserted in
        # increasing order: the first key is the oldest outstanding one.
        oldest = next(iter(self._unsettled), None)
        times = self._send_times
        if oldest is None:
            return None
        while len(times) > 1 and times[1][0] <= oldest:
            times.popleft()
        if not times or times[0][0] > oldest:
            return None
        return oldest, now - times[0][1]

    def clear(self) -> None:
        """The session is over."""
        self._unsettled.clear()
        self._send_times.clear()
        self.unsettled_bytes = 0


class ReceiveWindow:
    """
    What the peer may still send us.

    @ivar messages: message credit the peer holds.
    @ivar body_bytes: body byte credit the peer holds.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.body_bytes = 0
        self._expected_seq = 1

    def received(self, seq: int, body_length: int) -> None:
        """
        A message arrived.

        @raise ProtocolViolation: C{bad-sequence} for a gap or a repeat,
            C{flow-control} for a message the peer had no credit for.
        """
        if seq != self._expected_seq:
            raise ProtocolViolation("bad-sequence", f"expected MSG {self._expected_seq}, got {seq}")
        if self.messages <= 0 or self.body_bytes < body_length:
            raise ProtocolViolation("flow-control", f"MSG {seq} sent without credit")
        self._expected_seq += 1
        self.messages -= 1
        self.body_bytes -= body_length

    def grant(self, messages: int, body_bytes: int) -> None:
        """We let the peer send more."""
        self.messages += messages
        self.body_bytes += body_bytes
