# -*- test-case-name: tests.test_codec -*-
"""
The link frame codec: bytes to L{Frame} values and back, with no I/O.

A frame on the Unix socket is a 32-bit big-endian length followed by that many
bytes of CBOR encoding one array whose first element is the frame type.  The
layout is specified in C{docs/protocol.md}; this module is its reference
implementation.  Decoding is strict: any deviation (size, CBOR, type, field
shape) raises L{FrameError} and nothing else, because the bytes come from a
peer that may be hostile.
"""

from __future__ import annotations

import datetime
import decimal
import io
import math
import struct
from collections.abc import Mapping
from typing import Any, Union

import attrs
import cbor2

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

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Close",
    "Credit",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "Heartbeat",
    "Hello",
    "MessageFrame",
    "NotificationAddress",
    "Reject",
    "ReplyAddress",
    "CanaryAddress",
    "RpcAddress",
    "Welcome",
    "decode_frame",
    "encode",
]

PROTOCOL_VERSION = 1

#: Room for everything in a MSG frame that is not the body.
FRAME_OVERHEAD = 64 * 1024

#: Ceiling on one frame's CBOR payload where no smaller one was agreed:
#: RabbitMQ's own largest message plus envelope room.  The control half
#: announces its smaller limit for upstream frames in WELCOME.
DEFAULT_MAX_FRAME = 128 * 1024 * 1024 + FRAME_OVERHEAD

_LENGTH = struct.Struct(">I")

# Frame type codes (first array element).
HELLO, WELCOME, MSG, ACK, REJECT, CREDIT, HEARTBEAT, CLOSE = range(8)

# Message kinds (third MSG element).
KIND_RPC, KIND_NOTIFICATION, KIND_REPLY, KIND_CANARY = range(4)


# Integer properties and their AMQP widths (octet, octet, timestamp).
_PROPERTY_BITS = {"delivery_mode": 8, "priority": 8, "timestamp": 64}


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the link must close."""


# --- frame values ---------------------------------------------------------


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

    @ivar routes: what the tenant half must serve, as defined in
        C{docs/protocol.md} (plain CBOR data; see L{msgmux.routing}).
    """

    version: int
    link: str
    session: str
    heartbeat: float
    max_frame: int
    routes: Mapping[str, Any]


