# -*- test-case-name: tests.test_scripted_capture -*-
"""
C{python -m lab.capture_amqp}: record what a real RabbitMQ says to msgmux.

The scripted broker of the unit tests (C{tests/doubles/amqp.py}) replays
server frames; this records them.  It creates a vhost of its own on the
machine's RabbitMQ (127.0.0.1:5672, guest/guest, through C{rabbitmqctl}),
puts a plain TCP forwarder on a loopback port between msgmux's
L{BrokerProtocol} and the broker, and logs every frame crossing it in both
directions while three connections run:

 0. the session msgmux's channels go through: handshake, channel.open,
    confirm.select, basic.qos, exchange.declare, queue.declare (classic,
    x-expires), queue.bind, basic.consume, a routed publish (basic.deliver
    with content, basic.ack confirm, the client's basic.ack), a mandatory
    unroutable publish (basic.return, basic.ack), a publish that is
    delivered and rejected, a publish to a full reject-publish queue
    (basic.nack), basic.cancel, a consumer whose queue is deleted
    (server-sent basic.cancel), channel.close/close-ok from the client,
    heartbeats, an inequivalent queue.declare and an unknown delivery tag
    (channel.close 406 from the server); then what moving a queue uses: a
    passive queue.declare, queue.unbind, queue.delete refused (406, not
    empty), a passive declare of a missing queue (404), an exchange declared
    again as durable (406), a queue.delete; connection.close/close-ok;
 1. a login with a wrong password (connection.close 403);
 2. a connection closed by C{rabbitmqctl close_all_connections}
    (connection.close 320).

The server frames go, in hex with the client method each answers and the
names of its varying fields, into
C{tests/doubles/rabbitmq-<version>.frames.json}; client frames are listed
by method only.  Needs the machine's broker and C{rabbitmqctl}, nothing
else.  Blocking steps (rabbitmqctl) run in threads.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from twisted.internet import defer, endpoints, protocol, task, threads
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from lab.rabbit import SystemBroker
from msgmux.amqp.channel import Channel, Delivery, PublishRefused, PublishReturned
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol
from tests.doubles import amqp_capture, amqp_frames
from tests.doubles.amqp_frames import Frame, FrameSplitter

BROKER = ("127.0.0.1", 5672)
HEARTBEAT = 1
EXCHANGE = "capture.x"
QUEUE = "capture.q"
VHOST = "msgmux-capture"


class Transcript:
    """Every frame of every connection through the forwarder, in the order it saw them."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, Frame]] = []
        self.connections = 0

    def new_connection(self) -> int:
        self.connections += 1
        return self.connections - 1

    def add(self, connection: int, side: str, frame: Frame) -> None:
        self.entries.append((connection, side, frame))


class _Half(protocol.Protocol):
    """One side of the forwarder: logs the frames it receives, passes the bytes on."""

    def __init__(self, transcript: Transcript, connection: int, side: str) -> None:
        self.transcript = transcript
        self.connection = connection
        self.side = side
        self.splitter = FrameSplitter(header=side == "client")
        self.peer: _Half | None = None
        self.pending: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        for frame in self.splitter.feed(data):
            self.transcript.add(self.connection, self.side, frame)
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _ForwarderFactory(protocol.Factory):
    """Accepts the client's connection and opens one to the broker for it."""

    def __init__(self, reactor: IReactorTCP, transcript: Transcript) -> None:
        self.reactor = reactor
        self.transcript = transcript

    def buildProtocol(self, addr: Any) -> _Half:
        connection = self.transcript.new_connection()
        client_side = _Half(self.transcript, connection, "client")
        server_side = _Half(self.transcript, connection, "server")
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, *BROKER)

        def connected(_: Any) -> None:
            client_side.peer, server_side.peer = server_side, client_side
            server_side.transport.write(b"".join(client_side.pending))

        connecting = endpoints.connectProtocol(endpoint, server_side)
        connecting.addCallbacks(connected, lambda failure: client_side.transport.loseConnection())
        return client_side


def _client(
    reactor: Any, port: int, vhost: str, password: str = "guest", name: str = "msgmux capture"
) -> defer.Deferred[BrokerProtocol]:
    broker = BrokerProtocol(BrokerDelegate(), vhost, HEARTBEAT, reactor, "guest", password, name)
    return endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), broker)


async def _lost(channel: Channel) -> None:
    """Wait until the broker closes C{channel}."""
    if channel.is_open:
        gone: defer.Deferred[Any] = defer.Deferred()
        # The reason can be a txAMQP message rather than an exception: fire with nothing.
        channel.lost_observers.append(lambda reason: gone.callback(None))
        await gone


