"""Tests for L{msgmux.stream_offsets.StreamPosition}: resume at the first offset whose relay was not settled."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from msgmux.stream_offsets import StreamPosition


class StreamPositionTests(SynchronousTestCase):
    def test_first_consumer_starts_at_the_end(self) -> None:
        """Before anything was read, a consumer starts at the stream's end, as oslo's does."""
        self.assertEqual(StreamPosition().resume(), "last")

    def test_after_settled(self) -> None:
        """When everything delivered was settled, resume after the last of it."""
        position = StreamPosition()
        for offset in (10, 11, 12):
            position.delivered(offset)
        for offset in (10, 11, 12):
            position.settled(offset)
        self.assertEqual(position.resume(), 13)

    def test_first_unsettled(self) -> None:
        """Settlements out of order: resume at the first offset still outstanding, whatever was settled after it."""
        position = StreamPosition()
        for offset in (5, 6, 7, 8):
            position.delivered(offset)
        position.settled(5)
        position.settled(7)
        position.settled(8)
        self.assertEqual(position.resume(), 6)
        # The redelivered 6, 7, 8 are tracked afresh.
        for offset in (6, 7, 8):
            position.delivered(offset)
        position.settled(6)
        self.assertEqual(position.resume(), 7)

    def test_resume_twice(self) -> None:
        """A consumer that receives nothing before the next rebuild resumes at the same place."""
        position = StreamPosition()
        position.delivered(3)
        self.assertEqual(position.resume(), 3)
        self.assertEqual(position.resume(), 3)
