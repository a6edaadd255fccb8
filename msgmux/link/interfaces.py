# -*- test-case-name: tests.test_link_protocol -*-
"""
What a link session and the half using it expect of each other.

A relay uses its session through L{LinkConnection}; the session tells the
relay what happens through L{SessionHandler}.  Both are small on purpose:
the relay tests use a recording connection, the protocol tests a recording
handler (C{tests.doubles}).
"""

from __future__ import annotations

from typing import Any, Protocol

from msgmux.message import Message

__all__ = ["LinkConnection", "MessageTooLarge", "SessionHandler"]


class SessionHandler(Protocol):
    """What a half does with an established link session (its relay)."""

    def session_started(self, connection: LinkConnection) -> None:
        """The handshake completed; C{connection} can carry messages."""

    def message_received(self, seq: int, message: Message) -> None:
        """
        The peer sent a message; answer later with
        L{LinkConnection.acknowledge} or L{LinkConnection.refuse}.
        """

    def messages_acknowledged(self, tokens: list[Any]) -> None:
        """The peer's broker confirmed messages we sent (their send tokens)."""

    def message_refused(self, token: Any, reason: str) -> None:
        """The peer refused a message we sent, for good."""

    def credit_received(self) -> None:
        """The peer allowed more messages."""

    def session_ended(self, reason: str) -> None:
        """The session is over (the socket closed); in-flight state is void."""


class LinkConnection(Protocol):
    """What a relay uses of its link session."""

    link_name: str | None
    session_id: str | None

    @property
    def established(self) -> bool:
        """Whether the session is up and usable."""

    @property
    def unacknowledged(self) -> int:
        """Messages we sent that the peer has not settled."""

    def can_send(self, message: Message) -> bool:
        """Whether the credit the peer granted lets C{message} go now."""

    def send_message(self, message: Message, token: Any) -> None:
        """Send C{message} (see L{LinkProtocol.send_message})."""

    def acknowledge(self, seq: int) -> None:
        """The peer's message C{seq} is safely published."""

    def refuse(self, seq: int, reason: str) -> None:
        """Refuse the peer's message C{seq} for good."""

    def grant(self, messages: int, body_bytes: int) -> None:
        """Let the peer send more."""

    def close(self, code: str, detail: str) -> None:
        """End the session, saying why."""


class MessageTooLarge(Exception):
    """A message does not fit what the peer accepts."""
