"""
C{python -m lab.brokeradmin URL delete-exchange NAME}: delete an exchange,
as an operator does with C{rabbitmqadmin delete exchange} or the management
API, over AMQP (the lab's brokers run without the management plugin).
Started inside the tenant namespace for the tenant broker.  Exits 0 once
the broker confirmed the deletion.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import unquote, urlparse

from twisted.internet import defer, endpoints, task

from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol


async def delete_exchange(reactor: Any, url: str, name: str) -> None:
    parsed = urlparse(url)
    vhost = unquote(parsed.path[1:]) or "/"
    broker = BrokerProtocol(
        BrokerDelegate(), vhost, 0, reactor, parsed.username or "guest", parsed.password or "guest", "lab brokeradmin"
    )
    endpoint = endpoints.TCP4ClientEndpoint(reactor, parsed.hostname or "127.0.0.1", parsed.port or 5672)
    await endpoints.connectProtocol(endpoint, broker)
    await broker.login()
    channel = await broker.open_channel()
    await channel.txamqp_channel.exchange_delete(exchange=name, if_unused=False)
    await channel.close()
    broker.transport.loseConnection()


def main() -> None:
    url, command, name = sys.argv[1:4]
    if command != "delete-exchange":
        raise SystemExit(f"unknown command {command!r}")
    task.react(lambda reactor: defer.Deferred.fromCoroutine(delete_exchange(reactor, url, name)))


if __name__ == "__main__":
    main()
