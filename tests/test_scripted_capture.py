# -*- test-case-name: tests.test_scripted_capture -*-
"""
The fixture the scripted broker replays: it was recorded from a real
RabbitMQ (and says which), its bytes agree with its descriptions, and the
frame codec of the test doubles gives back those bytes exactly, which is
what lets the scripted broker change varying fields and nothing else.  Also
the capture tool's bookkeeping, without a broker.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lab import capture_amqp
from msgmux.amqp import wire
from tests.doubles import amqp_frames
from tests.doubles.amqp_capture import FIXTURE, VARYING, load_capture
from tests.doubles.amqp_frames import Frame, FrameSplitter

#: Capabilities RabbitMQ 3.x announces in connection.start.
RABBITMQ_CAPABILITIES = {
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
}


def fixture_document() -> dict[str, Any]:
    with open(FIXTURE, encoding="utf-8") as f:
        document: dict[str, Any] = json.load(f)
    return document


class ProvenanceTests(SynchronousTestCase):
    """The frames are what RabbitMQ 3.10.8 sent, not written by hand."""

    def test_connection_start(self) -> None:
        """The bytes of connection.start name RabbitMQ, the recorded version, Erlang, and RabbitMQ's capabilities."""
        capture = load_capture()
        self.assertEqual((capture.product, capture.version), ("RabbitMQ", "3.10.8"))
        self.assertEqual(os.path.basename(FIXTURE), f"rabbitmq-{capture.version}.frames.json")
        for connection in range(3):
            start = next(f for f in capture.frames if f.connection == connection and f.method == "connection.start")
            _, fields = amqp_frames.decode_method(start.frame.payload)
            properties = fields["server-properties"]
            self.assertEqual((fields["version-major"], fields["version-minor"]), (0, 9))
            self.assertEqual((properties["product"], properties["version"]), ("RabbitMQ", capture.version))
            self.assertTrue(properties["platform"].startswith("Erlang/OTP "))
            self.assertTrue(properties["cluster_name"].startswith("rabbit@"))
            self.assertLessEqual(RABBITMQ_CAPABILITIES, set(properties["capabilities"]))
            self.assertIn(b"PLAIN", fields["mechanisms"].split())
            self.assertEqual(fields["locales"], b"en_US")

    def test_broker_texts(self) -> None:
        """The error replies carry RabbitMQ's own wording for what the capture tool did."""
        capture = load_capture()
        texts = {
            (f.method, f.answers, f.fields["reply-code"]): amqp_frames.decode_method(f.frame.payload)[1]["reply-text"]
            for f in capture.frames
            if f.method in ("channel.close", "connection.close")
        }
        self.assertEqual(
            texts[("channel.close", "queue.declare", 406)],
            "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'capture.q' in vhost 'msgmux-capture':"
            " received '300000' but current is '600000'",
        )
        self.assertEqual(texts[("channel.close", "basic.ack", 406)], "PRECONDITION_FAILED - unknown delivery tag 99")
        self.assertEqual(
            texts[("channel.close", "queue.delete", 406)],
            "PRECONDITION_FAILED - queue 'capture.q' in vhost 'msgmux-capture' not empty",
        )
        self.assertEqual(
            texts[("channel.close", "queue.declare", 404)], "NOT_FOUND - no queue 'capture.missing' in vhost 'msgmux-capture'"
        )
        self.assertEqual(
            texts[("channel.close", "exchange.declare", 406)],
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'capture.x' in vhost 'msgmux-capture':"
            " received 'true' but current is 'false'",
        )
        self.assertTrue(texts[("connection.close", None, 403)].startswith("ACCESS_REFUSED - Login was refused"))
        self.assertEqual(texts[("connection.close", None, 320)], "CONNECTION_FORCED - capture: closed by rabbitmqctl")
        self.assertEqual(len(texts), 7)

    def test_moving_a_queue(self) -> None:
        """
        What moving a queue uses was recorded: a passive declare that counts
        the message waiting, unbind, and the delete that took that message
        with the queue.
        """
        capture = load_capture()
        counted = [f for f in capture.frames if f.method == "queue.declare-ok" and f.fields["message-count"] == 1]
        self.assertEqual([f.fields["queue"] for f in counted], ["capture.q"])
        self.assertEqual(capture.find("queue.unbind-ok", answers="queue.unbind").answers, "queue.unbind")
        self.assertEqual(capture.find("queue.delete-ok", message_count=1).answers, "queue.delete")

    def test_heartbeats(self) -> None:
        """The broker's heartbeats are in the capture, on channel 0, empty."""
        heartbeats = [f for f in load_capture().frames if f.method == "heartbeat"]
        self.assertGreater(len(heartbeats), 0)
        self.assertEqual({(f.frame.channel, f.frame.payload) for f in heartbeats}, {(0, b"")})


