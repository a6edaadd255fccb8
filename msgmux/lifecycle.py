# -*- test-case-name: tests.test_lifecycle -*-
"""
The control half's moving parts: links added at run time, and the tenant
halves it supervises.

L{ControlLifecycle} puts together the spawner (started while still root),
the L{TenantSupervisor}, the state file and the admin socket, and gives
L{msgmux.service.MsgmuxService} a handful of calls at the points where they
belong in its own start, reload and stop.  It also reports the supervised
halves in C{/status} and C{/metrics}.
"""

from __future__ import annotations

import grp
import os
from typing import Any, Callable, Iterable

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer, threads
from twisted.logger import Logger

from msgmux.admin import AdminFactory, check_admin_directory, listen_admin
from msgmux.config import ControlConfig, LinkConfig
from msgmux.control.listener import UnsafeSocketDirectory
from msgmux.linkadmin import ControlHalfLike, LinkAdmin
from msgmux.linkstore import LinkStore, StoredLink
from msgmux.spawnerclient import SpawnerProcess, SupervisorChannel
from msgmux.supervisor import HalfState, TenantSupervisor, namespace_exists

__all__ = ["ControlLifecycle"]

#: Seconds the stop waits for the spawner beyond the halves' own stop timeout.
SPAWNER_GRACE = 5.0


