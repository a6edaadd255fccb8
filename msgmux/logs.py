# -*- test-case-name: tests.test_logs -*-
"""
Log observers for C{twistd --logger}.

msgmux logs through L{twisted.logger} with named fields (C{link},
C{reason}, C{broker}...).  For machine-readable logs run
C{twistd --logger=msgmux.logs.json_stdout -n msgmux --config FILE}: one flat
JSON object per event on standard output, which journald, a log shipper or
C{jq} take from there.

Twisted's own JSON observer writes its event dictionaries as they are: no
rendered message, the level as a nested object, and Twisted's bookkeeping
keys.  Log pipelines built for OpenStack expect the fields of oslo.log's
C{JSONFormatter} instead, so each line here carries those where a Twisted
event has an equivalent:

 - C{message}: the rendered text; C{msg}: its format string;
 - C{asctime}: ISO 8601 time in UTC (oslo's key; its value there is the
   local C{logging} default, ISO is what shippers parse without help);
   C{created}: the same as Unix time;
 - C{name}: the logger's namespace (a module or class path);
 - C{levelname} and C{levelno}: as in the stdlib (C{WARNING}, 30);
 - C{hostname}, C{process};
 - C{traceback}: the traceback of a failure (C{log.failure}), else null;
   C{error_summary}: its one-line C{Type: value}, else empty;

followed by the event's own fields, flat (C{link}, C{reason}, C{broker},
C{code}...).  A field whose name is one of the keys above goes into an
C{extra} object instead, so it never hides them.  A value JSON cannot
carry is written as its C{repr}; no event is dropped for its contents.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = ["JSONLogObserver", "event_as_json", "json_stdout"]

#: Twisted level -> (stdlib level name, stdlib level number).
_LEVELS = {
    LogLevel.debug: ("DEBUG", 10),
    LogLevel.info: ("INFO", 20),
    LogLevel.warn: ("WARNING", 30),
    LogLevel.error: ("ERROR", 40),
    LogLevel.critical: ("CRITICAL", 50),
}

#: The keys every line has; an event field of the same name goes to C{extra}.
RESERVED = frozenset(
    ("message", "msg", "asctime", "created", "name", "levelname", "levelno", "hostname", "process", "traceback", "error_summary", "extra")
)

#: Keys of L{twisted.python.log} events (passed on by Twisted's legacy
#: bridge, which adds C{isError} to every event it touches) that duplicate
#: the C{log_*} keys or are its internals.
_LEGACY = frozenset(("message", "format", "isError", "system", "time", "why", "failure", "printed", "logLevel"))


def _safe_repr(value: Any) -> str:
    """C{repr(value)}, or a placeholder when C{__repr__} itself fails."""
    try:
        return repr(value)
    except Exception:
        try:
            name = type(value).__name__
        except Exception:
            name = "object"
        return f"<unrepresentable {name}>"


def _encode(value: Any) -> str:
    """
    One value as JSON text, never raising: what JSON has no type for (bytes,
    sets, exceptions, objects) is written as its repr, and so is anything
    that defeats the encoder (NaN, a cycle, dictionary keys of other types).
    """
    try:
        return json.dumps(value, default=_safe_repr, allow_nan=False)
    except Exception:  # ValueError, TypeError, RecursionError
        return json.dumps(_safe_repr(value))


def _failure_fields(event: dict[str, Any]) -> tuple[str | None, str]:
    """The traceback and the one-line summary of an event's failure, if any."""
    failure = event.get("log_failure")
    if failure is None and "isError" in event:
        failure = event.get("failure")  # twisted.python.log.err()
    if failure is None:
        return None, ""
    try:
        text = failure.getTraceback()
    except Exception:
        text = _safe_repr(failure)
    try:
        summary = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    except Exception:
        summary = _safe_repr(failure)
    return text, summary


def event_as_json(event: dict[str, Any], hostname: str | None, process: int) -> str:
    """
    @param event: a L{twisted.logger} event (or an old-style one passed on by
        Twisted's legacy bridge).
    @param hostname: the host's name, as oslo.log reports it.
    @param process: the process id.
    @return: one line of JSON (without the newline) for the event.
    """
    try:
        levelname, levelno = _LEVELS.get(event.get("log_level"), ("INFO", 20))  # type: ignore[arg-type]
    except TypeError:  # not hashable: not a level
        levelname, levelno = "INFO", 20
    when = event.get("log_time")
    try:
        asctime: str | None = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
    except Exception:  # missing, not a number, out of range
        asctime, when = None, None
    traceback, summary = _failure_fields(event)
    template = event.get("log_format")
    fields: dict[str, Any] = {
        "message": formatEvent(event),
        "asctime": asctime,
        "levelname": levelname,
        "levelno": levelno,
        "name": event.get("log_namespace"),
        "hostname": hostname,
        "process": process,
        "msg": template if isinstance(template, str) else None,
        "created": when,
        "traceback": traceback,
        "error_summary": summary,
    }
    # Twisted's legacy bridge marks the events it made or adapted with isError.
    legacy = "isError" in event
    extra: dict[str, Any] = {}
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        if key in RESERVED:
            extra[key] = value
        else:
            fields[key] = value
    line = _object(fields)
    if extra:
        line = line[:-1] + ', "extra": ' + _object(extra) + "}"
    return line


def _object(fields: dict[str, Any]) -> str:
    """A JSON object of C{fields}, each value encoded on its own so one bad value spoils nothing else."""
    return "{" + ", ".join(f"{json.dumps(key)}: {_encode(value)}" for key, value in fields.items()) + "}"


@implementer(ILogObserver)
class JSONLogObserver:
    """Writes each event as one line of flat JSON (see the module docstring)."""

    def __init__(self, out: IO[str], hostname: str | None = None) -> None:
        """
        @param out: where the lines go (flushed after each).
        @param hostname: the host name to report; by default this host's.
        """
        self._out = out
        if hostname is None:
            try:
                hostname = socket.gethostname()
            except OSError:
                hostname = None
        self._hostname = hostname

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = event_as_json(event, self._hostname, os.getpid())
        except Exception as e:
            # A bug here must not cost the event: write what can be said.
            line = _object(
                {
                    "message": f"msgmux could not format a log event ({_safe_repr(e)}): {_safe_repr(event)}",
                    "levelname": "ERROR",
                    "levelno": 40,
                    "hostname": self._hostname,
                    "process": os.getpid(),
                }
            )
        self._out.write(line + "\n")
        self._out.flush()


def json_stdout() -> ILogObserver:
    """@return: an observer writing each event as a line of flat JSON to stdout."""
    return JSONLogObserver(sys.stdout)
