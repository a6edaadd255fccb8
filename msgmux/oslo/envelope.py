# -*- test-case-name: tests.test_envelope -*-
"""
oslo.messaging message bodies: parse, inspect, rewrite.

An oslo message body is JSON C{{"oslo.version": "2.0", "oslo.message":
"<JSON text>"}}; the inner JSON holds the method, arguments, context and, for
calls, C{_msg_id} and C{_reply_q}.  msgmux reads bodies only where it must
(call routing, upstream policy, replies) and otherwise relays them as bytes.
Pure code.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from msgmux.acyclic import decode_tree

__all__ = ["Envelope", "EnvelopeError", "container_count", "leading_method", "might_be_call", "parse"]

OSLO_VERSION = "2.0"


class EnvelopeError(ValueError):
    """The body is not an oslo.messaging 2.0 envelope."""


@attrs.frozen
class Envelope:
    """
    A parsed oslo message.

    @ivar outer: the outer JSON object.
    @ivar inner: the decoded C{oslo.message} object.
    """

    outer: dict[str, Any]
    inner: dict[str, Any]

    @property
    def msg_id(self) -> str | None:
        """C{_msg_id}: set on call requests and on replies."""
        value = self.inner.get("_msg_id")
        return value if isinstance(value, str) else None

    @property
    def reply_queue(self) -> str | None:
        """C{_reply_q}: where the caller waits; set on call requests only."""
        value = self.inner.get("_reply_q")
        return value if isinstance(value, str) else None

    @property
    def method(self) -> str | None:
        """The RPC method name of a request."""
        value = self.inner.get("method")
        return value if isinstance(value, str) else None

    @property
    def is_call(self) -> bool:
        """Whether this request expects a reply."""
        return self.msg_id is not None and self.reply_queue is not None

    def check_request(self) -> None:
        """
        Refuse a request whose call fields an oslo server would read
        differently from msgmux.

        oslo's server answers any request whose C{_msg_id} is truthy, to
        whatever C{_reply_q} says, whatever their JSON types.  msgmux
        rewrites only calls whose two fields are non-empty text; a request
        carrying one of them without the other, or either as another type,
        would reach the server unrewritten and make it answer into an
        arbitrary queue.  So it is refused.

        A C{_reply_q} longer than an AMQP queue name (255 bytes) is refused
        too: no reply could be published to it, and the reply's link frame
        would be refused by the other half.

        @raise EnvelopeError: for such a request.
        """
        inner = self.inner
        if "_msg_id" not in inner and "_reply_q" not in inner:
            return
        msg_id, reply_queue = inner.get("_msg_id"), inner.get("_reply_q")
        if type(msg_id) is not str or type(reply_queue) is not str or not msg_id or not reply_queue:
            raise EnvelopeError("a request with _msg_id or _reply_q needs both, as non-empty text")
        if len(reply_queue.encode("utf-8", "surrogatepass")) > 255:
            raise EnvelopeError("_reply_q is longer than an AMQP queue name (255 bytes)")

    def with_inner(self, **changes: Any) -> bytes:
        """
        @param changes: inner keys to replace.
        @return: the re-serialized body with those keys changed.
        """
        inner = dict(self.inner)
        inner.update(changes)
        outer = dict(self.outer)
        outer["oslo.message"] = json.dumps(inner)
        return json.dumps(outer).encode("utf-8")


def parse(body: bytes) -> Envelope:
    """
    @param body: an AMQP message body.
    @return: the envelope.
    @raise EnvelopeError: when the body is not an oslo 2.0 envelope.
    """
    # Strictly UTF-8, as oslo's consumers decode it (content_encoding
    # utf-8): json.loads on bytes would also accept UTF-16 and UTF-32, which
    # a consumer would read differently.
    try:
        outer = decode_tree(json.loads, body.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise EnvelopeError(f"body is not UTF-8 JSON: {e}"[:200]) from None
    if type(outer) is not dict:
        raise EnvelopeError("body is not a JSON object")
    if outer.get("oslo.version") != OSLO_VERSION:
        raise EnvelopeError(f"oslo.version is {outer.get('oslo.version')!r}, expected {OSLO_VERSION!r}"[:200])
    text = outer.get("oslo.message")
    if type(text) is not str:
        raise EnvelopeError("oslo.message is not a JSON string")
    try:
        inner = decode_tree(json.loads, text)
    except (ValueError, RecursionError) as e:
        raise EnvelopeError(f"oslo.message is not JSON: {e}"[:200]) from None
    if type(inner) is not dict:
        raise EnvelopeError("oslo.message is not a JSON object")
    return Envelope(outer, inner)


def might_be_call(body: bytes) -> bool:
    """
    Cheap pre-check: a body without the bytes C{_reply_q} is not a call, so
    the relay can pass casts through without parsing JSON.

    @param body: an AMQP message body.
    @return: L{False} when the body certainly is not a call request.
    """
    return b"_reply_q" in body


#: Bytes of a body counted at a time by L{container_count}.
_COUNT_CHUNK = 256 * 1024


def container_count(body: bytes, most: int | None = None) -> int:
    """
    An upper bound on the JSON arrays and objects in C{body}, in the time of
    two byte scans: the brackets that open them (the count includes
    brackets inside strings, which is why it is only a bound).

    Parsing JSON costs in proportion to the values it builds; a body of
    millions of empty lists costs a second of CPU while its bytes say
    nothing alarming.  Bounding this count first makes refusing such a body
    cheap, whatever its size.

    @param most: stop counting once the count passes it (the body is then
        refused anyway): an 8 MB body of empty lists is refused after its
        first half megabyte rather than scanned whole.
    @return: the count, or with C{most}, a number above C{most} once it is.
    """
    if most is None:
        return body.count(b"[") + body.count(b"{")
    total = 0
    for start in range(0, len(body), _COUNT_CHUNK):
        end = start + _COUNT_CHUNK
        total += body.count(b"[", start, end) + body.count(b"{", start, end)
        if total > most:
            break
    return total


# How oslo.messaging serialises a request (rpc.client._make_message puts the
# method first; common.serialize_msg and kombu's json.dumps write the
# envelope with the default separators).
_LEADING_METHOD = re.compile(rb'\{"oslo\.version": "2\.0", "oslo\.message": "\{\\"method\\": \\"([A-Za-z0-9_.:-]{1,255})\\"')


def leading_method(body: bytes) -> str | None:
    """
    The method of a request laid out as oslo.messaging lays it out, read
    from the first bytes of the body without parsing it.

    Only good for refusing: JSON lets a later C{method} key override this
    one, so a request whose leading method is allowed must still be parsed
    and checked whole.  A leading method that is not allowed is refused at
    once, whatever follows it.

    @return: the method, or L{None} when the body does not start that way.
    """
    match = _LEADING_METHOD.match(body)
    return match.group(1).decode("ascii") if match else None
