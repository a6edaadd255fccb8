# -*- test-case-name: tests.test_stream_offsets -*-
"""
Where to resume reading a stream queue.

With oslo's C{rabbit_stream_fanout}, fanout casts go through a stream, which
keeps its messages and lets each consumer choose where to start
(C{x-stream-offset}).  Unlike a classic queue, a stream does not redeliver
what a consumer had not acknowledged when its channel went: the consumer
must say where to start again.  oslo resumes after the last message it
received; msgmux, which must not lose what it had not yet relayed, resumes
at the first message whose relay was not settled (published on the other
broker, or refused).  A L{StreamPosition} outlives the link sessions; it
starts at the stream's end (C{"last"}), as oslo does, when msgmux starts.
A L{StreamReader} applies them to the consumers of one channel.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from msgmux.amqp.channel import Delivery
from msgmux.amqp.declared import Consumer
from msgmux.oslo.topology import QueueSpec

__all__ = ["OFFSET_HEADER", "StreamPosition", "StreamReader"]

#: The header RabbitMQ puts on every message delivered from a stream.
OFFSET_HEADER = "x-stream-offset"


class StreamPosition:
    """Delivered and settled offsets of one stream queue, in delivery order."""

    def __init__(self) -> None:
        self._next: int | None = None
        self._outstanding: collections.deque[int] = collections.deque()
        self._settled: set[int] = set()

    def delivered(self, offset: int) -> None:
        """The message at C{offset} was delivered to us."""
        self._outstanding.append(offset)

    def settled(self, offset: int) -> None:
        """The message at C{offset} is relayed (or refused) for good."""
        outstanding = self._outstanding
        if outstanding and outstanding[0] == offset:
            outstanding.popleft()
            self._next = offset + 1
            while outstanding and outstanding[0] in self._settled:
                self._settled.discard(outstanding[0])
                self._next = outstanding.popleft() + 1
        else:
            self._settled.add(offset)

    def resume(self) -> int | str:
        """
        @return: the C{x-stream-offset} for a new consumer: the first offset
            not settled, or C{"last"} when nothing was read yet.  What was
            outstanding is forgotten (it will be delivered again).
        """
        offset: int | str = self._outstanding[0] if self._outstanding else (self._next if self._next is not None else "last")
        self._outstanding.clear()
        self._settled.clear()
        if isinstance(offset, int):
            self._next = offset
        return offset


class StreamReader:
    """
    The stream consumers of one channel: where each resumes, which offset
    each delivery has, and settlement back to the positions.

    A new reader goes with each new channel; the L{StreamPosition}s outlive
    them.
    """

    def __init__(self, positions: dict[str, StreamPosition]) -> None:
        """
        @param positions: by queue name, kept by the half across sessions.
        """
        self._positions = positions
        # Delivery tag -> (position, offset), for this channel's deliveries.
        self._tags: dict[int, tuple[StreamPosition, int]] = {}

    def consumer(self, queue: QueueSpec, tag: str, deliver: Callable[[Delivery], None]) -> Consumer:
        """
        @return: the consumer of C{queue}: for a stream, one that resumes at
            the first offset not settled, notes each delivery's offset and
            strips it before C{deliver} sees the delivery.
        """
        arguments: dict[str, object] = dict(queue.consume_arguments)
        if OFFSET_HEADER not in arguments:
            return Consumer(queue.name, tag, deliver, arguments)
        arguments[OFFSET_HEADER] = self._positions.setdefault(queue.name, StreamPosition()).resume()

        def delivered(delivery: Delivery) -> None:
            self.delivered(queue.name, delivery.delivery_tag, delivery.properties.get("headers"))
            deliver(delivery)

        return Consumer(queue.name, tag, delivered, arguments)

    def delivered(self, queue: str, delivery_tag: int, headers: dict[str, Any] | None) -> None:
        """
        Note a delivery's offset, and take RabbitMQ's offset header off it:
        it means nothing on the other broker.
        """
        offset = headers.pop(OFFSET_HEADER, None) if headers else None
        if type(offset) is int:
            position = self._positions.setdefault(queue, StreamPosition())
            position.delivered(offset)
            self._tags[delivery_tag] = (position, offset)

    def settled(self, delivery_tag: int) -> None:
        """The delivery was acknowledged or rejected on its channel."""
        entry = self._tags.pop(delivery_tag, None)
        if entry is not None:
            entry[0].settled(entry[1])
