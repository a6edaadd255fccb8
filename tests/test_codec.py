# -*- test-case-name: tests.test_codec -*-
"""
Tests for L{msgmux.link.codec}: round trips, stream splitting, and strict
refusal of everything that is not a well-formed frame.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import cbor2
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from msgmux.link import codec
from msgmux.link.codec import FrameDecoder, FrameError, decode_frame, encode

from . import strategies

_MSG = 2


def _prefixed(payload: bytes) -> bytes:
    """@return: C{payload} behind a correct 32-bit length prefix."""
    return struct.pack(">I", len(payload)) + payload


def _valid_msg() -> list[Any]:
    """@return: the CBOR array of a valid RPC MSG frame, for mutating one field."""
    return [_MSG, 1, 0, [None, "compute", None, False], {"content_type": "application/json"}, b"{}", None]


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

    @given(strategies.frame_strategies["Message"])
    def test_message(self, frame: codec.Message) -> None:
        """MSG frames round-trip for every address kind, with header types preserved exactly."""
        self.assert_round_trip(frame)
        (decoded,) = FrameDecoder().feed(encode(frame))
        headers = frame.properties.get("headers")
        if headers is not None:
            self.assertEqual(strategies.tagged(decoded.properties["headers"]), strategies.tagged(headers))

    @given(strategies.addresses)
    def test_every_address_kind(self, address: codec.Address) -> None:
        """Each address kind decodes to the same address class and fields."""
        self.assert_round_trip(codec.Message(1, address, {}, b""))

    @given(strategies.frame_strategies["Ack"])
    def test_ack(self, frame: codec.Ack) -> None:
        """ACK frames round-trip, including an empty list."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["Reject"])
    def test_reject(self, frame: codec.Reject) -> None:
        """REJECT frames round-trip."""
        self.assert_round_trip(frame)

    @given(strategies.frame_strategies["Credit"])
    def test_credit(self, frame: codec.Credit) -> None:
        """CREDIT frames round-trip over the whole 32-bit range."""
        self.assert_round_trip(frame)

    def test_heartbeat(self) -> None:
        """HEARTBEAT round-trips and is the smallest frame: a one-element array."""
        self.assert_round_trip(codec.Heartbeat())
        self.assertEqual(encode(codec.Heartbeat()), b"\x00\x00\x00\x02\x81\x06")

    @given(strategies.frame_strategies["Close"])
    def test_close(self, frame: codec.Close) -> None:
        """CLOSE frames round-trip."""
        self.assert_round_trip(frame)

    def test_encode_refuses_non_frames(self) -> None:
        """Encoding something that is not a frame raises TypeError instead of sending garbage."""
        self.assertRaises(TypeError, encode, object())


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
        """Feeding one byte at a time yields the frame only with its last byte."""
        data = encode(codec.Close("shutdown", "bye"))
        decoder = FrameDecoder()
        for i in range(len(data) - 1):
            self.assertEqual(decoder.feed(data[i : i + 1]), [])
            self.assertEqual(decoder.pending, i + 1)
        self.assertEqual(decoder.feed(data[-1:]), [codec.Close("shutdown", "bye")])

    def test_oversized_prefix_refused_before_payload(self) -> None:
        """A length prefix above max_frame raises as soon as the prefix is complete, buffering nothing more."""
        decoder = FrameDecoder(max_frame=1000)
        prefix = struct.pack(">I", 1001)
        self.assertEqual(decoder.feed(prefix[:3]), [])
        self.assertRaises(FrameError, decoder.feed, prefix[3:])
        self.assertLessEqual(decoder.pending, 4)

    def test_oversized_prefix_after_valid_frame(self) -> None:
        """An oversized prefix following a good frame in the same chunk is refused."""
        decoder = FrameDecoder(max_frame=100)
        self.assertRaises(FrameError, decoder.feed, encode(codec.Heartbeat()) + struct.pack(">I", 0xFFFFFFFF))

    def test_max_frame_boundary(self) -> None:
        """A payload of exactly max_frame bytes is accepted and one byte more is not."""
        data = encode(codec.Close("x" * 50, ""))
        size = len(data) - 4
        self.assertEqual(FrameDecoder(max_frame=size).feed(data), [codec.Close("x" * 50, "")])
        self.assertRaises(FrameError, FrameDecoder(max_frame=size - 1).feed, data)

    def test_default_limit(self) -> None:
        """The default decoder refuses a 4 GiB prefix immediately."""
        self.assertRaises(FrameError, FrameDecoder().feed, b"\xff\xff\xff\xff")

    def test_empty_payload(self) -> None:
        """A zero-length frame is not valid CBOR and is refused."""
        self.assertRaises(FrameError, FrameDecoder().feed, b"\x00\x00\x00\x00")


