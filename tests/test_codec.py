# -*- test-case-name: tests.test_codec -*-
"""
Tests for L{msgmux.link.codec}: round trips, stream splitting, size limits
checked before a frame is buffered, and strict refusal of everything that is
not a well-formed frame.
"""

from __future__ import annotations

import decimal
import math
import struct
from typing import Any

import attrs
import cbor2
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from msgmux import message
from msgmux.link import codec
from msgmux.link.codec import FrameDecoder, FrameError, LegacyFrame, MessageFrame, decode_frame, encode
from msgmux.message import CanaryAddress, Message, RpcAddress

from . import strategies

HELLO, WELCOME, MSG, ACK, REJECT, CREDIT, HEARTBEAT, CLOSE = range(8)

_WELCOME = {"version": 2, "link": "l", "session": "s", "heartbeat": 1.0, "max_body": 10, "routes": {}}


def _frame(code: int, payload: bytes) -> bytes:
    """@return: a frame of type C{code} around C{payload}, with a correct length."""
    return struct.pack(">IB", len(payload) + 1, code) + payload


def _msg_payload(head: bytes, body: bytes = b"{}") -> bytes:
    """@return: a MSG payload: C{head}'s length, C{head} and C{body}."""
    return struct.pack(">I", len(head)) + head + body


def _valid_head() -> list[Any]:
    """@return: the head array of a valid RPC MSG frame, for mutating one field."""
    return [1, 0, [None, "compute", None, False], {"content_type": "application/json"}, None]


def _v1_frame(array: list[Any]) -> bytes:
    """@return: C{array} framed as protocol version 1 did: length, then CBOR."""
    payload = cbor2.dumps(array)
    return struct.pack(">I", len(payload)) + payload


class MessageTests(SynchronousTestCase):
    """The domain message carries no sequence number: that belongs to the frame."""

    def test_fields(self) -> None:
        """A message is address, properties, body and deadline, and is frozen."""
        self.assertEqual([f.name for f in attrs.fields(Message)], ["address", "properties", "body", "deadline"])
        relayed = Message(CanaryAddress(), {}, b"")
        self.assertIsNone(relayed.deadline)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, relayed, "body", b"x")


class RoundTripTests(SynchronousTestCase):
    """Every frame survives encode then decode unchanged."""

    def assert_round_trip(self, frame: codec.Frame) -> None:
        """@param frame: a frame that must decode to an equal frame of the same class."""
        decoded = FrameDecoder().feed(encode(frame))
        self.assertEqual(decoded, [frame])
        self.assertIs(type(decoded[0]), type(frame))

    @given(strategies.frame_strategies["Hello"])
    def test_hello(self, frame: codec.Hello) -> None:
        """HELLO frames round-trip."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["Welcome"])
    def test_welcome(self, frame: codec.Welcome) -> None:
        """WELCOME frames round-trip, routes included."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["MessageFrame"])
    def test_message(self, frame: MessageFrame) -> None:
        """MSG frames round-trip for every address kind, with header types preserved exactly."""
        self.assert_round_trip(frame)
        (decoded,) = FrameDecoder().feed(encode(frame))
        assert isinstance(decoded, MessageFrame)
        headers = frame.message.properties.get("headers")
        if headers is not None:
            self.assertEqual(strategies.tagged(decoded.message.properties["headers"]), strategies.tagged(headers))

    @given(strategies.addresses)
    def test_every_address_kind(self, address: message.Address) -> None:
        """Each address kind decodes to the same address class and fields."""
        self.assert_round_trip(MessageFrame(1, Message(address, {}, b"")))

    @given(strategies.frame_strategies["Ack"])
    def test_ack(self, frame: codec.Ack) -> None:
        """ACK frames round-trip, from none to a full batch of the largest numbers."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["Reject"])
    def test_reject(self, frame: codec.Reject) -> None:
        """REJECT frames round-trip."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["Credit"])
    def test_credit(self, frame: codec.Credit) -> None:
        """CREDIT frames round-trip over the whole range of messages (32 bits) and bytes (64 bits)."""
        self.assert_round_trip(frame)

    def test_heartbeat(self) -> None:
        """HEARTBEAT round-trips and is the smallest frame: a type byte and no payload."""
        self.assert_round_trip(codec.Heartbeat())
        self.assertEqual(encode(codec.Heartbeat()), b"\x00\x00\x00\x01\x06")

    @given(strategies.frame_strategies["Close"])
    def test_close(self, frame: codec.Close) -> None:
        """CLOSE frames round-trip."""
        self.assert_round_trip(frame)

    def test_encode_refuses_non_frames(self) -> None:
        """Encoding something that is not a frame raises TypeError instead of sending garbage."""
        self.assertRaises(TypeError, encode, object())
        self.assertRaises(TypeError, encode, Message(CanaryAddress(), {}, b""))

    @given(strategies.messages, st.integers(min_value=1, max_value=(1 << 64) - 1))
    def test_encode_message_layout(self, relayed: Message, seq: int) -> None:
        """
        encode_message returns the frame up to the body, and the body object
        itself (never copied); together they are the frame encode makes.
        """
        head, body = codec.encode_message(seq, relayed)
        self.assertIs(body, relayed.body)
        self.assertEqual(head + body, encode(MessageFrame(seq, relayed)))
        length, code, head_length = struct.unpack_from(">IBI", head)
        self.assertEqual((length, code, head_length), (len(head) + len(body) - 4, MSG, len(head) - 9))
        self.assertEqual(cbor2.loads(head[9:])[0], seq)

    def test_body_is_raw(self) -> None:
        """The body is carried as raw bytes, whatever they are (no CBOR inside)."""
        for body in (b"", b"\xff", b"\x9f" * 100, bytes(range(256))):
            relayed = Message(RpcAddress(None, "t"), {}, body)
            head, _ = codec.encode_message(1, relayed)
            self.assertEqual(encode(MessageFrame(1, relayed))[len(head) :], body)
            self.assert_round_trip(MessageFrame(1, relayed))

    def test_large_body_in_pieces(self) -> None:
        """A 1 MiB body fed in 64 KiB pieces decodes to the same bytes."""
        frame = MessageFrame(3, Message(RpcAddress("e", "t", "s", True), {"priority": 5}, bytes(range(256)) * 4096))
        data = encode(frame)
        decoder = FrameDecoder()
        received = []
        for start in range(0, len(data), 65536):
            received += decoder.feed(data[start : start + 65536])
        self.assertEqual(received, [frame])
        self.assertEqual(decoder.pending, 0)

    def test_v1_close(self) -> None:
        """encode_v1_close makes a frame a version 1 decoder reads as CLOSE: length, then CBOR [7, code, detail]."""
        data = codec.encode_v1_close("version", "this control half speaks version 2")
        (length,) = struct.unpack_from(">I", data)
        self.assertEqual(length, len(data) - 4)
        self.assertEqual(cbor2.loads(data[4:]), [7, "version", "this control half speaks version 2"])


