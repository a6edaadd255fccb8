"""
Tests for L{msgmux.oslo.envelope}: oslo.messaging 2.0 bodies are parsed,
inspected and rewritten; anything else is an L{EnvelopeError}.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from msgmux.oslo import envelope
from msgmux.oslo.envelope import Envelope, EnvelopeError, might_be_call, parse

#: JSON values as oslo arguments carry them (no floats: NaN never compares equal).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def body(inner: Any, version: Any = "2.0", **outer: Any) -> bytes:
    """Serialize like oslo's rabbit driver: the inner message is JSON inside JSON."""
    envelope = {"oslo.version": version, "oslo.message": json.dumps(inner), **outer}
    return json.dumps(envelope).encode("utf-8")


def call(**extra: Any) -> dict[str, Any]:
    """The inner message of an oslo call request."""
    return {
        "method": "sync_routers",
        "args": {"host": "agent-1", "router_ids": ["r1", "r2"]},
        "namespace": None,
        "version": "1.1",
        "_context_user_id": "u1",
        "_msg_id": "6a1c0e2f3b4d4e5f",
        "_reply_q": "reply_0123abcd",
        "_unique_id": "u-42",
        **extra,
    }


def cast(**extra: Any) -> dict[str, Any]:
    """The inner message of an oslo cast."""
    inner = call(**extra)
    del inner["_msg_id"], inner["_reply_q"]
    return inner


class ParseTests(SynchronousTestCase):
    """Valid oslo bodies and what they say."""

    def test_call_has_method_msg_id_and_reply_queue(self) -> None:
        """A call request has a method, msg_id and reply queue, and is a call."""
        envelope = parse(body(call()))
        self.assertIsInstance(envelope, Envelope)
        self.assertEqual(envelope.inner, call())
        self.assertEqual(envelope.outer["oslo.version"], "2.0")
        self.assertEqual(
            (envelope.method, envelope.msg_id, envelope.reply_queue, envelope.is_call),
            ("sync_routers", "6a1c0e2f3b4d4e5f", "reply_0123abcd", True),
        )

    def test_cast_has_no_call_fields(self) -> None:
        """A cast has a method but no msg_id or reply queue."""
        envelope = parse(body(cast()))
        self.assertEqual((envelope.method, envelope.msg_id, envelope.reply_queue, envelope.is_call), ("sync_routers", None, None, False))

    def test_reply_is_no_call(self) -> None:
        """A reply carries a msg_id but no reply queue, so it is no call."""
        envelope = parse(body({"_msg_id": "m", "result": {"ok": 1}, "failure": None, "ending": True}))
        self.assertEqual((envelope.msg_id, envelope.reply_queue, envelope.method, envelope.is_call), ("m", None, None, False))

    def test_wrong_types(self) -> None:
        """Non-string method, msg_id or reply queue read as absent."""
        envelope = parse(body(call(method=1, _msg_id=None, _reply_q=["q"])))
        self.assertEqual((envelope.method, envelope.msg_id, envelope.reply_queue, envelope.is_call), (None, None, None, False))
        self.assertFalse(parse(body(call(_msg_id=5))).is_call)
        self.assertFalse(parse(body(call(_reply_q=None))).is_call)

    def test_extra_outer_keys(self) -> None:
        """Unknown outer keys are kept."""
        envelope = parse(body(cast(), extra="kept"))
        self.assertEqual(envelope.outer["extra"], "kept")

    def test_envelopes_are_frozen(self) -> None:
        """Envelopes are frozen value objects."""
        envelope = parse(body(cast()))
        self.assertRaises(AttributeError, setattr, envelope, "inner", {})
        self.assertEqual(envelope, parse(body(cast())))


class CheckRequestTests(SynchronousTestCase):
    """Requests whose call fields oslo would read differently from msgmux."""

    def test_casts_and_calls_pass(self) -> None:
        """A cast (neither field) and a call (both, as text) are fine."""
        parse(body(cast())).check_request()
        parse(body(call())).check_request()

    def test_half_calls_and_mistyped_ids(self) -> None:
        """One field without the other, empty ones, or ids of another JSON type are refused."""
        for inner in (
            call(_msg_id=1),
            call(_msg_id=True),
            call(_msg_id=None),
            call(_reply_q=["reply_x"]),
            call(_msg_id=""),
            call(_reply_q=""),
            {**cast(), "_msg_id": "m1"},
            {**cast(), "_reply_q": "reply_victim"},
        ):
            self.assertRaises(EnvelopeError, parse(body(inner)).check_request)

    def test_reply_queue_name_length(self) -> None:
        """A reply queue fits an AMQP queue name (255 bytes of UTF-8) or is refused."""
        parse(body(call(_reply_q="r" * 255))).check_request()
        for name in ("r" * 256, "\u00e9" * 128):
            self.assertRaises(EnvelopeError, parse(body(call(_reply_q=name))).check_request)