async def _main_session(reactor: Any, port: int, vhost: str) -> None:
    broker = await _client(reactor, port, vhost)
    await broker.login()
    channel = await broker.open_channel()
    await channel.select_confirms()
    await channel.qos(10)
    await channel.declare_exchange(EXCHANGE, "topic", durable=False, auto_delete=False)
    await channel.declare_queue(QUEUE, durable=False, auto_delete=False, arguments={"x-expires": 600000})
    await channel.bind_queue(QUEUE, EXCHANGE, "capture.key")
    deliveries: defer.DeferredQueue[Delivery] = defer.DeferredQueue()
    await channel.consume(QUEUE, "capture.ctag", deliveries.put)

    properties = {"content_type": "application/json", "delivery_mode": 2, "headers": {"x-capture": "yes", "n": 1}}
    confirmed = channel.publish(EXCHANGE, "capture.key", properties, b'{"routed": 1}')
    delivery = await deliveries.get()
    await confirmed
    delivery.ack()

    # Nothing is bound to this key: RabbitMQ returns the message, then confirms it.
    try:
        await channel.publish(
            EXCHANGE, "capture.nowhere", {"content_type": "text/plain"}, b"unroutable", mandatory=True
        )
    except PublishReturned:
        pass
    else:
        raise RuntimeError("the unroutable mandatory publish was not returned")

    confirmed = channel.publish(EXCHANGE, "capture.key", {}, b"to be rejected")
    delivery = await deliveries.get()
    await confirmed
    delivery.reject(requeue=False)

    # A queue that takes nothing: the broker nacks what is routed to it.
    full = "capture.full"
    await channel.declare_queue(full, False, False, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    await channel.bind_queue(full, EXCHANGE, full)
    try:
        await channel.publish(EXCHANGE, full, {}, b"no room")
    except PublishRefused:
        pass
    else:
        raise RuntimeError("the publish to a full reject-publish queue was not nacked")

    await channel.cancel("capture.ctag")

    # A consumer whose queue is deleted (from another channel) is cancelled by the broker.
    doomed = "capture.doomed"
    await channel.declare_queue(doomed, False, False)
    cancelled: defer.Deferred[str] = defer.Deferred()
    channel.cancel_observers.append(cancelled.callback)
    await channel.consume(doomed, "capture.doomed-ctag", deliveries.put)
    other = await broker.open_channel()
    await other.txamqp_channel.queue_delete(queue=doomed)
    await cancelled
    await other.close()

    # Idle long enough for the broker to send heartbeats.
    await task.deferLater(reactor, 2.5 * HEARTBEAT)

    # Redeclaring with another x-expires is a channel error (406).
    try:
        await channel.declare_queue(QUEUE, durable=False, auto_delete=False, arguments={"x-expires": 300000})
    except Exception:
        pass
    await _lost(channel)

    # So is acknowledging a delivery tag the channel never had.
    stray = await broker.open_channel()
    stray.ack(99)
    await _lost(stray)

    await _moving_steps(broker)

    channel0 = await broker.channel(0)
    await channel0.connection_close(reply_code=200, reply_text="capture done", class_id=0, method_id=0)
    broker.transport.loseConnection()
    await broker.disconnected.wait()


async def _moving_steps(broker: BrokerProtocol) -> None:
    """
    What moving a queue to new arguments uses (L{msgmux.amqp.migrate}): a
    passive declare that counts a waiting message, unbind, a delete refused
    because the queue is not empty (406), a passive declare of a queue that
    does not exist (404), an exchange declared again as durable (406), a
    delete that takes a message with it.
    """
    channel = await broker.open_channel()
    await channel.select_confirms()
    await channel.publish("", QUEUE, {"content_type": "text/plain"}, b"waiting")
    await channel.queue_counts(QUEUE)
    await channel.unbind_queue(QUEUE, EXCHANGE, "capture.key")
    try:
        await channel.delete_queue(QUEUE, if_empty=True)
    except Exception:
        pass
    await _lost(channel)
    missing = await broker.open_channel()
    try:
        await missing.queue_counts("capture.missing")
    except Exception:
        pass
    await _lost(missing)
    exchange = await broker.open_channel()
    try:
        await exchange.declare_exchange(EXCHANGE, "topic", durable=True, auto_delete=False)
    except Exception:
        pass
    await _lost(exchange)
    last = await broker.open_channel()
    await last.delete_queue(QUEUE)
    await last.close()


async def _refused_login(reactor: Any, port: int, vhost: str) -> None:
    broker = await _client(reactor, port, vhost, password="not-the-password")
    try:
        await broker.login()
    except Exception:
        pass
    else:
        raise RuntimeError("the broker accepted a wrong password")
    await broker.disconnected.wait()


async def _forced_close(reactor: Any, port: int, vhost: str, rabbit: SystemBroker) -> None:
    broker = await _client(reactor, port, vhost, name="msgmux capture forced")
    await broker.login()
    await threads.deferToThread(rabbit.ctl, "close_all_connections", "--vhost", vhost, "capture: closed by rabbitmqctl")
    await broker.disconnected.wait()


def document(transcript: Transcript, names: list[str]) -> dict[str, Any]:
    """
    @return: the fixture: broker identity and the described frames, each
        server method frame with the client method it answers.
    """
    frames = []
    pending: dict[tuple[int, int], list[str]] = {}
    server_properties: dict[str, Any] = {}
    for connection, side, frame in transcript.entries:
        entry: dict[str, Any] = {"from": side, "connection": connection, "channel": frame.channel}
        entry.update(amqp_frames.describe(frame))
        method = entry.get("method")
        if side == "client":
            if method == "connection.start-ok":
                entry["fields"]["response"] = "(credentials left out)"
            if method is not None and amqp_frames.spec_method(method).responses:
                pending.setdefault((connection, frame.channel), []).append(method)
            frames.append(entry)
            continue
        entry["frame-type"] = frame.kind
        entry["answers"] = _answers(method, entry.get("fields", {}), pending.get((connection, frame.channel), []))
        entry["varies"] = ["channel"] + list(amqp_capture.VARYING.get(method or "", ()))
        entry["hex"] = frame.raw.hex()
        if method == "connection.start":
            server_properties = amqp_frames.decode_method(frame.payload)[1]["server-properties"]
        frames.append(entry)
    return {
        "description": "Frames recorded from a real RabbitMQ by lab/capture_amqp.py, replayed by tests/doubles/amqp.py.",
        "broker": {
            "product": server_properties.get("product"),
            "version": server_properties.get("version"),
            "platform": server_properties.get("platform"),
        },
        "connections": names,
        "frames": frames,
    }


def _answers(method: str | None, fields: dict[str, Any], pending: list[str]) -> str | None:
    """@return: the client method a server method frame answers, or L{None}."""
    if method is None:
        return None
    if method == "connection.tune":
        return "connection.start-ok"
    if method in ("basic.ack", "basic.nack", "basic.return"):
        return "basic.publish"
    if method in ("channel.close", "connection.close"):
        if fields.get("class-id"):
            return amqp_frames.method_name(amqp_frames.method_by_id(fields["class-id"], fields["method-id"]))
        return None
    spec = amqp_frames.spec_method(method)
    if not spec.response:
        return None
    for index in range(len(pending) - 1, -1, -1):
        if spec in amqp_frames.spec_method(pending[index]).responses:
            return pending.pop(index)
    raise RuntimeError(f"{method} answers nothing the client asked")


async def capture(reactor: Any, output_directory: str) -> str:
    """Record the three connections; @return: the fixture's path."""
    rabbit = SystemBroker()
    # A fixed name keeps the broker's texts (which name the vhost) the same
    # from one capture to the next; a vhost left by a crashed run goes first.
    vhost = VHOST
    await threads.deferToThread(rabbit.delete_vhost, vhost)
    await threads.deferToThread(rabbit.add_vhost, vhost)
    transcript = Transcript()
    listening = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        _ForwarderFactory(reactor, transcript)
    )
    port = listening.getHost().port
    try:
        await _main_session(reactor, port, vhost)
        await _refused_login(reactor, port, vhost)
        await _forced_close(reactor, port, vhost, rabbit)
        await task.deferLater(reactor, 0.2)  # the forwarder's last frames
    finally:
        await listening.stopListening()
        await threads.deferToThread(rabbit.delete_vhost, vhost)
    fixture = document(transcript, ["session", "refused login", "closed by rabbitmqctl"])
    path = os.path.join(output_directory, f"rabbitmq-{fixture['broker']['version']}.frames.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-directory", default=os.path.join(os.path.dirname(amqp_frames.__file__)))
    arguments = parser.parse_args()

    async def run(reactor: Any) -> None:
        path = await capture(reactor, arguments.output_directory)
        print(f"wrote {path}")

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
