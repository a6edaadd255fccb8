# -*- test-case-name: tests.test_wire -*-
"""
Tests for L{msgmux.amqp.wire}: field tables, basic properties and the
hand-encoded AMQP 0-9-1 frames on msgmux's hot path.

Expected bytes are written out from the AMQP 0-9-1 specification (frame
layout: type octet, channel short, size long, payload, frame-end 0xCE) and
RabbitMQ's field-type table, not computed with the code under test.
"""

from __future__ import annotations

import datetime
import decimal
import math
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp import wire
from msgmux.amqp.wire import WireError
from msgmux.link import codec
from msgmux.message import Message, RpcAddress

from . import strategies

_UTC = datetime.timezone.utc


def _table(entries: bytes) -> bytes:
    """@return: C{entries} behind their 32-bit length: a field table."""
    return struct.pack(">I", len(entries)) + entries


class FieldTableTests(SynchronousTestCase):
    """encode_table and decode_table."""

    @given(strategies.field_tables)
    def test_round_trip(self, table: dict[str, Any]) -> None:
        """Field tables round-trip with value types, decimal exponents and timezones preserved."""
        data = wire.encode_table(table)
        decoded, end = wire.decode_table(data)
        self.assertEqual(strategies.tagged(decoded), strategies.tagged(table))
        self.assertEqual(end, len(data))

    @given(strategies.field_tables, st.binary(max_size=10), st.binary(max_size=10))
    def test_offset(self, table: dict[str, Any], before: bytes, after: bytes) -> None:
        """decode_table starts at the given offset and returns the offset just past the table."""
        data = wire.encode_table(table)
        decoded, end = wire.decode_table(before + data + after, len(before))
        self.assertEqual(strategies.tagged(decoded), strategies.tagged(table))
        self.assertEqual(end, len(before) + len(data))

    def test_nan(self) -> None:
        """A NaN header value survives the round trip as NaN."""
        decoded, _ = wire.decode_table(wire.encode_table({"n": math.nan}))
        self.assertTrue(math.isnan(decoded["n"]))

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes decode to a table or raise WireError, nothing else."""
        try:
            wire.decode_table(data)
        except WireError:
            pass

    @given(st.binary(max_size=300))
    def test_arbitrary_entries(self, entries: bytes) -> None:
        """Arbitrary bytes behind a correct length decode to a table or raise WireError."""
        try:
            table, end = wire.decode_table(_table(entries))
        except WireError:
            return
        self.assertEqual(end, len(entries) + 4)

    @given(strategies.field_tables, st.data())
    def test_mutated(self, table: dict[str, Any], data: st.DataObject) -> None:
        """A valid table with one byte changed or cut short decodes or raises WireError."""
        encoded = bytearray(wire.encode_table(table))
        index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
        encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
        for candidate in (bytes(encoded), bytes(encoded[:index])):
            try:
                wire.decode_table(candidate)
            except WireError:
                pass

    def test_field_types(self) -> None:
        """Each field type letter decodes to the value RabbitMQ's field-type table gives it."""
        cases: list[tuple[bytes, Any]] = [
            (b"t\x01", True),
            (b"t\x00", False),
            (b"b\xfe", -2),
            (b"B\xfe", 254),
            (b"s\xff\xfe", -2),
            (b"u\xff\xfe", 65534),
            (b"I\xff\xff\xff\xfe", -2),
            (b"i\xff\xff\xff\xfe", 4294967294),
            (b"l\xff\xff\xff\xff\xff\xff\xff\xfe", -2),
            (b"l\x7f\xff\xff\xff\xff\xff\xff\xff", 2**63 - 1),
            (b"f\x3f\xc0\x00\x00", 1.5),
            (b"d\xc0\x04\x00\x00\x00\x00\x00\x00", -2.5),
            (b"D\x02\x00\x00\x04\xd2", decimal.Decimal("12.34")),
            (b"D\x03\xff\xff\xff\xfe", decimal.Decimal("-0.002")),
            (b"D\x00\x00\x00\x00\x07", decimal.Decimal("7")),
            (b"S\x00\x00\x00\x03abc", "abc"),
            (b"S\x00\x00\x00\x02\xc3\xa9", "\xe9"),
            (b"S\x00\x00\x00\x02\xc3\x28", b"\xc3\x28"),
            (b"A\x00\x00\x00\x07I\x00\x00\x00\x07t\x01", [7, True]),
            (b"A\x00\x00\x00\x00", []),
            (b"T\x00\x00\x00\x00\x3b\x9a\xca\x00", datetime.datetime(2001, 9, 9, 1, 46, 40, tzinfo=_UTC)),
            (b"F\x00\x00\x00\x07\x01kS\x00\x00\x00\x00", {"k": ""}),
            (b"V", None),
            (b"x\x00\x00\x00\x02\x00\xff", b"\x00\xff"),
        ]
        for encoded, expected in cases:
            table, end = wire.decode_table(_table(b"\x03key" + encoded))
            self.assertEqual(strategies.tagged(table), strategies.tagged({"key": expected}), encoded)
            self.assertEqual(end, 4 + 4 + len(encoded))

    def test_timestamp_is_utc(self) -> None:
        """A T value decodes to an aware UTC datetime."""
        table, _ = wire.decode_table(_table(b"\x01tT\x00\x00\x00\x00\x00\x00\x00\x00"))
        self.assertEqual(table["t"].utcoffset(), datetime.timedelta(0))
        self.assertEqual(table["t"], datetime.datetime(1970, 1, 1, tzinfo=_UTC))

    def test_encoding(self) -> None:
        """Values are encoded with the expected type letters: I below 2**31, l above, d, x, V."""
        encoded = wire.encode_table({"a": 1, "b": 1 << 31, "c": 0.5, "d": b"\x01", "e": None})
        self.assertEqual(
            encoded,
            _table(b"\x01aI\x00\x00\x00\x01" + b"\x01bl\x00\x00\x00\x00\x80\x00\x00\x00"
                   + b"\x01cd\x3f\xe0\x00\x00\x00\x00\x00\x00" + b"\x01dx\x00\x00\x00\x01\x01" + b"\x01eV"),  # fmt: skip
        )

    def test_invalid_utf8_key(self) -> None:
        """A table key (a short string) that is not UTF-8 raises WireError."""
        self.assertRaises(WireError, wire.decode_table, _table(b"\x02\xc3\x28V"))

    def test_malformed(self) -> None:
        """Unknown type letters, overlong lengths, truncation and bad timestamps raise WireError."""
        for data in (_table(b"\x01kZ"), _table(b"\x01k"), b"\x00\x00\x00\x05\x01kV", _table(b"\x01kI\x00"),
                     _table(b"\x01kS\x00\x00\x00\x09ab"), _table(b"\x01kT" + b"\xff" * 8), _table(b"\x05k"), b"\x00",
                     _table(b"\x01kA\x00\x00\x00\x01"), _table(b"\x01kF\x00\x00\x00\x02\x01k")):  # fmt: skip
            self.assertRaises(WireError, wire.decode_table, data)

    def test_unencodable(self) -> None:
        """Values AMQP cannot carry raise WireError when encoded."""
        for table in ({"k": 1 << 63}, {"k": -(1 << 63) - 1}, {"k": {1, 2}}, {"k": decimal.Decimal("1E+1")},
                      {"k": decimal.Decimal("1E-256")}, {"k": decimal.Decimal(1 << 31)}, {"k": decimal.Decimal("NaN")},
                      {"k": datetime.datetime(1969, 12, 31, tzinfo=_UTC)}, {1: "v"}, {"k" * 256: 1}):  # fmt: skip
            self.assertRaises(WireError, wire.encode_table, table)