class ConsistencyTests(SynchronousTestCase):
    def test_descriptions_match_bytes(self) -> None:
        """Each server frame's method, fields and properties are what its bytes say: no entry was edited by hand."""
        document = fixture_document()
        for entry in document["frames"]:
            if entry["from"] != "server":
                continue
            [frame] = FrameSplitter(header=False).feed(bytes.fromhex(entry["hex"]))
            described = amqp_frames.describe(frame)
            self.assertEqual({key: entry[key] for key in described}, described)
            self.assertEqual(entry["varies"], ["channel"] + list(VARYING.get(entry.get("method", ""), ())))

    def test_reencoding_is_exact(self) -> None:
        """Decoding then encoding every captured method and content header gives back its bytes."""
        for captured in load_capture().frames:
            payload = captured.frame.payload
            if captured.frame.kind == wire.FRAME_METHOD:
                self.assertEqual(
                    amqp_frames.encode_method(*amqp_frames.decode_method(payload)), payload, captured.method
                )
            elif captured.frame.kind == wire.FRAME_HEADER:
                self.assertEqual(
                    amqp_frames.encode_content_header(*amqp_frames.decode_content_header(payload)), payload
                )

    def test_answers_follow_the_spec(self) -> None:
        """Every reply answers a method the specification pairs it with."""
        for captured in load_capture().frames:
            if captured.answers is None or captured.method in ("connection.tune", "channel.close", "connection.close"):
                continue
            answered = amqp_frames.spec_method(captured.answers)
            if captured.answers == "basic.publish":
                self.assertIn(captured.method, ("basic.ack", "basic.nack", "basic.return"))
            else:
                self.assertIn(amqp_frames.spec_method(captured.method), answered.responses)

    def test_substitution_changes_only_the_field(self) -> None:
        """Changing one varying field of a captured frame changes exactly that field."""
        capture = load_capture()
        template = capture.find("basic.deliver")
        _, before = amqp_frames.decode_method(template.frame.payload)
        [frame] = FrameSplitter(header=False).feed(capture.method_frame(template, 5, delivery_tag=77))
        _, after = amqp_frames.decode_method(frame.payload)
        self.assertEqual(frame.channel, 5)
        self.assertEqual({k for k in before if before[k] != after[k]}, {"delivery-tag"})


class SplitterTests(SynchronousTestCase):
    @given(st.lists(st.integers(min_value=0, max_value=40000), max_size=12))
    def test_split_anywhere(self, cuts: list[int]) -> None:
        """The captured server stream gives the same frames however it is cut."""
        frames = [f.frame for f in load_capture().frames if f.connection == 0]
        data = b"".join(frame.raw for frame in frames)
        splitter = FrameSplitter(header=False)
        points = sorted({min(c, len(data)) for c in cuts})
        got: list[Frame] = []
        for start, end in zip([0] + points, points + [len(data)]):
            got.extend(splitter.feed(data[start:end]))
        self.assertEqual(got, frames)

    def test_bad_frame_end(self) -> None:
        raw = bytearray(wire.encode_ack(1, 1))
        raw[-1] = 0
        self.assertRaises(amqp_frames.FrameError, list, FrameSplitter(header=False).feed(bytes(raw)))

    def test_wrong_protocol_header(self) -> None:
        self.assertRaises(amqp_frames.FrameError, list, FrameSplitter(header=True).feed(b"AMQP\x00\x00\x09\x00"))


class CaptureToolTests(SynchronousTestCase):
    """How C{lab/capture_amqp.py} labels server frames, from a made-up transcript."""

    def test_document(self) -> None:
        declare = amqp_frames.encode_method(amqp_frames.spec_method("queue.declare"), {"queue": "q"})
        declare_ok = amqp_frames.encode_method(amqp_frames.spec_method("queue.declare-ok"), {"queue": "q"})
        refused = amqp_frames.encode_method(
            amqp_frames.spec_method("channel.close"),
            {"reply-code": 406, "reply-text": "PRECONDITION_FAILED", "class-id": 50, "method-id": 10},
        )
        transcript = capture_amqp.Transcript()
        for side, payload in [("client", declare), ("server", declare_ok), ("client", declare), ("server", refused)]:
            transcript.add(0, side, Frame(wire.FRAME_METHOD, 1, payload))
        transcript.add(0, "server", Frame(wire.FRAME_HEARTBEAT, 0, b""))
        frames = capture_amqp.document(transcript, ["test"])["frames"]
        server = [entry for entry in frames if entry["from"] == "server"]
        self.assertEqual(
            [(e.get("method", e["type"]), e["answers"]) for e in server],
            [
                ("queue.declare-ok", "queue.declare"),
                ("channel.close", "queue.declare"),
                ("heartbeat", None),
            ],
        )
        self.assertEqual(server[0]["varies"], ["channel", "queue", "message-count", "consumer-count"])
        self.assertNotIn("hex", frames[0])
