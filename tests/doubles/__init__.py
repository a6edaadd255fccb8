"""
The test doubles every test module shares, typed against the interfaces
they stand in for (as C{treq.testing} does for treq): a test builds the
real msgmux objects and hands them these, not a fresh fake of its own.

 - L{RecordingConnection} is a link session (L{LinkConnection}) that
   records what a relay does with it;
 - L{RecordingHandler} is a session handler (L{SessionHandler}) that
   records what a link protocol hands it;
 - L{RecordingControlHalf} is a control half as run-time links see it
   (L{ControlHalfLike}), serving L{IdleLink}s and recording what is asked
   of it;
 - L{RecordingSpawner} is the spawner as the tenant half supervisor sees
   it (L{SpawnerChannel}), recording the commands it is given;
 - L{broker_connection} and L{open_channel} give a real
   L{BrokerProtocol} and L{Channel} writing to a C{StringTransport}, for
   deliveries and publishes without a broker;
 - L{tests.doubles.amqp} plays RabbitMQ from frames captured on a real
   one (C{rabbitmq-3.10.8.frames.json}, recorded by
   C{python -m lab.capture_amqp}), for tests that run the AMQP layer, both
   halves and the link together under C{iosim} without root.

Behaviour that depends on the broker is tested against the real broker
(C{tests/integration/}); nothing here pretends to route messages.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from txamqp.message import Message as TxMessage

from msgmux.amqp import wire
from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Channel, Delivery
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol, load_spec
from msgmux.config import BrokerConfig, Config, ControlConfig, LinkConfig, TenantConfig, parse, parse_transport_url
from msgmux.link.protocol import LinkConnection, SessionHandler
from msgmux.linkadmin import ControlHalfLike
from msgmux.message import Message
from msgmux.supervisor import SpawnerChannel

__all__ = [
    "OSLO_PROPERTIES",
    "IdleLink",
    "RecordingConnection",
    "RecordingControlHalf",
    "RecordingHandler",
    "RecordingSpawner",
    "TxChannelStandIn",
    "broker_closes_channel",
    "broker_connection",
    "confirm",
    "control_config",
    "one_link",
    "delivery",
    "idle_broker",
    "inner_of",
    "open_channel",
    "oslo_body",
    "published",
    "tenant_config",
]

#: The properties oslo.messaging puts on every message.
OSLO_PROPERTIES: dict[str, Any] = {"content_type": "application/json", "content_encoding": "utf-8", "delivery_mode": 2, "priority": 0}

#: A start time for clocks, so that deadlines look like Unix times.
EPOCH = 1_700_000_000.0


def clock() -> Clock:
    """A clock at a plausible Unix time."""
    c = Clock()
    c.advance(EPOCH)
    return c


def oslo_body(inner: dict[str, Any]) -> bytes:
    """An oslo.messaging 2.0 envelope around C{inner}, laid out as oslo lays it out."""
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()


def inner_of(body: bytes) -> dict[str, Any]:
    """The inner message of an oslo envelope."""
    inner: dict[str, Any] = json.loads(json.loads(body)["oslo.message"])
    return inner


def one_link(routes: str = "", limits: str = "") -> str:
    """
    The TOML of a control half with one link, C{tenant-a}, on the machine's
    broker.

    @param routes: the link's route keys.
    @param limits: the link's C{[control.links.limits]} keys.
    """
    return (
        '[control]\ntransport_url = "rabbit://guest:guest@127.0.0.1:5672/"\n\n'
        '[[control.links]]\nname = "tenant-a"\nsocket = "/run/msgmux/tenant-a.sock"\n'
        + routes
        + ("\n[control.links.limits]\n" + limits if limits else "")
        + "\n"
    )


def control_config(text: str) -> ControlConfig:
    """The C{[control]} section of a TOML configuration."""
    config: Config = parse(text)
    assert config.control is not None, "no [control] section"
    return config.control


def tenant_config(text: str) -> TenantConfig:
    """The C{[tenant]} section of a TOML configuration."""
    config: Config = parse(text)
    assert config.tenant is not None, "no [tenant] section"
    return config.tenant


def idle_broker(name: str = "control", reactor: MemoryReactorClock | None = None) -> BrokerService:
    """A real L{BrokerService} that is never started: nothing connects."""
    hosts, vhost = parse_transport_url("rabbit://guest:guest@127.0.0.1:5672/")
    return BrokerService(BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack"), name, reactor or MemoryReactorClock())


class TxChannelStandIn:
    """
    Stands in for txAMQP's channel object under a L{Channel}: every
    synchronous AMQP method succeeds at once and is recorded by name, as if
    the broker had answered C{...-ok}.  Deliveries, publishes and confirms
    do not pass here (they take the hot path), so a test drives those with
    frames (L{confirm}, L{published}).
    """

    def __init__(self, number: int) -> None:
        self.id = number
        self.closed = False
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def method(**arguments: Any) -> defer.Deferred[None]:
            self.calls.append((name, arguments))
            return defer.succeed(None)

        return method


def broker_connection(clock: Clock | None = None, heartbeat: int = 0) -> tuple[BrokerProtocol, StringTransport]:
    """A real L{BrokerProtocol} connected to a C{StringTransport} (frames it writes land there)."""
    protocol = BrokerProtocol(BrokerDelegate(), "/", heartbeat, clock or Clock(), "user", "secret", "msgmux test")
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.clear()  # the protocol header
    protocol.MAX_LENGTH = 131072
    return protocol, transport


def open_channel(protocol: BrokerProtocol, number: int = 1) -> Channel:
    """A real L{Channel} on C{protocol}, registered for the hot path, as if the broker had opened it."""
    channel = Channel(protocol, TxChannelStandIn(number))
    protocol.fast_channels[number] = channel
    return channel


def delivery(
    channel: Channel,
    body: bytes,
    routing_key: str = "k",
    properties: dict[str, Any] | None = None,
    tag: int = 1,
    redelivered: bool = False,
    exchange: str = "openstack",
    error: str | None = None,
) -> Delivery:
    """A delivery on C{channel}, as the hot path makes it."""
    return Delivery(channel, "ctag", tag, redelivered, exchange, routing_key, dict(properties or {}), body, error)


def confirm(protocol: BrokerProtocol, channel: int, tag: int, multiple: bool = False, ok: bool = True) -> None:
    """The broker confirms (or, with C{ok} false, nacks) publishes up to C{tag} on C{channel}."""
    frame = wire.encode_ack(channel, tag, multiple) if ok else wire.encode_nack(channel, tag, multiple)
    protocol.dataReceived(frame)


def broker_closes_channel(protocol: BrokerProtocol, channel: Channel, code: int = 406, text: str = "PRECONDITION_FAILED") -> None:
    """The broker closes C{channel} over an error, as txAMQP reports a C{channel.close} from it."""
    reason = TxMessage(load_spec().parse_method("channel.close"), [code, text, 60, 40])
    channel.txamqp_channel.closed = True
    protocol.channel_failed(channel.txamqp_channel, Failure(reason))


def published(transport: StringTransport) -> list[tuple[str, str, dict[str, Any], bytes]]:
    """
    The messages a protocol published (read from what it wrote), and clear
    the transport.

    @return: (exchange, routing key, properties, body) of each publish.
    """
    data = transport.value()
    transport.clear()
    found: list[tuple[str, str, dict[str, Any], bytes]] = []
    offset = 0
    while offset < len(data):
        kind, _, size = wire.FRAME_HEAD.unpack_from(data, offset)
        payload = data[offset + 7 : offset + 7 + size]
        offset += 8 + size
        if kind == wire.FRAME_METHOD and payload[:4] == bytes([0, wire.BASIC, 0, wire.BASIC_PUBLISH]):
            exchange_length = payload[6]
            exchange = payload[7 : 7 + exchange_length].decode()
            key_at = 7 + exchange_length
            key = payload[key_at + 1 : key_at + 1 + payload[key_at]].decode()
            found.append((exchange, key, {}, b""))
        elif kind == wire.FRAME_HEADER and found:
            exchange, key, _, body = found[-1]
            found[-1] = (exchange, key, wire.decode_properties(payload, 12), body)
        elif kind == wire.FRAME_BODY and found:
            exchange, key, properties, body = found[-1]
            found[-1] = (exchange, key, properties, body + payload)
    return found


class RecordingConnection:
    """
    A link session that records what is done with it.

    @ivar messages: message credit the peer granted.
    @ivar body_bytes: body byte credit the peer granted.
    """

    link_name: str | None = "tenant-a"
    session_id: str | None = "session-1"

    def __init__(self, messages: int = 0, body_bytes: int = 1 << 40) -> None:
        self.messages = messages
        self.body_bytes = body_bytes
        self.open = True
        self.sent: list[tuple[Message, Any]] = []
        self.acknowledged: list[int] = []
        self.refused: list[tuple[int, str]] = []
        self.granted: list[tuple[int, int]] = []
        self.closed: tuple[str, str] | None = None

    @property
    def established(self) -> bool:
        return self.open

    @property
    def unacknowledged(self) -> int:
        return len(self.sent)

    def can_send(self, message: Message) -> bool:
        return self.open and self.messages > 0 and self.body_bytes >= len(message.body)

    def send_message(self, message: Message, token: Any) -> None:
        assert self.can_send(message), "send_message without credit"
        self.messages -= 1
        self.body_bytes -= len(message.body)
        self.sent.append((message, token))

    def acknowledge(self, seq: int) -> None:
        self.acknowledged.append(seq)

    def refuse(self, seq: int, reason: str) -> None:
        self.refused.append((seq, reason))

    def grant(self, messages: int, body_bytes: int) -> None:
        self.granted.append((messages, body_bytes))

    def close(self, code: str, detail: str) -> None:
        self.closed = (code, detail)
        self.open = False

    def total_granted(self) -> tuple[int, int]:
        """@return: all message and byte credit granted so far."""
        return sum(m for m, _ in self.granted), sum(b for _, b in self.granted)


class RecordingHandler:
    """A session handler that records what the link protocol hands it."""

    def __init__(self) -> None:
        self.connection: LinkConnection | None = None
        self.received: list[tuple[int, Message]] = []
        self.acknowledged: list[Any] = []
        self.refused: list[tuple[Any, str]] = []
        self.credit_events = 0
        self.ended: str | None = None

    def session_started(self, connection: LinkConnection) -> None:
        self.connection = connection

    def message_received(self, seq: int, message: Message) -> None:
        self.received.append((seq, message))

    def messages_acknowledged(self, tokens: list[Any]) -> None:
        self.acknowledged.extend(tokens)

    def message_refused(self, token: Any, reason: str) -> None:
        self.refused.append((token, reason))

    def credit_received(self) -> None:
        self.credit_events += 1

    def session_ended(self, reason: str) -> None:
        self.ended = reason


class IdleLink:
    """
    A control link as L{msgmux.linkadmin.LinkAdmin} sees it (its
    configuration and status), with no session: down and unhealthy.
    """

    def __init__(self, config: LinkConfig) -> None:
        self.config = config

    def status(self) -> dict[str, Any]:
        return {"up": False, "healthy": False}


class RecordingControlHalf:
    """
    A control half as run-time links see it (L{ControlHalfLike}): it serves
    an L{IdleLink} per link and records what it is asked.

    @ivar calls: C{("add", name)} and C{("remove", name)}, in order.
    @ivar refuse_bind: when set, adding a link fails as if its socket could
        not be bound (and is not recorded).
    """

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.links: dict[str, IdleLink] = {link.name: IdleLink(link) for link in config.links}
        self.peer_check: Callable[[str, tuple[int, int, int] | None], str | None] = lambda link, peer: None
        self.calls: list[tuple[str, str]] = []
        self.refuse_bind = False

    def add_link(self, link: LinkConfig) -> None:
        if self.refuse_bind:
            raise OSError(98, "Address already in use")
        self.calls.append(("add", link.name))
        self.links[link.name] = IdleLink(link)

    async def remove_link(self, name: str) -> None:
        self.calls.append(("remove", name))
        del self.links[name]


class RecordingSpawner:
    """
    The spawner as the tenant half supervisor sees it (L{SpawnerChannel}):
    records the commands it is given and answers none; a test reports the
    halves' starts and exits to the supervisor itself.

    @ivar commands: C{("start", link)} and C{("stop", link)}, in order.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def start(self, link: LinkConfig) -> None:
        self.commands.append(("start", link.name))

    def stop(self, link: str, timeout: float) -> None:
        self.commands.append(("stop", link))


def _satisfies_interfaces(
    connection: RecordingConnection, handler: RecordingHandler, control: RecordingControlHalf, spawner: RecordingSpawner
) -> tuple[LinkConnection, SessionHandler, ControlHalfLike, SpawnerChannel]:
    """Checked by mypy: the doubles satisfy the interfaces they stand in for."""
    return connection, handler, control, spawner
