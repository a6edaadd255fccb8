# -*- test-case-name: tests.test_writethrough -*-
"""
Send a message now rather than on the reactor's next turn.

Twisted's stream transports buffer every C{write} and send it only when the
reactor next finds the socket writable (twisted/twisted#5303): one more
trip through the event loop for every message a relay forwards.  A call
through msgmux crosses four such writes, so on the relay's latency path
that turn is a good part of what msgmux adds.

A L{Writer} tells two kinds of writes apart:

 - I{urgent} ones (a message being relayed) go out at once when the
   connection has been quiet for a moment, together with whatever lazy
   writes are waiting; while urgent writes follow each other closely, as
   under load, they are left to Twisted, which sends each turn's writes in
   one system call and one wakeup of the peer;
 - I{lazy} ones (acknowledgements, credit, heartbeats) always wait for the
   next turn or for the next urgent write, whichever comes first.

Whatever the kernel does not take at once stays in the transport's own
buffer, so ordering, flow control (producers) and error handling remain
Twisted's.  The fast path uses attributes of
L{twisted.internet.abstract.FileDescriptor} and checks for them; any other
transport (test doubles, another reactor's transports) is written the
ordinary way.

TLS (L{twisted.protocols.tls}) adds a turn of its own: it collects small
writes until the next turn before encrypting them.  An urgent write on a
quiet TLS connection therefore flushes that collection (the same flush
C{loseConnection} does), so the encrypted bytes reach the TCP transport at
once and go out as above; under load, writes are left to Twisted, which
encrypts a whole turn's writes in one record.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol

from msgmux._private_apis import flush_tls_writes

__all__ = ["Writer"]

#: Seconds since the previous urgent write below which a connection counts
#: as busy (its writes are left to Twisted to batch).
BUSY = 0.001


def _socket_if_idle(transport: Any) -> socket.socket | None:
    """
    @return: the socket to send on directly, or L{None} when C{transport}
        has data queued, is closing, or is not a plain socket transport.
    """
    if not isinstance(transport, tcp.Connection):
        return None
    try:
        if (
            transport._tempDataBuffer
            or transport.offset != len(transport.dataBuffer)
            or not transport.connected
            or transport.disconnecting
            or transport._writeDisconnected
            or getattr(transport, "_sendmsgQueue", None)
        ):
            return None
        sock: socket.socket = transport.socket
    except AttributeError:  # a Twisted whose FileDescriptor looks otherwise
        return None
    return sock


def _flush_tls(transport: Any) -> Any:
    """
    Encrypt what a TLS transport collected for the next turn now.

    @return: the TCP transport under C{transport}, or C{transport} itself
        when it is not TLS.
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    flush_tls_writes(transport)
    return transport.transport


def _send_now(transport: Any, parts: Sequence[bytes]) -> None:
    """Write C{parts} after anything queued, and send it all right away."""
    sock = _socket_if_idle(transport)
    if sock is None:
        transport.writeSequence(parts)
        transport = _flush_tls(transport)
        if isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting:
            # What the reactor would do on the next turn, now.  An error is
            # left for the reactor to meet: the transport stays registered
            # for writing until its buffer is empty.
            transport.doWrite()
        return
    try:
        sent = sock.sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Including too many pieces for one sendmsg: the transport's own
        # path sends them, or meets the error and closes as it always does.
        transport.writeSequence(parts)
        return
    for index, part in enumerate(parts):
        if sent >= len(part):
            sent -= len(part)
            continue
        transport.writeSequence([part[sent:] if sent else part, *parts[index + 1 :]])
        return


class Writer:
    """
    The writes of one connection: urgent ones through to the socket while
    it is quiet, lazy ones batched.
    """

    __slots__ = ("_clock", "_last")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._last = float("-inf")

    def urgent(self, transport: Any, parts: Sequence[bytes]) -> None:
        """Write C{parts}, a message someone waits for."""
        now = self._clock.seconds()
        quiet = now - self._last >= BUSY
        self._last = now
        if quiet:
            _send_now(transport, parts)
        else:
            transport.writeSequence(parts)

    def lazy(self, transport: Any, parts: Sequence[bytes]) -> None:
        """Write C{parts}, which can wait for the next turn or urgent write."""
        transport.writeSequence(parts)
