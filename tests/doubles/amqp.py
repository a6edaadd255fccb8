# -*- test-case-name: tests.test_scripted_broker,tests.test_scripted_service -*-
"""
A scripted AMQP peer: the server side of msgmux's broker connections,
played from frames captured from a real RabbitMQ.

L{ScriptedBroker} answers every client method with the reply RabbitMQ gave
to that method in the capture (C{rabbitmq-3.10.8.frames.json}, recorded by
C{lab/capture_amqp.py}), changing only the fields that vary between
sessions (see L{amqp_capture.VARYING}).  It is not a broker: it routes
nothing and keeps no queues.  The test drives it: it reads what the client
published, acknowledged and rejected, and tells it to confirm, deliver,
return, cancel consumers, close channels or drop the connection, each sent
with a captured frame as its template.

Whatever a real RabbitMQ would refuse (a method on a channel that is not
open, an unknown delivery tag, a method the capture has no answer for)
raises L{UnexpectedFrame} out of C{dataReceived}, so under iosim it
surfaces in the test that pumped it; it is also kept in
L{ScriptedBroker.unexpected}.  Behaviour that depends on the broker itself
stays tested against the real one, in C{tests/integration}.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect, makeFakeClient, makeFakeServer

from msgmux.amqp import wire
from tests.doubles import amqp_frames
from tests.doubles.amqp_capture import Capture, CapturedFrame, load_capture
from tests.doubles.amqp_frames import Frame
from tests.doubles.amqp_records import (
    ACK,
    NACK,
    RETURN,
    ChannelState,
    Consumer,
    Published,
    Received,
    ScriptError,
    Settled,
    UnexpectedFrame,
)

__all__ = [
    "ACK",
    "NACK",
    "RETURN",
    "ChannelState",
    "Consumer",
    "Published",
    "Received",
    "ScriptError",
    "ScriptedBroker",
    "ScriptedBrokerFactory",
    "Settled",
    "UnexpectedFrame",
    "connect_pending",
    "load_capture",
]


class ScriptedBroker(Protocol):
    """
    The server end of one AMQP connection, answering from the capture.

    @ivar received: every client method, in order.
    @ivar published: every complete publish, in order.
    @ivar settled: every client ack, nack and reject, in order.
    @ivar unexpected: what raised L{UnexpectedFrame}.
    @ivar client_properties: the client's C{connection.start-ok} table.
    @ivar username: the PLAIN login name.
    @ivar password: the PLAIN password.
    @ivar vhost: the virtual host the client opened, or L{None}.
    @ivar heartbeat: the heartbeat interval of the client's tune-ok.
    @ivar frame_max: the frame size limit of the client's tune-ok.
    @ivar heartbeats_received: heartbeat frames from the client.
    @ivar channels: the open channels by number.
    @ivar consumers: active consumers by tag.
    @ivar lost: why the connection ended, or L{None} while it lasts.
    @ivar auto_confirm: L{False}; L{True} to ack every publish on a confirm
        channel as it completes; or a policy called with each L{Published}
        that returns L{ACK}, L{NACK}, L{RETURN} (returned, then acked, as
        RabbitMQ does for an unroutable mandatory publish) or L{None}
        (left for L{confirm}).
    """

    def __init__(
        self,
        capture: Capture | None = None,
        clock: IReactorTime | None = None,
        auto_confirm: bool | Callable[[Published], str | None] = False,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """
        @param capture: the frames to replay (the committed fixture by default).
        @param clock: sends heartbeats at the negotiated interval when given.
        @param credentials: a login with other credentials is refused with
            the captured C{connection.close} 403; any login is accepted when
            L{None}.
        """
        self.capture = capture or load_capture()
        self.clock = clock
        self.auto_confirm = auto_confirm
        self.credentials = credentials
        self.received: list[Received] = []
        self.published: list[Published] = []
        self.settled: list[Settled] = []
        self.unexpected: list[UnexpectedFrame] = []
        self.client_properties: dict[str, Any] = {}
        self.username: str | None = None
        self.password: str | None = None
        self.vhost: str | None = None
        self.heartbeat = 0
        self.frame_max = 0
        self.heartbeats_received = 0
        self.channels: dict[int, ChannelState] = {}
        self.consumers: dict[str, Consumer] = {}
        self.lost: Failure | None = None
        self._splitter = amqp_frames.FrameSplitter(header=True)
        self._state = "header"
        self._refusals: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        #: What a C{queue.declare-ok} (passive or not) and C{queue.delete-ok}
        #: report, by queue: messages ready, and consumers on other
        #: connections (this connection's own consumers are added).
        self.queue_counts: dict[str, tuple[int, int]] = {}
        self._beating: LoopingCall | None = None
        self._names = itertools.count(1)

    # --- what the test drives ----------------------------------------------

    def confirm(self, channel: int = 1, tag: int | None = None, multiple: bool = False, ok: bool = True) -> int:
        """
        Send C{basic.ack} (or C{basic.nack} when not C{ok}) for publishes.

        @param tag: the publish sequence number; the oldest unconfirmed one
            when L{None}.
        @param multiple: settle every unconfirmed publish up to C{tag}.
        @return: the tag sent.
        """
        tag = self._open(channel).confirm(tag, multiple)
        template = self.capture.find("basic.ack" if ok else "basic.nack", answers="basic.publish")
        self._send_method(template, channel, delivery_tag=tag, multiple=multiple)
        return tag

    def deliver(
        self,
        consumer: str,
        properties: dict[str, Any] | None = None,
        body: bytes = b"",
        exchange: str = "",
        routing_key: str = "",
        redelivered: bool = False,
    ) -> int:
        """
        Send C{basic.deliver} with its content to a consumer.

        @param consumer: a consumer tag, or a queue (its first consumer).
        @return: the delivery tag.
        """
        target = self.consumers.get(consumer) or next((c for c in self.consumers.values() if c.queue == consumer), None)
        if target is None:
            raise ScriptError(f"no consumer {consumer!r} (consumers: {sorted(self.consumers)})")
        tag = self._open(target.channel).deliver()
        template = self.capture.find("basic.deliver")
        self._send_method(
            template,
            target.channel,
            consumer_tag=target.tag,
            delivery_tag=tag,
            redelivered=redelivered,
            exchange=exchange,
            routing_key=routing_key,
        )
        self._send_content(template, target.channel, properties or {}, body)
        return tag

    def return_message(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        properties: dict[str, Any],
        body: bytes,
        code: int = 312,
        text: str = "NO_ROUTE",
    ) -> None:
        """Send C{basic.return} with its content (RabbitMQ sends the publish's confirm right after)."""
        self._open(channel)
        template = self.capture.find("basic.return")
        self._send_method(
            template, channel, reply_code=code, reply_text=text, exchange=exchange, routing_key=routing_key
        )
        self._send_content(template, channel, properties, body)

    def refuse(self, method: str, code: int, text: str, **fields: Any) -> None:
        """
        Answer the client's next C{method} (e.g. C{"queue.declare"}) with
        C{channel.close}; calls queue up.

        @param fields: only a C{method} whose arguments have these values
            (spec names with C{_} for C{-}, e.g. C{queue="q"}).
        """
        amqp_frames.spec_method(method)
        wanted = {name.replace("_", "-"): value for name, value in fields.items()}
        self._refusals.setdefault(method, []).append((code, text, wanted))

    def close_channel(self, channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        """
        Send C{channel.close} (a channel error); until the client's
        close-ok, its other frames on that channel are discarded.
        """
        self._open(channel).closing = True
        self._drop_consumers(channel)
        template = self.capture.find("channel.close", reply_code=406)
        self._send_method(template, channel, reply_code=code, reply_text=text, class_id=class_id, method_id=method_id)

    def cancel_consumer(self, tag: str) -> None:
        """Send C{basic.cancel}, as RabbitMQ does when a consumer's queue goes."""
        consumer = self.consumers.pop(tag, None)
        if consumer is None:
            raise ScriptError(f"no consumer {tag!r}")
        self._send_method(self.capture.find("basic.cancel"), consumer.channel, consumer_tag=tag)

    def close_connection(
        self, code: int = 320, text: str = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    ) -> None:
        """Send C{connection.close}; the socket closes at the client's close-ok."""
        self._state = "closing"
        template = self.capture.find("connection.close", reply_code=320)
        self._send_method(template, 0, reply_code=code, reply_text=text)

    def send_heartbeat(self) -> None:
        """Send one heartbeat frame."""
        self.transport.write(self.capture.find("heartbeat").frame.raw)

    def drop(self) -> None:
        """Cut the connection without a word, as a broker crash does."""
        self.transport.abortConnection()

    def unconfirmed(self, channel: int = 1) -> list[int]:
        """@return: the publish tags awaiting a confirm on C{channel}."""
        return list(self._open(channel).unconfirmed)

    def outstanding(self, channel: int = 1) -> set[int]:
        """@return: the delivery tags not yet acked or rejected on C{channel}."""
        return set(self._open(channel).outstanding)

    def methods(self, name: str) -> list[Received]:
        """@return: the client's C{name} methods, in order."""
        return [r for r in self.received if r.method == name]

    # --- frames from the client ---------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            for frame in self._splitter.feed(data):
                self._frame(frame)
        except amqp_frames.FrameError as e:
            self._unexpected(str(e), None)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("connection lost"))) -> None:
        self.lost = reason
        self._state = "closed"
        if self._beating is not None and self._beating.running:
            self._beating.stop()

    def _unexpected(self, reason: str, frame: Frame | None) -> None:
        error = UnexpectedFrame(reason, frame)
        self.unexpected.append(error)
        raise error

    def _frame(self, frame: Frame) -> None:
        if frame.kind == 0:
            self._state = "start-ok"
            self.transport.write(self.capture.find("connection.start").frame.raw)
            return
        if frame.kind == wire.FRAME_HEARTBEAT:
            if frame.channel != 0:
                self._unexpected("heartbeat on a channel other than 0", frame)
            self.heartbeats_received += 1
            return
        if frame.kind != wire.FRAME_METHOD:
            self._content_frame(frame)
            return
        method, fields = amqp_frames.decode_method(frame.payload)
        name = amqp_frames.method_name(method)
        self.received.append(Received(frame.channel, name, fields))
        if self._state == "closing":
            # After connection.close, AMQP discards everything but close and close-ok.
            if name == "connection.close":
                self._answer(frame, name, fields)
            if name in ("connection.close", "connection.close-ok"):
                self.transport.loseConnection()
            return
        if frame.channel == 0:
            self._connection_method(frame, name, fields)
            return
        if self._state != "ready":
            self._unexpected(f"{name} before connection.open", frame)
        if method.klass.name == "connection":
            self._unexpected(f"{name} on channel {frame.channel}, not 0", frame)
        state = self.channels.get(frame.channel)
        if name == "channel.open":
            if state is not None:
                self._unexpected("channel.open on an open channel", frame)
            self.channels[frame.channel] = ChannelState()
            self._answer(frame, name, fields)
            return
        if state is None:
            self._unexpected(f"{name} on a channel that is not open", frame)
            return
        if state.closing:
            # After channel.close, AMQP discards everything but close and close-ok.
            if name == "channel.close":
                self._answer(frame, name, fields)
            if name in ("channel.close", "channel.close-ok"):
                self._forget(frame.channel)
            return
        if state.receiving_content:
            # RabbitMQ: 505 UNEXPECTED_FRAME, a connection error.
            self._unexpected(f"{name} in the middle of a message's content", frame)
        refusal = self._refusal(name, fields)
        if refusal is not None:
            code, text = refusal
            self.close_channel(frame.channel, code, text, method.klass.id, method.id)
            return
        handler = self._channel_methods.get(name, ScriptedBroker._answer)
        handler(self, frame, name, fields)

    def _refusal(self, name: str, fields: dict[str, Any]) -> tuple[int, str] | None:
        """@return: the first refusal queued for this method and these arguments, taken off the queue."""
        queued = self._refusals.get(name, [])
        for index, (code, text, wanted) in enumerate(queued):
            if all(fields.get(key) == value for key, value in wanted.items()):
                del queued[index]
                return code, text
        return None

    def _connection_method(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        expected = {"start-ok": "connection.start-ok", "tune-ok": "connection.tune-ok", "open": "connection.open"}
        if self._state in expected and name not in (expected[self._state], "connection.close"):
            self._unexpected(f"{name} while waiting for {expected[self._state]}", frame)
        if name == "connection.start-ok":
            self.client_properties = fields["client-properties"]
            _, username, password = fields["response"].decode("utf-8").split("\0")
            self.username, self.password = username, password
            if self.credentials is not None and (username, password) != self.credentials:
                self._state = "closing"
                self._send_method(self.capture.find("connection.close", reply_code=403), 0)
                return
            self._state = "tune-ok"
            self.transport.write(self.capture.find("connection.tune").frame.raw)
        elif name == "connection.tune-ok":
            self.heartbeat, self.frame_max = fields["heartbeat"], fields["frame-max"]
            self._state = "open"
            if self.clock is not None and self.heartbeat > 0:
                self._beating = LoopingCall(self.send_heartbeat)
                self._beating.clock = self.clock
                self._beating.start(self.heartbeat, now=False)
        elif name == "connection.open" and self._state == "open":
            self.vhost = fields["virtual-host"]
            self._state = "ready"
            self._answer(frame, name, fields)
        elif name == "connection.close":
            self._state = "closing"
            self._answer(frame, name, fields)
            self.transport.loseConnection()
        else:
            self._unexpected(f"{name} is not scripted on channel 0", frame)

    # --- answers to channel methods -------------------------------------------

    def _answer(self, frame: Frame, name: str, fields: dict[str, Any], **changes: Any) -> None:
        """Send the captured answer to C{name}, with C{changes}; none when the client set no-wait."""
        responses = amqp_frames.spec_method(name).responses
        if not responses:
            self._unexpected(f"{name} is not a request the script answers", frame)
        try:
            template = self.capture.find(amqp_frames.method_name(responses[0]), answers=name)
        except LookupError:
            self._unexpected(f"the capture has no answer to {name}", frame)
            return
        if not fields.get("no-wait"):
            self._send_method(template, frame.channel, **changes)

    def _confirm_select(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        self.channels[frame.channel].confirming = True
        self._answer(frame, name, fields)

    def _counts(self, queue: str) -> tuple[int, int]:
        messages, others = self.queue_counts.get(queue, (0, 0))
        return messages, others + sum(1 for consumer in self.consumers.values() if consumer.queue == queue)

    def _queue_declare(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        queue = fields["queue"] or f"amq.gen-scripted-{next(self._names)}"
        messages, consumers = self._counts(queue)
        self._answer(frame, name, fields, queue=queue, message_count=messages, consumer_count=consumers)

    def _queue_delete(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        """Answer as RabbitMQ does: delete-ok with the messages ready, then basic.cancel to the queue's consumers."""
        queue = fields["queue"]
        messages, _ = self.queue_counts.pop(queue, (0, 0))
        self._answer(frame, name, fields, message_count=messages)
        for tag in [tag for tag, consumer in self.consumers.items() if consumer.queue == queue]:
            self.cancel_consumer(tag)

    def _basic_consume(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        tag = fields["consumer-tag"] or f"amq.ctag-scripted-{next(self._names)}"
        if tag in self.consumers:
            self._unexpected(f"consumer tag {tag!r} is already in use", frame)
        self.consumers[tag] = Consumer(frame.channel, fields["queue"], tag)
        self._answer(frame, name, fields, consumer_tag=tag)

    def _basic_cancel(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        self.consumers.pop(fields["consumer-tag"], None)
        self._answer(frame, name, fields, consumer_tag=fields["consumer-tag"])

    def _basic_publish(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        self.channels[frame.channel].publish_started(fields)

    def _settle(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        tag = fields["delivery-tag"]
        multiple = bool(fields.get("multiple"))
        if not self.channels[frame.channel].settle(tag, multiple):
            # RabbitMQ closes the channel: 406 PRECONDITION_FAILED - unknown delivery tag.
            self._unexpected(f"{name} of unknown delivery tag {tag}", frame)
        self.settled.append(Settled(frame.channel, name.partition(".")[2], tag, multiple, bool(fields.get("requeue"))))

    def _channel_close(self, frame: Frame, name: str, fields: dict[str, Any]) -> None:
        self._forget(frame.channel)
        self._answer(frame, name, fields)

    _channel_methods: dict[str, Callable[[ScriptedBroker, Frame, str, dict[str, Any]], None]] = {
        "confirm.select": _confirm_select,
        "queue.declare": _queue_declare,
        "queue.delete": _queue_delete,
        "basic.consume": _basic_consume,
        "basic.cancel": _basic_cancel,
        "basic.publish": _basic_publish,
        "basic.ack": _settle,
        "basic.nack": _settle,
        "basic.reject": _settle,
        "channel.close": _channel_close,
    }

    # --- publishes ------------------------------------------------------------

    def _content_frame(self, frame: Frame) -> None:
        state = self.channels.get(frame.channel)
        if state is None:
            self._unexpected("content frame on a channel that is not open", frame)
            return
        if state.closing:
            return
        try:
            complete = state.content(frame)
        except ValueError as e:
            self._unexpected(str(e), frame)
            return
        if complete is None:
            return
        tag, fields, properties, body = complete
        published = Published(
            frame.channel, tag, fields["exchange"], fields["routing-key"], fields["mandatory"], properties, body
        )
        self.published.append(published)
        if tag is None or not self.auto_confirm:
            return
        decide = self.auto_confirm
        outcome = ACK if decide is True or not callable(decide) else decide(published)
        if outcome == RETURN:
            if not published.mandatory:
                raise ScriptError(f"only a mandatory publish can be returned: {published}")
            self.return_message(frame.channel, published.exchange, published.routing_key, properties, body)
        if outcome is not None:
            self.confirm(frame.channel, tag, ok=outcome != NACK)

    # --- frames to the client ---------------------------------------------------

    def _send_method(self, template: CapturedFrame, channel: int, **changes: Any) -> None:
        """Send C{template} on C{channel} with the varying fields in C{changes} replaced."""
        self.transport.write(self.capture.method_frame(template, channel, **changes))

    def _send_content(self, method: CapturedFrame, channel: int, properties: dict[str, Any], body: bytes) -> None:
        """Send a content header and body frames, shaped like those that followed C{method} in the capture."""
        self.transport.writeSequence(
            self.capture.content_frames(method, channel, properties, body, self.frame_max or 131072)
        )

    # --- bookkeeping --------------------------------------------------------------

    def _open(self, channel: int) -> ChannelState:
        state = self.channels.get(channel)
        if state is None or state.closing:
            raise ScriptError(f"channel {channel} is not open")
        return state

    def _forget(self, channel: int) -> None:
        self.channels.pop(channel, None)
        self._drop_consumers(channel)

    def _drop_consumers(self, channel: int) -> None:
        for tag in [tag for tag, c in self.consumers.items() if c.channel == channel]:
            del self.consumers[tag]


class ScriptedBrokerFactory(Factory):
    """
    Builds a L{ScriptedBroker} per connection, for a listening port (e.g.
    C{MemoryReactorClock.listenTCP}, connected with
    L{twisted.test.iosim.ConnectionCompleter}).

    @ivar brokers: every broker built, in order.
    """

    def __init__(self, **options: Any) -> None:
        """@param options: keyword arguments for each L{ScriptedBroker}."""
        self.options = options
        self.brokers: list[ScriptedBroker] = []

    def buildProtocol(self, addr: Any) -> ScriptedBroker:
        broker = ScriptedBroker(**self.options)
        broker.factory = self
        self.brokers.append(broker)
        return broker


def connect_pending(reactor: MemoryReactor) -> list[IOPump]:
    """
    Complete, through iosim, every pending connection attempt on C{reactor}
    to an address listening there: TCP by port (e.g. a
    L{ScriptedBrokerFactory} on 5672), Unix sockets by path (e.g. the link
    between msgmux's halves).

    Code under test connects as usual, through the C{reactor} it was given
    (msgmux's L{BrokerService} through C{HostnameEndpoint}); attempts to
    addresses nothing listens on stay pending (fail them with the factory
    in C{reactor.tcpClients}).  Unlike L{ConnectionCompleter}, this forgets
    the right entry of C{reactor.connectors} when TCP and Unix attempts mix.

    @return: a pump per connection, not yet flushed: nothing has been said
        on them (flush them to move bytes).
    """
    pumps = []
    for client in list(reactor.tcpClients):
        host, port, factory = client[:3]
        server = next((s for s in reactor.tcpServers if s[0] == port), None)
        if server is not None:
            reactor.tcpClients.remove(client)
            pumps.append(_join(reactor, factory, server[1], IPv4Address("TCP", host, port)))
    for client in list(reactor.unixClients):
        path, factory = client[:2]
        server = next((s for s in reactor.unixServers if s[0] == path), None)
        if server is not None:
            reactor.unixClients.remove(client)
            pumps.append(_join(reactor, factory, server[1], UNIXAddress(path)))
    return pumps


def _join(reactor: MemoryReactor, client_factory: Any, server_factory: Any, address: Any) -> IOPump:
    """Connect a client factory's protocol to a server factory's, as a connection to C{address}."""
    for connector in reactor.connectors:
        if connector.getDestination() == address:
            reactor.connectors.remove(connector)
            break
    client = client_factory.buildProtocol(address)
    server = server_factory.buildProtocol(address)
    return connect(server, makeFakeServer(server), client, makeFakeClient(client), greet=False, clock=reactor)
