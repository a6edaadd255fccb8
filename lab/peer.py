"""
Twisted-side handle on an L{lab.oslo_peer} process.

Each request is one JSON line; the answer comes back as a Deferred.  Errors
raised by oslo.messaging in the peer come back as L{PeerFailure} carrying
the exception's class name, so tests can assert "the caller got
MessagingTimeout" exactly as they would in-process.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeerFailure(Exception):
    """The peer reported an exception."""

    def __init__(self, error: str, message: str, kwargs: Any = None) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message
        self.kwargs = kwargs


class OsloPeer(ProcessProtocol):
    """
    @ivar ready: fires once the peer's transports are set up.
    @ivar ended: fires when the process exits.
    """

    def __init__(self, label: str, log_path: str) -> None:
        self.label = label
        self.ready: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffer = b""
        self._pending: dict[int, defer.Deferred[Any]] = {}
        self._ids = itertools.count(1)
        self._log = open(log_path, "ab")

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            answer = json.loads(line)
            if answer.get("id") is None:
                if not self.ready.called:
                    self.ready.callback(answer)
                continue
            waiting = self._pending.pop(answer["id"], None)
            if waiting is None:
                continue
            if answer["ok"]:
                waiting.callback(answer["result"])
            else:
                waiting.errback(PeerFailure(answer["error"], answer["message"], answer.get("kwargs")))

    def errReceived(self, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()

    def processEnded(self, reason: Failure) -> None:
        self._log.close()
        pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.errback(PeerFailure("PeerExited", f"{self.label} exited: {reason.getErrorMessage()}"))
        if not self.ready.called:
            self.ready.errback(PeerFailure("PeerExited", f"{self.label} exited before it was ready"))
        self.ended.callback(None)

    def request(self, op: str, **arguments: Any) -> defer.Deferred[Any]:
        """Send one command; the Deferred fires with its result."""
        request = next(self._ids)
        waiting: defer.Deferred[Any] = defer.Deferred()
        self._pending[request] = waiting
        self.transport.write(json.dumps({"id": request, "op": op, **arguments}).encode() + b"\n")
        return waiting

    def quit(self) -> defer.Deferred[None]:
        """Stop everything in the peer and wait for it to exit."""
        if self.ended.called:
            return defer.succeed(None)
        self.request("quit").addErrback(lambda f: None)
        return self.ended


def spawn_peer(
    reactor: Any,
    url: str,
    log_path: str,
    label: str,
    namespace: str | None = None,
    exchange: str = "openstack",
    rabbit_options: dict[str, Any] | None = None,
) -> OsloPeer:
    """
    Start an oslo peer on the broker at C{url}, inside C{namespace} if given.

    @return: its handle; wait on C{ready} before sending requests.
    """
    peer = OsloPeer(label, log_path)
    argv = [sys.executable, "-m", "lab.oslo_peer", url, exchange]
    if namespace:
        argv = ["ip", "netns", "exec", namespace] + argv
    environment = dict(os.environ)
    environment["PYTHONPATH"] = REPO + os.pathsep + environment.get("PYTHONPATH", "")
    environment["LAB_OSLO_RABBIT"] = json.dumps(rabbit_options or {})
    reactor.spawnProcess(peer, argv[0], argv, env=environment, path=REPO)
    return peer