class HostileInputTests(SynchronousTestCase):
    """Whatever the peer sends, the decoder yields frames or FrameError, nothing else."""

    def assert_frames_or_frame_error(self, data: bytes, complete: bool = False) -> None:
        """
        @param data: bytes to feed a fresh decoder, which may raise only L{FrameError}.
        @param complete: whether C{data} is exactly one length-prefixed frame,
            so that success must yield exactly one frame.
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

    @given(st.lists(st.binary(max_size=60).map(_prefixed) | st.binary(max_size=12), max_size=6), st.lists(st.integers(0, 500)))
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

    @given(st.binary(max_size=400))
    def test_arbitrary_payload(self, payload: bytes) -> None:
        """Arbitrary bytes behind a valid length prefix give exactly one frame or FrameError."""
        self.assert_frames_or_frame_error(_prefixed(payload), complete=True)

    @given(strategies.cbor_values | strategies.frame_arrays)
    def test_arbitrary_cbor(self, value: Any) -> None:
        """Arbitrary CBOR data (tags, bignums, odd keys, frame-shaped arrays) gives one frame or FrameError."""
        self.assert_frames_or_frame_error(_prefixed(cbor2.dumps(value)), complete=True)

    @given(strategies.frames, st.data())
    def test_mutated_frame(self, frame: codec.Frame, data: st.DataObject) -> None:
        """A valid frame with one byte changed gives one frame or FrameError."""
        payload = bytearray(codec.encode_payload(frame))
        index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[index] = data.draw(st.integers(min_value=0, max_value=255))
        self.assert_frames_or_frame_error(_prefixed(bytes(payload)), complete=True)


class RefusalTests(SynchronousTestCase):
    """Specific malformed payloads are refused with FrameError."""

    def assert_refused(self, payload: bytes, case: object) -> None:
        """
        @param payload: a frame payload that L{decode_frame} must refuse.
        @param case: what to name in the failure message.
        """
        try:
            frame = decode_frame(payload)
        except FrameError:
            return
        self.fail(f"{case!r} decoded to {frame!r} instead of raising FrameError")

    def assert_msg_refused(self, index: int, value: Any) -> None:
        """
        @param index: which element of the valid MSG array to replace.
        @param value: the replacement, which must make the frame invalid.
        """
        array = _valid_msg()
        array[index] = value
        self.assert_refused(cbor2.dumps(array), (index, value))

    def test_valid_msg_fixture(self) -> None:
        """The MSG fixture the refusal tests mutate is itself accepted."""
        frame = decode_frame(cbor2.dumps(_valid_msg()))
        expected = codec.Message(1, codec.RpcAddress(None, "compute"), {"content_type": "application/json"}, b"{}")
        self.assertEqual(frame, expected)

    def test_forbidden_tags(self) -> None:
        """Tags other than 1 and 4 are refused inside WELCOME routes, which accept any other CBOR value."""
        welcome = {"version": 1, "link": "l", "session": "s", "heartbeat": 1.0, "max_frame": 10, "routes": {"down": []}}
        self.assertIsInstance(decode_frame(cbor2.dumps([1, welcome])), codec.Welcome)
        for tag, value in [(35, "a+"), (36, "Content-Type: text/plain\r\n\r\nhi"), (258, [1, 2]), (2, b"\x01"),
                           (3, b"\x01"), (28, ["x"]), (0, "2020-01-01T00:00:00Z"), (9999, "x"), (55799, "x")]:  # fmt: skip
            routes = {"down": cbor2.CBORTag(tag, value)}
            self.assert_refused(cbor2.dumps([1, {**welcome, "routes": routes}]), tag)
        # Tag 29 refers back to a value shared with tag 28.
        routes = {"down": cbor2.CBORTag(28, []), "up": cbor2.CBORTag(29, 0)}
        shared_ref = cbor2.dumps([1, {**welcome, "routes": routes}])
        self.assert_refused(shared_ref, 29)

    def test_allowed_tags(self) -> None:
        """Tags 1 (epoch time) and 4 (decimal fraction) are accepted in headers."""
        array = _valid_msg()
        array[4] = {"headers": {"t": cbor2.CBORTag(1, 0), "d": cbor2.CBORTag(4, [-2, 1234])}}
        headers = decode_frame(cbor2.dumps(array)).properties["headers"]  # type: ignore[union-attr]
        self.assertEqual(headers["t"].timestamp(), 0)
        self.assertEqual(str(headers["d"]), "12.34")

    def test_shared_reference_refused(self) -> None:
        """cbor2's value sharing (tags 28/29) is refused as it is emitted."""
        shared = ["x"]
        payload = cbor2.dumps([_MSG, 1, 2, [None, "t", "p"], {"headers": {"a": shared, "b": shared}}, b"", None],
                              value_sharing=True)  # fmt: skip
        self.assert_refused(payload, "value_sharing")

    def test_indefinite_lengths(self) -> None:
        """Indefinite-length arrays, maps and strings are refused where their definite forms are accepted."""
        self.assertEqual(decode_frame(b"\x81\x06"), codec.Heartbeat())
        self.assert_refused(b"\x9f\x06\xff", "indefinite array")
        self.assertEqual(decode_frame(b"\x83\x07\x61a\x60"), codec.Close("a", ""))
        self.assert_refused(b"\x83\x07\x7f\x61a\xff\x60", "indefinite text")
        definite = cbor2.dumps([_MSG, 1, 3, [], {}, b"", None])
        self.assertEqual(decode_frame(definite), codec.Message(1, codec.CanaryAddress(), {}, b""))
        self.assert_refused(definite.replace(b"\xa0", b"\xbf\xff"), "indefinite map")
        self.assert_refused(definite.replace(b"\x40", b"\x5f\xff"), "indefinite bytes")

    def test_non_text_map_keys(self) -> None:
        """Map keys other than text are refused in headers and properties."""
        for key in (1, -1, 1.5, (1, 2), None, b"h"):
            self.assert_msg_refused(4, {"headers": {key: "v"}})
            self.assert_msg_refused(4, {key: "v"})

    def test_trailing_bytes(self) -> None:
        """Bytes after the frame's CBOR value are refused."""
        self.assert_refused(b"\x81\x06\x00", "trailing")

    def test_too_deep(self) -> None:
        """Headers nested beyond 32 levels are refused."""
        deep: Any = "leaf"
        for _ in range(40):
            deep = [deep]
        self.assert_msg_refused(4, {"headers": {"h": deep}})

    def test_msg_sequence_numbers(self) -> None:
        """MSG seq must be an integer from 1 to 2**64-1."""
        for seq in (0, -1, 1 << 64, True, 1.0, "1", None):
            self.assert_msg_refused(1, seq)

    def test_msg_addresses(self) -> None:
        """Addresses of the wrong shape for their kind are refused."""
        for kind, address in [
            (0, [None, "t", None]), (0, [None, "t", None, 0]), (0, [None, None, None, False]), (0, [1, "t", None, False]),
            (0, [None, "t", 5, False]), (1, [None, "t"]), (1, [None, "t", None]), (1, ["e", "t", "p", "x"]),
            (2, []), (2, [1]), (2, ["q", "r"]), (3, [None]), (4, []), (-1, []), ("0", [None, "t", None, False]),
            (0, None), (0, {"topic": "t"}), (None, []),
        ]:  # fmt: skip
            array = _valid_msg()
            array[2:4] = [kind, address]
            self.assert_refused(cbor2.dumps(array), (kind, address))

    def test_msg_address_names_are_short_strings(self) -> None:
        """Names longer than an AMQP short string (255 UTF-8 bytes) are refused, in every address field."""
        long_ascii, long_utf8 = "t" * 256, "é" * 128
        for kind, address in [
            (0, [long_ascii, "t", None, False]), (0, [None, long_utf8, None, False]), (0, [None, "t", long_ascii, False]),
            (1, [long_ascii, "t", "info"]), (1, [None, long_utf8, "info"]), (1, [None, "t", long_ascii]), (2, [long_ascii]),
        ]:  # fmt: skip
            array = _valid_msg()
            array[2:4] = [kind, address]
            self.assert_refused(cbor2.dumps(array), (kind, address))
        array = _valid_msg()
        array[2:4] = [0, [None, "t" * 255, "é" * 127, False]]
        codec.decode_frame(cbor2.dumps(array))

    def test_fanout_flag_is_a_boolean_even_when_cached(self) -> None:
        """0 and 1 are not booleans, even right after the same address was decoded with False."""
        array = _valid_msg()
        array[2:4] = [0, [None, "cached", None, False]]
        codec.decode_frame(cbor2.dumps(array))
        for fanout in (0, 1):
            array[3] = [None, "cached", None, fanout]
            self.assert_refused(cbor2.dumps(array), fanout)

    def test_msg_property_names(self) -> None:
        """Unknown property names, and a properties value that is not a map, are refused."""
        for properties in ({"contentType": "x"}, {"x-custom": "x"}, {"": 1}, [], None, "headers"):
            self.assert_msg_refused(4, properties)

    def test_msg_property_types(self) -> None:
        """Every property refuses a value of the wrong type."""
        wrong = {str: 5, dict: ["a", 1], int: "2"}
        for name, expected in codec.PROPERTY_TYPES.items():
            assert isinstance(expected, type)
            for value in (wrong[expected], None, True, 1.5):
                self.assert_msg_refused(4, {name: value})

    def test_msg_header_values(self) -> None:
        """Header values of types AMQP cannot carry are refused, at any depth."""
        for value in (cbor2.undefined, cbor2.CBORSimpleValue(100)):
            for nested in (value, [value], {"k": value}, [1, {"k": [value]}]):
                self.assert_msg_refused(4, {"headers": {"h": nested}})
        self.assert_msg_refused(4, {"headers": ["not", "a", "map"]})

    def test_msg_body_and_deadline(self) -> None:
        """The body must be a byte string and the deadline a number or null."""
        for body in ("text", None, [1]):
            self.assert_msg_refused(5, body)
        for deadline in ("soon", b"1", [1.0], True, math.nan, math.inf, -math.inf):
            self.assert_msg_refused(6, deadline)

    def test_wrong_field_counts(self) -> None:
        """Every frame type refuses a missing or an extra field."""
        for array in ([0], [0, {"versions": []}, 1], [1], [_MSG, 1, 3, [], {}, b""], _valid_msg() + [None],
                      [3], [3, [], []], [4, 1], [5], [5, 1, 2], [6, None], [7, "a"], [7, "a", "b", "c"]):  # fmt: skip
            self.assert_refused(cbor2.dumps(array), array)

    def test_other_field_values(self) -> None:
        """Out-of-range or mistyped fields of the non-MSG frames are refused."""
        welcome = {"version": 1, "link": "l", "session": "s", "heartbeat": 1.0, "max_frame": 10, "routes": {}}
        self.assertIsInstance(decode_frame(cbor2.dumps([1, welcome])), codec.Welcome)
        bad_welcomes = [{**welcome, "heartbeat": 0}, {**welcome, "heartbeat": -1.0}, {**welcome, "max_frame": 1 << 32},
                        {**welcome, "version": 1 << 16}, {**welcome, "routes": []}, {**welcome, "link": None},
                        {k: v for k, v in welcome.items() if k != "session"}, {**welcome, "heartbeat": None}]  # fmt: skip
        cases = [[1, w] for w in bad_welcomes] + [
            [0, {"versions": [1 << 16]}], [0, {"versions": 1}], [0, {"versions": [1], "link": 5}], [0, []],
            [3, [1, 0]], [3, [1 << 64]], [3, 1], [4, 0, "route"], [4, 1, None], [5, 1 << 32], [5, -1],
            [7, "shutdown", None], [7, 1, "x"],
        ]  # fmt: skip
        for array in cases:
            self.assert_refused(cbor2.dumps(array), array)

    def test_unknown_frame_types(self) -> None:
        """Unknown frame types and payloads that are not a non-empty array are refused."""
        for array in ([8], [255], [-1], ["MSG"], [None], [[2]], [{"type": 2}], [], {"0": 1}, 6, "heartbeat"):
            self.assert_refused(cbor2.dumps(array), array)

    def test_frame_type_must_be_an_integer(self) -> None:
        """Values equal to a frame type but not integers (6.0, Decimal 6, True) are refused."""
        welcome = {"version": 1, "link": "l", "session": "s", "heartbeat": 1.0, "max_frame": 10, "routes": {}}
        for array in ([6.0], [__import__("decimal").Decimal(6)], [True, welcome]):
            self.assert_refused(cbor2.dumps(array), array)

    def test_kind_must_be_an_integer(self) -> None:
        """A MSG kind of True or 0.0 is refused, not read as 1 or 0."""
        self.assert_msg_refused(2, True)
        self.assert_msg_refused(2, 0.0)

    def test_welcome_heartbeat_is_a_number(self) -> None:
        """A WELCOME heartbeat given as text, bytes, a boolean or infinity is refused."""
        welcome = {"version": 1, "link": "l", "session": "s", "heartbeat": 1.0, "max_frame": 10, "routes": {}}
        for value in ("2.5", b"inf", True, float("inf"), float("nan")):
            self.assert_refused(cbor2.dumps([1, {**welcome, "heartbeat": value}]), value)

    def test_integer_properties_in_range(self) -> None:
        """delivery_mode and priority must be octets and timestamp unsigned 64-bit."""
        for name, value in (("priority", 1000), ("delivery_mode", -1), ("timestamp", -5), ("priority", 256)):
            array = _valid_msg()
            array[4] = {name: value}
            self.assert_refused(cbor2.dumps(array), (name, value))

    def test_malformed_cbor(self) -> None:
        """Truncated or reserved CBOR encodings are refused."""
        for payload in (b"\x82\x06", b"\x5a\xff\xff\xff\xff", b"\x1c", b"\xff", b"\x9b" + b"\xff" * 8):
            self.assert_refused(payload, payload)
