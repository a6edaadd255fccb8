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

import gc
import os
import signal
from typing import Any, Callable

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.config import Config, ConfigError, ControlConfig, LinkConfig, TenantConfig, load
from msgmux.control import ControlLink, ControlLinkFactory
from msgmux.control.listener import LinkListener, listen_now
from msgmux.lifecycle import ControlLifecycle
from msgmux.linkstore import StoredLink
from msgmux.metrics import MetricsSite, MsgmuxCollector
from msgmux.oslo.tokens import TokenSigner
from msgmux.oslo.topology import OsloTopology
from msgmux.reply_queues import ReplyQueueDeclarer
from msgmux.sdnotify import Notifier
from msgmux.tenant import TenantLink, TenantLinkFactory

__all__ = ["ControlHalf", "MsgmuxService", "TenantHalf"]

#: Seconds a stopping half waits for in-flight messages to settle.
DRAIN_TIMEOUT = 5.0


class ControlHalf:
    """
    The control half: one control broker connection, and one L{ControlLink}
    with its listening socket per link.
    """

    _log = Logger()

    def __init__(self, config: ControlConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.broker = BrokerService(config.broker, "control", reactor)
        self.signer = TokenSigner(config.reply_key or os.urandom(32), config.reply_verify_keys)
        if config.reply_key is None:
            self._log.info("No reply_key_file: calls in flight when this control half restarts will time out")
        else:
            self._log.info("Reply keys: signing with {signing}, also verifying {verifying}", **self.signer.key_ids())
        self.links: dict[str, ControlLink] = {}
        #: Says why a process may not be a link's tenant half (set by the
        #: tenant half supervisor), or L{None}.
        self.peer_check: Callable[[str, tuple[int, int, int] | None], str | None] = lambda link, peer: None
        self._listeners: dict[str, LinkListener] = {}
        self._started = False
        self.reply_queues = ReplyQueueDeclarer(
            self.broker, OsloTopology(config.broker.queues, config.broker.exchange), lambda: list(self.links)
        )
        for link in config.links:
            self._serve(link)

    def _serve(self, config: LinkConfig) -> None:
        link = ControlLink(config, self.config, self.broker, self.signer, self.reactor)
        link.peer_check = lambda peer: self.peer_check(config.name, peer)
        self.links[config.name] = link
        self._listeners[config.name] = LinkListener(self.reactor, config, ControlLinkFactory(link))

    def start(self) -> None:
        """Connect to the broker and listen on every link's socket (a bind failure raises)."""
        self._started = True
        self.reply_queues.start()
        self.broker.startService()
        for listener in self._listeners.values():
            listener.listen()

    def add_link(self, config: LinkConfig) -> None:
        """
        Serve a new link now: listen on its socket.

        @raise Exception: when its socket cannot be bound (nothing changes).
        """
        if config.name in self.links:
            raise ValueError(f"link {config.name!r} exists")
        self._serve(config)
        if self._started:
            try:
                self._listeners[config.name].listen()
            except BaseException:
                del self.links[config.name], self._listeners[config.name]
                raise

    async def remove_link(self, name: str) -> None:
        """
        Stop serving a link: stop listening (its socket goes), turn away
        connections that have not completed the handshake, drain its
        session (in-flight messages settle), and forget its calls.
        """
        listener = self._listeners.pop(name)
        link = self.links.pop(name)
        link.retire()
        await listener.stop()
        factory = listener.factory
        assert isinstance(factory, ControlLinkFactory)
        factory.close_pending("removed", "the control half no longer serves this link")
        await link.drain(DRAIN_TIMEOUT)
        link.forget_calls()
        self._log.info("Link {link}: removed", link=name)

    async def reload(self, config: ControlConfig) -> None:
        """
        Apply a new configuration's links: new links start listening, removed
        ones stop, changed ones get their new routes and limits (their
        tenant half reconnects); untouched links are not disturbed; the
        reply keys in the key files are used from now on.  Broker changes
        need a restart.
        """
        if config.broker != self.config.broker:
            self._log.warn("Reload: control broker changes take effect only after a restart")
        if config.reply_key is None:  # no key file (any more): the key in use stays
            config = attrs.evolve(config, reply_key=self.config.reply_key, reply_verify_keys=self.config.reply_verify_keys)
        elif (config.reply_key, config.reply_verify_keys) != (self.config.reply_key, self.config.reply_verify_keys):
            self.signer.use_keys(config.reply_key, config.reply_verify_keys)
            self._log.info("Reply keys: signing with {signing}, also verifying {verifying}", **self.signer.key_ids())
        old = {link.name: link for link in self.config.links}
        new = {link.name: link for link in config.links}
        for name in old.keys() - new.keys():
            await self.remove_link(name)
        for name in old.keys() & new.keys():
            if old[name].socket != new[name].socket or old[name].socket_mode != new[name].socket_mode:
                await self.remove_link(name)
        self.config = attrs.evolve(config, broker=self.config.broker)
        for name, link in new.items():
            if name not in self.links:
                self.add_link(link)
            elif old[name] != link:
                self.links[name].reconfigure(link, self.config)
                self._log.info("Link {link}: reconfigured", link=name)
            else:
                self.links[name].control = self.config

    async def stop(self) -> None:
        for listener in self._listeners.values():
            await listener.stop()
        drains = [defer.Deferred.fromCoroutine(link.drain(DRAIN_TIMEOUT)) for link in self.links.values()]
        await defer.DeferredList(drains, consumeErrors=True)
        for link in self.links.values():
            link.forget_calls()
        self.reply_queues.stop()
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
        self.reply_queues = ReplyQueueDeclarer(self.broker, self.link.topology, self._link_names)

    def _link_names(self) -> list[str]:
        name = self.link.routes.link if self.link.routes is not None else self.config.link
        return [name] if name else []

    def start(self) -> None:
        self.reply_queues.start()
        self.broker.startService()
        self.client.startService()

    async def stop(self) -> None:
        await self.link.drain(DRAIN_TIMEOUT)
        await self.client.stopService()
        self.reply_queues.stop()
        await self.broker.stopService()


class MsgmuxService(Service):
    """The whole process: the configured halves, started and stopped in order."""

    name = "msgmux"
    _log = Logger()
    _previous_hup: Any = None

    def __init__(
        self, config: Config, reactor: Any, stored_links: list[StoredLink] | None = None, *, freeze_heap: bool = False
    ) -> None:
        """
        @param stored_links: the control half's links from its state file.
        @param freeze_heap: once started, exempt everything built so far
            from the cycle collector (C{gc.freeze}): modules, configuration
            and links live as long as the process, and a full collection
            then costs only what was built since.  For the process that runs
            this service alone (the twistd plugin), not for a test runner.
        """
        self._freeze_heap = freeze_heap
        self.config = config
        self.reactor = reactor
        self.control = ControlHalf(config.control, reactor) if config.control else None
        self.tenant = TenantHalf(config.tenant, reactor) if config.tenant else None
        # Reloads (which wait for removed links to drain), run-time link
        # changes and the stop run one at a time, so that two SIGHUPs in a
        # row apply the newest file once each, and a stop never meets a
        # reload halfway.
        self._changes = defer.DeferredLock()
        self.lifecycle = (
            ControlLifecycle(self.control, reactor, stored_links or [], self._changes.run, self._spawner_lost)
            if self.control is not None
            else None
        )
        self.notifier = Notifier(None)
        self.collector = MsgmuxCollector(self._monitored, self._brokers())
        if self.lifecycle is not None:
            self.collector.extras.append(self.lifecycle)
        self._metrics_address = (config.control.metrics if config.control else None) or (config.tenant.metrics if config.tenant else None)
        self._metrics_port: IListeningPort | None = None

    def _monitored(self) -> list[tuple[str, Any]]:
        links: list[tuple[str, Any]] = []
        if self.control is not None:
            links += [("control", link) for link in self.control.links.values()]
        if self.tenant is not None:
            links.append(("tenant", self.tenant.link))
        return links

    def _brokers(self) -> list[BrokerService]:
        return [half.broker for half in (self.control, self.tenant) if half is not None]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Host names are encoded with the idna codec, which Python imports on
        # first use: do that while the interpreter's files are surely
        # readable, before twistd --uid drops privileges.
        "localhost".encode("idna")
        self.notifier = Notifier.from_environment()
        if self.lifecycle is not None:
            self.lifecycle.privileged_start()

    def startService(self) -> None:
        super().startService()
        self._log.info("msgmux starting from {path}", path=self.config.path)
        self._previous_hup = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        if self.control is not None:
            self.control.start()
        if self.lifecycle is not None:
            self.lifecycle.start()
        if self.tenant is not None:
            self.tenant.start()
        if self._metrics_address:
            endpoint = serverFromString(self.reactor, self._metrics_address)
            self._metrics_port = listen_now(endpoint, MetricsSite(self.collector))
        self._notify_when_ready()
        if self._freeze_heap:
            gc.collect()  # what start-up left behind is not frozen for good
            gc.freeze()

    def _notify_when_ready(self) -> None:
        """C{READY=1} once the sockets are bound (above) and every broker is logged in."""
        waits = [broker.when_connected() for broker in self._brokers()]
        if self.lifecycle is not None:
            waits += self.lifecycle.ready()
        links = len(self.control.links) if self.control is not None else 0
        ready = defer.gatherResults(waits, consumeErrors=True)
        ready.addCallback(lambda _: self.notifier.ready(f"serving {links} links"))
        ready.addErrback(lambda failure: self._log.info("Stopped before ready: {error}", error=failure.getErrorMessage()))
        self.notifier.start_watchdog(self.reactor)

    def _spawner_lost(self) -> None:
        self._log.critical("msgmux stops: it cannot supervise tenant halves without the spawner (let systemd restart it)")
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.notifier.stopping()
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
        if self.control is not None and config.control is not None and self.lifecycle is not None:
            control = self.lifecycle.pin(config.control)
            if isinstance(control, str):
                self._log.error("Reload refused, keeping the running configuration: {error}", error=control)
                return
            await self.control.reload(control)
            self.lifecycle.reloaded()
        elif (self.control is None) != (config.control is None):
            self._log.warn("Reload: adding or removing a half takes effect only after a restart")
        self.config = attrs.evolve(config, tenant=self.config.tenant)
        self._log.info("Reloaded {path}", path=self.config.path)

    async def _stop(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.stop_admin()
        port, self._metrics_port = self._metrics_port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        if self.tenant is not None:
            await self.tenant.stop()
        if self.control is not None:
            await self.control.stop()
        if self.lifecycle is not None:
            # After the links drained: the halves confirm what was in flight.
            await self.lifecycle.stop_halves()
        self._log.info("msgmux stopped")
