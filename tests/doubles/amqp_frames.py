# -*- test-case-name: tests.test_scripted_capture -*-
"""
AMQP 0-9-1 frames as the scripted broker and the capture tool see them.

Method arguments are read and written from the specification msgmux ships
(C{msgmux/amqp/amqp0-9-1.xml}, through txAMQP's spec loader), so every
method is handled by the same few lines; field tables and content
properties use L{msgmux.amqp.wire}, which knows every RabbitMQ field type.
Re-encoding a decoded frame gives back its bytes (tested for every frame of
the fixture), which is what lets the scripted broker change a captured
reply's varying fields and nothing else.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

import attrs

from msgmux.amqp import wire
from msgmux.amqp.protocol import load_spec

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">I")
_LONGLONG = struct.Struct(">Q")
_CONTENT_HEAD = struct.Struct(">HHQ")


class FrameError(ValueError):
    """Bytes that do not make an AMQP frame or method this module knows."""


def method_name(method: Any) -> str:
    """@return: C{"queue.declare-ok"} for a txAMQP spec method."""
    return f"{method.klass.name}.{method.name}"


def spec_method(name: str) -> Any:
    """
    @param name: C{class.method}, e.g. C{"basic.consume-ok"}.
    @return: the txAMQP spec method.
    @raise FrameError: for a name the specification does not have.
    """
    klass, _, method = name.partition(".")
    try:
        return load_spec().classes.byname[klass].methods.byname[method]
    except KeyError:
        raise FrameError(f"no AMQP 0-9-1 method {name!r}") from None


def method_by_id(class_id: int, method_id: int) -> Any:
    """@raise FrameError: for ids the specification does not have."""
    try:
        return load_spec().classes.byid[class_id].methods.byid[method_id]
    except KeyError:
        raise FrameError(f"no AMQP 0-9-1 method {class_id}.{method_id}") from None


def decode_method(payload: bytes) -> tuple[Any, dict[str, Any]]:
    """
    @param payload: a method frame's payload.
    @return: the spec method and its arguments by spec name (long strings
        as bytes, tables as dicts).
    @raise FrameError: for an unknown method or malformed arguments.
    """
    if len(payload) < 4:
        raise FrameError("method frame shorter than its ids")
    method = method_by_id(*struct.unpack_from(">HH", payload))
    fields: dict[str, Any] = {}
    offset = 4
    bit = 8
    octet = 0
    try:
        for field in method.fields:
            kind = field.type
            if kind == "bit":
                if bit == 8:
                    octet = payload[offset]
                    offset += 1
                    bit = 0
                fields[field.name] = bool(octet & (1 << bit))
                bit += 1
                continue
            bit = 8
            if kind == "octet":
                fields[field.name] = payload[offset]
                offset += 1
            elif kind == "short":
                fields[field.name] = _SHORT.unpack_from(payload, offset)[0]
                offset += 2
            elif kind == "long":
                fields[field.name] = _LONG.unpack_from(payload, offset)[0]
                offset += 4
            elif kind == "longlong":
                fields[field.name] = _LONGLONG.unpack_from(payload, offset)[0]
                offset += 8
            elif kind == "shortstr":
                fields[field.name], offset = wire.decode_shortstr(payload, offset)
            elif kind == "longstr":
                (size,) = _LONG.unpack_from(payload, offset)
                fields[field.name] = payload[offset + 4 : offset + 4 + size]
                offset += 4 + size
            elif kind == "table":
                fields[field.name], offset = wire.decode_table(payload, offset)
            else:
                raise FrameError(f"{method_name(method)}: field type {kind} is not supported")
    except (struct.error, IndexError, wire.WireError) as e:
        raise FrameError(f"{method_name(method)}: malformed arguments ({e})") from None
    if offset != len(payload):
        raise FrameError(f"{method_name(method)}: {len(payload) - offset} bytes after the arguments")
    return method, fields


def encode_method(method: Any, fields: dict[str, Any]) -> bytes:
    """
    @param method: a txAMQP spec method.
    @param fields: its arguments by spec name; missing ones are zero, false
        or empty.
    @return: the method frame's payload.
    """
    unknown = set(fields) - {field.name for field in method.fields}
    if unknown:
        raise FrameError(f"{method_name(method)} has no fields {sorted(unknown)}")
    out = [struct.pack(">HH", method.klass.id, method.id)]
    bits: list[bool] = []
    for field in method.fields:
        value = fields.get(field.name)
        if field.type == "bit":
            bits.append(bool(value))
            continue
        if bits:
            out.append(_pack_bits(bits))
            bits = []
        if field.type == "octet":
            out.append(bytes((value or 0,)))
        elif field.type == "short":
            out.append(_SHORT.pack(value or 0))
        elif field.type == "long":
            out.append(_LONG.pack(value or 0))
        elif field.type == "longlong":
            out.append(_LONGLONG.pack(value or 0))
        elif field.type == "shortstr":
            out.append(wire.encode_shortstr(value or ""))
        elif field.type == "longstr":
            raw = value.encode("utf-8") if isinstance(value, str) else (value or b"")
            out.append(_LONG.pack(len(raw)) + raw)
        elif field.type == "table":
            out.append(wire.encode_table(value or {}))
        else:
            raise FrameError(f"{method_name(method)}: field type {field.type} is not supported")
    if bits:
        out.append(_pack_bits(bits))
    return b"".join(out)


def _pack_bits(bits: list[bool]) -> bytes:
    out = bytearray()
    for start in range(0, len(bits), 8):
        out.append(sum(1 << index for index, bit in enumerate(bits[start : start + 8]) if bit))
    return bytes(out)


def decode_content_header(payload: bytes) -> tuple[int, int, int, dict[str, Any]]:
    """@return: class id, weight, body size and properties of a content header."""
    try:
        class_id, weight, size = _CONTENT_HEAD.unpack_from(payload)
    except struct.error:
        raise FrameError("truncated content header") from None
    try:
        return class_id, weight, size, wire.decode_properties(payload, _CONTENT_HEAD.size)
    except wire.WireError as e:
        raise FrameError(f"content header: {e}") from None


def encode_content_header(class_id: int, weight: int, size: int, properties: dict[str, Any]) -> bytes:
    """@return: a content header payload."""
    return _CONTENT_HEAD.pack(class_id, weight, size) + wire.encode_properties(properties)


@attrs.frozen
class Frame:
    """
    One AMQP frame (or the protocol header, type 0).

    @ivar kind: L{wire.FRAME_METHOD}, C{FRAME_HEADER}, C{FRAME_BODY},
        C{FRAME_HEARTBEAT}, or 0 for the protocol header.
    """

    kind: int
    channel: int
    payload: bytes

    @property
    def raw(self) -> bytes:
        """The frame's bytes on the wire."""
        if self.kind == 0:
            return self.payload
        return wire.frame(self.kind, self.channel, self.payload)


