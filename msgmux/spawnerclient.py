# -*- test-case-name: tests.test_spawnerclient -*-
"""
The control half's end of the spawner.

L{SpawnerProcess.start} runs C{python -m msgmux.spawner} as a fresh
interpreter, with one end of a socket pair as its descriptor 3 and nothing
else of ours: no other descriptor (Twisted closes every descriptor not
listed), and an environment of C{PATH} and C{PYTHONPATH} only.  It must be
called while the control half is still root, from C{privilegedStartService}.
The spawner's events go to a listener (the L{msgmux.supervisor}); commands
go out through L{SpawnerProcess.start_half} and L{SpawnerProcess.stop_half}.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from msgmux.config import LinkConfig, SupervisionConfig
from msgmux.spawnproto import MAX_LINE, Event, ProtocolError, Ready, Start, Stop, decode_event, encode

__all__ = ["SpawnerProcess"]


class _Channel(LineOnlyReceiver):
    """Lines from the spawner, decoded into events."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    _log = Logger()

    def __init__(self, owner: SpawnerProcess) -> None:
        self.owner = owner

    def lineReceived(self, line: bytes) -> None:
        try:
            event = decode_event(line)
        except ProtocolError as e:
            self._log.error("Spawner sent a malformed event: {error}", error=str(e))
            return
        self.owner.received(event)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._log.error("Spawner sent a line longer than {limit} bytes; closing", limit=MAX_LINE)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.owner.channel_lost()


class _Watcher(ProcessProtocol):
    def __init__(self, owner: SpawnerProcess) -> None:
        self.owner = owner

    def processEnded(self, reason: Failure) -> None:
        self.owner.process_ended(getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))


class SpawnerProcess:
    """
    The privileged spawner, seen from the control half.

    @ivar ready: fires with the spawner's pid once it takes commands.
    @ivar ended: fires when the spawner process has exited.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        supervision: SupervisionConfig,
        listener: Callable[[Event], None],
        on_lost: Callable[[], None],
        python: str = sys.executable,
    ) -> None:
        """
        @param listener: gets every event.
        @param on_lost: called when the spawner goes away while it was
            wanted (it cannot be restarted without root).
        """
        self.reactor = reactor
        self.supervision = supervision
        self.listener = listener
        self.on_lost = on_lost
        self.python = python
        self.ready: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._channel: _Channel | None = None
        self._stopping = False
        self._lost_reported = False

    def start(self) -> None:
        """Run the spawner (as root: call from C{privilegedStartService})."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            environment = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
            if os.environ.get("PYTHONPATH"):
                environment["PYTHONPATH"] = os.environ["PYTHONPATH"]
            argv = [self.python, "-m", "msgmux.spawner", "--fd", "3"] + self.supervision.to_arguments()
            self.reactor.spawnProcess(
                _Watcher(self), self.python, argv, env=environment, path="/", childFDs={0: null, 1: 1, 2: 2, 3: theirs.fileno()}
            )
            self._channel = _Channel(self)
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _OneProtocol(self._channel))
        finally:
            os.close(null)
            theirs.close()
            ours.close()
        self._log.info("Started the tenant half spawner")

    def received(self, event: Event) -> None:
        if isinstance(event, Ready) and not self.ready.called:
            self._log.info("Tenant half spawner ready (pid {pid})", pid=event.pid)
            self.ready.callback(event.pid)
        self.listener(event)

    def start_half(self, link: LinkConfig) -> None:
        """Ask for C{link}'s tenant half."""
        assert link.tenant is not None
        self._send(encode(Start(link.name, link.socket, link.tenant.table)))

    def stop_half(self, link: str, timeout: float) -> None:
        """Ask for C{link}'s tenant half to stop."""
        self._send(encode(Stop(link, timeout)))

    def _send(self, line: bytes) -> None:
        if self._channel is None or self._channel.transport is None:
            self._log.error("Tenant half spawner is gone; command dropped")
            return
        self._channel.transport.write(line)

    def stop(self) -> defer.Deferred[None]:
        """
        Close the command socket: the spawner stops every half it still runs
        and exits.

        @return: fires when it has exited.
        """
        self._stopping = True
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.loseConnection()
        return self.ended

    def channel_lost(self) -> None:
        self._channel = None
        self._lost()

    def process_ended(self, code: int | None, signal: int | None) -> None:
        if not self._stopping:
            self._log.critical(
                "The tenant half spawner exited unexpectedly (code {code}, signal {signal})", code=code, signal=signal
            )
        if not self.ended.called:
            self.ended.callback(None)
        self._lost()

    def _lost(self) -> None:
        if not self._stopping and not self._lost_reported:
            self._lost_reported = True
            self.on_lost()


class _OneProtocol(Factory):
    def __init__(self, protocol: _Channel) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> _Channel:
        return self.protocol_instance


class SupervisorChannel:
    """Adapts L{SpawnerProcess} to L{msgmux.supervisor.SpawnerChannel}."""

    def __init__(self, process: SpawnerProcess) -> None:
        self.process = process

    def start(self, link: LinkConfig) -> None:
        self.process.start_half(link)

    def stop(self, link: str, timeout: float) -> None:
        self.process.stop_half(link, timeout)
