# -*- test-case-name: tests.test_control_link -*-
"""
The control end of a link socket: one protocol per connection.

A link socket is reachable by local processes, so what they can make the
control half do before the handshake is bounded: at most
L{MAX_PENDING_CONNECTIONS} connections that have not said HELLO are held,
and the connection log lines they cause are rate-limited.  After it, the
MSG head bytes a tenant half sends are budgeted in proportion to its
message rate (L{head_budget}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from msgmux.config import Limits
from msgmux.control.link import ControlLink
from msgmux.control.upstream import HEADERS_READ
from msgmux.link import codec
from msgmux.link.handshake import ControlLinkProtocol
from msgmux.link.protocol import LinkState
from msgmux.log_budget import LogBudget
from msgmux.pacing import TokenBucket

__all__ = ["ControlLinkFactory", "HEAD_BYTES_PER_MESSAGE", "MAX_PENDING_CONNECTIONS", "MIN_HEAD_BYTE_RATE", "head_budget"]

#: Connections one link socket holds open before their handshake: a real
#: tenant half needs one; more are turned away so that nobody can pile up
#: sockets and buffers on the control half.
MAX_PENDING_CONNECTIONS = 4

#: MSG head bytes a tenant half may send per message of its C{max_rate}
#: and C{burst}.  An oslo message's head is 100 to 300 bytes; a largest
#: head (L{codec.MAX_HEAD}) of the worst kind costs the control half half
#: a millisecond to decode, so a tenant that sends only those is slowed to a
#: few percent of one core.
HEAD_BYTES_PER_MESSAGE = 512

#: Head bytes per second a link may always send, however low its
#: C{max_rate}: a largest head then never waits more than 1/8 s.
MIN_HEAD_BYTE_RATE = 64 * 1024

#: Connection log lines per link in each L{CONNECTION_LOG_WINDOW} seconds.
CONNECTION_LOG_BURST = 5
CONNECTION_LOG_WINDOW = 10.0


class ControlLinkFactory(Factory):
    """Builds the control end of the link for connections on one socket."""

    _log = Logger()

    def __init__(self, link: ControlLink) -> None:
        self.link = link
        self._pending: set[ControlLinkProtocol] = set()
        self._log_budget = LogBudget(link.clock, CONNECTION_LOG_BURST, CONNECTION_LOG_WINDOW)
        self._heads: tuple[Limits, TokenBucket] | None = None

    def _head_budget(self) -> TokenBucket:
        """
        The link's head budget, shared by its connections (a tenant half
        that reconnects does not get a fresh burst) and made anew when its
        limits change.
        """
        limits = self.link.config.limits
        if self._heads is None or self._heads[0] != limits:
            self._heads = (limits, head_budget(limits, self.link.clock))
        return self._heads[1]

    def close_pending(self, code: str, detail: str) -> None:
        """Close the connections that have not completed their handshake."""
        for protocol in list(self._pending):
            if protocol.state is LinkState.HANDSHAKE:
                protocol.close(code, detail)
        self._pending.clear()

    def buildProtocol(self, addr: Any) -> ControlLinkProtocol | None:
        link = self.link
        self._pending = {p for p in self._pending if p.state is LinkState.HANDSHAKE}
        if len(self._pending) >= MAX_PENDING_CONNECTIONS:
            link.stats.count("connections_refused")
            self._log_line(
                "refused",
                "Link {link}: refusing a connection, {count} others have not completed the handshake",
                count=len(self._pending),
            )
            return None
        protocol = ControlLinkProtocol(
            clock=link.clock,
            heartbeat=link.control.link_heartbeat,
            max_body=link.config.limits.max_message_size,
            link_name=link.name,
            routes=lambda: link.routes.to_wire(),
            attach=link.attach,
            connected=self._connected,
            header_names=HEADERS_READ,
        )
        protocol.head_budget = self._head_budget()
        protocol.violation_observers.append(lambda code, detail: link.stats.count("protocol_violations", code=code))
        protocol.ended_observers.append(lambda code: link.stats.count("sessions_ended", reason=code))
        protocol.factory = self
        self._pending.add(protocol)
        return protocol

    def _connected(self, protocol: ControlLinkProtocol) -> None:
        pid, uid, gid = protocol.peer or (-1, -1, -1)
        self._log_line("connected", "Link {link}: tenant half connected (pid {pid}, uid {uid}, gid {gid})", pid=pid, uid=uid, gid=gid)

    def _log_line(self, key: str, text: str, **fields: Any) -> None:
        log, held_back = self._log_budget.take(key)
        if held_back:
            self._log.info(
                "Link {link}: {count} more connection log lines ({key}) held back in the last {window:.0f}s",
                link=self.link.name,
                count=held_back,
                key=key,
                window=CONNECTION_LOG_WINDOW,
            )
        if log:
            self._log.info(text, link=self.link.name, **fields)


def head_budget(limits: Limits, clock: IReactorTime) -> TokenBucket:
    """The MSG head bytes a link's tenant half may send, by its message limits."""
    rate = max(MIN_HEAD_BYTE_RATE, limits.max_rate * HEAD_BYTES_PER_MESSAGE)
    burst = max(codec.MAX_HEAD, limits.burst * HEAD_BYTES_PER_MESSAGE)
    return TokenBucket(rate, burst, clock)
