# -*- test-case-name: tests.test_linkcli -*-
"""
C{msgmux link add | remove | list | show}: change a running control half's
links over its admin socket (L{msgmux.admin}).

C{add} takes a TOML file (or C{-} for standard input) holding one link's
keys, exactly as in a C{[[control.links]]} entry of the configuration file:

    name = "r1"
    socket = "/run/msgmux/tenants/r1.sock"
    down = [ { topic = "l3_agent", servers = ["r1"] } ]

    [tenant]                      # optional: msgmux runs the tenant half
    namespace = "qrouter-1"
    transport_url = "rabbit://r1:secret@127.0.0.1:5672/"
    user = "msgmux-tenant"
    group = "msgmux-tenants"

A plain blocking client: one request, one answer, no reactor needed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from typing import Any, TextIO

from msgmux.config import ConfigError, load
from msgmux.control.listener import UnsafeSocketDirectory, check_socket_directory

__all__ = ["DEFAULT_ADMIN_SOCKET", "add_arguments", "exchange", "request", "run"]

DEFAULT_ADMIN_SOCKET = "/run/msgmux/admin.sock"
#: Removing a link waits for it to drain, and its tenant half to stop.
TIMEOUT = 120.0


class LinkCommandError(Exception):
    """Why a C{msgmux link} command failed, for standard error."""


def add_arguments(commands: Any) -> None:
    """Register C{msgmux link ...} on the main parser's subcommands."""
    link = commands.add_parser("link", help="add, remove, list or show links of a running control half")
    where = link.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"the admin socket (default: {DEFAULT_ADMIN_SOCKET})")
    where.add_argument("--config", help="the control half's configuration (its admin_socket is used)")
    actions = link.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a link from a TOML file of its keys ('-' reads standard input)")
    add.add_argument("file")
    remove = actions.add_parser("remove", help="drain and remove a link added at run time")
    remove.add_argument("name")
    listing = actions.add_parser("list", help="every link, with its origin, state and tenant half")
    show = actions.add_parser("show", help="one link's settings and state (JSON)")
    show.add_argument("name")
    for parser in (add, remove, listing, show):
        parser.add_argument("--json", action="store_true", help="print the raw answer")


def request(path: str, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """
    Send one request to the admin socket at C{path}.

    @return: the answer, when it says C{"ok": true}.
    @raise LinkCommandError: when the socket cannot be reached or the
        request was refused (with the control half's reason).
    """
    answer = exchange(path, message, timeout)
    if not answer.get("ok"):
        raise LinkCommandError(str(answer.get("error")))
    return answer


def exchange(path: str, message: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """
    Send one request to the admin socket at C{path}.

    @return: the answer, whether it says C{"ok"} or not.
    @raise LinkCommandError: when the socket cannot be reached or does not
        answer, or sits in a directory others can write (the socket there
        may be anyone's, and a request may hold a tenant broker password).
    """
    try:
        check_socket_directory(os.path.dirname(path) or ".", owners=False)
    except UnsafeSocketDirectory as e:
        raise LinkCommandError(f"not sending to the admin socket {path}: {e}") from None
    except OSError as e:
        raise LinkCommandError(f"cannot reach the admin socket {path}: {e.strerror or e}") from None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise LinkCommandError(f"cannot reach the admin socket {path}: {e.strerror or e}") from None
    if not data:
        raise LinkCommandError(f"the admin socket {path} closed without an answer")
    return json.loads(data)  # type: ignore[no-any-return]


def _admin_socket(arguments: argparse.Namespace) -> str:
    if arguments.socket:
        return arguments.socket  # type: ignore[no-any-return]
    if arguments.config:
        try:
            config = load(arguments.config)
        except ConfigError as e:
            raise LinkCommandError(str(e)) from None
        if config.control is None or config.control.admin_socket is None:
            raise LinkCommandError(f"{arguments.config} has no [control] admin_socket")
        return config.control.admin_socket
    return DEFAULT_ADMIN_SOCKET


def _read_link(path: str, stdin: TextIO) -> tuple[dict[str, Any], str]:
    try:
        text = stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise LinkCommandError(f"{path}: cannot read: {e.strerror or e}") from None
    source = "<stdin>" if path == "-" else path
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LinkCommandError(f"{source}: is not valid TOML: {e}") from None
    try:
        json.dumps(table)
    except TypeError:
        raise LinkCommandError(f"{source}: dates and times are not link settings") from None
    return table, source


def _half(link: dict[str, Any]) -> str:
    half = link.get("tenant_half")
    if half is None:
        return "-"
    text = f"{half['state']}"
    if half.get("pid"):
        text += f" pid {half['pid']}"
    if half.get("restarts"):
        text += f", {half['restarts']} restarts"
    return text


def render_links(links: list[dict[str, Any]]) -> str:
    """A table of links as C{list} answers them."""
    lines = [f"{'link':24} {'origin':8} {'up':4} {'healthy':8} tenant half"]
    for link in links:
        status = link["status"]
        lines.append(
            f"{link['link']:24} {link['origin']:8} {'yes' if status.get('up') else 'no':4}"
            f" {'yes' if status.get('healthy') else 'no':8} {_half(link)}"
        )
    return "\n".join(lines)


def run(arguments: argparse.Namespace, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> int:
    """Carry out C{msgmux link ...}; @return: the exit status."""
    try:
        path = _admin_socket(arguments)
        if arguments.action == "add":
            table, source = _read_link(arguments.file, stdin)
            answer = request(path, {"command": "add", "link": table, "source": source})
            link = answer["link"]
            text = f"link {link['link']} added: socket {link['socket']}"
            if "tenant_half" in link:
                text += f", tenant half in namespace {link['tenant_half']['namespace']} ({link['tenant_half']['state']})"
        elif arguments.action == "remove":
            answer = request(path, {"command": "remove", "name": arguments.name})
            text = f"link {arguments.name} drained and removed"
        elif arguments.action == "list":
            answer = request(path, {"command": "list"})
            text = render_links(answer["links"])
        else:
            answer = request(path, {"command": "show", "name": arguments.name})
            text = json.dumps(answer["link"], indent=2)
    except LinkCommandError as e:
        print(f"msgmux: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if arguments.json else text, file=out)
    return 0
