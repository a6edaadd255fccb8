# -*- test-case-name: tests.test_control_policy -*-
"""
Calls, rewritten so that their replies come back through msgmux.

Whichever way a call goes, the control half replaces its C{_msg_id} with a
signed reply token (L{msgmux.oslo.tokens}) and its C{_reply_q} with the
link's own reply queue, and tracks it until its deadline.  The answering
server echoes the token as the reply's C{_msg_id}; L{CallRewriter.reply}
checks it and restores the caller's id.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from msgmux.calls import CallTracker
from msgmux.oslo import envelope
from msgmux.oslo.tokens import ReplyToken, TokenError, TokenSigner
from msgmux.policy import Refusal

__all__ = ["CallRewriter"]


class CallRewriter:
    """The call rewrite of one link, both ways."""

    def __init__(self, link_name: str, signer: TokenSigner, calls: CallTracker, reply_queue: str, clock: IReactorTime) -> None:
        self.link_name = link_name
        self.signer = signer
        self.calls = calls
        self.reply_queue = reply_queue
        self.clock = clock

    def call(self, request: envelope.Envelope, direction: str, expiration: float | None, limit: float) -> tuple[bytes, float]:
        """
        Rewrite a call relayed in C{direction} and start tracking it.

        @param expiration: seconds the caller waits (the AMQP expiration),
            or L{None}.
        @param limit: the link's C{max_call_timeout}.
        @return: the rewritten body and the call's deadline.
        @raise Refusal: when the call's ids cannot go in a token.
        """
        deadline = self.clock.seconds() + min(expiration if expiration is not None else limit, limit)
        try:
            token = self.signer.issue(self.link_name, direction, request.msg_id or "", request.reply_queue or "", deadline)
        except TokenError as e:
            raise Refusal("malformed", str(e)) from None
        self.calls.begin(token, deadline, direction)
        return request.with_inner(_msg_id=token, _reply_q=self.reply_queue), deadline

    def reply(self, reply: envelope.Envelope, direction: str) -> ReplyToken:
        """
        Check a reply to a call that went C{direction}.

        @return: what its token says (the caller's id and queue, the
            deadline, which is the caller's to check).
        @raise Refusal: C{unsolicited-reply} unless the token is one this
            link issued for a call that went C{direction}.
        """
        try:
            return self.signer.verify(self.link_name, direction, reply.msg_id or "")
        except TokenError as e:
            raise Refusal("unsolicited-reply", f"reply for a call this link was not asked: {e}") from None

    def answered(self, token: str) -> None:
        """The final reply for C{token} passed."""
        self.calls.answered(token)

    def restored(self, reply: envelope.Envelope, token: ReplyToken) -> bytes:
        """@return: the reply's body with the caller's own C{_msg_id} back."""
        return reply.with_inner(_msg_id=token.msg_id)