@attrs.frozen(slots=True)
class MessageFrame:
    """
    MSG: one relayed message, numbered.

    @ivar seq: per-session, per-direction sequence number, acknowledged by
        L{Ack} once the destination broker confirmed the publish.
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
    """The receiver accepts C{increment} more messages."""

    increment: int


@attrs.frozen
class Heartbeat:
    """Sent when a half has sent nothing else for one heartbeat interval."""


@attrs.frozen
class Close:
    """Last frame before a half closes the socket, saying why."""

    code: str
    detail: str


Frame = Union[Hello, Welcome, MessageFrame, Ack, Reject, Credit, Heartbeat, Close]


# --- encoding -------------------------------------------------------------


def _address_array(address: Address) -> tuple[int, list[Any]]:
    if isinstance(address, RpcAddress):
        return KIND_RPC, [address.exchange, address.topic, address.server, address.fanout]
    if isinstance(address, NotificationAddress):
        return KIND_NOTIFICATION, [address.exchange, address.topic, address.priority]
    if isinstance(address, CanaryAddress):
        return KIND_CANARY, []
    return KIND_REPLY, [address.queue]


def _frame_array(frame: Frame) -> list[Any]:
    if isinstance(frame, MessageFrame):
        message = frame.message
        kind, address = _address_array(message.address)
        return [MSG, frame.seq, kind, address, dict(message.properties), message.body, message.deadline]
    if isinstance(frame, Ack):
        return [ACK, list(frame.seqs)]
    if isinstance(frame, Credit):
        return [CREDIT, frame.increment]
    if isinstance(frame, Reject):
        return [REJECT, frame.seq, frame.reason]
    if isinstance(frame, Heartbeat):
        return [HEARTBEAT]
    if isinstance(frame, Close):
        return [CLOSE, frame.code, frame.detail]
    if isinstance(frame, Hello):
        return [HELLO, {"versions": list(frame.versions), "link": frame.link, "software": frame.software}]
    if isinstance(frame, Welcome):
        return [
            WELCOME,
            {
                "version": frame.version,
                "link": frame.link,
                "session": frame.session,
                "heartbeat": frame.heartbeat,
                "max_frame": frame.max_frame,
                "routes": frame.routes,
            },
        ]
    raise TypeError(f"not a frame: {frame!r}")


def encode_message(seq: int, message: Message) -> bytes:
    """
    @return: the CBOR payload of C{message} numbered C{seq} (the hot path:
        no new frame object).
    """
    kind, address = _address_array(message.address)
    return cbor2.dumps([MSG, seq, kind, address, message.properties, message.body, message.deadline], datetime_as_timestamp=True)


def encode_payload(frame: Frame) -> bytes:
    """
    @param frame: a frame value.
    @return: its CBOR payload, without the length prefix.
    """
    return cbor2.dumps(_frame_array(frame), datetime_as_timestamp=True)


def encode(frame: Frame) -> bytes:
    """
    @param frame: a frame value.
    @return: the bytes to write on the socket (length prefix included).
    """
    payload = encode_payload(frame)
    return _LENGTH.pack(len(payload)) + payload


# --- decoding -------------------------------------------------------------


def _refuse_tag(decoder: Any, *args: Any) -> Any:
    raise FrameError("CBOR tag not allowed")


# Tags cbor2 would otherwise decode natively.  Only 1 (epoch timestamps) and 4
# (decimal fractions) are allowed: they carry AMQP header values of types T
# and D.  Everything else (regexes, MIME, shared references, bignums, sets...)
# is either costly to decode or meaningless here.
_REFUSED_TAGS = {
    tag: _refuse_tag
    for tag in (0, 2, 3, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799)
}


def _cbor_decoder(stream: io.BytesIO) -> Any:
    return cbor2.CBORDecoder(
        stream,
        tag_hook=_refuse_tag,
        semantic_decoders=_REFUSED_TAGS,
        max_depth=32,
        allow_indefinite=False,
        strict_hashable_types=True,
    )


def decode_frame(payload: bytes, decoder: Any = None) -> Frame:
    """
    Decode one frame payload (the bytes after the length prefix).

    @param payload: CBOR bytes.
    @param decoder: a CBOR decoder to reuse (building one with these
        options costs more than decoding a small frame); L{FrameDecoder}
        keeps one.  It carries nothing from one frame to the next: shared
        references, the only CBOR feature with state, are refused.
    @return: the frame.
    @raise FrameError: for anything that is not a well-formed frame.
    """
    stream = io.BytesIO(payload)
    try:
        if decoder is None:
            decoder = _cbor_decoder(stream)
        else:
            decoder.fp = stream
        array = decoder.decode()
    except FrameError:
        raise
    except Exception as e:  # cbor2 raises CBORDecodeError, MemoryError, OverflowError...
        raise FrameError(f"bad CBOR: {type(e).__name__}: {e}") from None
    if stream.tell() != len(payload):
        raise FrameError("bytes after the frame's CBOR value")
    if type(array) is not list or not array:
        raise FrameError("frame is not a non-empty CBOR array")
    if type(array[0]) is not int:
        raise FrameError(f"frame type {array[0]!r} is not an unsigned integer"[:200])
    try:
        return _DECODERS[array[0]](array)
    except FrameError:
        raise
    except (KeyError, TypeError):
        raise FrameError(f"unknown frame type {array[0]!r}") from None


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise FrameError(what)


def _is_uint(value: object, bits: int = 64) -> bool:
    return type(value) is int and 0 <= value < (1 << bits)


def _is_str(value: object) -> bool:
    return type(value) is str


def _optional_str(value: object) -> bool:
    return value is None or type(value) is str


def _fields(array: list[Any], count: int, name: str) -> list[Any]:
    _expect(len(array) == count, f"{name} frame needs {count - 1} fields, has {len(array) - 1}")
    return array


def _decode_message(array: list[Any]) -> MessageFrame:
    # The hot path of every relayed message: checks are inline, and error
    # texts are only built when a check fails.
    if len(array) != 7:
        raise FrameError(f"MSG frame needs 6 fields, has {len(array) - 1}")
    _, seq, kind, address, properties, body, deadline = array
    if type(seq) is not int or not 0 < seq < 1 << 64:
        raise FrameError("MSG seq must be a positive integer")
    if type(address) is not list:
        raise FrameError("MSG address must be an array")
    if type(body) is not bytes:
        raise FrameError("MSG body must be a byte string")
    if deadline is not None:
        if type(deadline) is not float and type(deadline) is not int:
            raise FrameError("MSG deadline must be a number or null")
        try:
            deadline = float(deadline)
        except OverflowError:
            raise FrameError("MSG deadline out of range") from None
        if not math.isfinite(deadline):
            raise FrameError("MSG deadline must be finite")
    return MessageFrame(seq, Message(_decode_address(kind, address), _decode_properties(properties), body, deadline))


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
    return type(value) is str and len(value) <= MAX_NAME and len(value.encode("utf-8")) <= MAX_NAME  # type: ignore[attr-defined]


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


def _decode_properties(properties: object) -> dict[str, Any]:
    if type(properties) is not dict:
        raise FrameError("MSG properties must be a map")
    for name, value in properties.items():
        expected = PROPERTY_TYPES.get(name)
        if expected is None:
            raise FrameError(f"unknown message property {name!r}"[:200])
        if type(value) is not expected:
            raise FrameError(f"message property {name} has the wrong type")
        bits = _PROPERTY_BITS.get(name)
        if bits is not None and not 0 <= value < 1 << bits:
            raise FrameError(f"message property {name} is out of range")
    headers = properties.get("headers")
    if headers:
        _check_header_table(headers)
    return properties


_HEADER_SCALARS = (str, bytes, int, float, bool, decimal.Decimal, datetime.datetime, type(None))


def _check_header_table(table: dict[Any, Any]) -> None:
    for key, value in table.items():
        _expect(type(key) is str, "header names must be text")
        _check_header_value(value)


def _check_header_value(value: object) -> None:
    if type(value) is dict:
        _check_header_table(value)  # type: ignore[arg-type]
    elif type(value) is list:
        for item in value:  # type: ignore[attr-defined]
            _check_header_value(item)
    else:
        _expect(type(value) in _HEADER_SCALARS, f"header value of type {type(value).__name__} not allowed")


def _decode_ack(array: list[Any]) -> Ack:
    _, seqs = _fields(array, 2, "ACK")
    _expect(type(seqs) is list and all(_is_uint(s) and s > 0 for s in seqs), "ACK needs an array of sequence numbers")
    return Ack(tuple(seqs))


def _decode_reject(array: list[Any]) -> Reject:
    _, seq, reason = _fields(array, 3, "REJECT")
    _expect(_is_uint(seq) and seq > 0 and _is_str(reason), "REJECT needs a sequence number and a reason")
    return Reject(seq, reason)


def _decode_credit(array: list[Any]) -> Credit:
    _, increment = _fields(array, 2, "CREDIT")
    _expect(_is_uint(increment, 32), "CREDIT needs a non-negative 32-bit increment")
    return Credit(increment)


def _decode_heartbeat(array: list[Any]) -> Heartbeat:
    _fields(array, 1, "HEARTBEAT")
    return Heartbeat()


def _decode_close(array: list[Any]) -> Close:
    _, code, detail = _fields(array, 3, "CLOSE")
    _expect(_is_str(code) and _is_str(detail), "CLOSE needs a code and a detail")
    return Close(code, detail)


def _decode_hello(array: list[Any]) -> Hello:
    _, body = _fields(array, 2, "HELLO")
    _expect(type(body) is dict, "HELLO body must be a map")
    versions = body.get("versions")
    _expect(type(versions) is list and all(_is_uint(v, 16) for v in versions), "HELLO versions must be integers")
    _expect(_optional_str(body.get("link")) and _is_str(body.get("software", "")), "HELLO link/software must be text")
    return Hello(tuple(versions), body.get("link"), body.get("software", ""))


def _decode_welcome(array: list[Any]) -> Welcome:
    _, body = _fields(array, 2, "WELCOME")
    _expect(type(body) is dict, "WELCOME body must be a map")
    try:
        welcome = Welcome(
            version=body["version"],
            link=body["link"],
            session=body["session"],
            heartbeat=body["heartbeat"],
            max_frame=body["max_frame"],
            routes=body["routes"],
        )
    except (KeyError, TypeError, ValueError):
        raise FrameError("WELCOME lacks a field or has a mistyped one") from None
    _expect(_is_uint(welcome.version, 16) and _is_str(welcome.link) and _is_str(welcome.session), "bad WELCOME")
    _expect(type(welcome.heartbeat) in (int, float), "WELCOME heartbeat must be a number")
    _expect(_is_uint(welcome.max_frame, 32) and 0 < welcome.heartbeat < math.inf, "bad WELCOME limits")
    welcome = attrs.evolve(welcome, heartbeat=float(welcome.heartbeat))
    _expect(type(welcome.routes) is dict, "WELCOME routes must be a map")
    return welcome


_DECODERS = {
    HELLO: _decode_hello,
    WELCOME: _decode_welcome,
    MSG: _decode_message,
    ACK: _decode_ack,
    REJECT: _decode_reject,
    CREDIT: _decode_credit,
    HEARTBEAT: _decode_heartbeat,
    CLOSE: _decode_close,
}


class FrameDecoder:
    """
    Incremental decoder: feed it socket bytes in any pieces, get frames.

    After it raised L{FrameError} it is broken for good; the protocol closes
    the link.

    @ivar max_frame: largest accepted payload; a larger length prefix is an
        error before any of the payload is buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._cbor = _cbor_decoder(io.BytesIO())

    def feed(self, data: bytes) -> list[Frame]:
        """
        @param data: the next bytes from the socket.
        @return: the frames completed by them, in order.
        @raise FrameError: when the stream is not valid.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        end = len(buffer)
        while end - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > self.max_frame:
                raise FrameError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
            if end - offset - 4 < length:
                break
            start = offset + 4
            offset = start + length
            frames.append(decode_frame(bytes(buffer[start:offset]), self._cbor))
        del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)