class WithInnerTests(SynchronousTestCase):
    """Rewriting inner keys."""

    def test_rewrites_only_given_keys(self) -> None:
        """Only the named keys change; everything else, inner and outer, stays."""
        original = parse(body(call(), extra=[1, 2]))
        rewritten = parse(original.with_inner(_msg_id="mmx1.token", _reply_q="reply_msgmux_a"))
        self.assertEqual(rewritten.inner, call(_msg_id="mmx1.token", _reply_q="reply_msgmux_a"))
        self.assertEqual(rewritten.outer["extra"], [1, 2])
        self.assertEqual(rewritten.outer["oslo.version"], "2.0")
        self.assertEqual(set(rewritten.outer), {"oslo.version", "oslo.message", "extra"})
        self.assertEqual(original.inner, call())

    def test_adds_key(self) -> None:
        """A key absent before is added."""
        self.assertEqual(parse(parse(body(cast())).with_inner(_msg_id="x")).inner, {**cast(), "_msg_id": "x"})

    def test_no_changes_give_an_equal_message(self) -> None:
        """No changes re-serialize an equal message."""
        envelope = parse(body(call()))
        self.assertEqual(parse(envelope.with_inner()), envelope)

    def test_unicode_and_nested(self) -> None:
        """Unicode and nested arguments survive a rewrite unchanged."""
        args = {"name": "rüter ☃ 路由器 \U0001f600", "nested": {"a": [1, 2.5, None, True, {"b": "\u2028"}]}, "empty": {}}
        envelope = parse(body(call(args=args, _context_user_id="ü")))
        rewritten = parse(envelope.with_inner(_msg_id="t"))
        self.assertEqual(rewritten.inner["args"], args)
        self.assertEqual(rewritten.inner["_context_user_id"], "ü")

    def test_bytes_out(self) -> None:
        """The result is UTF-8 JSON bytes in oslo's layout."""
        out = parse(body(cast())).with_inner(method="other")
        self.assertIsInstance(out, bytes)
        outer = json.loads(out.decode("utf-8"))
        self.assertIsInstance(outer["oslo.message"], str)
        self.assertEqual(json.loads(outer["oslo.message"])["method"], "other")

    @settings(deadline=None)
    @given(st.dictionaries(st.text(max_size=8), JSON, max_size=4))
    def test_round_trip_property(self, args: dict[str, Any]) -> None:
        """Arbitrary JSON arguments survive parse and rewrite."""
        rewritten = parse(parse(body(call(args=args))).with_inner(_msg_id="t"))
        self.assertEqual(rewritten.inner["args"], args)
        self.assertEqual(rewritten.msg_id, "t")


