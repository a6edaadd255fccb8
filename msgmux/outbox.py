# -*- test-case-name: tests.test_relay -*-
"""
Deliveries waiting for link credit, replies first.

When the peer's credit runs out, deliveries wait here in the order they
came, in two lines: replies (and call-monitor heartbeats, which are
replies) and everything else.  Replies go first when credit returns: a
caller gives up when its reply is late, a cast behind it only waits.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

from msgmux.amqp.channel import Delivery
from msgmux.message import Message, ReplyAddress

__all__ = ["Outbox"]


class Outbox:
    """The waiting deliveries of one session."""

    def __init__(self) -> None:
        self._replies: collections.deque[tuple[Message, Delivery]] = collections.deque()
        self._others: collections.deque[tuple[Message, Delivery]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._replies or self._others)

    def add(self, message: Message, delivery: Delivery) -> None:
        """Keep C{message} until credit lets it go."""
        line = self._replies if type(message.address) is ReplyAddress else self._others
        line.append((message, delivery))

    def ready(self, can_send: Callable[[Message], bool]) -> Iterator[tuple[Message, Delivery]]:
        """
        @param can_send: whether credit lets a message go now (asked again
            after each message taken).
        @return: the messages that may go, replies first, each line in its
            order; each is taken out as it is yielded.
        """
        for line in (self._replies, self._others):
            while line and can_send(line[0][0]):
                yield line.popleft()

    def clear(self) -> None:
        """Forget everything (the deliveries' channel is gone)."""
        self._replies.clear()
        self._others.clear()
