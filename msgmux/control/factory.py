# -*- test-case-name: tests.test_control_link -*-
"""
The control end of a link socket: one protocol per connection.

A link socket is reachable by local processes, so what they can make the
control half do before the handshake is bounded: at most
L{MAX_PENDING_CONNECTIONS} connections that have not said HELLO are held,
and the connection log lines they cause are rate-limited.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from msgmux.control.link import ControlLink
from msgmux.link.handshake import ControlLinkProtocol
from msgmux.link.protocol import LinkState
from msgmux.log_budget import LogBudget

__all__ = ["ControlLinkFactory", "MAX_PENDING_CONNECTIONS"]

#: Connections one link socket holds open before their handshake: a real
#: tenant half needs one; more are turned away so that nobody can pile up
#: sockets and buffers on the control half.
MAX_PENDING_CONNECTIONS = 4

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
        )
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