class ErrorTests(SynchronousTestCase):
    """Anything but an oslo 2.0 envelope is an EnvelopeError."""

    def refuse(self, data: bytes) -> EnvelopeError:
        """Assert that C{data} is refused."""
        return self.assertRaises(EnvelopeError, parse, data)

    def test_not_json(self) -> None:
        """Bodies that are not JSON are refused."""
        for data in (b"", b"{", b"not json", b"\xff\xfe\x00", b'{"oslo.version": "2.0",}', b"\x80abc"):
            self.refuse(data)

    def test_only_utf8(self) -> None:
        """UTF-16 and UTF-32 JSON, which json.loads would detect on bytes, are refused: oslo's consumers decode UTF-8."""
        text = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(call())})
        for encoding in ("utf-16", "utf-16-le", "utf-32", "utf-8-sig"):
            self.refuse(text.encode(encoding))
        parse(text.encode("utf-8"))

    def test_not_object(self) -> None:
        """A JSON body that is not an object is refused."""
        for data in (b"[]", b'"2.0"', b"null", b"1"):
            self.refuse(data)

    def test_other_oslo_versions_refused(self) -> None:
        """Missing or other oslo.version values are refused."""
        for version in ("1.0", "2", 2.0, None, "2.0 "):
            self.refuse(body(cast(), version=version))
        self.refuse(json.dumps({"oslo.message": json.dumps(cast())}).encode())

    def test_oslo_message_not_string(self) -> None:
        """oslo.message must be a JSON string, not an embedded object."""
        for message in (cast(), None, 1, ["x"]):
            self.refuse(json.dumps({"oslo.version": "2.0", "oslo.message": message}).encode())
        self.refuse(json.dumps({"oslo.version": "2.0"}).encode())

    def test_inner_not_json(self) -> None:
        """oslo.message text that is not JSON is refused."""
        for text in ("", "{", "nope"):
            self.refuse(json.dumps({"oslo.version": "2.0", "oslo.message": text}).encode())

    def test_inner_not_object(self) -> None:
        """oslo.message that decodes to something other than an object is refused."""
        for inner in ([], "s", 1, None, True):
            self.refuse(body(inner))

    def test_deep_recursion(self) -> None:
        """Deeply nested JSON, outside or inside, is refused rather than crashing."""
        deep = "[" * 100000 + "]" * 100000
        self.refuse(deep.encode())
        self.refuse(b'{"a": ' + deep.encode() + b"}")
        self.refuse(json.dumps({"oslo.version": "2.0", "oslo.message": deep}).encode())
        self.refuse(json.dumps({"oslo.version": "2.0", "oslo.message": '{"a": ' + deep + "}"}).encode())

    def test_huge_integer(self) -> None:
        """Integers beyond Python's digit limit are refused, not raised as another error."""
        self.refuse(b"1" * 5000)
        self.refuse(json.dumps({"oslo.version": "2.0", "oslo.message": '{"a": ' + "1" * 5000 + "}"}).encode())

    def test_error_is_value_error(self) -> None:
        """EnvelopeError is a ValueError with a bounded message."""
        error = self.refuse(b"x" * 10000)
        self.assertIsInstance(error, ValueError)
        self.assertLessEqual(len(str(error)), 200)

    @settings(deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        """Arbitrary bytes give an envelope or an EnvelopeError, nothing else."""
        try:
            parse(data)
        except EnvelopeError:
            pass


class MightBeCallTests(SynchronousTestCase):
    """The cheap pre-check."""

    def test_call_request_might_be_a_call(self) -> None:
        """A call request might be a call."""
        self.assertTrue(might_be_call(body(call())))

    def test_casts_replies_and_garbage_are_not_calls(self) -> None:
        """A cast, a reply and garbage certainly are not."""
        self.assertFalse(might_be_call(body(cast())))
        self.assertFalse(might_be_call(body({"_msg_id": "m", "result": 1})))
        self.assertFalse(might_be_call(b"garbage"))

    def test_no_false_negatives(self) -> None:
        """Every body that parses as a call passes the pre-check."""
        for inner in (call(), call(args={"x": "\u00e9"}), call(_reply_q="r")):
            data = body(inner)
            self.assertTrue(parse(data).is_call)
            self.assertTrue(might_be_call(data))


class ContainerCountTests(SynchronousTestCase):
    """L{envelope.container_count}: a bound on what parsing a body would build."""

    def test_counts_opening_brackets(self) -> None:
        """Every [ and { counts, inside strings too (it is a bound, not a parse)."""
        body = b'{"a": [1, {"b": "[{"}], "c": []}'
        self.assertEqual(envelope.container_count(body), 6)
        self.assertEqual(envelope.container_count(body, most=6), 6)

    @given(st.binary(max_size=2000), st.integers(min_value=0, max_value=3000), st.integers(min_value=1, max_value=50))
    def test_same_answer_to_the_question_asked(self, body: bytes, most: int, chunk: int) -> None:
        """With a limit the count may stop early (here in chunks of a few bytes), but whether it passes the limit does not change."""
        original = envelope._COUNT_CHUNK
        envelope._COUNT_CHUNK = chunk
        try:
            full = envelope.container_count(body)
            limited = envelope.container_count(body, most)
        finally:
            envelope._COUNT_CHUNK = original
        self.assertEqual(limited > most, full > most)
        self.assertLessEqual(limited, full)

    def test_stops_once_past_the_limit(self) -> None:
        """A body of millions of empty lists is not scanned to its end once the limit is passed."""
        body = b"[" + b"[]," * 2_000_000 + b"[]]"
        limited = envelope.container_count(body, 100_000)
        self.assertGreater(limited, 100_000)
        self.assertLess(limited, envelope.container_count(body))