class PropertiesTests(SynchronousTestCase):
    """encode_properties and decode_properties."""

    @given(strategies.basic_properties())
    def test_round_trip(self, properties: dict[str, Any]) -> None:
        """Basic properties round-trip, header value types included."""
        data = wire.encode_properties(properties)
        decoded = wire.decode_properties(b"\x00\x3c\x00\x00" + data, 4)
        self.assertEqual(strategies.tagged(decoded), strategies.tagged(properties))

    def test_layout(self) -> None:
        """Flags and values follow the 0-9-1 order: content_type is bit 15, timestamp bit 6."""
        encoded = wire.encode_properties({"timestamp": 1, "content_type": "a", "delivery_mode": 2})
        self.assertEqual(encoded, b"\x90\x40" + b"\x01a" + b"\x02" + b"\x00\x00\x00\x00\x00\x00\x00\x01")

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes decode to properties or raise WireError, nothing else."""
        try:
            wire.decode_properties(data, 0)
        except WireError:
            pass

    def test_invalid_utf8(self) -> None:
        """A short-string property that is not UTF-8 raises WireError."""
        self.assertRaises(WireError, wire.decode_properties, b"\x80\x00\x02\xc3\x28", 0)

    def test_malformed(self) -> None:
        """Continuation flags, truncation and trailing bytes after properties raise WireError."""
        for data in (b"\x00\x01", b"\x80", b"\x80\x00\x05ab", b"\x10\x00", b"\x10\x00\x02\x00", b"\x00\x40\x00"):
            self.assertRaises(WireError, wire.decode_properties, data, 0)

    def test_unencodable(self) -> None:
        """Unknown names and out-of-range octets or timestamps raise WireError."""
        for properties in ({"colour": "red"}, {"priority": 256}, {"delivery_mode": -1}, {"timestamp": -1},
                           {"timestamp": 1 << 64}, {"content_type": "x" * 256}):  # fmt: skip
            self.assertRaises(WireError, wire.encode_properties, properties)


def _parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a byte stream into (type, channel, payload), checking each frame-end octet."""
    frames, offset = [], 0
    while offset < len(data):
        kind, channel, size = struct.unpack_from(">BHI", data, offset)
        end = offset + 7 + size
        assert data[end] == 0xCE, f"frame at {offset} does not end with 0xCE"
        frames.append((kind, channel, data[offset + 7 : end]))
        offset = end + 1
    return frames


