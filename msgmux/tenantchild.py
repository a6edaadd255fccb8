# -*- test-case-name: tests.integration.test_lifecycle -*-
"""
The first moments of a supervised tenant half, in the child the spawner
forked.

In this order, because each step needs the privileges the next one drops:
leave the spawner's session and signal handling, close every descriptor but
standard input, output and error (the child must not hold the spawner's
command socket), enter the link's network namespace (C{setns}, which needs
root), lower its scheduling priority (L{NICENESS}: the control half, which
every link shares, wins the CPU over any one tenant half, which cannot
raise its priority back), take the link's user and only its group, and
forbid ever gaining privileges again.  Then install a fresh reactor and run the tenant half
until SIGTERM, which drains it as C{twistd} would.

Linux only: C{setns} and C{prctl} come from the C library through
L{ctypes}, since Python 3.11's L{os} has neither.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, TextIO

from msgmux.config import TenantConfig

__all__ = ["NICENESS", "become_tenant_half", "run_tenant_half"]

#: How much nicer than the spawner a supervised tenant half runs: a
#: compromised half that spins costs the others, and the control half
#: above all, less of the CPU.
NICENESS = 5

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_NO_NEW_PRIVS = 38

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_namespace(path: str) -> None:
    """
    Move this process into the network namespace bound at C{path} (the
    C{ip netns} file C{/run/netns/NAME}).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_c().setns(fd, _CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def drop_privileges(uid: int, gid: int) -> None:
    """
    Become C{uid} with C{gid} as the only group, for good.

    @raise OSError: when any step fails, or root could be regained.
    """
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getegid() != gid or os.getgroups():
        raise OSError(f"credentials did not change to {uid}:{gid}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise OSError("root could be regained after dropping privileges")
    _check(_c().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def become_tenant_half(link: str, namespace_path: str, uid: int, gid: int, spawner_pid: int) -> None:
    """
    Everything between C{fork} and the reactor.  Raises on any failure; the
    caller then exits the child.
    """
    os.setsid()
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(number, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    enter_namespace(namespace_path)
    os.nice(NICENESS)
    drop_privileges(uid, gid)
    # Changing credentials clears the parent-death signal, so set it now;
    # if the spawner died meanwhile, nobody would ever stop this half.
    _check(_c().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != spawner_pid:
        raise OSError("the spawner exited while this tenant half started")
    _c().prctl(_PR_SET_NAME, ctypes.c_char_p(f"msgmux-t {link}".encode()[:15]), 0, 0, 0)
    os.umask(0o077)
    os.chdir("/")


class _PrefixedLog:
    """Text log lines on standard error, each naming the link and pid."""

    def __init__(self, link: str, out: TextIO) -> None:
        self.prefix = f"msgmux tenant half {link} [{os.getpid()}]: "
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        try:
            self.out.write(self.prefix + text.replace("\n", "\n\t") + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass


def run_tenant_half(config: TenantConfig) -> int:
    """
    Run one tenant half on a reactor of its own until SIGTERM.

    @return: the exit status.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer
    from twisted.internet import reactor as installed
    from twisted.logger import globalLogBeginner

    from msgmux.service import TenantHalf

    reactor: Any = installed
    globalLogBeginner.beginLoggingTo([_PrefixedLog(config.link or "?", sys.stderr)], redirectStandardIO=False)
    half = TenantHalf(config, reactor)
    reactor.callWhenRunning(half.start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(half.stop()))
    reactor.run()
    return 0
