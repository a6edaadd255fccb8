# -*- test-case-name: tests.test_config -*-
"""
Checks of single values, each returning a problem to report or L{None}.

Part of L{msgmux.config}; pure code.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# AMQP short strings are at most 255 bytes; oslo builds "<topic>.<server>" and
# "<topic>_fanout_<32 hex>" out of these, so keep names comfortably shorter.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-:@]{0,159}$")

LINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def name_problem(value: str) -> str | None:
    if not NAME.match(value):
        return "must be 1-160 characters of letters, digits and _ . - : @ (not starting with . - : @)"
    return None


def between(low: float, high: float, unit: str, low_inclusive: bool = False) -> Callable[[float], str | None]:
    """
    A check for a number in a range; the upper bound keeps out TOML's C{inf}
    and values so large that timers built from them overflow.
    """

    def problem(value: float) -> str | None:
        if (value >= low if low_inclusive else value > low) and value <= high:
            return None
        below = "at least" if low_inclusive else "greater than"
        return f"must be {below} {low:g} and at most {high:g} {unit}"

    return problem


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def endpoint_problem(value: str) -> str | None:
    kind = value.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix"):
        return "must be a Twisted endpoint like \"tcp:9464:interface=127.0.0.1\" or \"unix:/run/msgmux/metrics.sock\""
    return None


def socket_mode_problem(value: str) -> str | None:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        return "must be an octal mode like \"0660\""
    if int(value, 8) & 0o007:
        return "must grant nothing to others (the last digit must be 0): any local user could connect as the tenant half"
    return None


def socket_problem(value: str) -> str | None:
    if not value.startswith("/"):
        return "must be an absolute path"
    if len(value.encode()) > 107:
        return "is longer than a Unix socket path may be (107 bytes)"
    return None


def message_size_problem(value: int) -> str | None:
    if not 1024 <= value <= 128 * 1024 * 1024:
        return "must be between 1024 and 134217728 bytes (RabbitMQ's own ceiling)"
    return None


def link_name_problem(value: str) -> str | None:
    if not LINK_NAME.match(value):
        return "must be 1-63 letters, digits, _ . - starting with a letter or digit"
    return None


def admin_group_problem(value: str) -> str | None:
    import grp

    try:
        grp.getgrnam(value)
    except KeyError:
        return f"no group {value!r} on this host"
    return None
