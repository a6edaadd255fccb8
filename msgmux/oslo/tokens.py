# -*- test-case-name: tests.test_tokens -*-
"""
Signed reply tokens.

When the control half relays a call it replaces the request's C{_msg_id}
with a token that carries the original C{_msg_id}, the original reply queue,
the call's deadline and a serial number, signed with HMAC-SHA256 under the
control half's key and bound to the link name and the direction of the
call.  The server that answers echoes the token back as
the reply's C{_msg_id}; the control half verifies it and restores the
original.  So:

 - a tenant can only answer calls that were really relayed to it, before
   they expire, and cannot redirect a reply to another queue or link, nor
   pass a token of one of its own calls off as a reply to a control caller;
 - the control half needs no table to route replies: control halves sharing
   the key (C{reply_key_file}) can answer each other's calls, and calls
   survive a restart of the control half.

Keys rotate without failing calls in flight: a signer signs with one key
and verifies with it and up to L{MAX_VERIFY_KEYS} more (the next key before
it signs anywhere, the previous one until calls signed with it have
expired).  Tokens carry no key id, so a token that verifies under none costs
one HMAC per key; the bound keeps that a handful.

Pure code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
from typing import Sequence

import cbor2

__all__ = ["MAX_VERIFY_KEYS", "ReplyToken", "TokenError", "TokenSigner", "key_id"]

#: Verification-only keys a signer accepts besides its signing key.
MAX_VERIFY_KEYS = 3

_PREFIX = "mmx2."
_MAC_BYTES = 16

#: Directions a call is relayed in: C{"down"} (a control caller, a tenant
#: server) or C{"up"} (a tenant caller, a control server).
DIRECTIONS = ("down", "up")


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


def key_id(key: bytes) -> str:
    """
    @param key: a secret key.
    @return: a short fingerprint of it for logs and C{check-config}, so that
        operators can see which key each control half signs with; it tells
        nothing useful about the key.
    """
    return hashlib.sha256(b"msgmux-key-id\0" + key).hexdigest()[:8]


class TokenSigner:
    """Issues reply tokens under one secret key; verifies them under it or a few others."""

    def __init__(self, key: bytes, verify_keys: Sequence[bytes] = ()) -> None:
        """
        @param key: the key that signs (and verifies).
        @param verify_keys: keys that only verify, for rotation.
        @raise ValueError: for a key shorter than 16 bytes, or more than
            L{MAX_VERIFY_KEYS} verification keys.
        """
        # Makes every token unique, so two calls with the same ids and
        # deadline are still two calls (the in-flight limit counts tokens).
        self._serials = itertools.count()
        self.use_keys(key, verify_keys)

    def use_keys(self, key: bytes, verify_keys: Sequence[bytes] = ()) -> None:
        """
        Sign with C{key} from now on and verify with it and C{verify_keys}
        only: tokens and canaries made under any other key stop verifying.

        @param key: the key that signs (and verifies).
        @param verify_keys: keys that only verify, for rotation.
        @raise ValueError: as for the constructor; the keys in use are then
            unchanged.
        """
        if len(verify_keys) > MAX_VERIFY_KEYS:
            raise ValueError(f"at most {MAX_VERIFY_KEYS} verification keys")
        for candidate in (key, *verify_keys):
            if len(candidate) < 16:
                raise ValueError("reply token key must have at least 16 bytes")
        self._key = key
        # The signing key first: tokens issued since the last rotation, the
        # bulk of replies, verify with one HMAC.  A key listed twice costs
        # nothing twice.
        self._keys = tuple(dict.fromkeys((key, *verify_keys)))

    def key_ids(self) -> dict[str, str | list[str]]:
        """@return: the L{key_id}s of the signing key and of the others, for logs."""
        return {"signing": key_id(self._key), "verifying": [key_id(key) for key in self._keys[1:]]}

    def _mac(self, key: bytes, link: str, direction: str, payload: str) -> bytes:
        message = b"msgmux-reply\0" + link.encode("utf-8") + b"\0" + direction.encode("ascii") + b"\0" + payload.encode("ascii")
        return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, link: str, direction: str, msg_id: str, reply_queue: str, deadline: float) -> str:
        """
        @param link: the link the call is relayed over.
        @param direction: C{"down"} or C{"up"}, the way the call goes.
        @param msg_id: the caller's C{_msg_id}.
        @param reply_queue: the caller's C{_reply_q}.
        @param deadline: Unix time the call expires.
        @return: the token, to be used as the relayed request's C{_msg_id}.
        @raise TokenError: when the ids are not valid text (JSON allows lone
            surrogates, CBOR does not).
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        try:
            payload = _b64(cbor2.dumps([msg_id, reply_queue, round(deadline, 3), next(self._serials)]))
        except (UnicodeEncodeError, ValueError, TypeError) as e:
            raise TokenError(f"cannot sign these call ids: {e}") from None
        return f"{_PREFIX}{payload}.{_b64(self._mac(self._key, link, direction, payload))}"

    def verify(self, link: str, direction: str, token: str) -> ReplyToken:
        """
        @param link: the link the reply came from.
        @param direction: the way the call went (its reply comes back the
            other way).
        @param token: the reply's C{_msg_id}.
        @return: what the token carries.
        @raise TokenError: when it is not a token issued for C{link} and
            C{direction} by a holder of one of this signer's keys.  Expiry
            is the caller's to check.
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
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if not any(hmac.compare_digest(given, self._mac(key, link, direction, payload)) for key in self._keys):
            raise TokenError("token signature does not match")
        try:
            msg_id, reply_queue, deadline, serial = cbor2.loads(_unb64(payload))
        except Exception:
            # Only reachable with a valid signature over garbage, i.e. a
            # key holder's bug; still never let it escape as another type.
            raise TokenError("malformed token payload") from None
        if type(msg_id) is not str or type(reply_queue) is not str or type(deadline) not in (int, float) or type(serial) is not int:
            raise TokenError("malformed token payload")
        return ReplyToken(msg_id, reply_queue, float(deadline))

    # --- canaries ---------------------------------------------------------

    def canary(self, link: str, sent: float) -> bytes:
        """
        @param link: the link the canary goes round.
        @param sent: when it was sent (Unix time).
        @return: a canary body only a holder of the signing key can make, so
            that a tenant half cannot fake the health of its link.
        """
        text = repr(float(sent))
        return json.dumps({"link": link, "sent": text, "mac": _b64(self._canary_mac(self._key, link, text))}).encode("ascii")

    @staticmethod
    def _canary_mac(key: bytes, link: str, text: str) -> bytes:
        message = b"msgmux-canary\0" + link.encode("utf-8") + b"\0" + text.encode("ascii")
        return hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def verify_canary(self, link: str, body: bytes) -> float:
        """
        @param link: the link the canary came back on.
        @param body: its body.
        @return: when it was sent.
        @raise TokenError: unless C{body} is a canary made for C{link} under
            one of this signer's keys (one sent before a rotation may come
            back after it).
        """
        if len(body) > 512:
            raise TokenError("not a canary: too long")
        try:
            document = json.loads(body.decode("ascii"))
            text, mac = document["sent"], document["mac"]
            if type(text) is not str or type(mac) is not str or document.get("link") != link:
                raise TokenError("not a canary of this link")
            sent = float(text)
            canonical = repr(sent) == text
            given = mac.encode("ascii")
        except TokenError:
            raise
        except Exception as e:  # ValueError, KeyError, TypeError, OverflowError...
            raise TokenError(f"not a canary: {type(e).__name__}") from None
        if not canonical or not any(
            hmac.compare_digest(_b64(self._canary_mac(key, link, text)).encode("ascii"), given) for key in self._keys
        ):
            raise TokenError("canary signature does not match")
        if not math.isfinite(sent):
            raise TokenError("canary time is not finite")
        return sent
