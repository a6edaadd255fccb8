"""
Tests for L{msgmux.acyclic}: decoding runs with the cycle collector paused,
and leaves it as it found it.
"""

from __future__ import annotations

import gc
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from msgmux.acyclic import decode_tree
from msgmux.link import codec
from msgmux.message import CanaryAddress, Message
from msgmux.oslo import envelope


class DecodeTreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)

    def test_paused_while_decoding(self) -> None:
        """The decoder runs with the collector off; it is on again afterwards."""
        gc.enable()
        seen = decode_tree(lambda data: (gc.isenabled(), data), b"x")
        self.assertEqual(seen, (False, b"x"))
        self.assertTrue(gc.isenabled())

    def test_restored_after_a_failure(self) -> None:
        """A decoder that raises leaves the collector on."""
        gc.enable()

        def failing(data: bytes) -> None:
            raise ValueError(data)

        self.assertRaises(ValueError, decode_tree, failing, b"x")
        self.assertTrue(gc.isenabled())

    def test_left_off_when_off(self) -> None:
        """A collector that was off stays off."""
        gc.disable()
        self.assertEqual(decode_tree(lambda data: gc.isenabled(), b""), False)
        self.assertFalse(gc.isenabled())

    def test_the_decoders_use_it(self) -> None:
        """MSG heads, other frames and oslo bodies are decoded with the collector paused."""
        gc.enable()
        decoder = codec.FrameDecoder()
        calls: list[bool] = []
        decode_cbor = decoder._decode_cbor

        def observed(data: bytes) -> Any:
            calls.append(gc.isenabled())
            return decode_cbor(data)

        self.patch(decoder, "_decode_cbor", observed)
        frames = [codec.MessageFrame(1, Message(CanaryAddress(), {}, b"")), codec.Credit(1, 2)]
        decoder.feed(b"".join(codec.encode(frame) for frame in frames))
        loads: list[bool] = []
        json_loads = json.loads

        def observed_loads(text: str) -> Any:
            loads.append(gc.isenabled())
            return json_loads(text)

        self.patch(envelope.json, "loads", observed_loads)
        envelope.parse(b'{"oslo.version": "2.0", "oslo.message": "{}"}')
        self.assertEqual((calls, loads), ([False, False], [False, False]))
        self.assertTrue(gc.isenabled())
