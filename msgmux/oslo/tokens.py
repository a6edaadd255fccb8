# -*- test-case-name: tests.test_tokens -*-
"""
Signed reply tokens.

When the control half relays a call it replaces the request's C{_msg_id}
with a token that carries the original C{_msg_id}, the original reply queue
and the call's deadline, signed with HMAC-SHA256 under the control half's key
and bound to the link name.  The server that answers echoes the token back as
the reply's C{_msg_id}; the control half verifies it and restores the
original.  So:

 - a tenant can only answer calls that were really relayed to it, before
   they expire, and cannot redirect a reply to another queue or link;
 - the control half needs no table to route replies: control halves sharing
   the key (C{reply_key_file}) can answer each other's calls, and calls
   survive a restart of the control half.

Pure code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import cbor2

__all__ = ["ReplyToken", "TokenError", "TokenSigner"]

_PREFIX = "mmx1."
_MAC_BYTES = 16


class TokenError(ValueError):
    """The token is malformed or its signature is wrong."""


class ReplyToken:
    """
    What a verified token says.

    @ivar msg_id: the caller's original C{_msg_id}.
    @ivar reply_queue: the caller's original C{_reply_q}.
    @ivar deadline: Unix time after which replies are refused.
    """

    __slots__ = ("msg_id", "reply_queue", "deadline")

    def __init__(self, msg_id: str, reply_queue: str, deadline: float) -> None:
        self.msg_id = msg_id
        self.reply_queue = reply_queue
        self.deadline = deadline


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies reply tokens under one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("reply token key must have at least 16 bytes")
        self._key = key

    def _mac(self, link: str, payload: str) -> bytes:
        message = b"msgmux-reply\0" + link.encode("utf-8") + b"\0" + payload.encode("ascii")
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, link: str, msg_id: str, reply_queue: str, deadline: float) -> str:
        """
        @param link: the link the call is relayed over.
        @param msg_id: the caller's C{_msg_id}.
        @param reply_queue: the caller's C{_reply_q}.
        @param deadline: Unix time the call expires.
        @return: the token, to be used as the relayed request's C{_msg_id}.
        @raise TokenError: when the ids are not valid text (JSON allows lone
            surrogates, CBOR does not).
        """
        try:
            payload = _b64(cbor2.dumps([msg_id, reply_queue, round(deadline, 3)]))
        except (UnicodeEncodeError, ValueError, TypeError) as e:
            raise TokenError(f"cannot sign these call ids: {e}") from None
        return f"{_PREFIX}{payload}.{_b64(self._mac(link, payload))}"

    def verify(self, link: str, token: str) -> ReplyToken:
        """
        @param link: the link the reply came from.
        @param token: the reply's C{_msg_id}.
        @return: what the token carries.
        @raise TokenError: when it is not a token issued for C{link} by a
            holder of this key.  Expiry is the caller's to check.
        """
        if not token.startswith(_PREFIX) or len(token) > 1024 or not token.isascii():
            raise TokenError("not a msgmux reply token")
        payload, _, mac = token[len(_PREFIX) :].partition(".")
        try:
            given = _unb64(mac)
            # base64 leaves a few bits of the last character unused; insist
            # on the one spelling issue() produces, so that a token has
            # exactly one string form (it keys the table of pending calls).
            canonical = _b64(_unb64(payload)) == payload and _b64(given) == mac
        except ValueError:
            raise TokenError("malformed token") from None
        if not canonical:
            raise TokenError("token is not in canonical form")
        if not hmac.compare_digest(given, self._mac(link, payload)):
            raise TokenError("token signature does not match")
        try:
            msg_id, reply_queue, deadline = cbor2.loads(_unb64(payload))
        except Exception:
            # Only reachable with a valid signature over garbage, i.e. a
            # key holder's bug; still never let it escape as another type.
            raise TokenError("malformed token payload") from None
        if type(msg_id) is not str or type(reply_queue) is not str or type(deadline) not in (int, float):
            raise TokenError("malformed token payload")
        return ReplyToken(msg_id, reply_queue, float(deadline))
