# -*- test-case-name: tests.test_acyclic -*-
"""
Decoding what a peer sent without CPython's cycle collector.

CBOR without shared references (which the link codec refuses) and JSON
decode to trees: nothing they build can be part of a reference cycle, and
reference counting frees all of it.  Yet every container they allocate
counts towards the next collection, and each collection that runs while a
tree is being built traverses it and moves it a generation older, until it
counts towards a full collection of the whole heap.  A peer that sends
heads or bodies made of thousands of empty arrays would thereby make the
process run collection after collection, and full ones of tens of
milliseconds on a busy control half, at the expense of every link.  So
decoding pauses the collector: a body of 90 000 empty arrays then takes
about 3 ms to parse instead of about 60 ms.  What is kept after decoding
can still be caught by the next young collection once: a MSG head is
therefore decoded and reduced (headers the control half drops, dropped)
before the collector resumes.  Pure code.
"""

from __future__ import annotations

import gc
from typing import Callable, TypeVar

__all__ = ["decode_tree"]

_Argument = TypeVar("_Argument")
_Result = TypeVar("_Result")


def decode_tree(decode: Callable[[_Argument], _Result], data: _Argument) -> _Result:
    """@return: C{decode(data)}, run with the cycle collector paused (if it was on)."""
    if not gc.isenabled():
        return decode(data)
    gc.disable()
    try:
        return decode(data)
    finally:
        gc.enable()
