"""
C{python -m lab.bench_moves}: what moving msgmux's own queues costs, on the
machine's RabbitMQ (a vhost of its own, removed afterwards).

 - how long a move takes with N messages waiting (classic to classic, as a
   TTL change does; classic to quorum, as the quorum move does);
 - what checking for an unfinished move adds to each declaration of an own
   queue (the holding queue's delete if-empty), against a declaration alone;
 - how many replies a publisher sees returned while the reply queue is
   replaced under load (the window in which the name does not exist).

Prints a table; takes about a minute.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import defer, endpoints, task, threads

from lab.rabbit import SystemBroker
from msgmux.amqp.channel import Channel, PublishReturned
from msgmux.amqp.migrate import MoveNeeded, QueueMover, declare_queue
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol
from msgmux.oslo.topology import QueueSpec

VHOST = "msgmux-bench-moves"
BODY = b"x" * 1024


def spec(name: str, quorum: bool, ttl: int) -> QueueSpec:
    arguments: dict[str, Any] = {"x-expires": ttl}
    if quorum:
        arguments["x-queue-type"] = "quorum"
    return QueueSpec(name, quorum, False, tuple(sorted(arguments.items())), owned=True)


async def connect(reactor: Any) -> BrokerProtocol:
    broker = BrokerProtocol(BrokerDelegate(), VHOST, 0, reactor, "guest", "guest", "msgmux bench moves")
    await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", 5672), broker)
    await broker.login()
    return broker


async def fill(channel: Channel, queue: str, count: int) -> None:
    for start in range(0, count, 1000):
        await defer.gatherResults(
            [channel.publish("", queue, {"delivery_mode": 2}, BODY) for _ in range(min(1000, count - start))]
        )


async def needed(broker: BrokerProtocol, mover: QueueMover, new: QueueSpec) -> MoveNeeded:
    channel = await broker.open_channel()
    try:
        await mover.declare(channel, new)
    except MoveNeeded as e:
        return e
    raise RuntimeError("the declaration did not need a move")


async def timed_move(broker: BrokerProtocol, name: str, count: int, to_quorum: bool) -> tuple[float, int]:
    channel = await broker.open_channel()
    await channel.select_confirms()
    await declare_queue(channel, spec(name, False, 1800000))
    await fill(channel, name, count)
    await channel.close()
    mover = QueueMover("bench")
    move = await needed(broker, mover, spec(name, to_quorum, 3600000))
    started = time.perf_counter()
    await mover.move(broker, move)
    return time.perf_counter() - started, mover.messages.get(name, 0)


async def check_cost(broker: BrokerProtocol, rounds: int) -> tuple[float, float]:
    """Microseconds per declaration of an own queue, alone and with the holding queue check."""
    channel = await broker.open_channel()
    queue = spec("bench.check", False, 1800000)
    mover = QueueMover("bench")
    started = time.perf_counter()
    for _ in range(rounds):
        await declare_queue(channel, queue)
    alone = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        await mover.declare(channel, queue)
    checked = (time.perf_counter() - started) / rounds
    await channel.close()
    return alone * 1e6, checked * 1e6


async def returned_during_move(reactor: Any, broker: BrokerProtocol, rate: int) -> tuple[int, int, float]:
    """A publisher sends mandatory replies at C{rate}/s to the reply queue while it is moved."""
    name = "reply_msgmux_bench"
    channel = await broker.open_channel()
    await channel.select_confirms()
    await declare_queue(channel, spec(name, False, 1800000))
    outcomes: list[defer.Deferred[None]] = []
    returned: list[int] = []

    def publish() -> None:
        sent = channel.publish("", name, {}, b"reply", mandatory=True)
        sent.addErrback(lambda failure: returned.append(1) if failure.check(PublishReturned) else failure)
        outcomes.append(sent)

    loop = task.LoopingCall(publish)
    loop.start(1.0 / rate)
    await task.deferLater(reactor, 0.5)
    mover = QueueMover("bench")
    move = await needed(broker, mover, spec(name, True, 3600000))
    started = time.perf_counter()
    await mover.move(broker, move)
    elapsed = time.perf_counter() - started
    await task.deferLater(reactor, 0.5)
    loop.stop()
    await defer.DeferredList(outcomes, consumeErrors=True)
    return len(outcomes), len(returned), elapsed


async def main(reactor: Any, count: int) -> None:
    rabbit = SystemBroker()
    await threads.deferToThread(rabbit.delete_vhost, VHOST)
    await threads.deferToThread(rabbit.add_vhost, VHOST)
    try:
        broker = await connect(reactor)
        rows = []
        for to_quorum in (False, True):
            elapsed, kept = await timed_move(broker, f"bench.move.{to_quorum}", count, to_quorum)
            target = "quorum" if to_quorum else "classic"
            rows.append(
                (f"move {count} x 1 KiB, classic to {target}", f"{elapsed:.2f} s", f"{kept} kept, {kept / elapsed:.0f} msg/s")
            )
        alone, checked = await check_cost(broker, 500)
        rows.append(("declare an own queue", f"{alone:.0f} us", f"{checked:.0f} us with the unfinished-move check"))
        sent, returned, elapsed = await returned_during_move(reactor, broker, 500)
        rows.append(
            ("replies at 500/s while the reply queue moves", f"{elapsed * 1000:.0f} ms move", f"{returned} of {sent} returned")
        )
        for row in rows:
            print(f"{row[0]:<48} {row[1]:>12}   {row[2]}")
    finally:
        await threads.deferToThread(rabbit.delete_vhost, VHOST)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments.messages)))


if __name__ == "__main__":
    run()
