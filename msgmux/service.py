# -*- test-case-name: tests.test_service -*-
"""
The msgmux service tree, and its start and stop order.

L{MsgmuxService} runs the control half, the tenant half, or both (a config
with both sections; the halves still talk over the Unix socket).  Starting
brings up the broker connections, then the link sockets.  Stopping follows a
fixed order that a plain C{MultiService} (which stops children concurrently)
cannot give: stop accepting tenant halves, drain the sessions (in-flight
publishes get a few seconds to be confirmed and acknowledged), close the
sessions, and only then close the broker connections.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.config import Config, ControlConfig, TenantConfig
from msgmux.control import ControlLink, ControlLinkFactory
from msgmux.oslo.tokens import TokenSigner
from msgmux.tenant import TenantLink, TenantLinkFactory

__all__ = ["ControlHalf", "MsgmuxService", "TenantHalf"]

#: Seconds a stopping half waits for in-flight messages to settle.
DRAIN_TIMEOUT = 5.0


class ControlHalf:
    """
    The control half: one control broker connection, one listening socket
    and one L{ControlLink} per configured link.
    """

    _log = Logger()

    def __init__(self, config: ControlConfig, reactor: Any) -> None:
        self.config = config
        self.broker = BrokerService(config.broker, "control", reactor)
        self.signer = TokenSigner(config.reply_key or os.urandom(32))
        if config.reply_key is None:
            self._log.info(
                "No reply_key_file: calls in flight when this control half restarts will time out"
            )
        self.links = {link.name: ControlLink(link, config, self.broker, self.signer, reactor) for link in config.links}
        self.listeners = []
        for link in config.links:
            endpoint = UNIXServerEndpoint(reactor, link.socket, mode=link.socket_mode, wantPID=True)
            listener = StreamServerEndpointService(endpoint, ControlLinkFactory(self.links[link.name]))
            # Make startService raise when the socket cannot be bound, so
            # twistd fails at startup rather than running without the link.
            listener._raiseSynchronously = True
            self.listeners.append(listener)

    def start(self) -> None:
        self.broker.startService()
        for link, listener in zip(self.config.links, self.listeners):
            directory = os.path.dirname(link.socket)
            if directory and not os.path.isdir(directory):
                os.makedirs(directory, mode=0o750, exist_ok=True)
            # Bind with a restrictive umask: Twisted chmods the socket only
            # after binding it.
            previous = os.umask(0o177)
            try:
                listener.startService()
            finally:
                os.umask(previous)
            self._log.info(
                "Link {link}: listening on {socket} (mode {mode:o})", link=link.name, socket=link.socket, mode=link.socket_mode
            )

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.stopService()
        drains = [
            defer.Deferred.fromCoroutine(link.relay.drain(DRAIN_TIMEOUT))
            for link in self.links.values()
            if link.relay is not None and link.relay.active
        ]
        await defer.DeferredList(drains, consumeErrors=True)
        for link in self.links.values():
            link.calls.cancel_all()
        await self.broker.stopService()


class TenantHalf:
    """
    The tenant half: one tenant broker connection and one reconnecting link
    client.
    """

    def __init__(self, config: TenantConfig, reactor: Any) -> None:
        self.config = config
        self.broker = BrokerService(config.broker, "tenant", reactor)
        self.link = TenantLink(config, self.broker, reactor)
        self.client = ClientService(
            UNIXClientEndpoint(reactor, config.socket, timeout=5),
            TenantLinkFactory(self.link),
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
            clock=reactor,
        )

    def start(self) -> None:
        self.broker.startService()
        self.client.startService()

    async def stop(self) -> None:
        relay = self.link.relay
        if relay is not None and relay.active:
            await relay.drain(DRAIN_TIMEOUT)
        await self.client.stopService()
        await self.broker.stopService()


class MsgmuxService(Service):
    """The whole process: the configured halves, started and stopped in order."""

    name = "msgmux"
    _log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.control = ControlHalf(config.control, reactor) if config.control else None
        self.tenant = TenantHalf(config.tenant, reactor) if config.tenant else None

    def startService(self) -> None:
        super().startService()
        self._log.info("msgmux starting from {path}", path=self.config.path)
        if self.control is not None:
            self.control.start()
        if self.tenant is not None:
            self.tenant.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.tenant is not None:
            await self.tenant.stop()
        if self.control is not None:
            await self.control.stop()
        self._log.info("msgmux stopped")