class StreamTests(SynchronousTestCase):
    """FrameDecoder reassembles frames however the stream is cut."""

    @given(st.lists(strategies.frames, min_size=1, max_size=6), st.data())
    def test_split_anywhere(self, frames: list[codec.Frame], data: st.DataObject) -> None:
        """A stream of frames cut at arbitrary points decodes to the same frames in order."""
        stream = b"".join(encode(frame) for frame in frames)
        cuts = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=len(stream)), max_size=12)))
        decoder = FrameDecoder()
        received = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            received.extend(decoder.feed(stream[start:end]))
        self.assertEqual(received, frames)
        self.assertEqual(decoder.pending, 0)

    def test_byte_by_byte(self) -> None:
        """Feeding one byte at a time yields each frame only with its last byte."""
        frames: list[codec.Frame] = [
            codec.Close("shutdown", "bye"),
            MessageFrame(1, Message(CanaryAddress(), {}, b"body")),
            codec.Heartbeat(),
        ]
        decoder = FrameDecoder()
        for frame in frames:
            data = encode(frame)
            for i in range(len(data) - 1):
                self.assertEqual(decoder.feed(data[i : i + 1]), [])
                self.assertEqual(decoder.pending, i + 1)
            self.assertEqual(decoder.feed(data[-1:]), [frame])
            self.assertEqual(decoder.pending, 0)

    def test_one_decoder_many_sizes(self) -> None:
        """
        One decoder decodes large and small CBOR one after the other, and
        still finds bytes after a value: nothing of one frame stays for the next.
        """
        big = MessageFrame(1, Message(CanaryAddress(), {"headers": {"h": "x" * 8000}}, b"1"))
        small = MessageFrame(2, Message(CanaryAddress(), {}, b"2"))
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(encode(big) + encode(small) + encode(codec.Close("a", "b"))), [big, small, codec.Close("a", "b")])
        self.assertEqual(decoder.feed(encode(big)), [big])
        self.assertRaises(FrameError, decoder.feed, _frame(CLOSE, cbor2.dumps(["a", "b"]) + b"\x00"))

    def test_max_body_can_change(self) -> None:
        """The protocol raises max_body after the handshake: MSG bodies refused before are accepted after."""
        relayed = MessageFrame(1, Message(CanaryAddress(), {}, b"x" * 100))
        self.assertRaises(FrameError, FrameDecoder(max_body=0).feed, encode(relayed))
        decoder = FrameDecoder(max_body=0)
        self.assertEqual(decoder.feed(encode(codec.Heartbeat())), [codec.Heartbeat()])
        decoder.max_body = 100
        self.assertEqual(decoder.feed(encode(relayed)), [relayed])

    def test_broken_for_good(self) -> None:
        """After a FrameError, the decoder refuses everything, valid frames included."""
        decoder = FrameDecoder(max_body=0)
        self.assertRaises(FrameError, decoder.feed, encode(MessageFrame(1, Message(CanaryAddress(), {}, b"x"))))
        decoder.max_body = 100  # the refused frame would fit now
        self.assertRaises(FrameError, decoder.feed, b"")
        self.assertRaises(FrameError, decoder.feed, encode(codec.Heartbeat()))


