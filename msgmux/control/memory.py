# -*- test-case-name: tests.test_control_policy -*-
"""
What a link remembers across its sessions so that nothing happens twice.

A tenant broker redelivers what the tenant half had not acknowledged when a
session ended, including messages the control broker already confirmed;
oslo's own duplicate check remembers only the last 16 ids per listener.  And
a tenant half must not answer a call again once it was answered (until the
call's deadline, the reply token alone would let it).  Pure code.
"""

from __future__ import annotations

import collections

__all__ = ["ANSWERED_CALLS", "LinkMemory", "RECENT_IDS", "RecentIds"]

#: oslo C{_unique_id}s of upstream messages a link remembers as published:
#: more than link window plus prefetch, the most that can be redelivered at
#: once.
RECENT_IDS = 2048

#: Final replies remembered per link.  Down calls come from control
#: clients, so a tenant half cannot push entries out by making calls.
ANSWERED_CALLS = 8192


class RecentIds:
    """The last C{size} ids added, for membership tests."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: collections.deque[str] = collections.deque()
        self._ids: set[str] = set()

    def add(self, value: str) -> None:
        if value in self._ids:
            return
        self._ids.add(value)
        self._order.append(value)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())

    def __contains__(self, value: object) -> bool:
        return value in self._ids

    def __len__(self) -> int:
        return len(self._order)


class LinkMemory:
    """
    @ivar published_ids: C{_unique_id}s of upstream messages the control
        broker confirmed.
    @ivar answered_calls: reply tokens of down calls whose final reply the
        control broker confirmed.
    """

    def __init__(self) -> None:
        self.published_ids = RecentIds(RECENT_IDS)
        self.answered_calls = RecentIds(ANSWERED_CALLS)
