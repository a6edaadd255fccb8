# -*- test-case-name: tests.test_wire -*-
"""
AMQP 0-9-1 wire encoding for the frames msgmux handles itself.

txAMQP negotiates connections and runs the synchronous methods (declare,
bind, consume...).  The frames every relayed message crosses -- basic.deliver
with its content header and body, basic.publish, basic.ack/nack/reject and the
broker's publisher confirms -- are encoded and decoded here instead, for two
reasons:

 - fidelity: txAMQP decodes bodies opportunistically as text (so a body split
   across frames inside a UTF-8 sequence breaks) and its field-table codec
   knows four value types; a relay must carry any message unchanged;
 - speed: txAMQP spends several Deferreds per frame.

Pure code, no reactor.  Field-table types follow RabbitMQ's reading of the
0-9-1 errata (C{t b B s u I i l f d D S A T F V x}).
"""

from __future__ import annotations

import datetime
import decimal
import functools
import struct
from typing import Any, Callable, TypeVar

T = TypeVar("T")

__all__ = [
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "WireError",
    "decode_properties",
    "decode_shortstr",
    "decode_table",
    "encode_ack",
    "encode_nack",
    "encode_properties",
    "encode_publish",
    "encode_reject",
    "encode_shortstr",
    "encode_table",
]

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"

BASIC = 60
BASIC_PUBLISH = 40
BASIC_RETURN = 50
BASIC_DELIVER = 60
BASIC_ACK = 80
BASIC_REJECT = 90
BASIC_NACK = 120

#: Frame header: type, channel, payload size.
FRAME_HEAD = struct.Struct(">BHI")

_U8 = struct.Struct(">B")
_I8 = struct.Struct(">b")
_U16 = struct.Struct(">H")
_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_METHOD_ID = struct.Struct(">HH")
_CONTENT_HEAD = struct.Struct(">HHQ")
_ACK_ARGS = struct.Struct(">HHQB")
_PUBLISH_PREFIX = struct.Struct(">HHH")

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class WireError(ValueError):
    """Bytes that are not valid AMQP, or a value AMQP cannot carry."""


# --- field tables ---------------------------------------------------------