class LimitTests(SynchronousTestCase):
    """Sizes are checked from the first bytes of a frame, before the rest is buffered."""

    def assert_refused_early(self, prefix: bytes, max_body: int = codec.DEFAULT_MAX_BODY) -> None:
        """
        @param prefix: the first bytes of a frame, which alone must make a
            fresh decoder raise L{FrameError} (and not before the last one).
        """
        decoder = FrameDecoder(max_body)
        self.assertEqual(decoder.feed(prefix[:-1]), [])
        self.assertRaises(FrameError, decoder.feed, prefix[-1:])

    def test_per_type_limits(self) -> None:
        """Every type but MSG has its payload limit: a length one byte above is refused with the 5-byte prefix."""
        self.assertEqual(set(codec.PAYLOAD_LIMITS), {HELLO, WELCOME, ACK, REJECT, CREDIT, HEARTBEAT, CLOSE})
        for code, limit in codec.PAYLOAD_LIMITS.items():
            self.assert_refused_early(struct.pack(">IB", limit + 2, code))
            if code != HEARTBEAT:  # else the 5 bytes are a whole HEARTBEAT
                decoder = FrameDecoder()
                self.assertEqual(decoder.feed(struct.pack(">IB", limit + 1, code)), [])
                self.assertEqual(decoder.pending, 5)

    def test_limit_values(self) -> None:
        """The limits are the documented ones, and a full ACK batch fits its limit."""
        limits = {HELLO: 4096, WELCOME: 1 << 20, ACK: 4096, REJECT: 1024, CREDIT: 64, HEARTBEAT: 0, CLOSE: 4096}
        self.assertEqual(dict(codec.PAYLOAD_LIMITS), limits)
        self.assertEqual((codec.MAX_HEAD, codec.DEFAULT_MAX_BODY, codec.ACK_BATCH), (8192, 128 << 20, 256))
        largest = encode(codec.Ack(tuple(range((1 << 64) - 256, 1 << 64))))
        self.assertLessEqual(len(largest) - 5, codec.MAX_ACK_PAYLOAD)
        self.assertLessEqual(len(encode(codec.Credit((1 << 32) - 1, (1 << 64) - 1))) - 5, codec.MAX_CREDIT_PAYLOAD)

    def test_payload_at_limit(self) -> None:
        """A payload of exactly its type's limit is accepted: a CLOSE detail that fills 4 KiB."""
        detail = "d" * (codec.MAX_CLOSE_PAYLOAD - len(cbor2.dumps(["c", ""])) - 2)
        data = encode(codec.Close("c", detail))
        self.assertEqual(len(data) - 5, codec.MAX_CLOSE_PAYLOAD)
        self.assertEqual(FrameDecoder().feed(data), [codec.Close("c", detail)])

    def test_encode_refuses_what_the_peer_would(self) -> None:
        """Frames over their limit raise ValueError on encoding instead of being sent to a peer that refuses them."""
        self.assertRaises(ValueError, encode, codec.Close("c", "d" * codec.MAX_CLOSE_PAYLOAD))
        self.assertRaises(ValueError, encode, codec.Reject(1, "r" * codec.MAX_REJECT_PAYLOAD))
        self.assertRaises(ValueError, encode, codec.Ack(tuple(range(1, codec.ACK_BATCH + 2))))
        big = Message(CanaryAddress(), {"headers": {"h": "x" * codec.MAX_HEAD}}, b"")
        self.assertRaises(ValueError, codec.encode_message, 1, big)
        self.assertRaises(ValueError, encode, MessageFrame(1, big))

    def test_heartbeat_has_no_payload(self) -> None:
        """A HEARTBEAT with a payload byte is refused with its prefix."""
        self.assert_refused_early(struct.pack(">IB", 2, HEARTBEAT))

    def test_zero_length(self) -> None:
        """A frame without even a type byte is refused."""
        self.assert_refused_early(b"\x00\x00\x00\x00\x06")
        self.assert_refused_early(b"\x00\x00\x00\x00\x02")

    def test_msg_frame_limit(self) -> None:
        """A MSG length above 4 + MAX_HEAD + max_body (after the type byte) is refused with the 5-byte prefix."""
        self.assert_refused_early(struct.pack(">IB", 5 + codec.MAX_HEAD + 1000 + 1, MSG), max_body=1000)
        self.assert_refused_early(b"\xff\xff\xff\xff\x02")
        self.assert_refused_early(struct.pack(">IB", 4, MSG))
        decoder = FrameDecoder(1000)
        self.assertEqual(decoder.feed(struct.pack(">IB", 5 + codec.MAX_HEAD + 1000, MSG)), [])

    def test_msg_head_length(self) -> None:
        """A head length above MAX_HEAD, beyond the frame, or zero is refused with the 9-byte prefix."""
        size = 5 + codec.MAX_HEAD + 100
        self.assert_refused_early(struct.pack(">IBI", size, MSG, codec.MAX_HEAD + 1))
        self.assert_refused_early(struct.pack(">IBI", 50, MSG, 46))
        self.assert_refused_early(struct.pack(">IBI", 50, MSG, 0))
        self.assert_refused_early(struct.pack(">IBI", 50, MSG, 0xFFFFFFFF))
        for head_length in (1, 45, codec.MAX_HEAD):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(struct.pack(">IBI", size, MSG, head_length)), [])

    def test_msg_body_limit(self) -> None:
        """A body above max_body is refused with the 9-byte prefix, even when the frame fits the MSG limit."""
        self.assert_refused_early(struct.pack(">IBI", 5 + 20 + 11, MSG, 20), max_body=10)
        self.assert_refused_early(struct.pack(">IBI", 5 + 20 + 1, MSG, 20), max_body=0)
        empty = MessageFrame(1, Message(CanaryAddress(), {}, b""))
        self.assertEqual(FrameDecoder(max_body=0).feed(encode(empty)), [empty])

    def test_largest_head(self) -> None:
        """
        A head of exactly MAX_HEAD bytes, nearly all empty arrays in a header,
        decodes; one byte more is refused from its 9-byte prefix, without
        decoding anything.
        """

        def head(count: int) -> bytes:
            return cbor2.dumps([1, 0, [None, "t", None, False], {"headers": {"h": [[]] * count}}, None])

        count = codec.MAX_HEAD - len(head(1000)) + 1000
        largest = head(count)
        self.assertEqual(len(largest), codec.MAX_HEAD)
        frame = decode_frame(MSG, _msg_payload(largest, b"body"))
        assert isinstance(frame, MessageFrame)
        self.assertEqual(len(frame.message.properties["headers"]["h"]), count)
        data = _frame(MSG, _msg_payload(head(count + 1), b"body"))
        self.assert_refused_early(data[:9])

    def test_welcome_refused_where_never_received(self) -> None:
        """
        A decoder made with accept_welcome=False (the control half's) refuses
        WELCOME from its 5-byte prefix, however small, and decodes the rest.
        """
        welcome = encode(codec.Welcome(2, "l", "s", 1.0, 10, {}))
        self.assertEqual(len(FrameDecoder().feed(welcome)), 1)
        decoder = FrameDecoder(accept_welcome=False)
        others: list[codec.Frame] = [codec.Heartbeat(), codec.Hello((2,), None, "x")]
        self.assertEqual(decoder.feed(b"".join(encode(frame) for frame in others)), others)
        self.assertEqual(decoder.feed(welcome[:4]), [])
        self.assertRaises(FrameError, decoder.feed, welcome[4:5])

    def test_unknown_types(self) -> None:
        """Type bytes that are no frame type are refused with the 5-byte prefix."""
        for code in [8, 9, 0x80, 0x88, 0xA0, 0xFF]:
            self.assert_refused_early(struct.pack(">IB", 2, code))


