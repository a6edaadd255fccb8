# -*- test-case-name: tests.test_codec -*-
"""
The link frame codec, protocol version 2: bytes to L{Frame} values and back,
with no I/O.

A frame is a 32-bit big-endian length, a frame type byte and a payload (the
length counts the type byte and the payload).  A MSG payload is a 32-bit head
length, a small CBOR head (sequence number, address, properties, deadline) and
the raw body; every other payload is one CBOR array of the frame's fields.
The layout is specified in C{docs/protocol.md}; this module is its reference
implementation.

The bytes come from a peer that may be hostile, so work is bounded by bytes
before any object is built: each frame type has a payload limit, checked as
soon as the five bytes of length and type are in, before the rest is buffered;
a MSG head has its own limit (L{MAX_HEAD}) and is the only part of a MSG that
CBOR decodes, so however its body is made, it costs one copy.  Decoding is
strict: any deviation (size, CBOR, type, field shape) raises L{FrameError} and
nothing else.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import cbor2

from msgmux.acyclic import decode_tree
from msgmux.link._frames import (
    ACK,
    ACK_BATCH,
    CLOSE,
    CREDIT,
    FIELD_DECODERS,
    HEARTBEAT,
    HELLO,
    KIND_CANARY,
    KIND_NOTIFICATION,
    KIND_REPLY,
    KIND_RPC,
    MSG,
    NAMES,
    REJECT,
    WELCOME,
    Ack,
    Close,
    Credit,
    Frame,
    FrameError,
    Heartbeat,
    Hello,
    MessageFrame,
    Reject,
    Welcome,
    decode_message,
)
from msgmux.message import Address, CanaryAddress, Message, NotificationAddress, ReplyAddress, RpcAddress

__all__ = [
    "ACK_BATCH",
    "DEFAULT_MAX_BODY",
    "MAX_ACK_PAYLOAD",
    "MAX_CLOSE_PAYLOAD",
    "MAX_CREDIT_PAYLOAD",
    "MAX_HEAD",
    "MAX_HEARTBEAT_PAYLOAD",
    "MAX_HELLO_PAYLOAD",
    "MAX_REJECT_PAYLOAD",
    "MAX_WELCOME_PAYLOAD",
    "PAYLOAD_LIMITS",
    "PROTOCOL_VERSION",
    "Ack",
    "Close",
    "Credit",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "Heartbeat",
    "Hello",
    "LegacyFrame",
    "MessageFrame",
    "Reject",
    "UndecodedMessage",
    "Welcome",
    "decode_frame",
    "encode",
    "encode_message",
    "encode_v1_close",
]

PROTOCOL_VERSION = 2

#: Largest CBOR head of a MSG frame: address, properties and headers of any
#: message oslo sends fit many times over (oslo sets no headers; RabbitMQ's
#: own, such as x-death, take a few hundred bytes), and decoding this much
#: hostile CBOR costs about 2.5 ms at worst.
MAX_HEAD = 8 * 1024

#: Largest MSG body a decoder accepts where no smaller limit was agreed:
#: RabbitMQ's own largest message.  The control half announces its smaller
#: limit in WELCOME.
DEFAULT_MAX_BODY = 128 * 1024 * 1024

#: Largest payload (bytes after the type byte) of each frame type but MSG,
#: whose limit is 4 + L{MAX_HEAD} + the decoder's C{max_body}.
MAX_HELLO_PAYLOAD = 4 * 1024
MAX_WELCOME_PAYLOAD = 1024 * 1024
MAX_ACK_PAYLOAD = 4 * 1024
MAX_REJECT_PAYLOAD = 1024
MAX_CREDIT_PAYLOAD = 64
MAX_HEARTBEAT_PAYLOAD = 0
MAX_CLOSE_PAYLOAD = 4 * 1024

#: The limits above by frame type code.
PAYLOAD_LIMITS: Mapping[int, int] = {
    HELLO: MAX_HELLO_PAYLOAD,
    WELCOME: MAX_WELCOME_PAYLOAD,
    ACK: MAX_ACK_PAYLOAD,
    REJECT: MAX_REJECT_PAYLOAD,
    CREDIT: MAX_CREDIT_PAYLOAD,
    HEARTBEAT: MAX_HEARTBEAT_PAYLOAD,
    CLOSE: MAX_CLOSE_PAYLOAD,
}

_LENGTH = struct.Struct(">I")
_PREFIX = struct.Struct(">IB")  # length, type
_MSG_PREFIX = struct.Struct(">IBI")  # length, type, head length
_MAX_LENGTH = 0xFFFFFFFF

# A version 1 frame's payload was one CBOR array [type, fields...] of one to
# seven elements, so its first byte is one of these array headers.
_V1_FIRST_BYTES = range(0x81, 0x88)


class LegacyFrame(FrameError):
    """
    The stream starts with a version 1 frame: the peer is a version 1 half.
    Send it L{encode_v1_close} before closing, so it logs why.
    """


# --- encoding -------------------------------------------------------------


def _address_array(address: Address) -> tuple[int, list[Any]]:
    if type(address) is RpcAddress:
        return KIND_RPC, [address.exchange, address.topic, address.server, address.fanout]
    if type(address) is NotificationAddress:
        return KIND_NOTIFICATION, [address.exchange, address.topic, address.priority]
    if type(address) is CanaryAddress:
        return KIND_CANARY, []
    if type(address) is ReplyAddress:
        return KIND_REPLY, [address.queue]
    raise TypeError(f"not an address: {address!r}")


def encode_message(seq: int, message: Message) -> tuple[bytes, bytes]:
    """
    Encode a MSG frame in two parts, for C{writeSequence}: the body is sent
    as it is, never copied into a frame.

    @param seq: its sequence number.
    @param message: the message; its address and properties are trusted
        (they come from this half's broker or were checked on the way in).
    @return: the frame's prefix, type, head length and head; then the body.
    @raise ValueError: if the head exceeds L{MAX_HEAD} or the frame the
        32-bit length, so the sender can refuse the message as too large.
    """
    kind, address = _address_array(message.address)
    head = cbor2.dumps([seq, kind, address, message.properties, message.deadline], datetime_as_timestamp=True)
    head_length = len(head)
    if head_length > MAX_HEAD:
        raise ValueError(f"MSG head of {head_length} bytes exceeds {MAX_HEAD}")
    body = message.body
    length = 5 + head_length + len(body)
    if length > _MAX_LENGTH:
        raise ValueError(f"MSG frame of {length} bytes exceeds the 32-bit length")
    return _MSG_PREFIX.pack(length, MSG, head_length) + head, body


def _fields(frame: Frame) -> tuple[int, list[Any]]:
    if isinstance(frame, Ack):
        if len(frame.seqs) > ACK_BATCH:
            raise ValueError(f"ACK of {len(frame.seqs)} sequence numbers exceeds {ACK_BATCH}")
        return ACK, [list(frame.seqs)]
    if isinstance(frame, Credit):
        return CREDIT, [frame.messages, frame.bytes]
    if isinstance(frame, Reject):
        return REJECT, [frame.seq, frame.reason]
    if isinstance(frame, Close):
        return CLOSE, [frame.code, frame.detail]
    if isinstance(frame, Hello):
        return HELLO, [{"versions": list(frame.versions), "link": frame.link, "software": frame.software}]
    if isinstance(frame, Welcome):
        welcome = {
            "version": frame.version,
            "link": frame.link,
            "session": frame.session,
            "heartbeat": frame.heartbeat,
            "max_body": frame.max_body,
            "routes": frame.routes,
        }
        return WELCOME, [welcome]
    raise TypeError(f"not a frame: {frame!r}")


_HEARTBEAT_FRAME = _PREFIX.pack(1, HEARTBEAT)


def encode(frame: Frame) -> bytes:
    """
    @param frame: a frame value.
    @return: the bytes to write on the socket, length prefix included.
    @raise ValueError: if the frame exceeds its type's payload limit (the
        peer would refuse it).
    @raise TypeError: if C{frame} is not a frame.
    """
    if isinstance(frame, MessageFrame):
        head, body = encode_message(frame.seq, frame.message)
        return head + body
    if isinstance(frame, Heartbeat):
        return _HEARTBEAT_FRAME
    code, fields = _fields(frame)
    payload = cbor2.dumps(fields, datetime_as_timestamp=True)
    if len(payload) > PAYLOAD_LIMITS[code]:
        raise ValueError(f"{type(frame).__name__} payload of {len(payload)} bytes exceeds {PAYLOAD_LIMITS[code]}")
    return _PREFIX.pack(len(payload) + 1, code) + payload


def encode_v1_close(code: str, detail: str) -> bytes:
    """
    @return: a complete version 1 CLOSE frame, which a version 1 half
        decodes and logs (instead of a version 2 frame it cannot read).
    """
    payload = cbor2.dumps([CLOSE, code, detail])
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


#: C{_point_stream(stream, data)} makes C{stream} read C{data} from its start.
_point_stream = io.BytesIO.__init__


def _copy(source: bytes | bytearray, start: int, stop: int) -> bytes:
    """@return: C{source[start:stop]} as bytes, copied once (a bytearray slice is a copy itself)."""
    if type(source) is bytes:
        return source[start:stop]
    with memoryview(source) as view:
        return bytes(view[start:stop])


# Payload limits by type byte; None for bytes that are no frame type (and for
# MSG, whose limit depends on the decoder).
_LIMITS: list[int | None] = [PAYLOAD_LIMITS.get(code) for code in range(256)]
_LIMITS_WITHOUT_WELCOME = [None if code == WELCOME else limit for code, limit in enumerate(_LIMITS)]

_HEARTBEAT = Heartbeat()


class UndecodedMessage:
    """
    A MSG frame whose sizes were checked but whose head is not decoded yet
    (L{FrameDecoder.feed} with C{heads=False}): decoding a head is the one
    part of a frame whose cost depends on what the peer put in it, so the
    protocol decides when to spend it (L{FrameDecoder.decode_head}).
    """

    __slots__ = ("head", "body")

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head = head
        self.body = body


class FrameDecoder:
    """
    Incremental decoder: feed it socket bytes in any pieces, get frames.

    Sizes are checked as soon as a frame's length and type are in (and a MSG's
    head length), before the rest of the frame is buffered.  After it raised
    L{FrameError} it is broken for good (and the frames decoded in the same
    call are dropped); the protocol closes the link.

    @ivar max_body: largest accepted MSG body.  The control half sets it to 0
        until the handshake completes, so that no MSG body is buffered before.
    """

    def __init__(
        self, max_body: int = DEFAULT_MAX_BODY, *, accept_welcome: bool = True, header_names: frozenset[str] | None = None
    ) -> None:
        """
        @param max_body: the initial L{max_body}.
        @param accept_welcome: whether WELCOME frames are decoded.  The
            control half, which never receives one, passes C{False}: a
            tenant half could otherwise make it decode a megabyte of CBOR
            (L{MAX_WELCOME_PAYLOAD}) per connection before the protocol
            refuses the frame.
        @param header_names: MSG headers are not kept but reduced to these
            names (see L{decode_message}).  The control half, which replaces
            a tenant's headers, passes the one it looks at: a head full of
            nested header values then costs it the CBOR decoding alone.
        """
        self.max_body = max_body
        self._limits = _LIMITS if accept_welcome else _LIMITS_WITHOUT_WELCOME
        self._header_names = header_names
        self._buffer = bytearray()
        # One CBOR decoder and stream for every frame: building a decoder
        # with these options, or even pointing it at a new stream, costs
        # more than decoding a small head.  Re-initialising the stream points
        # it at the next bytes without copying them.  Nothing carries over
        # from one frame to the next: shared references, the only CBOR
        # feature with state, are refused.
        self._stream = io.BytesIO()
        self._cbor = _cbor_decoder(self._stream)
        self._started = False
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes, heads: bool = True) -> list[Any]:
        """
        @param data: the next bytes from the socket.
        @param heads: whether to decode MSG heads now; with C{False}, MSG
            frames come back as L{UndecodedMessage}s for L{decode_head}.
        @return: the frames completed by them, in order.
        @raise FrameError: when the stream is not valid; L{LegacyFrame} when
            it starts with a version 1 frame.
        """
        if self._failed:
            raise FrameError("the stream already failed")
        buffer = self._buffer
        if buffer or type(data) is not bytes:
            # A frame began in an earlier read: continue it in the buffer.
            buffer += data
            source: bytes | bytearray = buffer
        else:
            # The usual case, a read that starts with a frame: decode from it
            # directly, buffering only the start of a frame not yet whole.
            source = data
        frames: list[Any] = []
        try:
            offset = self._decode(source, frames, heads)
        except FrameError:
            self._failed = True
            raise
        except Exception as e:  # a check that failed in an unforeseen way: still the peer's bytes
            self._failed = True
            raise FrameError(f"undecodable frame: {type(e).__name__}: {e}"[:300]) from None
        if source is buffer:
            del buffer[:offset]
        elif offset < len(source):
            buffer += memoryview(source)[offset:]
        if frames:
            self._started = True
        return frames

    def _decode(self, source: bytes | bytearray, frames: list[Any], heads: bool) -> int:
        """
        @param source: bytes from the start of a frame on.
        @param frames: where to append the whole frames in C{source}.
        @param heads: whether to decode MSG heads (else L{UndecodedMessage}).
        @return: where the first frame not yet whole starts.
        """
        whole = type(source) is bytes  # whose slices are copied once, not twice
        end = len(source)
        offset = 0
        while end - offset >= 5:
            length, code = _PREFIX.unpack_from(source, offset)
            frame_end = offset + 4 + length
            if code == MSG:
                max_body = self.max_body
                if not 5 <= length <= 5 + MAX_HEAD + max_body:
                    raise FrameError(f"MSG frame of {length} bytes outside 5..{5 + MAX_HEAD + max_body}")
                if end - offset < 9:
                    break
                head_start = offset + 9
                body_start = head_start + _LENGTH.unpack_from(source, offset + 5)[0]
                if not head_start < body_start <= head_start + MAX_HEAD or body_start > frame_end:
                    raise FrameError(f"MSG head of {body_start - head_start} bytes outside 1..{MAX_HEAD} or the frame")
                if frame_end - body_start > max_body:
                    raise FrameError(f"MSG body of {frame_end - body_start} bytes exceeds {max_body}")
                if end < frame_end:
                    break
                if whole:
                    head_bytes = source[head_start:body_start]
                    body = source[body_start:frame_end]
                else:
                    head_bytes = _copy(source, head_start, body_start)
                    body = _copy(source, body_start, frame_end)
                if heads:
                    frames.append(self._decode_message(head_bytes, body))  # type: ignore[arg-type]
                else:
                    frames.append(UndecodedMessage(head_bytes, body))  # type: ignore[arg-type]
            else:
                limit = self._limits[code]
                if limit is None:
                    raise self._unknown_type(code, first=offset == 0 and not self._started)
                if not 1 <= length <= limit + 1:
                    raise FrameError(f"frame of type {code} and {length} bytes outside 1..{limit + 1}")
                if end < frame_end:
                    break
                frames.append(self._decode_fields(code, _copy(source, offset + 5, frame_end)))
            offset = frame_end
        return offset

    def decode_head(self, message: UndecodedMessage) -> MessageFrame:
        """
        Decode the head of a MSG that L{feed} left undecoded.

        @raise FrameError: when the head is not valid; the decoder is then
            broken for good, as after any other bad frame.
        """
        try:
            return self._decode_message(message.head, message.body)
        except FrameError:
            self._failed = True
            raise
        except Exception as e:
            self._failed = True
            raise FrameError(f"undecodable frame: {type(e).__name__}: {e}"[:300]) from None

    def _unknown_type(self, code: int, first: bool) -> FrameError:
        if first and code in _V1_FIRST_BYTES:
            return LegacyFrame("a version 1 frame: the peer speaks link protocol version 1")
        if code in NAMES:
            return FrameError(f"{NAMES[code]} frames are not accepted here")
        return FrameError(f"unknown frame type {code}")

    def _decode_message(self, head: bytes, body: bytes) -> MessageFrame:
        """
        A MSG from its head and body, with the cycle collector paused until
        the headers it does not keep are dropped (L{decode_tree}).
        """
        return decode_tree(self._message_from_head, (head, body))

    def _message_from_head(self, parts: tuple[bytes, bytes]) -> MessageFrame:
        head, body = parts
        return decode_message(self._decode_cbor(head), body, self._header_names)

    def _decode_cbor(self, data: bytes) -> Any:
        """@return: the one CBOR value that is all of C{data}."""
        _point_stream(self._stream, data)
        try:
            value = self._cbor.decode()
        except FrameError:
            raise
        except Exception as e:  # CBORDecodeError, MemoryError, OverflowError, RecursionError...
            raise FrameError(f"bad CBOR: {type(e).__name__}: {e}"[:300]) from None
        if self._stream.tell() != len(data):
            raise FrameError("bytes after the CBOR value")
        return value

    def _decode_fields(self, code: int, payload: bytes) -> Frame:
        if code == HEARTBEAT:
            return _HEARTBEAT
        fields = decode_tree(self._decode_cbor, payload)
        decoder, count = FIELD_DECODERS[code]
        if type(fields) is not list or len(fields) != count:
            raise FrameError(f"{NAMES[code]} payload must be an array of {count} fields")
        return decoder(fields)


def decode_frame(code: int, payload: bytes, max_body: int = DEFAULT_MAX_BODY) -> Frame:
    """
    Decode one frame from its type and payload, with every check
    L{FrameDecoder} makes (for tests and tools).

    @param code: the frame type byte.
    @param payload: the bytes after it.
    @raise FrameError: for anything that is not one well-formed frame.
    """
    if not 0 <= code <= 255 or len(payload) >= _MAX_LENGTH:
        raise FrameError("no such frame")
    decoder = FrameDecoder(max_body)
    frames = decoder.feed(_PREFIX.pack(len(payload) + 1, code) + payload)
    if decoder.pending:
        raise FrameError("incomplete frame")
    return frames[0]