def _read_shortstr(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise WireError("short string runs past the end")
    try:
        return data[offset + 1 : end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise WireError("short string is not UTF-8") from None


def _read_longbytes(data: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = _U32.unpack_from(data, offset)
    start = offset + 4
    end = start + length
    if end > len(data):
        raise WireError("long string runs past the end")
    return data[start:end], end


#: Field tables and arrays nested deeper than this inside a table are
#: refused, both ways.  Headers travel on to the other half, whose link
#: decoder allows 32 levels for a whole frame: the frame, the properties and
#: the headers take 3 of them, a decimal or timestamp value up to 2.  A
#: message the broker delivers with deeper headers must fail here, where it
#: is refused as malformed, not at the other half, which would close the
#: link for it on every redelivery.
MAX_NESTING = 24


def _read_value(data: bytes, offset: int, depth: int) -> tuple[Any, int]:
    kind = data[offset : offset + 1]
    offset += 1
    if kind == b"S":
        raw, offset = _read_longbytes(data, offset)
        try:
            return raw.decode("utf-8"), offset
        except UnicodeDecodeError:
            return raw, offset
    if kind == b"I":
        return _I32.unpack_from(data, offset)[0], offset + 4
    if kind == b"F":
        return _read_table(data, offset, depth + 1)
    if kind == b"t":
        return data[offset] != 0, offset + 1
    if kind == b"l":
        return _I64.unpack_from(data, offset)[0], offset + 8
    if kind == b"V":
        return None, offset
    if kind == b"A":
        return _read_array(data, offset, depth + 1)
    if kind == b"x":
        return _read_longbytes(data, offset)
    if kind == b"T":
        seconds = _U64.unpack_from(data, offset)[0]
        try:
            stamp = _EPOCH + datetime.timedelta(seconds=seconds)
        except OverflowError:
            raise WireError("timestamp out of range") from None
        return stamp, offset + 8
    if kind == b"d":
        return _F64.unpack_from(data, offset)[0], offset + 8
    if kind == b"f":
        return _F32.unpack_from(data, offset)[0], offset + 4
    if kind == b"b":
        return _I8.unpack_from(data, offset)[0], offset + 1
    if kind == b"B":
        return data[offset], offset + 1
    if kind == b"s":
        return _I16.unpack_from(data, offset)[0], offset + 2
    if kind == b"u":
        return _U16.unpack_from(data, offset)[0], offset + 2
    if kind == b"i":
        return _U32.unpack_from(data, offset)[0], offset + 4
    if kind == b"D":
        scale = data[offset]
        value = _I32.unpack_from(data, offset + 1)[0]
        return decimal.Decimal(value).scaleb(-scale), offset + 5
    raise WireError(f"unknown field value type {kind!r}")


def _read_table(data: bytes, offset: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    if depth > MAX_NESTING:
        raise WireError("field tables nested too deeply")
    (length,) = _U32.unpack_from(data, offset)
    offset += 4
    end = offset + length
    if end > len(data):
        raise WireError("field table runs past the end")
    table: dict[str, Any] = {}
    while offset < end:
        key, offset = _read_shortstr(data, offset)
        table[key], offset = _read_value(data, offset, depth)
    if offset != end:
        raise WireError("field table length does not match its entries")
    return table, end


def _read_array(data: bytes, offset: int, depth: int) -> tuple[list[Any], int]:
    if depth > MAX_NESTING:
        raise WireError("field arrays nested too deeply")
    (length,) = _U32.unpack_from(data, offset)
    offset += 4
    end = offset + length
    if end > len(data):
        raise WireError("field array runs past the end")
    items = []
    while offset < end:
        item, offset = _read_value(data, offset, depth)
        items.append(item)
    if offset != end:
        raise WireError("field array length does not match its items")
    return items, end


def decode_table(data: bytes, offset: int = 0) -> tuple[dict[str, Any], int]:
    """
    Decode a field table.

    @param data: the bytes holding it.
    @param offset: where its 32-bit length starts.
    @return: the table and the offset just past it.
    @raise WireError: when the bytes are not a valid table.
    """
    try:
        return _read_table(data, offset)
    except (struct.error, IndexError):
        raise WireError("truncated field table") from None


def encode_shortstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise WireError(f"short string longer than 255 bytes: {value[:40]!r}...")
    return _U8.pack(len(raw)) + raw


def decode_shortstr(data: bytes, offset: int) -> tuple[str, int]:
    """
    Decode a short string (length octet, UTF-8).

    @param data: the bytes holding it.
    @param offset: where its length octet is.
    @return: the text and the offset just past it.
    @raise WireError: when it runs past the end or is not UTF-8.
    """
    if offset >= len(data):
        raise WireError("short string runs past the end")
    return _read_shortstr(data, offset)


def _encode_value(value: Any, out: list[bytes], depth: int) -> None:
    kind = type(value)
    if kind is str:
        raw = value.encode("utf-8")
        out.append(b"S" + _U32.pack(len(raw)) + raw)
    elif kind is bool:
        out.append(b"t\x01" if value else b"t\x00")
    elif kind is int:
        if -(1 << 31) <= value < (1 << 31):
            out.append(b"I" + _I32.pack(value))
        elif -(1 << 63) <= value < (1 << 63):
            out.append(b"l" + _I64.pack(value))
        else:
            raise WireError(f"integer {value} does not fit a 64-bit field")
    elif kind is dict:
        out.append(b"F" + _encode_table(value, depth + 1))
    elif kind is list or kind is tuple:
        if depth + 1 > MAX_NESTING:
            raise WireError("field arrays nested too deeply")
        items: list[bytes] = []
        for item in value:
            _encode_value(item, items, depth + 1)
        payload = b"".join(items)
        out.append(b"A" + _U32.pack(len(payload)) + payload)
    elif kind is bytes:
        out.append(b"x" + _U32.pack(len(value)) + value)
    elif value is None:
        out.append(b"V")
    elif kind is float:
        out.append(b"d" + _F64.pack(value))
    elif kind is decimal.Decimal:
        out.append(b"D" + _encode_decimal(value))
    elif kind is datetime.datetime:
        out.append(b"T" + _encode_timestamp(value))
    else:
        raise WireError(f"AMQP cannot carry a header value of type {kind.__name__}")


def _encode_decimal(value: decimal.Decimal) -> bytes:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int) or not -255 <= exponent <= 0:
        raise WireError(f"decimal {value} cannot be carried (AMQP decimals have 0-255 decimal places)")
    mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if not -(1 << 31) <= mantissa < (1 << 31):
        raise WireError(f"decimal {value} does not fit AMQP's 32-bit decimal")
    return _U8.pack(-exponent) + _I32.pack(mantissa)


def _encode_timestamp(value: datetime.datetime) -> bytes:
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    seconds = int((value - _EPOCH).total_seconds())
    if not 0 <= seconds < (1 << 64):
        raise WireError(f"timestamp {value} is out of range")
    return _U64.pack(seconds)


def _encode_table(table: dict[str, Any], depth: int = 0) -> bytes:
    if depth > MAX_NESTING:
        raise WireError("field tables nested too deeply")
    out: list[bytes] = []
    for key, value in table.items():
        if type(key) is not str:
            raise WireError(f"field table keys must be text, not {key!r}")
        out.append(encode_shortstr(key))
        _encode_value(value, out, depth)
    payload = b"".join(out)
    return _U32.pack(len(payload)) + payload


def encode_table(table: dict[str, Any]) -> bytes:
    """
    @param table: str keys; values str, bytes, bool, int (64-bit), float,
        Decimal, datetime, None, list, dict.
    @return: the field table, length prefix included.
    @raise WireError: for a value AMQP cannot carry.
    """
    return _encode_table(table)


# --- basic content properties ---------------------------------------------

# (name, flag bit, kind) in wire order; kind: s=shortstr o=octet t=table q=longlong
_PROPERTIES = (
    ("content_type", 1 << 15, "s"),
    ("content_encoding", 1 << 14, "s"),
    ("headers", 1 << 13, "t"),
    ("delivery_mode", 1 << 12, "o"),
    ("priority", 1 << 11, "o"),
    ("correlation_id", 1 << 10, "s"),
    ("reply_to", 1 << 9, "s"),
    ("expiration", 1 << 8, "s"),
    ("message_id", 1 << 7, "s"),
    ("timestamp", 1 << 6, "q"),
    ("type", 1 << 5, "s"),
    ("user_id", 1 << 4, "s"),
    ("app_id", 1 << 3, "s"),
    ("cluster_id", 1 << 2, "s"),
)

PROPERTY_NAMES = tuple(name for name, _, _ in _PROPERTIES)


# Decoded property lists without header tables, by their bytes: relayed
# traffic repeats the same few.  Each caller gets its own dict.
_decoded_properties: dict[bytes, dict[str, Any]] = {}


def decode_properties(data: bytes, offset: int) -> dict[str, Any]:
    """
    Decode the property flags and list of a basic content header.

    @param data: the header frame payload.
    @param offset: where the property flags start.
    @return: the present properties by name (a new dict).
    @raise WireError: on malformed input.
    """
    raw = data[offset:] if offset else data
    cached = _decoded_properties.get(raw)
    if cached is not None:
        properties = dict(cached)
        if "headers" in properties:
            properties["headers"] = {}
        return properties
    properties = _decode_properties(data, offset)
    headers = properties.get("headers")
    if headers is None or headers == {}:
        if len(_decoded_properties) >= 1024:
            _decoded_properties.clear()
        _decoded_properties[raw] = dict(properties)
    return properties


def _decode_properties(data: bytes, offset: int) -> dict[str, Any]:
    try:
        (flags,) = _U16.unpack_from(data, offset)
        if flags & 1:
            raise WireError("content header has continued property flags, which basic does not use")
        offset += 2
        properties: dict[str, Any] = {}
        for name, bit, kind in _PROPERTIES:
            if flags & bit:
                if kind == "s":
                    properties[name], offset = _read_shortstr(data, offset)
                elif kind == "o":
                    properties[name] = data[offset]
                    offset += 1
                elif kind == "t":
                    properties[name], offset = _read_table(data, offset)
                else:
                    properties[name] = _U64.unpack_from(data, offset)[0]
                    offset += 8
        if offset != len(data):
            raise WireError("content header has trailing bytes")
        return properties
    except (struct.error, IndexError):
        raise WireError("truncated content header") from None


# oslo.messaging sends these five properties, with an empty header table, on
# every message: their encodings are cached by value.
_OSLO_PROPERTIES = frozenset(("content_type", "content_encoding", "headers", "delivery_mode", "priority"))
_oslo_encodings: dict[tuple[str, str, int, int], bytes] = {}


def encode_properties(properties: dict[str, Any]) -> bytes:
    """
    @param properties: basic properties by name (unknown names refused).
    @return: property flags and list.
    @raise WireError: for an unknown property or a value that does not fit.
    """
    if properties.keys() == _OSLO_PROPERTIES and properties["headers"] == {}:
        key = (properties["content_type"], properties["content_encoding"], properties["delivery_mode"], properties["priority"])
        cached = _oslo_encodings.get(key)
        if cached is not None and type(key[2]) is int and type(key[3]) is int:
            return cached
        encoded = _encode_properties(properties)
        if len(_oslo_encodings) < 256:
            _oslo_encodings[key] = encoded
        return encoded
    return _encode_properties(properties)


def _encode_properties(properties: dict[str, Any]) -> bytes:
    flags = 0
    out: list[bytes] = []
    for name, bit, kind in _PROPERTIES:
        value = properties.get(name)
        if value is None:
            continue
        flags |= bit
        if kind == "s":
            if type(value) is not str:
                raise WireError(f"{name} must be text")
            out.append(encode_shortstr(value))
        elif kind == "o":
            if type(value) is not int or not 0 <= value <= 255:
                raise WireError(f"{name} must be an integer 0-255")
            out.append(_U8.pack(value))
        elif kind == "t":
            if type(value) is not dict:
                raise WireError(f"{name} must be a table")
            out.append(_encode_table(value))
        else:
            if type(value) is not int or not 0 <= value < (1 << 64):
                raise WireError(f"{name} must be an unsigned 64-bit integer")
            out.append(_U64.pack(value))
    if len(properties) > bin(flags).count("1"):
        unknown = set(properties) - set(PROPERTY_NAMES)
        if unknown:
            raise WireError(f"unknown message properties: {', '.join(sorted(unknown))}")
    return _U16.pack(flags) + b"".join(out)


# --- frames on the hot path -----------------------------------------------


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """
    @return: one complete frame.
    """
    return FRAME_HEAD.pack(frame_type, channel, len(payload)) + payload + FRAME_END_BYTE


#: Bodies up to this size are joined with their frames into one string.
SMALL_BODY = 16384

# basic.publish method frames by (channel, exchange, routing key, mandatory):
# relayed traffic goes to few destinations.
_publish_frames: dict[tuple[int, str, str, bool], bytes] = {}


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    properties: dict[str, Any],
    body: bytes,
    frame_max: int,
    mandatory: bool = False,
) -> list[bytes]:
    """
    Encode basic.publish with its content header and body frames.

    @param frame_max: the negotiated maximum frame size; bodies are split so
        each body frame fits.
    @return: byte strings to write in order (a list, so that large bodies
        are not copied into one string).
    @raise WireError: when a name or property cannot be encoded.
    """
    key = (channel, exchange, routing_key, mandatory)
    method_frame = _publish_frames.get(key)
    if method_frame is None:
        method = (
            _PUBLISH_PREFIX.pack(BASIC, BASIC_PUBLISH, 0)
            + encode_shortstr(exchange)
            + encode_shortstr(routing_key)
            + (b"\x01" if mandatory else b"\x00")
        )
        method_frame = frame(FRAME_METHOD, channel, method)
        if len(_publish_frames) >= 4096:
            _publish_frames.clear()
        _publish_frames[key] = method_frame
    header = _CONTENT_HEAD.pack(BASIC, 0, len(body)) + encode_properties(properties)
    if frame_max > 0 and len(header) > frame_max - 8:
        # The content header cannot be split: RabbitMQ would close the whole
        # connection over it.
        raise WireError(f"content header of {len(header)} bytes exceeds frame_max {frame_max}")
    if 0 < len(body) <= SMALL_BODY and (frame_max <= 0 or len(body) <= frame_max - 8):
        # One string for a small message: cheaper to join than to hand the
        # transport five pieces.
        return [
            b"".join(
                (
                    method_frame,
                    FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)),
                    header,
                    FRAME_END_BYTE,
                    FRAME_HEAD.pack(FRAME_BODY, channel, len(body)),
                    body,
                    FRAME_END_BYTE,
                )
            )
        ]
    parts = [method_frame, frame(FRAME_HEADER, channel, header)]
    # frame_max 0 means "no limit" in connection.tune; below 4096 is not
    # allowed by the spec, but never let it turn into an empty range.
    chunk = max(frame_max - 8, 1) if frame_max > 0 else max(len(body), 1)
    if len(body) <= chunk:
        if body:
            parts.append(FRAME_HEAD.pack(FRAME_BODY, channel, len(body)))
            parts.append(body)
            parts.append(FRAME_END_BYTE)
    else:
        view = memoryview(body)
        for start in range(0, len(body), chunk):
            piece = view[start : start + chunk]
            parts.append(FRAME_HEAD.pack(FRAME_BODY, channel, len(piece)))
            parts.append(bytes(piece))
            parts.append(FRAME_END_BYTE)
    return parts


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """@return: a basic.ack frame."""
    return frame(FRAME_METHOD, channel, _ACK_ARGS.pack(BASIC, BASIC_ACK, delivery_tag, 1 if multiple else 0))


