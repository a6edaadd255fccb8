# -*- test-case-name: tests.test_scripted_broker -*-
"""
What the scripted broker records of the client, the state it keeps per
channel, and how it fails.
"""

from __future__ import annotations

from typing import Any

import attrs

from msgmux.amqp import wire
from tests.doubles import amqp_frames
from tests.doubles.amqp_frames import Frame

#: Outcomes an C{auto_confirm} policy can give a publish.
ACK, NACK, RETURN = "ack", "nack", "return"


class UnexpectedFrame(Exception):
    """
    The client sent something the script has no answer for, or that
    RabbitMQ would refuse.

    @ivar frame: the offending frame, or L{None} for bytes that were not one.
    """

    def __init__(self, reason: str, frame: Frame | None = None) -> None:
        self.frame = frame
        shown = f" ({_show(frame)})" if frame is not None else ""
        super().__init__(reason + shown)


def _show(frame: Frame) -> str:
    try:
        described = amqp_frames.describe(frame)
    except amqp_frames.FrameError as e:
        described = {"undecodable": str(e)}
    return f"channel {frame.channel}: {described}"


class ScriptError(Exception):
    """The test asked the scripted broker for something it cannot send."""


@attrs.frozen
class Received:
    """A method the client sent (arguments by spec name, e.g. C{routing-key})."""

    channel: int
    method: str
    fields: dict[str, Any]


@attrs.frozen
class Published:
    """
    A message the client published.

    @ivar tag: its publish sequence number on a channel in confirm mode,
        else L{None}.
    """

    channel: int
    tag: int | None
    exchange: str
    routing_key: str
    mandatory: bool
    properties: dict[str, Any]
    body: bytes


@attrs.frozen
class Settled:
    """
    A client C{basic.ack}, C{basic.nack} or C{basic.reject}.

    @ivar method: C{"ack"}, C{"nack"} or C{"reject"}.
    """

    channel: int
    method: str
    delivery_tag: int
    multiple: bool
    requeue: bool


@attrs.frozen
class Consumer:
    """A consumer the client started (C{basic.consume}) and that still runs."""

    channel: int
    queue: str
    tag: str


@attrs.define
class ChannelState:
    """
    What the scripted broker tracks of one open channel.

    @ivar unconfirmed: publish tags awaiting a confirm, in order.
    @ivar outstanding: delivery tags not yet acked or rejected.
    @ivar closing: the broker sent channel.close and awaits close-ok.
    """

    confirming: bool = False
    publish_tag: int = 0
    unconfirmed: list[int] = attrs.Factory(list)
    delivery_tag: int = 0
    outstanding: set[int] = attrs.Factory(set)
    closing: bool = False
    # A publish whose content is arriving: method arguments, body size (-1
    # before the header), properties, body parts.
    _content: tuple[dict[str, Any], int, dict[str, Any], list[bytes]] | None = None

    def deliver(self) -> int:
        """@return: the next delivery tag, now outstanding."""
        self.delivery_tag += 1
        self.outstanding.add(self.delivery_tag)
        return self.delivery_tag

    def settle(self, tag: int, multiple: bool) -> bool:
        """
        The client acked, nacked or rejected C{tag} (and those below it when
        C{multiple}; all of them for tag 0).

        @return: whether that was allowed (RabbitMQ closes the channel with
            406 for an unknown delivery tag).
        """
        if multiple and tag == 0:
            self.outstanding.clear()
            return True
        if tag not in self.outstanding:
            return False
        self.outstanding -= {t for t in self.outstanding if t <= tag} if multiple else {tag}
        return True

    def confirm(self, tag: int | None, multiple: bool) -> int:
        """
        Take publishes off the unconfirmed list for a confirm.

        @param tag: the publish to confirm; the oldest when L{None}.
        @return: the tag to send.
        @raise ScriptError: when C{tag} is not awaiting a confirm.
        """
        if not self.unconfirmed:
            raise ScriptError("nothing to confirm")
        tag = self.unconfirmed[0] if tag is None else tag
        if tag not in self.unconfirmed:
            raise ScriptError(f"publish {tag} is not awaiting a confirm")
        self.unconfirmed = [t for t in self.unconfirmed if t > tag or (t < tag and not multiple)]
        return tag

    @property
    def receiving_content(self) -> bool:
        """Whether a publish's content header or body frames are due."""
        return self._content is not None

    def publish_started(self, fields: dict[str, Any]) -> None:
        """A basic.publish arrived: its content frames follow."""
        self._content = (fields, -1, {}, [])

    def content(self, frame: Frame) -> tuple[int | None, dict[str, Any], dict[str, Any], bytes] | None:
        """
        Add a content header or body frame to the publish in progress.

        @return: for a complete publish, its tag (when confirming), method
            arguments, properties and body; else L{None}.
        @raise ValueError: for a frame that does not fit there.
        """
        if self._content is None:
            raise ValueError("content frame without a basic.publish")
        fields, size, properties, parts = self._content
        if frame.kind == wire.FRAME_HEADER and size < 0:
            _, _, size, properties = amqp_frames.decode_content_header(frame.payload)
            self._content = (fields, size, properties, parts)
        elif frame.kind == wire.FRAME_BODY and size >= 0:
            parts.append(frame.payload)
        else:
            raise ValueError("content frame out of order")
        received = sum(map(len, parts))
        if received > size:
            raise ValueError(f"body of {received} bytes, header announced {size}")
        if received < size:
            return None
        self._content = None
        tag = None
        if self.confirming:
            self.publish_tag += 1
            tag = self.publish_tag
            self.unconfirmed.append(tag)
        return tag, fields, properties, b"".join(parts)
