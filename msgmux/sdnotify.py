# -*- test-case-name: tests.test_sdnotify -*-
"""
systemd readiness and watchdog (C{Type=notify}, C{WatchdogSec=}).

systemd passes C{NOTIFY_SOCKET}, a datagram socket, to the services it
starts with C{Type=notify}.  msgmux sends C{READY=1} once it really serves:
its link sockets are bound and its brokers are logged in.  With
C{WatchdogSec=}, systemd also passes C{WATCHDOG_USEC} and expects
C{WATCHDOG=1} at least that often; msgmux sends it every half interval from
the reactor, so a wedged reactor gets the service restarted.  C{STOPPING=1}
marks a clean stop.  The protocol is documented in sd_notify(3); it is a
few lines, so it is written here rather than taken from a C binding.

The variables are read once, when the service starts, and removed from the
environment, so that no child process (the spawner, its tenant halves)
could ever speak for this service.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["Notifier"]


class Notifier:
    """
    Talks to systemd's notification socket, if there is one.

    @ivar address: the socket address, or L{None} when not run by systemd
        with C{Type=notify} (then every call does nothing).
    @ivar watchdog_interval: seconds between watchdog pings, or L{None}.
    """

    _log = Logger()

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._watchdog: task.LoopingCall | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """
        Read and forget systemd's variables.

        @param environ: the environment (L{os.environ} by default; its
            variables are removed from it).
        @param pid: this process's pid; C{WATCHDOG_PID}, when set, must
            name it.
        """
        env: Any = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec_text = env.get("WATCHDOG_USEC")
        watchdog_pid = env.get("WATCHDOG_PID")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if hasattr(env, "pop"):
                env.pop(name, None)
        usec = None
        if usec_text and usec_text.isdigit() and int(usec_text) > 0:
            if watchdog_pid is None or watchdog_pid == str(pid if pid is not None else os.getpid()):
                usec = int(usec_text)
        return cls(address, usec)

    def notify(self, *fields: str) -> bool:
        """
        Send C{fields} (C{"READY=1"}, C{"STATUS=..."}) as one message.

        @return: whether it was sent.
        """
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        message = "\n".join(fields)
        try:
            # Never wait: a datagram socket whose reader is slow has a short
            # queue, and a full one would block the reactor.  A dropped
            # watchdog ping is followed by the next.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto(message.encode(), address)
        except OSError as e:
            if not self._failing:  # once per run of failures, not per watchdog ping
                self._log.warn("Cannot notify systemd at {address}: {error}", address=self.address, error=str(e))
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str) -> None:
        """Tell systemd the service is up."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def start_watchdog(self, clock: IReactorTime) -> None:
        """Ping the watchdog every half interval, from the reactor."""
        if self.address is None or self.watchdog_interval is None or self._watchdog is not None:
            return
        self._watchdog = task.LoopingCall(self.notify, "WATCHDOG=1")
        self._watchdog.clock = clock
        self._watchdog.start(self.watchdog_interval, now=True)

    def stopping(self) -> None:
        """Tell systemd the service is stopping, and stop the watchdog pings."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self.notify("STOPPING=1")
