# -*- test-case-name: tests.test_listener -*-
"""
A link's listening socket, in a directory nobody else controls.

The socket is how a tenant half reaches the control half, so whoever can
write in its directory can stand in its way: replace the socket, or plant
the C{<socket>.lock} that Twisted checks before binding (a symlink naming
any live pid keeps the control half from starting).  As OpenSSH's
StrictModes does for C{authorized_keys}, L{check_socket_directory} refuses a
socket directory that anyone but its owner can write, whose owner is not
root or msgmux itself, or with an ancestor that others could rename (group
or world writable without the sticky bit).

L{LinkListener} binds the socket with a restrictive umask (Twisted changes
the mode only after binding), listens, and on L{LinkListener.stop} stops
listening, which removes the socket and its lock.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.config import LinkConfig

__all__ = ["LinkListener", "UnsafeSocketDirectory", "check_socket_directory", "listen_now"]


class UnsafeSocketDirectory(Exception):
    """The socket's directory, or one above it, is not safe from other users."""


def check_socket_directory(directory: str, euid: int | None = None, *, owners: bool = True) -> None:
    """
    @param directory: where a link socket (or the admin socket) is to be bound.
    @param euid: the user msgmux runs as (default: this process's).
    @param owners: whether to check who owns the directories as well as who
        may write them.  Root binding a socket before twistd drops to
        msgmux's user cannot know that user yet: it checks the modes only,
        and the owners once it runs as msgmux.
    @raise UnsafeSocketDirectory: naming the directory and what is wrong.
    """
    euid = os.geteuid() if euid is None else euid
    trusted = {0, euid}
    path = os.path.abspath(directory)
    own = os.stat(path)
    if owners and own.st_uid not in trusted:
        raise UnsafeSocketDirectory(f"{path} is owned by uid {own.st_uid}, not by root or msgmux (uid {euid})")
    if own.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeSocketDirectory(f"{path} is writable by group or others (mode {stat.S_IMODE(own.st_mode):04o}); make it 0750 or stricter")
    parent = os.path.dirname(path)
    while parent != path:
        path, parent = parent, os.path.dirname(parent)
        info = os.stat(path)
        if owners and info.st_uid not in trusted:
            raise UnsafeSocketDirectory(f"{path} (above the socket) is owned by uid {info.st_uid}, not by root or msgmux")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise UnsafeSocketDirectory(f"{path} (above the socket) is writable by group or others without the sticky bit")


def listen_now(endpoint: IStreamServerEndpoint, factory: Factory) -> IListeningPort:
    """
    Listen on C{endpoint} and return the port, or raise what listening
    raised.  Unix and TCP endpoints listen at once; starting msgmux (or
    adding a link) must fail there and then when a socket cannot be bound,
    rather than run without it.
    """
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise RuntimeError(f"listening on {endpoint!r} did not complete at once")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    port: IListeningPort = outcome[0]
    return port


class LinkListener:
    """
    The listening socket of one link.

    @ivar port: the listening port while listening.
    """

    _log = Logger()

    def __init__(self, reactor: Any, config: LinkConfig, factory: Factory) -> None:
        self.reactor = reactor
        self.config = config
        self.factory = factory
        self.port: IListeningPort | None = None

    def listen(self) -> None:
        """
        Bind and listen, now.

        @raise UnsafeSocketDirectory: when the directory is not safe.
        @raise Exception: whatever binding raised (the socket is in use,
            the directory cannot be created...): the caller decides whether
            that ends msgmux (at start-up) or refuses one link (at run time).
        """
        directory = os.path.dirname(self.config.socket) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750, exist_ok=True)
        check_socket_directory(directory)
        endpoint = UNIXServerEndpoint(self.reactor, self.config.socket, mode=self.config.socket_mode, wantPID=True)
        previous = os.umask(0o177)
        try:
            self.port = listen_now(endpoint, self.factory)
        finally:
            os.umask(previous)
        self._log.info(
            "Link {link}: listening on {socket} (mode {mode:o})", link=self.config.name, socket=self.config.socket, mode=self.config.socket_mode
        )

    async def stop(self) -> None:
        """Stop listening; the socket file and its lock are removed."""
        port, self.port = self.port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