class FrameSplitter:
    """
    Cuts a byte stream into frames, whatever the read sizes.

    @param header: whether the stream starts with the protocol header (the
        client's does).
    """

    def __init__(self, header: bool) -> None:
        self._buffer = bytearray()
        self._header = header

    def feed(self, data: bytes) -> Iterator[Frame]:
        """
        @return: the frames C{data} completes.
        @raise FrameError: for bytes that cannot start a frame.
        """
        buffer = self._buffer
        buffer += data
        if self._header:
            if len(buffer) < len(PROTOCOL_HEADER):
                return
            self._header = False
            raw = bytes(buffer[: len(PROTOCOL_HEADER)])
            del buffer[: len(PROTOCOL_HEADER)]
            if raw != PROTOCOL_HEADER:
                raise FrameError(f"not the AMQP 0-9-1 protocol header: {raw!r}")
            yield Frame(0, 0, raw)
        while len(buffer) >= 8:
            kind, channel, size = wire.FRAME_HEAD.unpack_from(buffer)
            if len(buffer) < size + 8:
                return
            if buffer[size + 7] != wire.FRAME_END:
                raise FrameError(f"frame of type {kind} on channel {channel} does not end with frame-end")
            payload = bytes(buffer[7 : size + 7])
            del buffer[: size + 8]
            yield Frame(kind, channel, payload)


def describe(frame: Frame) -> dict[str, Any]:
    """
    @return: a JSON-ready description of a frame: C{method} and C{fields}
        for a method frame, C{properties} and C{body-size} for a content
        header; byte strings as text where they are UTF-8.
    """
    if frame.kind == 0:
        return {"type": "protocol-header"}
    if frame.kind == wire.FRAME_METHOD:
        method, fields = decode_method(frame.payload)
        return {"type": "method", "method": method_name(method), "fields": _jsonable(fields)}
    if frame.kind == wire.FRAME_HEADER:
        class_id, weight, size, properties = decode_content_header(frame.payload)
        return {
            "type": "header",
            "class-id": class_id,
            "weight": weight,
            "body-size": size,
            "properties": _jsonable(properties),
        }
    if frame.kind == wire.FRAME_BODY:
        return {"type": "body", "size": len(frame.payload)}
    if frame.kind == wire.FRAME_HEARTBEAT:
        return {"type": "heartbeat"}
    raise FrameError(f"unknown frame type {frame.kind}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"hex": value.hex()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