class LegacyTests(SynchronousTestCase):
    """A version 1 peer is recognised from its first frame's first bytes."""

    def test_v1_frames(self) -> None:
        """Every version 1 frame type raises LegacyFrame (a FrameError) once its first CBOR byte is in."""
        hello = _v1_frame([0, {"versions": [1], "link": "tenant-a", "software": "msgmux 1"}])
        v1_msg = _v1_frame([2, 1, 0, [None, "t", None, False], {}, b"{}", None])
        for data in (hello, v1_msg, _v1_frame([6]), _v1_frame([3, [1, 2]]), _v1_frame([7, "shutdown", ""])):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(data[:4]), [])
            self.assertRaises(LegacyFrame, decoder.feed, data[4:])
        self.assertTrue(issubclass(LegacyFrame, FrameError))

    def test_only_first(self) -> None:
        """After a version 2 frame, the same bytes are a plain FrameError: the peer is broken, not old."""
        decoder = FrameDecoder()
        decoder.feed(encode(codec.Heartbeat()))
        try:
            decoder.feed(_v1_frame([6]))
        except LegacyFrame:
            self.fail("LegacyFrame after a version 2 frame")
        except FrameError:
            pass
        else:
            self.fail("no FrameError")
        self.assertRaises(FrameError, decode_frame, 0x88, b"")
        self.assertRaises(LegacyFrame, decode_frame, 0x87, b"")


