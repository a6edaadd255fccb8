# -*- test-case-name: tests.test_admin -*-
"""
The admin socket: how C{msgmux link ...} reaches a running control half.

A Unix socket (C{[control] admin_socket}), mode 0660, owned by root and the
C{admin_group}, bound while the control half is still root.  File
permissions keep everyone else out; the peer's credentials are checked as
well (C{SO_PEERCRED}, and C{SO_PEERGROUPS} for its supplementary groups):
only root or a member of C{admin_group} is served.  One JSON request per
line, one JSON answer per line:

    {"command": "add", "link": {...the link's keys...}, "source": "r1.toml"}
    {"command": "remove", "name": "r1"}
    {"command": "list"}
    {"command": "show", "name": "r1"}

Answers are C{{"ok": true, ...}} or C{{"ok": false, "error": "..."}}.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from msgmux.control.listener import UnsafeSocketDirectory, check_socket_directory
from msgmux.link.handshake import peer_credentials
from msgmux.linkadmin import AdminError, LinkAdmin

__all__ = ["AdminFactory", "AdminProtocol", "check_admin_directory", "listen_admin", "peer_groups"]

#: Linux's SO_PEERGROUPS (since 4.13); Python's socket module lacks the name.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: A request is one link's table: far smaller than this.
MAX_REQUEST = 256 * 1024


def peer_groups(transport: Any) -> tuple[int, ...] | None:
    """
    @return: the peer's supplementary groups, or L{None} where the kernel
        cannot tell.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    size = 4 * 256
    for _ in range(3):
        try:
            raw = get_handle().getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == 34:  # ERANGE: more groups than fit
                size *= 16
                continue
            return None
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return None


def authorize(credentials: tuple[int, int, int] | None, groups: tuple[int, ...] | None, admin_gid: int | None) -> str | None:
    """
    @return: why the peer may not administer links, or L{None} when it may
        (root, or a member of the admin group).
    """
    if credentials is None:
        return "permission denied: the peer's credentials are unknown"
    pid, uid, gid = credentials
    if uid == 0:
        return None
    if admin_gid is not None and (gid == admin_gid or admin_gid in (groups or ())):
        return None
    return f"permission denied: uid {uid} is neither root nor in the admin group"


class AdminProtocol(LineOnlyReceiver):
    """One administrator's connection."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST
    _log = Logger()
    factory: AdminFactory

    def connectionMade(self) -> None:
        self._queue: defer.Deferred[None] = defer.succeed(None)
        credentials = self.factory.credentials(self.transport)
        problem = authorize(credentials, self.factory.groups(self.transport), self.factory.admin_gid)
        if problem is not None:
            self._log.warn("Admin socket: refused peer {peer}: {problem}", peer=credentials, problem=problem)
            self._answer({"ok": False, "error": problem})
            self.transport.loseConnection()
            self.authorized = False
            return
        self.authorized = True
        self.peer = credentials

    def lineReceived(self, line: bytes) -> None:
        if not self.authorized:
            return
        self._queue.addCallback(lambda _: defer.Deferred.fromCoroutine(self._handle(line)))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
        self.transport.loseConnection()

    async def _handle(self, line: bytes) -> None:
        try:
            answer = await self._dispatch(line)
            answer = {"ok": True, **answer}
        except AdminError as e:
            answer = {"ok": False, "error": str(e)}
        except Exception:
            self._log.failure("Admin request failed")
            answer = {"ok": False, "error": "internal error; see the control half's log"}
        self._answer(answer)

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise AdminError(f"the request is not JSON: {e}") from None
        if not isinstance(request, dict):
            raise AdminError("the request must be a JSON object")
        command = request.get("command")
        admin = self.factory.admin
        if command == "add":
            source = request.get("source", "request")
            if not isinstance(source, str) or not 0 < len(source) <= 200:
                source = "request"
            self._log.info("Admin socket: peer {peer} adds a link", peer=self.peer)
            return {"link": await admin.add(request.get("link"), source)}
        if command == "remove":
            self._log.info("Admin socket: peer {peer} removes link {name!r}", peer=self.peer, name=request.get("name"))
            return await admin.remove(request.get("name"))
        if command == "list":
            return {"links": admin.list()}
        if command == "show":
            return {"link": admin.show(request.get("name"))}
        raise AdminError(f"unknown command {command!r} (add, remove, list, show)")

    def _answer(self, answer: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(json.dumps(answer, default=str).encode())


class AdminFactory(Factory):
    """Serves the admin socket for one L{LinkAdmin}."""

    protocol = AdminProtocol
    noisy = False

    def __init__(
        self,
        admin: LinkAdmin,
        admin_gid: int | None,
        credentials: Callable[[Any], tuple[int, int, int] | None] = peer_credentials,
        groups: Callable[[Any], tuple[int, ...] | None] = peer_groups,
    ) -> None:
        """
        @param admin_gid: the group allowed besides root, or L{None}.
        @param credentials: reads a connection's peer (pid, uid, gid).
        @param groups: reads a connection's peer's supplementary groups.
        """
        self.admin = admin
        self.admin_gid = admin_gid
        self.credentials = credentials
        self.groups = groups


def listen_admin(reactor: Any, path: str, factory: AdminFactory) -> Any:
    """
    Bind the admin socket: mode 0660, owned by root (when we are root) and
    the admin group.  Call while still root.

    Whoever could write in its directory could plant a socket of their own
    there and be sent the tenant broker passwords of every C{msgmux link
    add}, or plant its lock and keep msgmux from starting: the directory is
    checked as a link socket's is.  As root, before twistd drops to msgmux's
    user, only who may write it is checked here; L{check_admin_directory}
    checks its owner once msgmux runs as itself.

    @return: the listening port.
    @raise OSError: when the directory is missing or binding fails.
    @raise UnsafeSocketDirectory: when others can write in the directory.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"admin_socket: directory {directory} does not exist")
    check_admin_directory(path, owners=os.geteuid() != 0)
    previous = os.umask(0o177)  # Twisted chmods only after binding
    try:
        port = reactor.listenUNIX(path, factory, mode=0o660, wantPID=True)
    finally:
        os.umask(previous)
    if factory.admin_gid is not None:
        try:
            os.chown(path, -1, factory.admin_gid)
        except PermissionError:
            Logger().warn("Admin socket {path}: cannot give it to group {gid}", path=path, gid=factory.admin_gid)
    return port


def check_admin_directory(path: str, owners: bool = True) -> None:
    """
    Refuse an admin socket whose directory others could write (or, with
    C{owners}, that is owned by anyone but root or msgmux's user).

    @raise UnsafeSocketDirectory: naming the C{admin_socket} key.
    """
    try:
        check_socket_directory(os.path.dirname(path) or ".", owners=owners)
    except UnsafeSocketDirectory as e:
        raise UnsafeSocketDirectory(f"admin_socket: {e}") from None
