# -*- test-case-name: tests.test_spawner,tests.test_spawnerclient -*-
"""
What the control half and the privileged spawner say to each other.

One JSON object per line over a socket pair.  The control half may say only
two things: start the tenant half of link X (with its tenant settings and
socket), and stop it.  The spawner answers with what happened to its
children.  The spawner is the privileged side, so everything it receives is
decoded strictly here and then checked again with the configuration file's
own checks (L{msgmux.config.supervised_tenant}) before anything runs.

Pure code: bytes in, values out; both ends and the tests share it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

__all__ = [
    "MAX_LINE",
    "Exited",
    "ProtocolError",
    "Ready",
    "Refused",
    "Start",
    "Started",
    "Stop",
    "decode_command",
    "decode_event",
    "encode",
]

#: Longest line either side accepts: a start command carries one link's
#: tenant table, a few hundred bytes in practice.
MAX_LINE = 64 * 1024


class ProtocolError(ValueError):
    """A line that is not a valid command or event."""


@attrs.frozen
class Start:
    """Start the tenant half of C{link}, which connects to C{socket}."""

    link: str
    socket: str
    tenant: dict[str, Any] = attrs.field(eq=False, repr=False)


@attrs.frozen
class Stop:
    """Stop the tenant half of C{link} (SIGTERM, then SIGKILL after C{timeout} seconds)."""

    link: str
    timeout: float


@attrs.frozen
class Ready:
    """The spawner has imported what tenant halves need and takes commands."""

    pid: int


@attrs.frozen
class Started:
    """The tenant half of C{link} runs as C{pid}."""

    link: str
    pid: int


@attrs.frozen
class Exited:
    """
    The tenant half of C{link} ended: with C{code}, or killed by C{signal}.
    """

    link: str
    pid: int
    code: int | None
    signal: int | None

    def describe(self) -> str:
        """@return: the exit status in words."""
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit code {self.code}"


@attrs.frozen
class Refused:
    """A command was not carried out, and why."""

    link: str
    reason: str


Command = Start | Stop
Event = Ready | Started | Exited | Refused

_NAMES: dict[type, str] = {Start: "start", Stop: "stop", Ready: "ready", Started: "started", Exited: "exited", Refused: "refused"}


def encode(message: Command | Event) -> bytes:
    """@return: one line for C{message}."""
    document = attrs.asdict(message, recurse=False)
    document["type"] = _NAMES[type(message)]
    line = json.dumps(document, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"{document['type']} message of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def _load(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        document = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ProtocolError("not a JSON object")
    return document


def _field(document: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{document.get('type')!r}: {name!r} missing or of the wrong type")
    return value


def _only(document: dict[str, Any], *names: str) -> None:
    unknown = sorted(set(document) - set(names) - {"type"})
    if unknown:
        raise ProtocolError(f"{document.get('type')!r}: unknown field {unknown[0]!r}")


def decode_command(line: bytes) -> Command:
    """
    Decode what the control half sent.  Only the shape is checked here; the
    spawner checks the contents with the configuration's own rules.

    @raise ProtocolError: for anything but a well-formed start or stop.
    """
    document = _load(line)
    kind = document.get("type")
    if kind == "start":
        _only(document, "link", "socket", "tenant")
        return Start(_field(document, "link", str), _field(document, "socket", str), _field(document, "tenant", dict))
    if kind == "stop":
        _only(document, "link", "timeout")
        timeout = float(_field(document, "timeout", (int, float)))
        if not 0 < timeout <= 600:
            raise ProtocolError("'stop': 'timeout' must be greater than 0 and at most 600")
        return Stop(_field(document, "link", str), timeout)
    raise ProtocolError(f"unknown command {kind!r}")


def decode_event(line: bytes) -> Event:
    """
    Decode what the spawner sent.

    @raise ProtocolError: for anything but a well-formed event.
    """
    document = _load(line)
    kind = document.get("type")
    if kind == "ready":
        _only(document, "pid")
        return Ready(_field(document, "pid", int))
    if kind == "started":
        _only(document, "link", "pid")
        return Started(_field(document, "link", str), _field(document, "pid", int))
    if kind == "exited":
        _only(document, "link", "pid", "code", "signal")
        return Exited(
            _field(document, "link", str),
            _field(document, "pid", int),
            _field(document, "code", (int, type(None))),
            _field(document, "signal", (int, type(None))),
        )
    if kind == "refused":
        _only(document, "link", "reason")
        return Refused(_field(document, "link", str), _field(document, "reason", str))
    raise ProtocolError(f"unknown event {kind!r}")