class HostileInputTests(SynchronousTestCase):
    """Whatever the peer sends, the decoder yields frames or FrameError, nothing else."""

    def assert_frames_or_frame_error(self, data: bytes, complete: bool = False) -> None:
        """
        @param data: bytes to feed a fresh decoder, which may raise only L{FrameError}.
        @param complete: whether C{data} is exactly one frame, so that success
            must yield exactly one frame.
        """
        try:
            frames = FrameDecoder().feed(data)
        except FrameError:
            return
        if complete:
            self.assertEqual(len(frames), 1)

    @given(st.binary(max_size=400))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes give frames or FrameError."""
        self.assert_frames_or_frame_error(data)

    @given(st.lists(strategies.raw_frames() | st.binary(max_size=12), max_size=6), st.lists(st.integers(0, 500)))
    def test_arbitrary_bytes_at_any_split(self, pieces: list[bytes], cuts: list[int]) -> None:
        """
        Bytes fed in any chunks give what they give fed at once: the same
        frames, or a FrameError (never another exception).
        """
        data = b"".join(pieces)
        bounds = sorted({cut % (len(data) + 1) for cut in cuts})
        chunks = [data[start:end] for start, end in zip([0] + bounds, bounds + [len(data)])]

        def outcome(chunks: list[bytes]) -> tuple[list[Any], bool]:
            decoder, frames = FrameDecoder(), []
            for chunk in chunks:
                try:
                    frames += decoder.feed(chunk)
                except FrameError:
                    return frames, True
            return frames, False

        whole, whole_failed = outcome([data])
        split, split_failed = outcome(chunks)
        self.assertEqual(split_failed, whole_failed)
        if not whole_failed:
            self.assertEqual(split, whole)

    @given(st.sampled_from(range(8)), st.binary(max_size=400))
    def test_arbitrary_payload(self, code: int, payload: bytes) -> None:
        """Arbitrary bytes after a valid prefix of each type give exactly one frame or FrameError."""
        self.assert_frames_or_frame_error(_frame(code, payload), complete=True)

    @given(strategies.raw_frames())
    def test_arbitrary_cbor(self, data: bytes) -> None:
        """Arbitrary CBOR (tags, bignums, odd keys) in frame-shaped bytes gives one frame or FrameError."""
        self.assert_frames_or_frame_error(data, complete=True)

    @given(strategies.cbor_values)
    def test_arbitrary_head(self, value: Any) -> None:
        """Any CBOR value as a MSG head gives one frame or FrameError."""
        self.assert_frames_or_frame_error(_frame(MSG, _msg_payload(cbor2.dumps(value))), complete=True)

    @given(strategies.frames, st.data())
    def test_mutated_frame(self, frame: codec.Frame, data: st.DataObject) -> None:
        """
        A valid frame with one byte changed gives frames or FrameError; one
        frame or FrameError when the change leaves the length alone.
        """
        encoded = bytearray(encode(frame))
        index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
        encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
        self.assert_frames_or_frame_error(bytes(encoded), complete=index >= 4)


class RefusalTests(SynchronousTestCase):
    """Specific malformed payloads are refused with FrameError."""

    def assert_refused(self, code: int, payload: bytes, case: object) -> None:
        """
        @param code: a frame type.
        @param payload: a payload of that type that L{decode_frame} must refuse.
        @param case: what to name in the failure message.
        """
        try:
            frame = decode_frame(code, payload)
        except FrameError:
            return
        self.fail(f"{case!r} decoded to {frame!r} instead of raising FrameError")

    def assert_head_refused(self, head: Any, case: object = None) -> None:
        """@param head: a MSG head value that must be refused."""
        self.assert_refused(MSG, _msg_payload(cbor2.dumps(head)), case if case is not None else head)

    def assert_msg_refused(self, index: int, value: Any) -> None:
        """
        @param index: which element of the valid head to replace.
        @param value: the replacement, which must make the frame invalid.
        """
        head = _valid_head()
        head[index] = value
        self.assert_head_refused(head, (index, value))

    def test_valid_msg_fixture(self) -> None:
        """The MSG head the refusal tests mutate is itself accepted."""
        frame = decode_frame(MSG, _msg_payload(cbor2.dumps(_valid_head())))
        expected = Message(RpcAddress(None, "compute"), {"content_type": "application/json"}, b"{}")
        self.assertEqual(frame, MessageFrame(1, expected))

    def test_forbidden_tags(self) -> None:
        """Tags other than 1 and 4 are refused inside WELCOME routes, which accept any other CBOR value."""
        self.assertIsInstance(decode_frame(WELCOME, cbor2.dumps([_WELCOME])), codec.Welcome)
        for tag, value in [(35, "a+"), (36, "Content-Type: text/plain\r\n\r\nhi"), (258, [1, 2]), (2, b"\x01"),
                           (3, b"\x01"), (28, ["x"]), (0, "2020-01-01T00:00:00Z"), (9999, "x"), (55799, "x")]:  # fmt: skip
            routes = {"down": cbor2.CBORTag(tag, value)}
            self.assert_refused(WELCOME, cbor2.dumps([{**_WELCOME, "routes": routes}]), tag)
        # Tag 29 refers back to a value shared with tag 28.
        routes = {"down": cbor2.CBORTag(28, []), "up": cbor2.CBORTag(29, 0)}
        self.assert_refused(WELCOME, cbor2.dumps([{**_WELCOME, "routes": routes}]), 29)

    def test_allowed_tags(self) -> None:
        """Tags 1 (epoch time) and 4 (decimal fraction) are accepted in headers."""
        head = _valid_head()
        head[3] = {"headers": {"t": cbor2.CBORTag(1, 0), "d": cbor2.CBORTag(4, [-2, 1234])}}
        frame = decode_frame(MSG, _msg_payload(cbor2.dumps(head)))
        assert isinstance(frame, MessageFrame)
        headers = frame.message.properties["headers"]
        self.assertEqual(headers["t"].timestamp(), 0)
        self.assertEqual(headers["d"], decimal.Decimal("12.34"))

    def test_shared_reference_refused(self) -> None:
        """cbor2's value sharing (tags 28/29) is refused as it is emitted."""
        shared = ["x"]
        head = cbor2.dumps([1, 1, [None, "t", "p"], {"headers": {"a": shared, "b": shared}}, None], value_sharing=True)
        self.assert_refused(MSG, _msg_payload(head), "value_sharing")

    def test_indefinite_lengths(self) -> None:
        """Indefinite-length arrays, maps and strings are refused where their definite forms are accepted."""
        self.assertEqual(decode_frame(CLOSE, b"\x82\x61a\x60"), codec.Close("a", ""))
        self.assert_refused(CLOSE, b"\x9f\x61a\x60\xff", "indefinite array")
        self.assert_refused(CLOSE, b"\x82\x7f\x61a\xff\x60", "indefinite text")
        definite = cbor2.dumps([1, 3, [], {"headers": {"b": b""}}, None])
        expected = MessageFrame(1, Message(CanaryAddress(), {"headers": {"b": b""}}, b""))
        self.assertEqual(decode_frame(MSG, _msg_payload(definite, b"")), expected)
        self.assert_refused(MSG, _msg_payload(definite.replace(b"\xa1\x61b", b"\xbf\x61b") + b"\xff"), "indefinite map")
        self.assert_refused(MSG, _msg_payload(definite.replace(b"\x40", b"\x5f\xff")), "indefinite bytes")

    def test_non_text_map_keys(self) -> None:
        """Map keys other than text are refused in headers and properties."""
        for key in (1, -1, 1.5, (1, 2), None, b"h"):
            self.assert_msg_refused(3, {"headers": {key: "v"}})
            self.assert_msg_refused(3, {key: "v"})

    def test_trailing_bytes(self) -> None:
        """Bytes after the CBOR value are refused, in a MSG head (inside its length) and in other payloads."""
        head = cbor2.dumps(_valid_head())
        self.assert_refused(MSG, _msg_payload(head + b"\x00"), "trailing in head")
        self.assert_refused(CLOSE, cbor2.dumps(["a", "b"]) + b"\x00", "trailing")
        self.assert_refused(CREDIT, cbor2.dumps([1, 1]) + b"\x60", "trailing")

    def test_msg_head_shape(self) -> None:
        """A head that is not an array of five fields, empty or not CBOR at all is refused."""
        for head in (_valid_head()[:4], [*_valid_head(), None], {"seq": 1}, 1, None, []):
            self.assert_head_refused(head)
        self.assert_refused(MSG, struct.pack(">I", 1) + b"\xff", "not CBOR")
        self.assert_refused(MSG, struct.pack(">I", 2) + b"\x85\x01", "truncated head")

    def test_too_deep(self) -> None:
        """Headers nested beyond 32 levels are refused."""
        deep: Any = "leaf"
        for _ in range(40):
            deep = [deep]
        self.assert_msg_refused(3, {"headers": {"h": deep}})

    def test_msg_sequence_numbers(self) -> None:
        """MSG seq must be an integer from 1 to 2**64-1."""
        for seq in (0, -1, 1 << 64, True, 1.0, "1", None):
            self.assert_msg_refused(0, seq)

    def test_msg_addresses(self) -> None:
        """Addresses of the wrong shape for their kind are refused."""
        for kind, address in [
            (0, [None, "t", None]), (0, [None, "t", None, 0]), (0, [None, None, None, False]), (0, [1, "t", None, False]),
            (0, [None, "t", 5, False]), (1, [None, "t"]), (1, [None, "t", None]), (1, ["e", "t", "p", "x"]),
            (2, []), (2, [1]), (2, ["q", "r"]), (3, [None]), (4, []), (-1, []), ("0", [None, "t", None, False]),
            (0, None), (0, {"topic": "t"}), (None, []), (True, [None]), (0.0, [None, "t", None, False]),
        ]:  # fmt: skip
            head = _valid_head()
            head[1:3] = [kind, address]
            self.assert_head_refused(head, (kind, address))

    def test_msg_address_names_are_short_strings(self) -> None:
        """Names longer than an AMQP short string (255 UTF-8 bytes) are refused, in every address field."""
        long_ascii, long_utf8 = "t" * 256, "é" * 128
        for kind, address in [
            (0, [long_ascii, "t", None, False]), (0, [None, long_utf8, None, False]), (0, [None, "t", long_ascii, False]),
            (1, [long_ascii, "t", "info"]), (1, [None, long_utf8, "info"]), (1, [None, "t", long_ascii]), (2, [long_ascii]),
        ]:  # fmt: skip
            head = _valid_head()
            head[1:3] = [kind, address]
            self.assert_head_refused(head, (kind, address))
        head = _valid_head()
        head[1:3] = [0, [None, "t" * 255, "é" * 127, False]]
        decode_frame(MSG, _msg_payload(cbor2.dumps(head)))

    def test_fanout_flag_is_a_boolean_even_when_cached(self) -> None:
        """0 and 1 are not booleans, even right after the same address was decoded with False."""
        head = _valid_head()
        head[1:3] = [0, [None, "cached", None, False]]
        decode_frame(MSG, _msg_payload(cbor2.dumps(head)))
        for fanout in (0, 1):
            head[2] = [None, "cached", None, fanout]
            self.assert_head_refused(head, fanout)

    def test_msg_property_names(self) -> None:
        """Unknown property names, and a properties value that is not a map, are refused."""
        properties: Any
        for properties in ({"contentType": "x"}, {"x-custom": "x"}, {"": 1}, [], None, "headers"):
            self.assert_msg_refused(3, properties)

    def test_msg_property_types(self) -> None:
        """Every property refuses a value of the wrong type."""
        wrong = {str: 5, dict: ["a", 1], int: "2"}
        for name, expected in message.PROPERTY_TYPES.items():
            assert isinstance(expected, type)
            for value in (wrong[expected], None, True, 1.5):
                self.assert_msg_refused(3, {name: value})

    def test_integer_properties_in_range(self) -> None:
        """delivery_mode and priority must be octets and timestamp unsigned 64-bit."""
        for name, value in (("priority", 1000), ("delivery_mode", -1), ("timestamp", -5), ("priority", 256)):
            self.assert_msg_refused(3, {name: value})

    def test_msg_header_values(self) -> None:
        """Header values of types AMQP cannot carry are refused, at any depth."""
        for value in (cbor2.undefined, cbor2.CBORSimpleValue(100)):
            for nested in (value, [value], {"k": value}, [1, {"k": [value]}]):
                self.assert_msg_refused(3, {"headers": {"h": nested}})
        self.assert_msg_refused(3, {"headers": ["not", "a", "map"]})

    def test_msg_deadline(self) -> None:
        """The deadline must be a finite number or null."""
        for deadline in ("soon", b"1", [1.0], True, math.nan, math.inf, -math.inf):
            self.assert_msg_refused(4, deadline)
        head = _valid_head()
        head[4] = 1700000000
        frame = decode_frame(MSG, _msg_payload(cbor2.dumps(head)))
        assert isinstance(frame, MessageFrame)
        self.assertEqual(frame.message.deadline, 1.7e9)

    def test_wrong_field_counts(self) -> None:
        """Every type whose payload is an array of fields refuses a missing or an extra field."""
        for code, fields in [(HELLO, []), (HELLO, [{"versions": []}, 1]), (WELCOME, []), (WELCOME, [_WELCOME, 1]),
                             (ACK, []), (ACK, [[], []]), (REJECT, [1]), (REJECT, [1, "r", "x"]), (CREDIT, [1]),
                             (CREDIT, [1, 2, 3]), (CLOSE, ["a"]), (CLOSE, ["a", "b", "c"])]:  # fmt: skip
            self.assert_refused(code, cbor2.dumps(fields), (code, fields))
        for code in (HELLO, WELCOME, ACK, REJECT, CREDIT, CLOSE):
            for payload in (b"", cbor2.dumps({"0": 1}), cbor2.dumps(6), cbor2.dumps("x")):
                self.assert_refused(code, payload, (code, payload))

    def test_other_field_values(self) -> None:
        """Out-of-range or mistyped fields of the frames other than MSG are refused."""
        self.assertIsInstance(decode_frame(WELCOME, cbor2.dumps([_WELCOME])), codec.Welcome)
        bad_welcomes = [{**_WELCOME, "heartbeat": 0}, {**_WELCOME, "heartbeat": -1.0}, {**_WELCOME, "max_body": 1 << 32},
                        {**_WELCOME, "max_body": -1}, {**_WELCOME, "max_body": 1.0}, {**_WELCOME, "version": 1 << 16},
                        {**_WELCOME, "routes": []}, {**_WELCOME, "link": None}, {**_WELCOME, "heartbeat": None},
                        {k: v for k, v in _WELCOME.items() if k != "session"},
                        {**{k: v for k, v in _WELCOME.items() if k != "max_body"}, "max_frame": 10}]  # fmt: skip
        cases = [(WELCOME, [w]) for w in bad_welcomes] + [
            (HELLO, [{"versions": [1 << 16]}]), (HELLO, [{"versions": 1}]), (HELLO, [{"versions": [1], "link": 5}]),
            (HELLO, [{"versions": [2], "software": None}]), (HELLO, [[]]),
            (ACK, [[1, 0]]), (ACK, [[1 << 64]]), (ACK, [1]), (ACK, [list(range(1, codec.ACK_BATCH + 2))]),
            (REJECT, [0, "route"]), (REJECT, [1, None]), (CREDIT, [1 << 32, 0]), (CREDIT, [-1, 0]), (CREDIT, [0, -1]),
            (CREDIT, [1, 1.0]), (CREDIT, [True, 1]), (CLOSE, ["shutdown", None]), (CLOSE, [1, "x"]),
        ]  # fmt: skip
        for code, fields in cases:
            self.assert_refused(code, cbor2.dumps(fields), (code, fields))

    def test_welcome_heartbeat_is_a_number(self) -> None:
        """A WELCOME heartbeat given as text, bytes, a boolean or infinity is refused."""
        for value in ("2.5", b"inf", True, float("inf"), float("nan")):
            self.assert_refused(WELCOME, cbor2.dumps([{**_WELCOME, "heartbeat": value}]), value)

    def test_malformed_cbor(self) -> None:
        """Truncated or reserved CBOR encodings are refused, in heads and other payloads."""
        for payload in (b"\x82\x06", b"\x5a\xff\xff\xff\xff", b"\x1c", b"\xff", b"\x9b" + b"\xff" * 8):
            self.assert_refused(CLOSE, payload, payload)
            self.assert_refused(MSG, _msg_payload(payload), payload)


