# -*- test-case-name: tests.test_scripted_capture -*-
"""
The frames recorded from a real RabbitMQ, and replies made from them.

The fixture written by C{lab/capture_amqp.py} and read by L{Capture} is a
JSON document: the broker's product and version, then every frame of the
recorded connections in order.  Server frames carry their bytes in hex (the
truth; their decoded C{fields} are there for reading and searching), the
client method they answer and the names of their fields that vary from one
session to the next; client frames carry only their method, for reading.

L{Capture.method_frame} and L{Capture.content_frames} turn a captured frame
into one for another session, changing only what L{VARYING} allows.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import attrs

from msgmux.amqp import wire
from tests.doubles.amqp_frames import (
    Frame,
    FrameError,
    FrameSplitter,
    decode_content_header,
    decode_method,
    encode_content_header,
    encode_method,
)
from tests.doubles.amqp_records import ScriptError

#: The fixture the scripted broker replays.
FIXTURE = os.path.join(os.path.dirname(__file__), "rabbitmq-3.10.8.frames.json")

#: Fields of each server method that differ between sessions: the scripted
#: broker may substitute these, and only these, in a captured frame.  The
#: channel number of every frame varies too.
VARYING: dict[str, tuple[str, ...]] = {
    "queue.declare-ok": ("queue", "message-count", "consumer-count"),
    "queue.delete-ok": ("message-count",),
    "queue.purge-ok": ("message-count",),
    "basic.consume-ok": ("consumer-tag",),
    "basic.cancel-ok": ("consumer-tag",),
    "basic.cancel": ("consumer-tag",),
    "basic.deliver": ("consumer-tag", "delivery-tag", "redelivered", "exchange", "routing-key"),
    "basic.return": ("reply-code", "reply-text", "exchange", "routing-key"),
    "basic.ack": ("delivery-tag", "multiple"),
    "basic.nack": ("delivery-tag", "multiple", "requeue"),
    "channel.close": ("reply-code", "reply-text", "class-id", "method-id"),
    "connection.close": ("reply-code", "reply-text", "class-id", "method-id"),
}


@attrs.frozen
class CapturedFrame:
    """
    A server frame of the fixture.

    @ivar connection: which recorded connection it came on (from 0).
    @ivar method: C{class.method} for a method frame, else the frame type
        (C{"header"}, C{"body"}, C{"heartbeat"}).
    @ivar answers: the client method it answers, or L{None} for what the
        broker sends on its own (start, deliveries, heartbeats...).
    """

    connection: int
    frame: Frame
    method: str
    answers: str | None
    fields: dict[str, Any]


class Capture:
    """
    The frames recorded from a real RabbitMQ (see C{lab/capture_amqp.py}).

    @ivar product: the broker's C{product} server property.
    @ivar version: its C{version} server property.
    @ivar frames: the server frames, in the order they were sent.
    """

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.product: str = document["broker"]["product"]
        self.version: str = document["broker"]["version"]
        self.frames: list[CapturedFrame] = []
        for entry in document["frames"]:
            if entry["from"] != "server":
                continue
            frames = list(FrameSplitter(header=False).feed(bytes.fromhex(entry["hex"])))
            if len(frames) != 1 or (frames[0].kind, frames[0].channel) != (entry["frame-type"], entry["channel"]):
                raise FrameError(f"fixture entry is not the one frame it describes: {entry}")
            frame = frames[0]
            self.frames.append(
                CapturedFrame(
                    entry["connection"],
                    frame,
                    entry.get("method", entry["type"]),
                    entry.get("answers"),
                    entry.get("fields", {}),
                )
            )

    @classmethod
    def load(cls, path: str = FIXTURE) -> Capture:
        """Read a fixture file."""
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def find(self, method: str, answers: str | None = None, **fields: Any) -> CapturedFrame:
        """
        @param method: C{class.method} or a frame type name.
        @param answers: only a frame answering this client method.
        @param fields: only a frame whose decoded fields have these values
            (spec names with C{_} for C{-}).
        @return: the first such frame.
        @raise LookupError: when the capture has none.
        """
        wanted = {name.replace("_", "-"): value for name, value in fields.items()}
        for captured in self.frames:
            if captured.method != method or (answers is not None and captured.answers != answers):
                continue
            if all(captured.fields.get(name) == value for name, value in wanted.items()):
                return captured
        raise LookupError(
            f"the capture has no {method} frame"
            + (f" answering {answers}" if answers else "")
            + (f" with {fields}" if fields else "")
        )

    def after(self, captured: CapturedFrame) -> CapturedFrame:
        """@return: the server frame sent right after C{captured} on its channel (its content header or body)."""
        index = self.frames.index(captured)
        for later in self.frames[index + 1 :]:
            if later.connection == captured.connection and later.frame.channel == captured.frame.channel:
                return later
        raise LookupError(f"nothing follows {captured.method} in the capture")

    def method_frame(self, template: CapturedFrame, channel: int, **changes: Any) -> bytes:
        """
        @param template: a captured method frame.
        @param channel: the channel to send it on.
        @param changes: new values for its varying fields (C{_} for C{-}).
        @return: the frame, otherwise byte for byte as captured.
        @raise ScriptError: for a field that does not vary.
        """
        payload = template.frame.payload
        if changes:
            method, fields = decode_method(payload)
            varying = VARYING.get(template.method, ())
            for key, value in changes.items():
                name = key.replace("_", "-")
                if name not in varying:
                    raise ScriptError(f"{name} of {template.method} does not vary in the capture")
                fields[name] = value
            payload = encode_method(method, fields)
        return wire.frame(wire.FRAME_METHOD, channel, payload)

    def content_frames(
        self, template: CapturedFrame, channel: int, properties: dict[str, Any], body: bytes, frame_max: int
    ) -> list[bytes]:
        """
        @param template: a captured method frame with content (deliver, return).
        @param frame_max: the negotiated frame size limit; the body is split to fit.
        @return: a content header shaped like the one that followed
            C{template} in the capture, and the body frames.
        """
        class_id, weight, _, _ = decode_content_header(self.after(template).frame.payload)
        frames = [
            wire.frame(wire.FRAME_HEADER, channel, encode_content_header(class_id, weight, len(body), properties))
        ]
        chunk = frame_max - 8
        frames.extend(wire.frame(wire.FRAME_BODY, channel, body[i : i + chunk]) for i in range(0, len(body), chunk))
        return frames


@functools.lru_cache(maxsize=None)
def load_capture() -> Capture:
    """@return: the committed fixture, read once per process."""
    return Capture.load()