class ControlLifecycle:
    """
    Run-time links and supervised tenant halves of one control half.

    @ivar supervisor: L{None} without C{[control.supervision]}.
    @ivar admin: L{None} without C{state_file}.
    """

    _log = Logger()

    def __init__(
        self,
        control: ControlHalfLike,
        reactor: Any,
        stored: list[StoredLink],
        exclusive: Callable[[Callable[[], defer.Deferred[Any]]], defer.Deferred[Any]],
        on_spawner_lost: Callable[[], None],
    ) -> None:
        """
        @param stored: the links of the state file (read at start-up, so that
            a bad one stops twistd before anything starts).
        @param exclusive: runs a change one at a time with reloads and the stop.
        @param on_spawner_lost: called when the spawner dies: without root it
            cannot be started again, so the service should end and be
            restarted.
        """
        self.control = control
        self.reactor = reactor
        config = control.config
        self.config = config
        self.spawner: SpawnerProcess | None = None
        self.supervisor: TenantSupervisor | None = None
        if config.supervision is not None:
            self.spawner = SpawnerProcess(reactor, config.supervision, self._event, on_spawner_lost)
            self.supervisor = TenantSupervisor(config.supervision, SupervisorChannel(self.spawner), reactor, namespace_exists())
        self.admin: LinkAdmin | None = None
        if config.state_file is not None:
            self.admin = LinkAdmin(
                control,
                LinkStore(config.state_file),
                self.supervisor,
                stored,
                exclusive,
                lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a),
            )
        self._admin_port: Any = None
        self._privileged = False

    def _event(self, event: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.event(event)

    def privileged_start(self) -> None:
        """Start the spawner and bind the admin socket, while still root."""
        if self._privileged:
            return
        self._privileged = True
        if self.spawner is not None:
            self.spawner.start()
        if self.config.admin_socket is not None and self.admin is not None:
            gid = grp.getgrnam(self.config.admin_group).gr_gid if self.config.admin_group else None
            self._admin_port = listen_admin(self.reactor, self.config.admin_socket, AdminFactory(self.admin, gid))
            self._log.info("Admin socket listening on {path}", path=self.config.admin_socket)

    def start(self) -> None:
        """Serve the stored links and start the supervised halves (after the control half started)."""
        self.privileged_start()
        if self._admin_port is not None and self.config.admin_socket is not None:
            # Bound as root, before msgmux knew the user it runs as: its
            # directory's owner is checked now, and the start refused.
            try:
                check_admin_directory(self.config.admin_socket)
            except UnsafeSocketDirectory:
                self._admin_port.stopListening()
                self._admin_port = None
                raise
        if self.spawner is not None and os.geteuid() == 0:
            self._log.warn(
                "The control half still runs as root: start it with twistd --uid/--gid so that only the spawner keeps root"
            )
        if self.admin is not None:
            self.admin.start()
        if self.supervisor is not None:
            self.control.peer_check = self.supervisor.peer_problem
            self.supervisor.start()
            for link in self._supervised():
                self.supervisor.add(link)

    def ready(self) -> list[defer.Deferred[Any]]:
        """@return: what must happen before the service is ready (the spawner's start)."""
        return [self.spawner.ready] if self.spawner is not None else []

    def _supervised(self) -> list[LinkConfig]:
        if self.admin is not None:
            return self.admin.supervised()
        return [link for link in self.control.config.links if link.tenant is not None]

    def pin(self, config: ControlConfig) -> ControlConfig | str:
        """
        Prepare a reloaded configuration: the admin socket, state file and
        supervision settings stay as they were started (the spawner got its
        users and groups then).

        @return: the configuration to apply, or why it cannot be.
        """
        if self.admin is not None:
            clash = self.admin.clash(config)
            if clash is not None:
                return clash
        kept = ("admin_socket", "admin_group", "state_file", "supervision")
        if any(getattr(config, name) != getattr(self.config, name) for name in kept):
            self._log.warn("Reload: admin_socket, admin_group, state_file and [control.supervision] take effect only after a restart")
        return attrs.evolve(config, **{name: getattr(self.config, name) for name in kept})

    def reloaded(self) -> None:
        """Follow the reloaded links: supervise new ones, stop gone ones, restart changed ones."""
        if self.supervisor is not None:
            for stop in self.supervisor.sync(self._supervised()):
                stop.addErrback(lambda failure: self._log.failure("Stopping a tenant half failed", failure))

    async def stop_admin(self) -> None:
        """Stop taking requests (first, when the service stops)."""
        if self._admin_port is not None:
            port, self._admin_port = self._admin_port, None
            await defer.maybeDeferred(port.stopListening)

    async def stop_halves(self) -> None:
        """Stop every supervised half, then the spawner (last, after the links drained)."""
        if self.supervisor is not None and self.spawner is not None and not self.spawner.ended.called:
            timeout = self.supervisor.config.stop_timeout + SPAWNER_GRACE
            stopping = self.supervisor.stop_all()
            stopping.addTimeout(timeout, self.reactor)
            try:
                await stopping
            except defer.TimeoutError:
                self._log.error("Tenant halves did not all stop within {timeout}s", timeout=timeout)
        if self.spawner is not None and self._privileged:
            ended = self.spawner.stop()
            ended.addTimeout(SPAWNER_GRACE, self.reactor)
            try:
                await ended
            except defer.TimeoutError:
                self._log.error("The tenant half spawner did not exit within {timeout}s", timeout=SPAWNER_GRACE)

    # --- reporting -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What C{/status} shows about supervision."""
        if self.supervisor is None:
            return {}
        return {"tenant_halves": self.supervisor.status(), "spawner": {"pid": self.supervisor.spawner_pid}}

    def collect(self) -> Iterable[Any]:
        """The supervised halves' metric families."""
        if self.supervisor is None:
            return
        up = GaugeMetricFamily("msgmux_tenant_half_up", "1 while the supervised tenant half runs.", labels=("link",))
        restarts = CounterMetricFamily(
            "msgmux_tenant_half_restarts_total", "Restarts of the supervised tenant half after it exited.", labels=("link",)
        )
        state = GaugeMetricFamily(
            "msgmux_tenant_half_state", "1 for the supervised tenant half's current state.", labels=("link", "state")
        )
        uptime = GaugeMetricFamily(
            "msgmux_tenant_half_uptime_seconds", "Seconds since the supervised tenant half started.", labels=("link",)
        )
        for half in self.supervisor.status():
            up.add_metric([half["link"]], 1 if half["state"] == HalfState.RUNNING.value else 0)
            restarts.add_metric([half["link"]], half["restarts"])
            state.add_metric([half["link"], half["state"]], 1)
            if half["uptime"] is not None:
                uptime.add_metric([half["link"]], half["uptime"])
        yield from (up, restarts, state, uptime)