class DeferredHeadTests(SynchronousTestCase):
    """
    With C{heads=False} the decoder checks a MSG's sizes and leaves its head
    for later (the protocol decodes heads as its per-turn budget allows).
    """

    def test_same_frames_later(self) -> None:
        """Deferred heads decode to the frames an eager decoder gives."""
        frames = [MessageFrame(seq, Message(CanaryAddress(), {"headers": {"n": seq}}, b"x" * seq)) for seq in (1, 2)]
        data = b"".join(encode(frame) for frame in frames) + encode(codec.Heartbeat())
        decoder = FrameDecoder()
        pending = decoder.feed(data, heads=False)
        self.assertEqual([type(p).__name__ for p in pending], ["UndecodedMessage", "UndecodedMessage", "Heartbeat"])
        self.assertEqual([decoder.decode_head(p) for p in pending[:2]], frames)

    def test_bad_head_breaks_the_decoder(self) -> None:
        """A head that does not decode raises FrameError when it is decoded, and the decoder is broken from then on."""
        decoder = FrameDecoder()
        [pending] = decoder.feed(_frame(MSG, _msg_payload(b"\xff", b"")), heads=False)
        self.assertRaises(FrameError, decoder.decode_head, pending)
        self.assertRaises(FrameError, decoder.feed, encode(codec.Heartbeat()))


