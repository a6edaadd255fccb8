# -*- test-case-name: tests.integration.test_rpc -*-
"""
Reply queues that exist whether or not a link session is up.

Every call msgmux relays names the link's own reply queue,
C{reply_msgmux_<link>}, on the broker of the server that answers.  The
relay of a session declares it, but a session may be down (the other half
restarting, the socket cut) while the broker restarts and forgets it.  oslo's
server then retries its reply for 60 seconds and afterwards drops every
reply to that queue for another minute (C{ObsoleteReplyQueuesCache}), so one
broker restart at the wrong moment would cost a link all its replies for a
while.  L{ReplyQueueDeclarer} declares the reply queues of its half's links
each time the broker connection comes up, independently of the sessions.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.declared import declare_queue
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.oslo.topology import OsloTopology
from msgmux.routing import reply_queue_name

__all__ = ["ReplyQueueDeclarer"]


class ReplyQueueDeclarer:
    """
    A broker observer that declares the reply queues of some links on every
    new connection.

    @ivar links: returns the names of the links whose queues to keep (read
        at each connection, so links added by a reload are included).
    """

    _log = Logger()

    def __init__(self, broker: BrokerService, topology: OsloTopology, links: Callable[[], list[str]]) -> None:
        self.broker = broker
        self.topology = topology
        self.links = links

    def start(self) -> None:
        self.broker.add_observer(self)

    def stop(self) -> None:
        self.broker.remove_observer(self)

    def broker_connected(self, protocol: BrokerProtocol) -> None:
        defer.Deferred.fromCoroutine(self._declare(protocol)).addErrback(self._failed)

    def broker_lost(self, reason: Failure) -> None:
        pass

    async def _declare(self, protocol: BrokerProtocol) -> None:
        names = self.links()
        if not names:
            return
        channel = await protocol.open_channel()
        try:
            for name in names:
                await declare_queue(channel, self.topology.reply_queue(reply_queue_name(name)))
        finally:
            await channel.close()

    def _failed(self, failure: Failure) -> None:
        # The session's own declarations report mismatches in detail; this
        # is the fallback, so a warning is enough.
        self._log.warn(
            "Could not declare the reply queues on the {broker} broker: {error}",
            broker=self.broker.name,
            error=failure.getErrorMessage(),
        )
