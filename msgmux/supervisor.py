# -*- test-case-name: tests.test_supervisor -*-
"""
Supervision of tenant halves, in the control half.

For each link with a C{tenant} table the L{TenantSupervisor} keeps its
tenant half running inside the link's network namespace, the way neutron's
ProcessMonitor keeps one metadata proxy per router: it asks the spawner to
start the half, restarts it with a doubling delay when it exits, stops it
when the link is removed, and stops it (reporting C{namespace-gone}) when
the namespace disappears, starting it again if the namespace comes back.

It only decides; the spawner (L{msgmux.spawnerclient}) does the starting
and stopping, and its events come back through L{TenantSupervisor.event}.
Time comes from an injected clock and the namespace check is a function, so
the tests drive all of it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Callable, Iterable, Protocol

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from msgmux.config import LinkConfig, SupervisionConfig
from msgmux.spawnproto import Event, Exited, Ready, Refused, Started

__all__ = ["HalfState", "SpawnerChannel", "TenantSupervisor", "namespace_exists"]


class SpawnerChannel(Protocol):
    """How the supervisor gives the spawner its two commands."""

    def start(self, link: LinkConfig) -> None:
        """Start C{link}'s tenant half."""

    def stop(self, link: str, timeout: float) -> None:
        """Stop C{link}'s tenant half: SIGTERM, SIGKILL after C{timeout}."""


class HalfState(enum.Enum):
    """Where one supervised tenant half is."""

    #: Its namespace has not appeared yet.
    WAITING_FOR_NAMESPACE = "waiting-for-namespace"
    #: Asked the spawner to start it.
    STARTING = "starting"
    RUNNING = "running"
    #: It exited (or could not start); a restart is scheduled.
    RESTARTING = "restarting"
    #: Asked the spawner to stop it.
    STOPPING = "stopping"
    #: Its namespace disappeared, so it was stopped; it starts again if the
    #: namespace comes back.
    NAMESPACE_GONE = "namespace-gone"


#: Why a half is being stopped, kept until its exit is reported.
_REMOVED = "removed"
_NAMESPACE_GONE = "namespace-gone"


@attrs.define(eq=False)
class SupervisedHalf:
    """One link's tenant half as the supervisor sees it."""

    link: LinkConfig
    state: HalfState
    pid: int | None = None
    restarts: int = 0
    failures_in_row: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    last_reason: str | None = None
    stop_reason: str | None = None
    restart_call: IDelayedCall | None = None
    waiters: list[defer.Deferred[None]] = attrs.field(factory=list)

    @property
    def namespace(self) -> str:
        assert self.link.tenant is not None
        return self.link.tenant.namespace


def namespace_exists(netns_dir: str = "/run/netns") -> Callable[[str], bool]:
    """@return: a check that a network namespace exists (C{ip netns} keeps them in C{netns_dir})."""
    return lambda name: os.path.exists(os.path.join(netns_dir, name))


