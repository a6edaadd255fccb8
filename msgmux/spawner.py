# -*- test-case-name: tests.test_spawner -*-
"""
The privileged spawner of supervised tenant halves:
C{python -m msgmux.spawner --fd N --user U... --group G...}.

The control half starts it as a fresh interpreter while it is still root
(before C{twistd --uid/--gid} drop its privileges), so the spawner holds
nothing of the control side: no configuration, no broker credentials, no
reply key.  Its only input is the socket at descriptor C{N}, over which the
control half may ask for two things (L{msgmux.spawnproto}): start the tenant
half of link X, stop it.  Each request is checked again here with the
configuration's own rules, against the users and groups given on the
command line; the namespace must exist.  This is the privsep pattern of
oslo.privsep, with a command set of two.

Before taking commands it imports everything a tenant half runs, parses the
AMQP spec once and freezes the garbage collector's view of those objects, so
the halves it forks share that memory copy-on-write instead of each
importing Twisted and txAMQP again (see L{msgmux.tenantchild} for what a
child does between C{fork} and its reactor).

It runs no reactor (a forked child must install a fresh one): a small
blocking loop waits on the command socket and on SIGCHLD, and escalates
SIGTERM to SIGKILL for halves that do not stop in time.  When the control
half goes away (end of file on the socket) or the spawner gets SIGTERM, it
stops every half and exits.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
from typing import Callable

import attrs

from msgmux._toml import ConfigError
from msgmux.config import TenantConfig, supervised_tenant
from msgmux.spawnproto import (
    MAX_LINE,
    Exited,
    ProtocolError,
    Ready,
    Refused,
    Start,
    Started,
    Stop,
    decode_command,
    encode,
)
from msgmux.tenantspec import SupervisionConfig, TenantSpec, resolve_account

__all__ = ["Spawner", "main"]

#: Where C{ip netns} keeps its namespaces.
NETNS_DIR = "/run/netns"
#: Halves one spawner runs at most: a bound on what a misbehaving control
#: half can make the privileged side fork.
MAX_HALVES = 2000


@attrs.define
class _Child:
    link: str
    pid: int
    kill_at: float | None = None


Fork = Callable[[TenantSpec, TenantConfig, str, int, int], int]


class Spawner:
    """
    The spawner's decisions, without its I/O: which commands to obey, which
    children to signal, what to report.

    @ivar children: running halves by link name.
    """

    def __init__(
        self,
        supervision: SupervisionConfig,
        send: Callable[[bytes], None],
        fork: Fork,
        kill: Callable[[int, int], None],
        now: Callable[[], float],
        netns_dir: str = NETNS_DIR,
        max_halves: int = MAX_HALVES,
    ) -> None:
        """
        @param supervision: the users and groups halves may run as.
        @param send: writes a line to the control half.
        @param fork: starts a half (spec, config, namespace path, uid, gid)
            and returns its pid.
        @param kill: L{os.kill}.
        @param now: a monotonic clock.
        """
        self.supervision = supervision
        self._send = send
        self._fork = fork
        self._kill = kill
        self._now = now
        self.netns_dir = netns_dir
        self.max_halves = max_halves
        self.children: dict[str, _Child] = {}
        self._by_pid: dict[int, _Child] = {}

    def received(self, line: bytes) -> None:
        """One line from the control half."""
        try:
            command = decode_command(line)
        except ProtocolError as e:
            self._send(encode(Refused("", f"malformed command: {e}")))
            return
        try:
            if isinstance(command, Start):
                self._start(command)
            else:
                self._stop(command)
        except Exception as e:  # the privileged side must outlive any request
            traceback.print_exc(file=sys.stderr)
            self._send(encode(Refused(command.link, f"internal error: {type(e).__name__}")))

    def _start(self, command: Start) -> None:
        link = command.link
        try:
            spec, config = supervised_tenant(link, command.socket, command.tenant, self.supervision, "spawner")
            uid, gid = resolve_account(spec.user, spec.group)
        except (ConfigError, ValueError) as e:
            self._send(encode(Refused(link, str(e))))
            return
        if link in self.children:
            self._send(encode(Refused(link, f"its tenant half already runs as pid {self.children[link].pid}")))
            return
        if len(self.children) >= self.max_halves:
            self._send(encode(Refused(link, f"this spawner already runs {self.max_halves} tenant halves")))
            return
        path = os.path.join(self.netns_dir, spec.namespace)
        if not os.path.exists(path):
            self._send(encode(Refused(link, f"no network namespace {spec.namespace!r}")))
            return
        try:
            pid = self._fork(spec, config, path, uid, gid)
        except OSError as e:
            self._send(encode(Refused(link, f"fork failed: {e}")))
            return
        child = _Child(link, pid)
        self.children[link] = child
        self._by_pid[pid] = child
        self._send(encode(Started(link, pid)))

    def _stop(self, command: Stop) -> None:
        child = self.children.get(command.link)
        if child is None:
            self._send(encode(Refused(command.link, "no tenant half runs for this link")))
            return
        self._terminate(child, command.timeout)

    def _terminate(self, child: _Child, timeout: float) -> None:
        if child.kill_at is None:
            child.kill_at = self._now() + timeout
            self._signal(child, 15)

    def _signal(self, child: _Child, number: int) -> None:
        try:
            self._kill(child.pid, number)
        except ProcessLookupError:
            pass  # already exited; the wait reports it

    def reaped(self, pid: int, status: int) -> None:
        """A child ended (C{status} as from L{os.waitpid})."""
        child = self._by_pid.pop(pid, None)
        if child is None:
            return
        del self.children[child.link]
        code = os.waitstatus_to_exitcode(status)
        exited = Exited(child.link, pid, None, -code) if code < 0 else Exited(child.link, pid, code, None)
        self._send(encode(exited))

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every half, SIGKILL after C{timeout}."""
        for child in list(self.children.values()):
            self._terminate(child, timeout)

    def tick(self) -> float | None:
        """
        SIGKILL halves past their stop deadline.

        @return: seconds until the next deadline, or L{None}.
        """
        now = self._now()
        upcoming = None
        for child in self.children.values():
            if child.kill_at is None:
                continue
            if child.kill_at <= now:
                self._signal(child, 9)
                child.kill_at = now + 3600  # signalled; wait for the reap
            else:
                upcoming = child.kill_at - now if upcoming is None else min(upcoming, child.kill_at - now)
        return upcoming


