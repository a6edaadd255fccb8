"""
Tests for L{msgmux.logs}: each event becomes one line of flat JSON with
oslo.log's field names, the rendered message and msgmux's own fields;
failures carry their traceback; no value can make an event disappear.
"""

from __future__ import annotations

import io
import json
import math
from datetime import datetime
from typing import Any

from twisted.logger import Logger, LogLevel
from twisted.logger._legacy import publishToNewObserver
from twisted.python.failure import Failure
from twisted.python.log import textFromEventDict
from twisted.trial.unittest import SynchronousTestCase

from msgmux.logs import RESERVED, JSONLogObserver, json_stdout

#: Keys every line has, whatever the event.
FIXED = {"message", "asctime", "levelname", "levelno", "name", "hostname", "process", "msg", "created", "traceback", "error_summary"}


class Unprintable:
    """An object whose repr fails."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class JSONLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.log = Logger(namespace="msgmux.control.ControlLink", observer=JSONLogObserver(self.out, hostname="ctl-1"))

    def lines(self) -> list[dict[str, Any]]:
        """Every line written so far, parsed; each must be one JSON object."""
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"), text)
        parsed = [json.loads(line) for line in text.splitlines()]
        for record in parsed:
            self.assertIsInstance(record, dict)
            self.assertLessEqual(FIXED, set(record), record)
        return parsed

    def test_flat_fields(self) -> None:
        """
        The rendered message, level name and number, logger name, ISO time,
        host and process, the format string, and the event's fields flat
        beside them.
        """
        self.log.warn("Link {link}: rejected up message ({reason})", link="tenant-a", reason="route", count=3)
        (record,) = self.lines()
        self.assertEqual(record["message"], "Link tenant-a: rejected up message (route)")
        self.assertEqual(record["msg"], "Link {link}: rejected up message ({reason})")
        self.assertEqual((record["levelname"], record["levelno"]), ("WARNING", 30))
        self.assertEqual(record["name"], "msgmux.control.ControlLink")
        self.assertEqual((record["hostname"], type(record["process"])), ("ctl-1", int))
        self.assertEqual((record["link"], record["reason"], record["count"]), ("tenant-a", "route", 3))
        self.assertEqual((record["traceback"], record["error_summary"]), (None, ""))
        self.assertNotIn("extra", record)
        # Nothing of Twisted's bookkeeping, nothing nested.
        self.assertEqual([key for key in record if key.startswith("log_")], [])
        when = datetime.fromisoformat(record["asctime"])
        offset = when.utcoffset()
        assert offset is not None, "asctime carries no offset"
        self.assertEqual(offset.total_seconds(), 0)
        self.assertAlmostEqual(when.timestamp(), record["created"], places=2)

    def test_levels(self) -> None:
        """Twisted's five levels map to the stdlib's names and numbers, as oslo.log reports them."""
        for level in LogLevel.iterconstants():
            self.log.emit(level, "x")
        levels = [(record["levelname"], record["levelno"]) for record in self.lines()]
        self.assertEqual(levels, [("DEBUG", 10), ("INFO", 20), ("WARNING", 30), ("ERROR", 40), ("CRITICAL", 50)])

    def test_failure_traceback(self) -> None:
        """log.failure puts the traceback and a one-line summary in their own fields."""
        try:
            {}["missing-key"]
        except KeyError:
            self.log.failure("Link {link}: relay failed", link="tenant-a")
        (record,) = self.lines()
        self.assertEqual(record["message"], "Link tenant-a: relay failed")
        self.assertEqual(record["levelname"], "CRITICAL")
        self.assertIn("Traceback", record["traceback"])
        self.assertIn("test_failure_traceback", record["traceback"])
        self.assertIn("missing-key", record["traceback"])
        self.assertEqual(record["error_summary"], "KeyError: 'missing-key'")

    def test_failure_without_traceback(self) -> None:
        """A failure made without a stack (cleaned, or built from an exception) still reports its type."""
        self.log.failure("gone", Failure(ValueError("bad frame")), level=LogLevel.error)
        (record,) = self.lines()
        self.assertEqual((record["levelname"], record["error_summary"]), ("ERROR", "ValueError: bad frame"))
        self.assertIn("ValueError", record["traceback"])

    def test_values_json_cannot_carry(self) -> None:
        """Bytes, sets, exceptions, NaN, cycles, odd keys and failing reprs are written as text; the event survives."""
        cycle: list[Any] = []
        cycle.append(cycle)
        self.log.info(
            "odd values",
            body=b"\xff\x00",
            ids={1, 2},
            error=ValueError("x"),
            ratio=math.nan,
            cycle=cycle,
            table={(1, 2): "tuple key"},
            broken=Unprintable(),
            fine="kept",
        )
        (record,) = self.lines()
        self.assertEqual(record["message"], "odd values")
        self.assertEqual(record["body"], repr(b"\xff\x00"))
        self.assertEqual(record["ids"], "{1, 2}")
        self.assertEqual(record["error"], "ValueError('x')")
        self.assertEqual(record["ratio"], "nan")
        self.assertEqual(record["cycle"], "[[...]]")
        self.assertEqual(record["table"], "{(1, 2): 'tuple key'}")
        self.assertEqual(record["broken"], "<unrepresentable Unprintable>")
        self.assertEqual(record["fine"], "kept")

    def test_unrenderable_message(self) -> None:
        """A format string that cannot be rendered still gives a line saying so, with the fields."""
        self.log.info("Link {link.missing_attribute} {nothere}", link="tenant-a")
        (record,) = self.lines()
        self.assertIn("Unable to format event", record["message"])
        self.assertEqual(record["link"], "tenant-a")

    def test_reserved_names_go_to_extra(self) -> None:
        """A field named like one of the fixed keys goes into C{extra}, never over them."""
        self.log.info("{name} {message}", name="control", message="hi", process="p")
        (record,) = self.lines()
        self.assertEqual(record["name"], "msgmux.control.ControlLink")
        self.assertEqual(record["message"], "control hi")
        self.assertEqual(record["extra"], {"name": "control", "message": "hi", "process": "p"})
        self.assertIsInstance(record["process"], int)

    def test_reserved_are_fixed(self) -> None:
        """Every fixed key is reserved (so an event field can never replace one)."""
        self.assertLessEqual(FIXED, RESERVED)

    def test_legacy_events(self) -> None:
        """Old-style twisted.python.log events (Twisted's own messages) come out the same way, without their internals."""
        observer = JSONLogObserver(self.out, hostname="ctl-1")
        publishToNewObserver(observer, {"message": ("Starting factory",), "isError": 0, "system": "-", "time": 1700000000.5}, textFromEventDict)
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        publishToNewObserver(
            observer,
            {"message": (), "isError": 1, "failure": failure, "why": "Unhandled", "system": "x", "time": 1700000001.0},
            textFromEventDict,
        )
        info, error = self.lines()
        self.assertEqual((info["message"], info["levelname"], info["name"]), ("Starting factory", "INFO", "log_legacy"))
        self.assertEqual(info["asctime"], "2023-11-14T22:13:20.500+00:00")
        for key in ("isError", "system", "time", "why", "failure", "format"):
            self.assertNotIn(key, info)
            self.assertNotIn(key, error)
        self.assertEqual(error["levelname"], "CRITICAL")
        self.assertEqual(error["error_summary"], "ZeroDivisionError: division by zero")
        self.assertIn("ZeroDivisionError", error["traceback"])

    def test_observer_bug_keeps_the_event(self) -> None:
        """Even an event the formatter chokes on yields a line (naming the problem) rather than nothing."""
        observer = JSONLogObserver(self.out, hostname="ctl-1")

        class Hostile(dict[str, Any]):
            def items(self) -> Any:
                raise RuntimeError("cannot iterate")

        observer(Hostile(log_format="lost?", log_level=LogLevel.info, link="tenant-a"))
        (record,) = [json.loads(line) for line in self.out.getvalue().splitlines()]
        self.assertEqual(record["levelname"], "ERROR")
        self.assertIn("could not format a log event", record["message"])
        self.assertIn("lost?", record["message"])

    def test_json_stdout(self) -> None:
        """The twistd --logger factory takes no arguments and writes to standard output."""
        observer = json_stdout()
        self.assertIsInstance(observer, JSONLogObserver)
