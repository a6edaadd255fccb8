# -*- test-case-name: tests.test_declared,tests.integration.test_rpc -*-
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
each time the broker connection comes up, independently of the sessions,
and moves a reply queue whose arguments changed (L{msgmux.amqp.migrate}):
until it is moved, servers still reach the old one, so nothing waits for a
session to start.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel
from msgmux.amqp.migrate import MoveNeeded, mover_for
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.oslo.topology import OsloTopology
from msgmux.routing import reply_queue

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
        mover = mover_for(self.broker)
        channel: Channel | None = None
        try:
            for name in names:
                queue = reply_queue(name, self.topology)
                if channel is None:
                    channel = await protocol.open_channel()
                try:
                    try:
                        await mover.declare(channel, queue)
                    except MoveNeeded as needed:
                        await channel.close_after_failure()  # gone already, unless a move of it runs here
                        await mover.move(protocol, needed)
                        channel = await protocol.open_channel()
                        await mover.declare(channel, queue)
                except Exception as e:
                    # One link's queue must not keep the others undeclared;
                    # the session's channel retries it and reports in detail.
                    self._failed(Failure(e), queue.name)
                    await channel.close_after_failure()
                    channel = None
        finally:
            if channel is not None:
                await channel.close_after_failure()

    def _failed(self, failure: Failure, queue: str = "") -> None:
        self._log.warn(
            "Could not declare the reply queue {queue} on the {broker} broker: {error}",
            queue=queue or "(all)",
            broker=self.broker.name,
            error=failure.getErrorMessage(),
        )