class HeaderNamesTests(SynchronousTestCase):
    """
    A decoder made with C{header_names} (the control half's, which replaces
    a tenant's headers) keeps of the headers only which of those names are
    present, and does not check the rest.
    """

    def decode(self, headers: Any, header_names: frozenset[str] = frozenset({"compression"})) -> Any:
        head = cbor2.dumps([1, 0, [None, "t", None, False], {"delivery_mode": 2, "headers": headers}, None])
        [frame] = FrameDecoder(header_names=header_names).feed(_frame(MSG, _msg_payload(head, b"body")))
        assert isinstance(frame, MessageFrame)
        return frame.message

    def test_names_only(self) -> None:
        """The headers become the named ones that are present; the other properties and the body are kept."""
        message = self.decode({"compression": "application/x-gzip", "x": [[], {"y": 1}]})
        self.assertEqual(message.properties, {"delivery_mode": 2, "headers": {"compression": True}})
        self.assertEqual(message.body, b"body")
        self.assertEqual(self.decode({"x": 1}).properties["headers"], {})

    def test_values_not_checked(self) -> None:
        """Values the full check refuses (here, a nested byte-string key) pass, because they are not kept."""
        self.assertEqual(self.decode({"g": [{b"k": "v"}]}).properties["headers"], {})
        head = cbor2.dumps([1, 0, [None, "t", None, False], {"headers": {"g": [{b"k": "v"}]}}, None])
        self.assertRaises(FrameError, FrameDecoder().feed, _frame(MSG, _msg_payload(head)))

    def test_headers_must_still_be_a_map(self) -> None:
        """The headers property itself is still checked: a map."""
        head = cbor2.dumps([1, 0, [None, "t", None, False], {"headers": ["compression"]}, None])
        decoder = FrameDecoder(header_names=frozenset({"compression"}))
        self.assertRaises(FrameError, decoder.feed, _frame(MSG, _msg_payload(head)))
