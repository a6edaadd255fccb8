"""
Test doubles with real sockets: a hostile tenant half that speaks the link
protocol frame by frame, and a probe that watches what reaches a broker.
The trust and availability tests use them, and so do C{lab.attacks} and
C{make bench}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel, Delivery
from msgmux.config import BrokerConfig, parse_transport_url
from msgmux.link import codec
from msgmux.message import Address, Message


class RawTenant(Protocol):
    """
    A tenant half under the test's control: it sends whatever frames (or
    bytes) the test gives it and records every frame it gets back.
    """

    #: Seconds between the HEARTBEATs it sends, so that the control half
    #: does not close a session for silence while a test takes its time.
    HEARTBEAT = 0.5

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.decoder = codec.FrameDecoder()
        self.frames: list[codec.Frame] = []
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.next_seq = 1
        self._heartbeats = task.LoopingCall(lambda: self.send(codec.Heartbeat()))
        self._heartbeats.clock = reactor

    def connectionMade(self) -> None:
        self._heartbeats.start(self.HEARTBEAT, now=False)

    def dataReceived(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._heartbeats.running:
            self._heartbeats.stop()
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, frame: codec.Frame) -> None:
        self.transport.write(codec.encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)

    def send_message(self, address: Address, body: bytes, properties: dict[str, Any] | None = None) -> int:
        """
        Send a MSG numbered after the previous one (whatever the credit).

        @return: its sequence number.
        """
        seq = self.next_seq
        self.next_seq += 1
        props = {"content_type": "application/json", "content_encoding": "utf-8"}
        props.update(properties or {})
        self.transport.writeSequence(codec.encode_message(seq, Message(address, props, body)))
        return seq

    def credit(self) -> int:
        """@return: the message credit granted so far."""
        return sum(f.messages for f in self.frames if isinstance(f, codec.Credit))

    def byte_credit(self) -> int:
        """@return: the body byte credit granted so far."""
        return sum(f.bytes for f in self.frames if isinstance(f, codec.Credit))

    def outcome(self, seq: int) -> str | None:
        """C{"ack"}, the REJECT reason, or L{None} while undecided."""
        for frame in self.frames:
            if isinstance(frame, codec.Ack) and seq in frame.seqs:
                return "ack"
            if isinstance(frame, codec.Reject) and frame.seq == seq:
                return frame.reason
        return None

    def close_frame(self) -> codec.Close | None:
        return next((f for f in self.frames if isinstance(f, codec.Close)), None)

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:
        waited = 0.0
        while not predicate():
            if waited >= timeout:
                raise AssertionError(f"condition not met in {timeout}s; frames: {self.frames[-10:]}")
            await task.deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05

    async def wait_outcome(self, seq: int) -> str:
        await self.wait_for(lambda: self.outcome(seq) is not None)
        result = self.outcome(seq)
        assert result is not None
        return result


async def connect_raw(reactor: Any, socket: str, link: str | None = "tenant-a", hello: bool = True) -> RawTenant:
    """Connect a L{RawTenant}; with C{hello}, complete the handshake and wait for credit."""
    tenant = RawTenant(reactor)
    await connectProtocol(UNIXClientEndpoint(reactor, socket), tenant)
    if hello:
        tenant.send(codec.Hello((codec.PROTOCOL_VERSION,), link, "hostile test"))
        await tenant.wait_for(lambda: tenant.credit() > 0)
    return tenant


def oslo_body(inner: dict[str, Any]) -> bytes:
    """An oslo.messaging 2.0 envelope around C{inner}."""
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()


class BrokerProbe:
    """
    A queue of our own on a real broker, bound where the test wants to see
    what arrives (it gets a copy of every message routed there).
    """

    def __init__(self, reactor: Any, url: str) -> None:
        hosts, vhost = parse_transport_url(url)
        self.broker = BrokerService(BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack"), "probe", reactor)
        self.received: list[Delivery] = []
        self.channel: Channel | None = None

    async def start(self, queue: str, bindings: list[tuple[str, str, str]]) -> None:
        """@param bindings: (exchange, exchange type, routing key) triples."""
        self.broker.startService()
        protocol = await self.broker.when_connected()
        channel = await protocol.open_channel()
        await channel.declare_queue(queue, durable=False, auto_delete=True)
        for exchange, kind, key in bindings:
            await channel.declare_exchange(exchange, kind, durable=False, auto_delete=False)
            await channel.bind_queue(queue, exchange, key)
        await channel.consume(queue, "probe", self._got)
        self.channel = channel

    def _got(self, delivery: Delivery) -> None:
        self.received.append(delivery)
        delivery.ack()

    async def stop(self) -> None:
        await self.broker.stopService()