def _preload() -> None:
    """
    Import and build what every tenant half uses, then freeze it, so that
    forked halves share it.
    """
    import gc

    import twisted.internet.epollreactor  # noqa: F401

    import msgmux.service  # noqa: F401
    import msgmux.tenantchild  # noqa: F401
    from msgmux.amqp.protocol import load_spec

    load_spec()
    # A half resolves and encodes a host name or two: load the codecs now.
    "localhost".encode("idna")
    gc.collect()
    gc.freeze()


def _fork_half(spec: TenantSpec, config: TenantConfig, namespace_path: str, uid: int, gid: int) -> int:
    spawner = os.getpid()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    status = 70
    try:
        from msgmux.tenantchild import become_tenant_half, run_tenant_half

        become_tenant_half(config.link or "?", namespace_path, uid, gid, spawner)
        status = run_tenant_half(config)
    except BaseException as e:  # the child must never return into the spawner's loop
        try:
            print(f"msgmux tenant half {config.link}: cannot start: {e}", file=sys.stderr, flush=True)
        except BaseException:
            pass
    os._exit(status)


def _run(fd: int, supervision: SupervisionConfig) -> int:
    import selectors
    import signal
    import socket

    channel = socket.socket(fileno=fd)
    channel.set_inheritable(False)
    wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stopping = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.set_wakeup_fd(wakeup_write)

    def send(line: bytes) -> None:
        if channel.fileno() >= 0:
            try:
                channel.sendall(line)
            except OSError:
                stopping.append(True)

    spawner = Spawner(supervision, send, _fork_half, os.kill, time.monotonic)
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    selector.register(wakeup_read, selectors.EVENT_READ)
    send(encode(Ready(os.getpid())))
    buffer = b""
    discarding = False
    while not stopping or spawner.children:
        if stopping and channel.fileno() >= 0:
            selector.unregister(channel)
            spawner.stop_all(supervision.stop_timeout)
            channel.close()
        for key, _ in selector.select(spawner.tick()):
            if key.fileobj is channel:
                data = b""
                try:
                    data = channel.recv(65536)
                except InterruptedError:
                    continue
                except OSError:
                    pass
                if not data:
                    stopping.append(True)
                    continue
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if discarding:
                        discarding = False
                    else:
                        spawner.received(line)
                if len(buffer) > MAX_LINE:
                    buffer, discarding = b"", True
                    send(encode(Refused("", f"command longer than {MAX_LINE} bytes")))
            else:
                try:
                    while os.read(wakeup_read, 512):
                        pass
                except BlockingIOError:
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            spawner.reaped(pid, status)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msgmux.spawner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the command socket's descriptor")
    parser.add_argument("--user", action="append", default=[], help="a user tenant halves may run as")
    parser.add_argument("--group", action="append", default=[], help="a group tenant halves may run as")
    parser.add_argument(
        "--stop-timeout", type=float, default=10.0, help="seconds halves get after SIGTERM when the control half goes away"
    )
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("msgmux spawner: must run as root (it enters namespaces and changes users)", file=sys.stderr)
        return 1
    if not arguments.user or not arguments.group:
        print("msgmux spawner: needs at least one --user and one --group", file=sys.stderr)
        return 1
    if not 0 < arguments.stop_timeout <= 600:
        print("msgmux spawner: --stop-timeout must be greater than 0 and at most 600", file=sys.stderr)
        return 1
    supervision = SupervisionConfig(users=tuple(arguments.user), groups=tuple(arguments.group), stop_timeout=arguments.stop_timeout)
    # A session of its own: a terminal's ^C reaches the control half, which
    # stops the halves in order, and not every half at once.
    try:
        os.setsid()
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
    _preload()
    return _run(arguments.fd, supervision)


if __name__ == "__main__":
    sys.exit(main())
