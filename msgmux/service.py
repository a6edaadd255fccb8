# -*- test-case-name: tests.integration.test_operations -*-
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
import signal
from typing import Any

import attrs
from twisted.application.internet import ClientService, StreamServerEndpointService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, serverFromString
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.config import Config, ConfigError, ControlConfig, LinkConfig, TenantConfig, load
from msgmux.control import ControlLink, ControlLinkFactory
from msgmux.keeper import ReplyQueueKeeper
from msgmux.metrics import MetricsSite, MsgmuxCollector
from msgmux.oslo.tokens import TokenSigner
from msgmux.oslo.topology import OsloTopology
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
        self.reactor = reactor
        self.links: dict[str, ControlLink] = {}
        self.listeners: dict[str, StreamServerEndpointService] = {}
        for link in config.links:
            self._add(link)
        self.keeper = ReplyQueueKeeper(
            self.broker, OsloTopology(config.broker.queues, config.broker.exchange), lambda: list(self.links)
        )

    def _add(self, link: LinkConfig) -> None:
        self.links[link.name] = ControlLink(link, self.config, self.broker, self.signer, self.reactor)
        endpoint = UNIXServerEndpoint(self.reactor, link.socket, mode=link.socket_mode, wantPID=True)
        listener = StreamServerEndpointService(endpoint, ControlLinkFactory(self.links[link.name]))
        # Make startService raise when the socket cannot be bound, so twistd
        # fails at startup rather than running without the link.
        listener._raiseSynchronously = True
        self.listeners[link.name] = listener

    def _listen(self, link: LinkConfig) -> None:
        directory = os.path.dirname(link.socket)
        if directory and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750, exist_ok=True)
        # Bind with a restrictive umask: Twisted chmods the socket only after
        # binding it.
        previous = os.umask(0o177)
        try:
            self.listeners[link.name].startService()
        finally:
            os.umask(previous)
        self._log.info("Link {link}: listening on {socket} (mode {mode:o})", link=link.name, socket=link.socket, mode=link.socket_mode)

    def start(self) -> None:
        self.keeper.start()
        self.broker.startService()
        for link in self.config.links:
            self._listen(link)

    async def _remove(self, name: str) -> None:
        listener = self.listeners.pop(name)
        await listener.stopService()
        link = self.links.pop(name)
        link.retired = True
        listener.factory.close_pending("removed", "the control half no longer serves this link")
        if link.relay is not None and link.relay.active:
            await link.relay.drain(DRAIN_TIMEOUT)
        link.calls.cancel_all()
        self._log.info("Link {link}: removed", link=name)

    async def reload(self, config: ControlConfig) -> None:
        """
        Apply a new configuration's links: new links start listening, removed
        ones stop, changed ones get their new routes and limits (their
        tenant half reconnects); untouched links are not disturbed.  Broker
        and key changes need a restart.
        """
        if config.broker != self.config.broker or config.reply_key != self.config.reply_key:
            self._log.warn("Reload: control broker or reply key changes take effect only after a restart")
        old = {link.name: link for link in self.config.links}
        new = {link.name: link for link in config.links}
        for name in old.keys() - new.keys():
            await self._remove(name)
        for name in old.keys() & new.keys():
            if old[name].socket != new[name].socket or old[name].socket_mode != new[name].socket_mode:
                await self._remove(name)
        self.config = attrs.evolve(config, broker=self.config.broker, reply_key=self.config.reply_key)
        for name, link in new.items():
            if name in self.links:
                if old[name] != link:
                    self.links[name].reconfigure(link, self.config)
                    self._log.info("Link {link}: reconfigured", link=name)
                else:
                    self.links[name].control = self.config
            else:
                self._add(link)
                self._listen(link)

    async def stop(self) -> None:
        for listener in self.listeners.values():
            await listener.stopService()
        drains = [
            defer.Deferred.fromCoroutine(link.relay.drain(DRAIN_TIMEOUT))
            for link in self.links.values()
            if link.relay is not None and link.relay.active
        ]
        await defer.DeferredList(drains, consumeErrors=True)
        for link in self.links.values():
            link.calls.cancel_all()
        self.keeper.stop()
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
        # The link's name is known from the configuration, or once a
        # session told it.
        self.keeper = ReplyQueueKeeper(self.broker, self.link.topology, self._link_names)

    def _link_names(self) -> list[str]:
        name = self.link.routes.link if self.link.routes is not None else self.config.link
        return [name] if name else []

    def start(self) -> None:
        self.keeper.start()
        self.broker.startService()
        self.client.startService()

    async def stop(self) -> None:
        relay = self.link.relay
        if relay is not None and relay.active:
            await relay.drain(DRAIN_TIMEOUT)
        await self.client.stopService()
        self.keeper.stop()
        await self.broker.stopService()