class TenantSupervisor:
    """
    Keeps the supervised tenant halves running.

    @ivar halves: by link name, in the order they were added.
    """

    _log = Logger()

    def __init__(
        self,
        config: SupervisionConfig,
        spawner: SpawnerChannel,
        clock: IReactorTime,
        namespace_exists: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.spawner = spawner
        self.clock = clock
        self.namespace_exists = namespace_exists
        self.halves: dict[str, SupervisedHalf] = {}
        self.spawner_pid: int | None = None
        self._poll = task.LoopingCall(self.check_namespaces)
        self._poll.clock = clock

    def start(self) -> None:
        """Start watching the namespaces."""
        self._poll.start(self.config.namespace_poll, now=False)

    # --- what the control half asks ------------------------------------------

    def peer_problem(self, link: str, peer: tuple[int, int, int] | None) -> str | None:
        """
        Whether a process connecting to C{link}'s socket may be its tenant
        half: for a supervised link, only the half this supervisor started.
        Halves share users and groups, so without this one half could take
        another link's session while that link's half is down.

        @param peer: the connecting process's (pid, uid, gid) from
            C{SO_PEERCRED}.
        @return: why it may not, or L{None}.
        """
        half = self.halves.get(link)
        if half is None:
            return None  # not supervised here: the socket's permissions decide
        if peer is None or half.pid is None or peer[0] != half.pid:
            pid = peer[0] if peer is not None else "unknown"
            return f"link {link!r} is supervised: only its tenant half (pid {half.pid}) may connect, not pid {pid}"
        return None

    def add(self, link: LinkConfig) -> None:
        """Supervise C{link}'s tenant half (the link has a C{tenant} table)."""
        if link.tenant is None:
            raise ValueError(f"link {link.name!r} has no tenant table")
        if link.name in self.halves:
            raise ValueError(f"link {link.name!r} is already supervised")
        half = SupervisedHalf(link, HalfState.WAITING_FOR_NAMESPACE)
        self.halves[link.name] = half
        if self.namespace_exists(half.namespace):
            self._start(half)
        else:
            self._log.info(
                "Tenant half {link}: waiting for network namespace {namespace}", link=link.name, namespace=half.namespace
            )

    def remove(self, name: str) -> defer.Deferred[None]:
        """
        Stop supervising C{name}: stop its half if it runs.

        @return: fires once the half has exited (at once if none ran).
        """
        half = self.halves.get(name)
        if half is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        half.waiters.append(done)
        self._stop(half, _REMOVED)
        return done

    def replace(self, link: LinkConfig) -> defer.Deferred[None]:
        """A supervised link's settings changed: stop its half and start the new one."""

        def restart(_: Any) -> None:
            if link.tenant is not None:
                self.add(link)

        return self.remove(link.name).addCallback(restart)

    def stop_all(self) -> defer.Deferred[Any]:
        """Stop every half; fires when all have exited."""
        if self._poll.running:
            self._poll.stop()
        return defer.gatherResults([self.remove(name) for name in list(self.halves)], consumeErrors=True)

    def sync(self, links: Iterable[LinkConfig]) -> list[defer.Deferred[None]]:
        """
        Supervise exactly the links with a C{tenant} table among C{links}
        (after a reload): new ones start, gone ones stop, ones whose tenant
        settings or socket changed restart.  (A change of routes needs no
        restart: the control half closes the session and the half
        reconnects.)

        @return: the stops in progress.
        """
        wanted = {link.name: link for link in links if link.tenant is not None}
        pending = []
        for name, half in list(self.halves.items()):
            if name not in wanted:
                pending.append(self.remove(name))
            elif (wanted[name].tenant, wanted[name].socket) != (half.link.tenant, half.link.socket):
                pending.append(self.replace(wanted[name]))
            else:
                half.link = wanted[name]
        for name, link in wanted.items():
            if name not in self.halves:
                self.add(link)
        return pending

    # --- what the spawner reports -------------------------------------------

    def event(self, event: Event) -> None:
        """An event from the spawner."""
        if isinstance(event, Ready):
            self.spawner_pid = event.pid
            return
        half = self.halves.get(event.link)
        if half is None:
            if isinstance(event, Started):
                # Not ours (any more): never leave a half running unsupervised.
                self.spawner.stop(event.link, self.config.stop_timeout)
            elif event.link or not isinstance(event, Refused):
                self._log.warn("Spawner event for an unsupervised link: {event!r}", event=event)
            else:
                self._log.error("The spawner refused a command: {reason}", reason=event.reason)
            return
        if isinstance(event, Started):
            self._started(half, event)
        elif isinstance(event, Exited):
            if event.pid != half.pid or half.state not in (HalfState.RUNNING, HalfState.STOPPING):
                self._log.warn("Tenant half {link}: stale exit report {event!r}", link=event.link, event=event)
                return
            self._exited(half, event.describe())
        else:
            self._refused(half, event.reason)

    def _started(self, half: SupervisedHalf, event: Started) -> None:
        half.pid = event.pid
        half.started_at = self.clock.seconds()
        if half.state is HalfState.STOPPING:
            # Asked to stop while it was starting: now there is a pid to stop.
            self.spawner.stop(half.link.name, self.config.stop_timeout)
            return
        half.state = HalfState.RUNNING
        self._log.info(
            "Tenant half {link}: running as pid {pid} in namespace {namespace}",
            link=half.link.name,
            pid=event.pid,
            namespace=half.namespace,
        )

    def _exited(self, half: SupervisedHalf, status: str) -> None:
        ran = None if half.started_at is None else self.clock.seconds() - half.started_at
        half.pid = None
        half.started_at = None
        half.last_exit = status
        if half.state is HalfState.STOPPING:
            half.last_reason = half.stop_reason
            self._stopped(half)
            return
        half.last_reason = "exited unexpectedly"
        self._log.warn(
            "Tenant half {link}: exited unexpectedly ({status})", link=half.link.name, status=status
        )
        if ran is not None and ran >= self.config.stable_after:
            half.failures_in_row = 0
        self._schedule_restart(half)

    def _refused(self, half: SupervisedHalf, reason: str) -> None:
        if half.state is HalfState.STOPPING:
            # It was not running after all (it exited as the stop crossed).
            self._stopped(half)
            return
        if half.state is not HalfState.STARTING:
            self._log.warn("Tenant half {link}: spawner refused: {reason}", link=half.link.name, reason=reason)
            return
        half.last_reason = f"start refused: {reason}"
        self._log.error("Tenant half {link}: cannot start: {reason}", link=half.link.name, reason=reason)
        self._schedule_restart(half)

    # --- decisions -----------------------------------------------------------

    def _start(self, half: SupervisedHalf) -> None:
        half.state = HalfState.STARTING
        half.stop_reason = None
        self.spawner.start(half.link)

    def _schedule_restart(self, half: SupervisedHalf) -> None:
        half.failures_in_row += 1
        delay = min(self.config.max_restart_delay, self.config.restart_delay * 2 ** (half.failures_in_row - 1))
        half.state = HalfState.RESTARTING
        half.restart_call = self.clock.callLater(delay, self._restart, half)
        self._log.info("Tenant half {link}: restart in {delay:.1f}s", link=half.link.name, delay=delay)

    def _restart(self, half: SupervisedHalf) -> None:
        half.restart_call = None
        if not self.namespace_exists(half.namespace):
            self._namespace_gone(half)
            return
        half.restarts += 1
        self._start(half)

    def _stop(self, half: SupervisedHalf, reason: str) -> None:
        if half.restart_call is not None:
            half.restart_call.cancel()
            half.restart_call = None
        if half.state is HalfState.STOPPING:
            if reason == _REMOVED:
                half.stop_reason = reason
            return
        half.stop_reason = reason
        if half.state in (HalfState.STARTING, HalfState.RUNNING):
            previous = half.state
            half.state = HalfState.STOPPING
            if previous is HalfState.RUNNING:
                self.spawner.stop(half.link.name, self.config.stop_timeout)
            return
        self._stopped(half)

    def _stopped(self, half: SupervisedHalf) -> None:
        if half.stop_reason == _NAMESPACE_GONE:
            self._namespace_gone(half)
            return
        del self.halves[half.link.name]
        self._log.info("Tenant half {link}: stopped", link=half.link.name)
        waiters, half.waiters = half.waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _namespace_gone(self, half: SupervisedHalf) -> None:
        half.state = HalfState.NAMESPACE_GONE
        half.last_reason = _NAMESPACE_GONE
        half.failures_in_row = 0
        self._log.warn(
            "Tenant half {link}: network namespace {namespace} is gone; half stopped",
            link=half.link.name,
            namespace=half.namespace,
        )

    def check_namespaces(self) -> None:
        """Follow namespaces that went or came back (run every C{namespace_poll} seconds)."""
        for half in list(self.halves.values()):
            present = self.namespace_exists(half.namespace)
            if present and half.state in (HalfState.WAITING_FOR_NAMESPACE, HalfState.NAMESPACE_GONE):
                self._log.info(
                    "Tenant half {link}: network namespace {namespace} is here", link=half.link.name, namespace=half.namespace
                )
                self._start(half)
            elif not present and half.state in (HalfState.STARTING, HalfState.RUNNING, HalfState.RESTARTING):
                self._stop(half, _NAMESPACE_GONE)

    # --- reporting -------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each half now, for C{/status} and C{msgmux status}."""
        now = self.clock.seconds()
        return [
            {
                "link": name,
                "namespace": half.namespace,
                "state": half.state.value,
                "pid": half.pid,
                "restarts": half.restarts,
                "uptime": None if half.started_at is None or half.state is not HalfState.RUNNING else round(now - half.started_at, 1),
                "last_exit": half.last_exit,
                "last_reason": half.last_reason,
            }
            for name, half in self.halves.items()
        ]