class PublishTests(SynchronousTestCase):
    """encode_publish: method, content header, then body frames."""

    @given(
        st.integers(min_value=0, max_value=65535),
        strategies.shortstrs,
        strategies.shortstrs,
        strategies.basic_properties(),
        st.binary(max_size=2000),
        st.integers(min_value=9, max_value=300),
        st.booleans(),
    )
    def test_frames(self, channel: int, exchange: str, key: str, properties: dict[str, Any], body: bytes,
                    frame_max: int, mandatory: bool) -> None:  # fmt: skip
        """The frames carry the method, the properties and the body split in frames of at most frame_max bytes."""
        if 12 + len(wire.encode_properties(properties)) > frame_max - 8:
            # A content header is never split: one too large for frame_max is refused.
            self.assertRaises(wire.WireError, wire.encode_publish, channel, exchange, key, properties, body, frame_max, mandatory)
            return
        parts = wire.encode_publish(channel, exchange, key, properties, body, frame_max, mandatory)
        frames = _parse_frames(b"".join(parts))
        (method_type, _, method), (header_type, _, header), *bodies = frames
        self.assertEqual((method_type, header_type), (1, 2))
        self.assertEqual(method[:6], b"\x00\x3c\x00\x28\x00\x00")
        exchange_raw, key_raw = exchange.encode(), key.encode()
        self.assertEqual(method[6:], bytes([len(exchange_raw)]) + exchange_raw + bytes([len(key_raw)]) + key_raw
                         + (b"\x01" if mandatory else b"\x00"))  # fmt: skip
        self.assertEqual(wire.content_body_size(header), len(body))
        self.assertEqual(strategies.tagged(wire.decode_properties(header, 12)), strategies.tagged(properties))
        self.assertEqual(b"".join(payload for _, _, payload in bodies), body)
        self.assertEqual(len(bodies), -(-len(body) // (frame_max - 8)))
        for kind, _, payload in bodies:
            self.assertEqual(kind, 3)
            self.assertLessEqual(len(payload), frame_max - 8)
        self.assertEqual({frame_channel for _, frame_channel, _ in frames}, {channel})

    def test_large_body(self) -> None:
        """A 300 000-byte body at RabbitMQ's default frame_max takes three body frames, each ending 0xCE."""
        body = bytes(range(256)) * 1172
        parts = wire.encode_publish(1, "", "q", {}, body, 131072)
        bodies = _parse_frames(b"".join(parts))[2:]
        self.assertEqual([len(p) for _, _, p in bodies], [131064, 131064, len(body) - 2 * 131064])
        self.assertEqual(b"".join(p for _, _, p in bodies), body)

    def test_body_boundary(self) -> None:
        """A body of exactly frame_max-8 bytes takes one frame, one byte more takes two, none takes none."""
        for size, count in ((0, 0), (4088, 1), (4089, 2)):
            frames = _parse_frames(b"".join(wire.encode_publish(1, "", "q", {}, b"x" * size, 4096)))
            self.assertEqual(len(frames) - 2, count, size)

    def test_unencodable(self) -> None:
        """An exchange name over 255 bytes raises WireError."""
        self.assertRaises(WireError, wire.encode_publish, 1, "e" * 256, "", {}, b"", 4096)


class MethodFrameTests(SynchronousTestCase):
    """The hand-encoded method frames, byte for byte."""

    def test_ack(self) -> None:
        """basic.ack: class 60 method 80, delivery-tag, multiple bit."""
        self.assertEqual(
            wire.encode_ack(1, 5),
            b"\x01\x00\x01\x00\x00\x00\x0d\x00\x3c\x00\x50\x00\x00\x00\x00\x00\x00\x00\x05\x00\xce",
        )
        self.assertEqual(wire.encode_ack(258, 2**64 - 1, multiple=True),
                         b"\x01\x01\x02\x00\x00\x00\x0d\x00\x3c\x00\x50" + b"\xff" * 8 + b"\x01\xce")  # fmt: skip

    def test_nack(self) -> None:
        """basic.nack: class 60 method 120, delivery-tag, multiple bit 0, requeue bit 1 (default on)."""
        head = b"\x01\x00\x02\x00\x00\x00\x0d\x00\x3c\x00\x78\x00\x00\x00\x00\x00\x00\x01\x00"
        self.assertEqual(wire.encode_nack(2, 256), head + b"\x02\xce")
        self.assertEqual(wire.encode_nack(2, 256, multiple=True, requeue=False), head + b"\x01\xce")
        self.assertEqual(wire.encode_nack(2, 256, multiple=True), head + b"\x03\xce")

    def test_reject(self) -> None:
        """basic.reject: class 60 method 90, delivery-tag, requeue bit."""
        head = b"\x01\x00\x03\x00\x00\x00\x0d\x00\x3c\x00\x5a\x00\x00\x00\x00\x00\x00\x00\x07"
        self.assertEqual(wire.encode_reject(3, 7, requeue=True), head + b"\x01\xce")
        self.assertEqual(wire.encode_reject(3, 7, requeue=False), head + b"\x00\xce")

    def test_exchange_declare(self) -> None:
        """exchange.declare: class 40 method 10, name, type, durable/auto-delete/no-wait bits, empty arguments."""
        self.assertEqual(
            wire.encode_exchange_declare(1, "ex", "topic", durable=True, auto_delete=False),
            b"\x01\x00\x01\x00\x00\x00\x14\x00\x28\x00\x0a\x00\x00\x02ex\x05topic\x12\x00\x00\x00\x00\xce",
        )
        self.assertEqual(
            wire.encode_exchange_declare(9, "", "fanout", durable=False, auto_delete=True),
            b"\x01\x00\x09\x00\x00\x00\x13\x00\x28\x00\x0a\x00\x00\x00\x06fanout\x14\x00\x00\x00\x00\xce",
        )


class RegressionTests(SynchronousTestCase):
    """Malformations once mishandled."""

    def test_frame_max_zero_or_tiny(self) -> None:
        """frame_max 0 (no limit) sends the whole body in one frame; a tiny one still sends it all."""
        for frame_max, frames, piece in ((0, 3, 100), (22, 10, 14)):
            parts = wire.encode_publish(1, "", "", {}, b"x" * 100, frame_max)
            data = b"".join(parts)
            self.assertEqual(data.count(b"\xce"), frames, frame_max)
            self.assertIn(b"x" * piece, data)
            self.assertNotIn(b"x" * (piece + 1), data)

    def test_header_larger_than_frame_max(self) -> None:
        """A content header that does not fit one frame is refused, never written (RabbitMQ would drop the connection)."""
        properties = {"headers": {"blob": "x" * 200000}}
        self.assertRaises(wire.WireError, wire.encode_publish, 1, "", "q", properties, b"body", 131072)
        wire.encode_publish(1, "", "q", {"headers": {"blob": "x" * 100000}}, b"body", 131072)

    def test_trailing_bytes_without_properties(self) -> None:
        """Junk after empty property flags is refused, as it is after present properties."""
        self.assertRaises(wire.WireError, wire.decode_properties, b"\x00\x00junk", 0)
        self.assertEqual(wire.decode_properties(b"\x00\x00", 0), {})

    def test_array_nesting_symmetric(self) -> None:
        """What the encoder accepts the decoder accepts: arrays nested beyond MAX_NESTING are refused both ways."""
        deep: list[object] = []
        for _ in range(wire.MAX_NESTING):
            deep = [deep]
        self.assertRaises(wire.WireError, wire.encode_table, {"a": deep})
        ok: list[object] = []
        for _ in range(wire.MAX_NESTING - 1):
            ok = [ok]
        self.assertEqual(wire.decode_table(wire.encode_table({"a": ok}))[0], {"a": ok})

        def nested_tables(levels: int) -> bytes:
            """Tables nested C{levels} deep under the outer one, built by hand as a broker could send them."""
            raw = struct.pack(">I", 0)
            for _ in range(levels):
                body = b"\x01nF" + raw
                raw = struct.pack(">I", len(body)) + body
            return raw

        self.assertEqual(wire.decode_table(nested_tables(wire.MAX_NESTING))[1], len(nested_tables(wire.MAX_NESTING)))
        self.assertRaises(wire.WireError, wire.decode_table, nested_tables(wire.MAX_NESTING + 1))

    def test_deepest_headers_cross_the_link(self) -> None:
        """
        Whatever headers the AMQP decoder accepts, the link codec carries:
        a message is never refused by the other half for its headers' depth
        (which would close the link on every redelivery).
        """
        leaves = [1, decimal.Decimal("1.5"), datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc), [decimal.Decimal("2")]]
        for leaf in leaves:
            table: dict[str, Any] = {"x": leaf}
            while True:
                deeper = {"n": table}
                try:
                    wire.encode_table(deeper)
                except wire.WireError:
                    break
                table = deeper
            properties = wire.decode_properties(b"\0" * 12 + wire.encode_properties({"headers": table}), 12)
            head, body = codec.encode_message(1, Message(RpcAddress(None, "t"), properties, b"{}"))
            [frame] = codec.FrameDecoder().feed(head + body)
            assert isinstance(frame, codec.MessageFrame)
            self.assertEqual(frame.message.properties, properties)

    def test_mistyped_properties(self) -> None:
        """Wrongly typed property values raise WireError, not AttributeError."""
        for properties in ({"content_type": 5}, {"headers": "x"}, {"message_id": b"id"}):
            self.assertRaises(wire.WireError, wire.encode_properties, properties)

    def test_truncated_methods(self) -> None:
        """Truncated deliver/return/confirm payloads raise WireError."""
        for decode, payload in (
            (wire.decode_deliver, b"\x00\x3c\x00\x3c\x00"),
            (wire.decode_return, b"\x00\x3c\x00\x32\x01"),
            (wire.decode_confirm, b"\x00\x3c\x00\x50\x00"),
            (wire.decode_deliver, b""),
        ):
            self.assertRaises(wire.WireError, decode, payload)


class DecodeMethodTests(SynchronousTestCase):
    """Decoding the broker's basic.deliver, basic.return, confirms and content headers."""

    def test_deliver(self) -> None:
        """basic.deliver yields consumer tag, delivery tag, redelivered, exchange and routing key."""
        payload = b"\x00\x3c\x00\x3c\x04ctag\x00\x00\x00\x00\x00\x00\x01\x02\x01\x09openstack\x08compute."
        self.assertEqual(wire.decode_deliver(payload), ("ctag", 258, True, "openstack", "compute."))
        payload = b"\x00\x3c\x00\x3c\x00" + b"\xff" * 8 + b"\x00\x00\x01q"
        self.assertEqual(wire.decode_deliver(payload), ("", 2**64 - 1, False, "", "q"))

    def test_deliver_invalid_utf8(self) -> None:
        """A consumer tag that is not UTF-8 raises WireError."""
        self.assertRaises(WireError, wire.decode_deliver, b"\x00\x3c\x00\x3c\x01\xff")

    def test_return_yields_code_text_exchange_and_key(self) -> None:
        """basic.return yields reply code, reply text, exchange and routing key."""
        payload = b"\x00\x3c\x00\x32\x01\x38\x08NO_ROUTE\x00\x0breply_abc.1"
        self.assertEqual(wire.decode_return(payload), (312, "NO_ROUTE", "", "reply_abc.1"))

    def test_confirm(self) -> None:
        """basic.ack/nack from the broker yield the delivery tag and only the multiple bit."""
        self.assertEqual(wire.decode_confirm(b"\x00\x3c\x00\x50\x00\x00\x00\x00\x00\x00\x00\x2a\x01"), (42, True))
        self.assertEqual(wire.decode_confirm(b"\x00\x3c\x00\x78\x00\x00\x00\x01\x00\x00\x00\x00\x02"), (1 << 32, False))

    def test_content_body_size(self) -> None:
        """content_body_size reads the body size of a basic content header and refuses other classes and truncation."""
        self.assertEqual(wire.content_body_size(b"\x00\x3c\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05\x00\x00"), 2**32 + 5)
        self.assertRaises(WireError, wire.content_body_size, b"\x00\x32\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05")
        self.assertRaises(WireError, wire.content_body_size, b"\x00\x3c\x00\x00\x00")


class ShortStringTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """The public short string helpers: a length octet, then UTF-8."""
        self.assertEqual(wire.encode_shortstr("é"), b"\x02\xc3\xa9")
        self.assertEqual(wire.decode_shortstr(b"xx\x02\xc3\xa9yy", 2), ("é", 5))

    def test_errors(self) -> None:
        """Past the end, truncated, not UTF-8 or too long: WireError, nothing else."""
        for data, offset in [(b"", 0), (b"\x01a", 2), (b"\x05ab", 0), (b"\x01\xff", 0)]:
            self.assertRaises(WireError, wire.decode_shortstr, data, offset)
        self.assertRaises(WireError, wire.encode_shortstr, "x" * 256)