class MsgmuxService(Service):
    """The whole process: the configured halves, started and stopped in order."""

    name = "msgmux"
    _log = Logger()
    _previous_hup: Any = None

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.control = ControlHalf(config.control, reactor) if config.control else None
        self.tenant = TenantHalf(config.tenant, reactor) if config.tenant else None
        self.collector = MsgmuxCollector(self._monitored(), self._brokers())
        # Reloads (which wait for removed links to drain) and the stop run
        # one at a time, so that two SIGHUPs in a row apply the newest file
        # once each, and a stop never meets a reload halfway.
        self._changes = defer.DeferredLock()
        self.metrics: StreamServerEndpointService | None = None
        address = (config.control.metrics if config.control else None) or (config.tenant.metrics if config.tenant else None)
        if address:
            self.metrics = StreamServerEndpointService(serverFromString(reactor, address), MetricsSite(self.collector))
            self.metrics._raiseSynchronously = True

    def _monitored(self) -> list[tuple[str, Any]]:
        links: list[tuple[str, Any]] = []
        if self.control is not None:
            links += [("control", link) for link in self.control.links.values()]
        if self.tenant is not None:
            links.append(("tenant", self.tenant.link))
        return links

    def _brokers(self) -> list[BrokerService]:
        return [half.broker for half in (self.control, self.tenant) if half is not None]

    def startService(self) -> None:
        super().startService()
        self._log.info("msgmux starting from {path}", path=self.config.path)
        self._previous_hup = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        if self.control is not None:
            self.control.start()
        if self.tenant is not None:
            self.tenant.start()
        if self.metrics is not None:
            self.metrics.startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        return self._changes.run(lambda: defer.Deferred.fromCoroutine(self._stop()))

    def reload(self) -> defer.Deferred[None]:
        """
        Re-read the configuration file (SIGHUP) and apply link changes, after
        any reload still in progress.
        """
        return self._changes.run(lambda: defer.Deferred.fromCoroutine(self._reload())).addErrback(
            lambda failure: self._log.failure("Reload failed", failure)
        )

    async def _reload(self) -> None:
        if not self.running:
            return  # stopping, or stopped while this reload waited
        # Certificate rotation: the same paths, new contents, for the
        # connections made from now on (whatever the rest of the file says).
        for broker in self._brokers():
            broker.reload_tls()
        try:
            config = load(self.config.path)
        except ConfigError as e:
            self._log.error("Reload refused, keeping the running configuration: {error}", error=str(e))
            return
        if config.tenant != self.config.tenant:
            self._log.warn("Reload: tenant half changes take effect only after a restart")
        if self.control is not None and config.control is not None:
            await self.control.reload(config.control)
            self.collector.links = self._monitored()
        elif (self.control is None) != (config.control is None):
            self._log.warn("Reload: adding or removing a half takes effect only after a restart")
        self.config = attrs.evolve(config, tenant=self.config.tenant)
        self._log.info("Reloaded {path}", path=self.config.path)

    async def _stop(self) -> None:
        if self.metrics is not None:
            await self.metrics.stopService()
        if self.tenant is not None:
            await self.tenant.stop()
        if self.control is not None:
            await self.control.stop()
        self._log.info("msgmux stopped")
