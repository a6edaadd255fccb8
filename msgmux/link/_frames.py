# -*- test-case-name: tests.test_codec -*-
"""
Link frame values, and the checks that build them from decoded CBOR.

Private to L{msgmux.link.codec}, which re-exports what is public.  The
checks get CBOR already decoded within the codec's byte bounds; they refuse
every value of the wrong type, shape or range with L{FrameError}, because it
comes from a peer that may be hostile.
"""

from __future__ import annotations

import datetime
import decimal
import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import attrs

from msgmux.message import (
    MAX_NAME,
    PROPERTY_TYPES,
    Address,
    CanaryAddress,
    Message,
    NotificationAddress,
    ReplyAddress,
    RpcAddress,
)

# Frame type codes (the byte after the length).
HELLO, WELCOME, MSG, ACK, REJECT, CREDIT, HEARTBEAT, CLOSE = range(8)

# Message kinds (second element of a MSG head).
KIND_RPC, KIND_NOTIFICATION, KIND_REPLY, KIND_CANARY = range(4)

#: Most sequence numbers one ACK frame may carry.
ACK_BATCH = 256

# Integer properties and their AMQP widths (octet, octet, timestamp).
_PROPERTY_BITS = {"delivery_mode": 8, "priority": 8, "timestamp": 64}


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the link must close."""


@attrs.frozen
class Hello:
    """
    Tenant to control, first frame: who I am and what I speak.

    @ivar versions: protocol versions the tenant half supports.
    @ivar link: the link name it expects to serve, or L{None}.
    @ivar software: free-form implementation identifier, for logs.
    """

    versions: tuple[int, ...]
    link: str | None
    software: str


@attrs.frozen
class Welcome:
    """
    Control to tenant, answer to HELLO: the session's terms.

    @ivar heartbeat: seconds between heartbeats.
    @ivar max_body: the largest MSG body the control half accepts.
    @ivar routes: what the tenant half must serve, as defined in
        C{docs/protocol.md} (plain CBOR data; see L{msgmux.routing}).
    """

    version: int
    link: str
    session: str
    heartbeat: float
    max_body: int
    routes: Mapping[str, Any]


@attrs.frozen
class MessageFrame:
    """
    A relayed message on the link, numbered for L{Ack} and L{Reject}.

    @ivar seq: per-session, per-direction sequence number, from 1.
    """

    seq: int
    message: Message


@attrs.frozen
class Ack:
    """The destination broker confirmed these messages; ack them at the source."""

    seqs: tuple[int, ...]


@attrs.frozen
class Reject:
    """
    The receiver refused a message for good (policy, limits, malformed
    content): the sender drops it at its source without requeueing.
    """

    seq: int
    reason: str


@attrs.frozen
class Credit:
    """The receiver accepts C{messages} more messages and C{bytes} more body bytes."""

    messages: int
    bytes: int


@attrs.frozen
class Heartbeat:
    """Sent when a half has sent nothing else for one heartbeat interval."""


@attrs.frozen
class Close:
    """Last frame before a half closes the socket, saying why."""

    code: str
    detail: str


Frame = Union[Hello, Welcome, MessageFrame, Ack, Reject, Credit, Heartbeat, Close]


# --- from decoded CBOR to frames -----------------------------------------


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise FrameError(what)


def _is_uint(value: object, bits: int = 64) -> bool:
    return type(value) is int and 0 <= value < (1 << bits)


def _is_str(value: object) -> bool:
    return type(value) is str


def decode_message(head: object, body: bytes, header_names: frozenset[str] | None = None) -> MessageFrame:
    """
    @param head: the decoded CBOR head of a MSG frame.
    @param body: its body.
    @param header_names: when given, the message's headers are neither kept
        nor checked: they become C{True} for each of these names present
        (a receiver that replaces the headers needs no more, and checking
        thousands of nested values would cost it more than decoding them).
    @return: the frame, if the head is valid.
    """
    # The hot path of every relayed message: checks are inline, and error
    # texts are only built when a check fails.
    if type(head) is not list or len(head) != 5:
        raise FrameError("MSG head must be an array of 5 fields")
    seq, kind, address, properties, deadline = head
    if type(seq) is not int or not 0 < seq < 1 << 64:
        raise FrameError("MSG seq must be a positive integer")
    if type(address) is not list:
        raise FrameError("MSG address must be an array")
    if deadline is not None:
        if type(deadline) is not float and type(deadline) is not int:
            raise FrameError("MSG deadline must be a number or null")
        try:
            deadline = float(deadline)
        except OverflowError:
            raise FrameError("MSG deadline out of range") from None
        if not math.isfinite(deadline):
            raise FrameError("MSG deadline must be finite")
    message = Message(_decode_address(kind, address), _decode_properties(properties, header_names), body, deadline)
    return MessageFrame(seq, message)


# Decoded addresses by their wire form.  Relayed traffic uses a handful of
# addresses over and over, so this saves building and checking them per
# message; it is emptied when it grows past a bound (a peer cycling through
# topics cannot grow it without limit).
_ADDRESSES: dict[tuple[Any, ...], Address] = {}
_ADDRESS_CACHE_LIMIT = 4096


def _decode_address(kind: object, address: list[Any]) -> Address:
    if type(kind) is not int:
        raise FrameError("MSG kind must be an unsigned integer")
    if kind == KIND_RPC and len(address) == 4 and type(address[3]) is not bool:
        # Checked before the cache: 0 == False would find a cached address.
        raise FrameError("bad RPC address: fanout must be a boolean")
    try:
        key = (kind, *address)
        cached = _ADDRESSES.get(key)
    except TypeError:  # an unhashable element: certainly invalid, checked below
        key, cached = None, None
    if cached is not None:
        return cached
    decoded = _check_address(kind, address)
    if key is not None:
        if len(_ADDRESSES) >= _ADDRESS_CACHE_LIMIT:
            _ADDRESSES.clear()
        _ADDRESSES[key] = decoded
    return decoded


def _is_name(value: object) -> bool:
    return type(value) is str and len(value) <= MAX_NAME and len(value.encode("utf-8")) <= MAX_NAME


def _optional_name(value: object) -> bool:
    return value is None or _is_name(value)


def _check_address(kind: int, address: list[Any]) -> Address:
    if kind == KIND_RPC and len(address) == 4:
        exchange, topic, server, fanout = address
        _expect(_optional_name(exchange) and _is_name(topic) and _optional_name(server), "bad RPC address")
        _expect(type(fanout) is bool, "bad RPC address: fanout must be a boolean")
        return RpcAddress(exchange, topic, server, fanout)
    if kind == KIND_NOTIFICATION and len(address) == 3:
        exchange, topic, priority = address
        _expect(_optional_name(exchange) and _is_name(topic) and _is_name(priority), "bad notification address")
        return NotificationAddress(exchange, topic, priority)
    if kind == KIND_CANARY and not address:
        return CanaryAddress()
    if kind == KIND_REPLY and len(address) == 1:
        _expect(_optional_name(address[0]), "bad reply address")
        return ReplyAddress(address[0])
    raise FrameError(f"bad message kind {kind!r} or address {address!r}"[:200])


def _decode_properties(properties: Any, header_names: frozenset[str] | None) -> dict[str, Any]:
    if type(properties) is not dict:
        raise FrameError("MSG properties must be a map")
    for name, value in properties.items():
        expected = PROPERTY_TYPES.get(name)
        if expected is None:
            raise FrameError(f"unknown message property {name!r}"[:200])
        if type(value) is not expected:
            raise FrameError(f"message property {name} has the wrong type")
        bits = _PROPERTY_BITS.get(name)
        if bits is not None and not 0 <= value < 1 << bits:  # type: ignore[operator]  # an int, checked above
            raise FrameError(f"message property {name} is out of range")
    headers = properties.get("headers")
    if headers:
        if header_names is None:
            _check_header_table(headers)
        else:
            properties["headers"] = {name: True for name in header_names if name in headers}
    return properties


_HEADER_SCALARS = frozenset({str, bytes, int, float, bool, decimal.Decimal, datetime.datetime, type(None)})


# Headers are the one part of a head whose size the peer chooses freely (up
# to MAX_HEAD), so these loops build no error text unless a check fails.
def _check_header_table(table: dict[Any, Any]) -> None:
    for key, value in table.items():
        if type(key) is not str:
            raise FrameError("header names must be text")
        if type(value) not in _HEADER_SCALARS:
            _check_header_value(value)


def _check_header_value(value: object) -> None:
    if type(value) is dict:
        _check_header_table(value)
    elif type(value) is list:
        for item in value:
            if type(item) not in _HEADER_SCALARS:
                _check_header_value(item)
    elif type(value) not in _HEADER_SCALARS:
        raise FrameError(f"header value of type {type(value).__name__} not allowed")


def _decode_hello(fields: list[Any]) -> Hello:
    (body,) = fields
    _expect(type(body) is dict, "HELLO body must be a map")
    versions = body.get("versions")
    _expect(type(versions) is list and all(_is_uint(v, 16) for v in versions), "HELLO versions must be integers")
    link, software = body.get("link"), body.get("software", "")
    _expect((link is None or _is_str(link)) and _is_str(software), "HELLO link/software must be text")
    return Hello(tuple(versions), link, software)


def _decode_welcome(fields: list[Any]) -> Welcome:
    (body,) = fields
    _expect(type(body) is dict, "WELCOME body must be a map")
    try:
        version, link, session = body["version"], body["link"], body["session"]
        heartbeat, max_body, routes = body["heartbeat"], body["max_body"], body["routes"]
    except KeyError:
        raise FrameError("WELCOME lacks a field") from None
    _expect(_is_uint(version, 16) and _is_str(link) and _is_str(session), "bad WELCOME")
    _expect(type(heartbeat) in (int, float) and 0 < heartbeat < math.inf, "WELCOME heartbeat must be a positive number")
    _expect(_is_uint(max_body, 32), "WELCOME max_body must be a 32-bit unsigned integer")
    _expect(type(routes) is dict, "WELCOME routes must be a map")
    return Welcome(version, link, session, float(heartbeat), max_body, routes)


def _decode_ack(fields: list[Any]) -> Ack:
    (seqs,) = fields
    _expect(type(seqs) is list and len(seqs) <= ACK_BATCH, f"ACK needs an array of at most {ACK_BATCH} numbers")
    _expect(all(_is_uint(s) and s > 0 for s in seqs), "ACK needs an array of sequence numbers")
    return Ack(tuple(seqs))


def _decode_reject(fields: list[Any]) -> Reject:
    seq, reason = fields
    _expect(_is_uint(seq) and seq > 0 and _is_str(reason), "REJECT needs a sequence number and a reason")
    return Reject(seq, reason)


def _decode_credit(fields: list[Any]) -> Credit:
    messages, size = fields
    _expect(_is_uint(messages, 32) and _is_uint(size, 64), "CREDIT needs a 32-bit message and a 64-bit byte increment")
    return Credit(messages, size)


def _decode_close(fields: list[Any]) -> Close:
    code, detail = fields
    _expect(_is_str(code) and _is_str(detail), "CLOSE needs a code and a detail")
    return Close(code, detail)


#: Field decoders and field counts of the frames whose payload is one CBOR array.
FIELD_DECODERS: dict[int, tuple[Callable[[list[Any]], Frame], int]] = {
    HELLO: (_decode_hello, 1),
    WELCOME: (_decode_welcome, 1),
    ACK: (_decode_ack, 1),
    REJECT: (_decode_reject, 2),
    CREDIT: (_decode_credit, 2),
    CLOSE: (_decode_close, 2),
}

#: Frame type names by code, for error messages.
NAMES = dict(enumerate(["HELLO", "WELCOME", "MSG", "ACK", "REJECT", "CREDIT", "HEARTBEAT", "CLOSE"]))