def encode_nack(channel: int, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> bytes:
    """@return: a basic.nack frame (RabbitMQ extension)."""
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return frame(FRAME_METHOD, channel, _ACK_ARGS.pack(BASIC, BASIC_NACK, delivery_tag, bits))


def encode_reject(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """@return: a basic.reject frame."""
    return frame(FRAME_METHOD, channel, _ACK_ARGS.pack(BASIC, BASIC_REJECT, delivery_tag, 1 if requeue else 0))


def _whole(decode: Callable[[bytes], T]) -> Callable[[bytes], T]:
    """Make a truncated payload a L{WireError}, like every other malformation."""

    @functools.wraps(decode)
    def checked(payload: bytes) -> T:
        try:
            return decode(payload)
        except (struct.error, IndexError):
            raise WireError(f"truncated {decode.__name__[7:]} payload") from None

    return checked


@_whole
def decode_deliver(payload: bytes) -> tuple[str, int, bool, str, str]:
    """
    @param payload: a basic.deliver method frame payload.
    @return: consumer tag, delivery tag, redelivered, exchange, routing key.
    """
    consumer_tag, offset = _read_shortstr(payload, 4)
    (delivery_tag,) = _U64.unpack_from(payload, offset)
    redelivered = bool(payload[offset + 8] & 1)
    exchange, offset = _read_shortstr(payload, offset + 9)
    routing_key, _ = _read_shortstr(payload, offset)
    return consumer_tag, delivery_tag, redelivered, exchange, routing_key


@_whole
def decode_return(payload: bytes) -> tuple[int, str, str, str]:
    """
    @param payload: a basic.return method frame payload.
    @return: reply code, reply text, exchange, routing key.
    """
    (code,) = _U16.unpack_from(payload, 4)
    text, offset = _read_shortstr(payload, 6)
    exchange, offset = _read_shortstr(payload, offset)
    routing_key, _ = _read_shortstr(payload, offset)
    return code, text, exchange, routing_key


@_whole
def decode_confirm(payload: bytes) -> tuple[int, bool]:
    """
    @param payload: a basic.ack or basic.nack payload sent by the broker.
    @return: delivery tag, multiple.
    """
    (tag,) = _U64.unpack_from(payload, 4)
    return tag, bool(payload[12] & 1)


def content_body_size(payload: bytes) -> int:
    """
    @param payload: a content header frame payload.
    @return: the size of the body that follows.
    @raise WireError: when the header is truncated or not for class basic.
    """
    try:
        class_id, _weight, size = _CONTENT_HEAD.unpack_from(payload, 0)
    except struct.error:
        raise WireError("truncated content header") from None
    if class_id != BASIC:
        raise WireError(f"content header for class {class_id}, expected basic")
    return size  # type: ignore[no-any-return]


def encode_exchange_declare(channel: int, name: str, kind: str, durable: bool, auto_delete: bool) -> bytes:
    """
    @return: an C{exchange.declare} frame with C{no-wait} set, so it can be
        pipelined in front of a publish without a round trip.
    """
    bits = (2 if durable else 0) | (4 if auto_delete else 0) | 16
    args = b"\x00\x28\x00\x0a\x00\x00" + encode_shortstr(name) + encode_shortstr(kind) + _U8.pack(bits) + b"\x00\x00\x00\x00"
    return frame(FRAME_METHOD, channel, args)
