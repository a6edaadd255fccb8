# -*- test-case-name: tests.test_link_protocol -*-
"""
The two ends of a link, which differ only in their handshake.

L{ControlLinkProtocol} waits for HELLO, checks it, and answers WELCOME with
the routes the tenant half must serve; L{TenantLinkProtocol} says HELLO and
takes its routes from WELCOME.  Everything else is L{LinkProtocol}'s.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

from msgmux import __version__
from msgmux.link import codec
from msgmux.link.codec import Frame, Hello, Welcome
from msgmux.link.interfaces import SessionHandler
from msgmux.link.protocol import HANDSHAKE_TIMEOUT, LOGGED_TEXT, LinkProtocol, LinkState

__all__ = ["ControlLinkProtocol", "TenantLinkProtocol", "peer_credentials"]


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """
    @param transport: a connected Unix socket transport.
    @return: the peer's (pid, uid, gid) from C{SO_PEERCRED}, or L{None}
        where the platform or transport cannot tell.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = get_handle().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class ControlLinkProtocol(LinkProtocol):
    """
    The control half's end: waits for HELLO, checks it, answers WELCOME with
    the routes the tenant half must serve.
    """

    def __init__(
        self,
        clock: IReactorTime,
        heartbeat: float,
        max_body: int,
        link_name: str,
        routes: Callable[[], dict[str, Any]],
        attach: Callable[[ControlLinkProtocol], SessionHandler | str],
        connected: Callable[[ControlLinkProtocol], None] = lambda protocol: None,
        header_names: frozenset[str] | None = None,
    ) -> None:
        """
        @param routes: the link's routes as WELCOME carries them, asked at
            HELLO (so that a reload between connecting and HELLO counts).
        @param attach: gives the session its handler, or says why there is
            none (the connection is then closed with C{busy}).
        @param connected: told of the connection and its peer credentials,
            for the (rate-limited) connection log.
        @param header_names: the only header names of a tenant's messages
            the control half looks at; their other headers are not even
            checked (L{codec.FrameDecoder}).
        """
        super().__init__(clock, heartbeat, max_body)
        # The control half never takes a WELCOME: a tenant could otherwise
        # make it decode a megabyte of them on every new connection.
        self.decoder = codec.FrameDecoder(0, accept_welcome=False, header_names=header_names)
        self.link_name = link_name
        self._routes = routes
        self._attach = attach
        self._connected = connected
        self.peer: tuple[int, int, int] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peer_credentials(self.transport)
        self._connected(self)

    def _handshake_handler(self, frame: Frame) -> Callable[[Any], None]:
        if self.state is LinkState.HANDSHAKE and type(frame) is Hello:
            return self._hello
        return super()._handshake_handler(frame)

    def _hello(self, hello: Hello) -> None:
        if codec.PROTOCOL_VERSION not in hello.versions:
            self.close("version", f"this control half speaks version {codec.PROTOCOL_VERSION}, not {list(hello.versions)}")
            return
        if hello.link is not None and hello.link != self.link_name:
            self.close("wrong-link", f"this socket serves link {self.link_name!r}, not {hello.link!r}")
            return
        handler = self._attach(self)
        if isinstance(handler, str):
            self.close("busy", handler)
            return
        session_id = uuid.uuid4().hex
        self._write(
            Welcome(
                version=codec.PROTOCOL_VERSION,
                link=self.link_name or "",
                session=session_id,
                heartbeat=self.heartbeat,
                max_body=self._session_max_body,
                routes=self._routes(),
            )
        )
        self._log.info(
            "Link {link}: session {session} up with {software}",
            link=self.link_name,
            session=session_id,
            software=hello.software[:LOGGED_TEXT],
        )
        self._open(handler, session_id)


class TenantLinkProtocol(LinkProtocol):
    """
    The tenant half's end: says HELLO, takes its routes from WELCOME.

    @ivar welcome: the WELCOME frame, once received.
    """

    def __init__(self, clock: IReactorTime, expected_link: str | None, handler_for: Callable[[Welcome], SessionHandler]) -> None:
        # The control half decides the heartbeat; until WELCOME only the
        # handshake timeout applies.
        super().__init__(clock, heartbeat=HANDSHAKE_TIMEOUT)
        self._expected_link = expected_link
        self._handler_for = handler_for
        self.welcome: Welcome | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._write(Hello(versions=(codec.PROTOCOL_VERSION,), link=self._expected_link, software=f"msgmux/{__version__} pid {os.getpid()}"))

    def _handshake_handler(self, frame: Frame) -> Callable[[Any], None]:
        if self.state is LinkState.HANDSHAKE and type(frame) is Welcome:
            return self._welcome
        return super()._handshake_handler(frame)

    def _welcome(self, welcome: Welcome) -> None:
        if welcome.version != codec.PROTOCOL_VERSION:
            self.close("version", f"control half chose version {welcome.version}")
            return
        self.welcome = welcome
        self.link_name = welcome.link
        self.heartbeat = welcome.heartbeat
        self.peer_max_body = welcome.max_body
        try:
            handler = self._handler_for(welcome)
        except ValueError as e:
            self.close("bad-welcome", str(e))
            return
        self._log.info("Link {link}: session {session} up", link=welcome.link, session=welcome.session)
        self._open(handler, welcome.session)
