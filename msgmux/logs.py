# -*- test-case-name: tests.integration.test_operations -*-
"""
Log observers for C{twistd --logger}.

msgmux logs through L{twisted.logger} with named fields (C{link},
C{reason}, C{broker}...).  For machine-readable logs run
C{twistd --logger=msgmux.logs.json_stdout -n msgmux --config FILE}: one JSON
object per event on standard output (journald, or any log shipper, takes it
from there), with every field as a key.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["json_stdout"]


def json_stdout() -> ILogObserver:
    """@return: an observer writing each event as a line of JSON to stdout."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
