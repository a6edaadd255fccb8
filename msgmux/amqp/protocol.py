# -*- test-case-name: tests.test_amqp_protocol -*-
"""
The AMQP connection protocol: txAMQP plus a hand-written hot path.

L{BrokerProtocol} is a txAMQP C{AMQClient}.  txAMQP keeps doing what it does
well: connection tuning and opening, channel objects whose synchronous
methods (declare, bind, qos, consume, cancel, confirm.select, close) return
Deferreds, heartbeats and server-initiated methods through the delegate.

What it does not do well is the frames every relayed message crosses, so
L{BrokerProtocol.dataReceived} splits frames itself and keeps these: the
broker's C{connection.start} (so the client properties can advertise
capabilities, which txAMQP's table encoder cannot), C{basic.deliver} and
C{basic.return} with their content, and publisher confirms
(C{basic.ack}/C{basic.nack}).  Everything else is handed to txAMQP unchanged.
Publishing and acknowledging write frames from L{msgmux.amqp.wire} directly.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp import spec as txspec
from txamqp.client import TwistedDelegate
from txamqp.protocol import AMQClient

from msgmux import __version__
from msgmux._private_apis import forget_txamqp_channel, txamqp_channel_numbers, unpack_txamqp_frame
from msgmux._writethrough import Writer
from msgmux.amqp import wire
from msgmux.amqp.channel import Channel

SPEC_PATH = os.path.join(os.path.dirname(__file__), "amqp0-9-1.xml")

_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_CONNECTION_START = (10, 10)
_DEFAULT_FRAME_MAX = 131072


@functools.lru_cache(maxsize=None)
def load_spec() -> Any:
    """
    @return: the AMQP 0-9-1 spec shipped with msgmux, parsed once per process.
    """
    return txspec.load(SPEC_PATH)


class BrokerDelegate(TwistedDelegate):
    """
    Handles the server-initiated methods txAMQP does not: RabbitMQ's
    connection.blocked/unblocked and consumer cancellation.
    """

    def connection_blocked(self, channel: Any, message: Any) -> None:
        self.client.set_blocked(message.reason)

    def connection_unblocked(self, channel: Any, message: Any) -> None:
        self.client.set_blocked(None)

    def basic_cancel(self, channel: Any, message: Any) -> None:
        self.client.consumer_cancelled(channel.id, message.consumer_tag)


def _channel_close_code(reason: Failure) -> int | None:
    """
    @return: the reply code of the broker's C{channel.close} that
        C{reason} (from txAMQP) carries, or L{None}.
    """
    value = reason.value
    method = getattr(value, "method", None)
    if method is None or getattr(getattr(method, "klass", None), "name", None) != "channel":
        return None
    try:
        return int(value.reply_code)
    except (AttributeError, TypeError, ValueError):
        return None


class _Incoming:
    """A message whose content frames are still arriving on one channel."""

    __slots__ = ("method", "size", "properties", "parts", "received", "error")

    def __init__(self, method: tuple[Any, ...]) -> None:
        self.method = method
        self.size = -1
        self.properties: dict[str, Any] = {}
        self.parts: list[bytes] = []
        self.received = 0
        self.error: str | None = None


class BrokerProtocol(AMQClient):
    """
    One AMQP connection to a broker.

    @ivar server_properties: what the broker said about itself.
    @ivar blocked: the reason the broker blocks publishing, or L{None}.
    """

    _log = Logger()

    def __init__(
        self,
        delegate: BrokerDelegate,
        vhost: str,
        heartbeat: int,
        clock: IReactorTime,
        username: str,
        password: str,
        connection_name: str,
        login_method: str = "PLAIN",
    ) -> None:
        """
        @param login_method: the SASL mechanism: C{PLAIN} or C{AMQPLAIN}
            (user name and password), or C{EXTERNAL} (the broker takes the
            identity from the TLS client certificate).
        """
        super().__init__(delegate, vhost, load_spec(), heartbeat=heartbeat, clock=clock)
        self._username = username
        self._password = password
        self._connection_name = connection_name
        self._login_method = login_method
        self._buffer = bytearray()
        self._incoming: dict[int, _Incoming] = {}
        self.fast_channels: dict[int, Channel] = {}
        self.server_properties: dict[str, Any] = {}
        self.blocked: str | None = None
        self.blocked_observers: list[Callable[[str | None], None]] = []
        self._last_received = clock.seconds()
        self._writer = Writer(clock)

    # --- connection set-up ----------------------------------------------

    def connectionMade(self) -> None:
        # Without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold small
        # publishes back for up to 40 ms: a call would cost two such waits.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def send_init_string(self) -> None:
        """Announce AMQP 0-9-1 (txAMQP would announce 0-9)."""
        self.transport.write(_PROTOCOL_HEADER)

    async def login(self) -> None:
        """
        Complete the handshake: txAMQP waits for connection.tune, then opens
        the virtual host.  Fails if the broker refuses us.
        """
        await self.started.wait()
        channel0 = await self.channel(0)
        await channel0.connection_open(self.vhost)

    def _start_ok(self, payload: bytes) -> None:
        table, offset = wire.decode_table(payload, 6)
        self.server_properties = table
        properties = {
            "product": "msgmux",
            "version": __version__,
            "platform": "Python/Twisted",
            "connection_name": self._connection_name,
            "capabilities": {
                "publisher_confirms": True,
                "consumer_cancel_notify": True,
                "basic.nack": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
            },
        }
        response = self._login_response()
        args = (
            wire.encode_table(properties)
            + wire.encode_shortstr(self._login_method)
            + len(response).to_bytes(4, "big")
            + response
            + wire.encode_shortstr("en_US")
        )
        self.transport.write(wire.frame(wire.FRAME_METHOD, 0, b"\x00\x0a\x00\x0b" + args))

    def _login_response(self) -> bytes:
        """The SASL response for the configured mechanism."""
        if self._login_method == "EXTERNAL":
            return b""  # the identity is the TLS client certificate's
        if self._login_method == "AMQPLAIN":
            # A field table without its length prefix (AMQP 0-9-1, 1.4.2.2.3).
            return wire.encode_table({"LOGIN": self._username, "PASSWORD": self._password})[4:]
        return ("\0" + self._username + "\0" + self._password).encode("utf-8")

    # --- incoming frames --------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Split frames; keep the hot ones, give the rest to txAMQP.
        """
        self._last_received = self.clock.seconds()
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        head = wire.FRAME_HEAD
        try:
            while end - offset >= 8:
                frame_type, channel, size = head.unpack_from(buffer, offset)
                stop = offset + 7 + size
                if stop >= end:
                    if size > max(self.MAX_LENGTH, _DEFAULT_FRAME_MAX):
                        raise wire.WireError(f"frame of {size} bytes exceeds frame_max {self.MAX_LENGTH}")
                    break
                if buffer[stop] != wire.FRAME_END:
                    raise wire.WireError("frame does not end with frame-end")
                payload = bytes(buffer[offset + 7 : stop])
                if not self._hot_frame(frame_type, channel, payload):
                    self.frame_received(self._decode_frame(bytes(buffer[offset : stop + 1])))
                offset = stop + 1
        except wire.WireError as e:
            self._log.error("Broker {broker} sent invalid AMQP: {error}; closing", broker=self._connection_name, error=e)
            self.transport.abortConnection()
        finally:
            del buffer[:offset]

    def _decode_frame(self, raw: bytes) -> Any:
        """
        Decode a frame the hot path leaves to txAMQP.

        @raise wire.WireError: for any frame txAMQP cannot decode (its codec
            raises whatever its reads hit: EOF, struct or key errors).
        """
        try:
            return unpack_txamqp_frame(self, raw)
        except Exception as e:
            raise wire.WireError(f"undecodable frame ({type(e).__name__}: {str(e)[:100]})") from None

    def _hot_frame(self, frame_type: int, channel: int, payload: bytes) -> bool:
        """
        @return: whether the frame was handled here (else txAMQP takes it).
        """
        if frame_type == wire.FRAME_BODY:
            incoming = self._incoming.get(channel)
            if incoming is None:
                return False
            incoming.parts.append(payload)
            incoming.received += len(payload)
            if incoming.received >= incoming.size:
                self._content_complete(channel)
            return True
        if frame_type == wire.FRAME_METHOD:
            if len(payload) < 4:
                raise wire.WireError("method frame shorter than its class and method ids")
            class_id = (payload[0] << 8) | payload[1]
            method_id = (payload[2] << 8) | payload[3]
            if class_id == wire.BASIC:
                if method_id == wire.BASIC_DELIVER:
                    self._incoming[channel] = _Incoming(wire.decode_deliver(payload))
                    return True
                if method_id == wire.BASIC_ACK or method_id == wire.BASIC_NACK:
                    fast = self.fast_channels.get(channel)
                    if fast is not None:
                        tag, multiple = wire.decode_confirm(payload)
                        fast.confirmed(tag, multiple, method_id == wire.BASIC_ACK)
                    return True
                if method_id == wire.BASIC_RETURN:
                    self._incoming[channel] = _Incoming(("return",) + wire.decode_return(payload))
                    return True
            elif (class_id, method_id) == _CONNECTION_START:
                self._start_ok(payload)
                return True
            return False
        if frame_type == wire.FRAME_HEADER:
            incoming = self._incoming.get(channel)
            if incoming is None:
                return False
            incoming.size = wire.content_body_size(payload)
            try:
                incoming.properties = wire.decode_properties(payload, 12)
            except wire.WireError as e:
                # One publisher's garbage must not cost the connection: the
                # message is still assembled and handed on as malformed.
                incoming.error = str(e)
            if incoming.size == 0:
                self._content_complete(channel)
            return True
        return frame_type == wire.FRAME_HEARTBEAT

    def _content_complete(self, channel: int) -> None:
        incoming = self._incoming.pop(channel)
        parts = incoming.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        fast = self.fast_channels.get(channel)
        if fast is None:
            return
        method = incoming.method
        if method[0] == "return":
            _, code, text, exchange, routing_key = method
            fast.returned(code, text, exchange, routing_key, incoming.properties, body)
        else:
            consumer_tag, delivery_tag, redelivered, exchange, routing_key = method
            fast.delivered(
                consumer_tag, delivery_tag, redelivered, exchange, routing_key, incoming.properties, body, incoming.error
            )

    # --- heartbeats -------------------------------------------------------

    def reschedule_check_heartbeat(self) -> None:
        """
        txAMQP re-arms a timer on every frame it sees; most frames never
        reach it.  L{check_heartbeat} looks at when bytes last arrived.
        """

    def check_heartbeat(self) -> None:
        """Abort a connection that sent nothing for three heartbeat intervals."""
        silence = self.clock.seconds() - self._last_received
        limit = self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT
        if silence < limit:
            self.checkHB = self.clock.callLater(limit - silence, self.check_heartbeat)
            return
        self._log.warn("Broker {broker} silent for {silence:.0f}s; aborting", broker=self._connection_name, silence=silence)
        self.transport.abortConnection()

    # --- notifications from the delegate ---------------------------------

    def set_blocked(self, reason: str | None) -> None:
        """
        @param reason: why the broker blocks publishers, or L{None} when it
            unblocked them.
        """
        self.blocked = reason
        if reason is None:
            self._log.info("Broker {broker} unblocked publishing", broker=self._connection_name)
        else:
            self._log.warn("Broker {broker} blocked publishing: {reason}", broker=self._connection_name, reason=reason)
        for observer in list(self.blocked_observers):
            observer(reason)

    def consumer_cancelled(self, channel: int, consumer_tag: str) -> None:
        """
        The broker cancelled a consumer (its queue was deleted, or a quorum
        leader moved): the channel owner must rebuild.
        """
        fast = self.fast_channels.get(channel)
        if fast is not None:
            fast.cancelled_by_broker(consumer_tag)

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        """
        The broker closed a channel with an error.

        txAMQP fails the channel's pending method before it calls this, and
        whoever awaited that method may already have closed the channel and
        opened another on the same number: only the tables' entries for this
        very channel are dropped.
        """
        fast = self.fast_channels.get(channel.id)
        if fast is not None and fast.txamqp_channel is channel:
            del self.fast_channels[channel.id]
            fast.closed_by_broker = _channel_close_code(reason)
            fast.lost(reason)
        forget_txamqp_channel(self, channel)

    def do_close(self, reason: Any) -> None:
        """
        txAMQP's C{do_close}, iterating over a copy: closing a channel fires
        Deferreds whose callbacks may forget channels while txAMQP iterates.
        """
        for channel in list(self.channels.values()):
            channel.close(reason)
        for queue in list(self.queues.values()):
            queue.close()
        self.delegate.close(reason)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        channels, self.fast_channels = self.fast_channels, {}
        for fast in channels.values():
            fast.lost(reason)

    # --- outgoing ---------------------------------------------------------

    async def open_channel(self) -> Channel:
        """
        Open a new channel on the lowest free channel number.

        @return: the channel, registered for the hot path.
        """
        number = 1
        taken = txamqp_channel_numbers(self)
        while number in taken or number in self.fast_channels:
            number += 1
        txchannel = await self.channel(number)
        try:
            await txchannel.channel_open()
        except BaseException:
            forget_txamqp_channel(self, txchannel)
            raise
        fast = Channel(self, txchannel)
        self.fast_channels[number] = fast
        return fast

    def forget_channel(self, channel: Channel) -> None:
        """
        A channel we closed is gone: drop it from the hot path and from
        txAMQP's table, so that its number can be used again (unless the
        number already belongs to a newer channel).
        """
        if self.fast_channels.get(channel.number) is channel:
            del self.fast_channels[channel.number]
        forget_txamqp_channel(self, channel.txamqp_channel)

    def write_message(self, parts: list[bytes]) -> None:
        """
        Write a message's pre-encoded frames (in order, untouched by
        txAMQP), at once if the connection is quiet.
        """
        self._writer.urgent(self.transport, parts)

    def write_frames(self, parts: list[bytes]) -> None:
        """Write pre-encoded frames that can wait a turn (acks, rejects, declarations)."""
        self._writer.lazy(self.transport, parts)

    def write_frame(self, data: bytes) -> None:
        """Write one pre-encoded frame that can wait a turn."""
        self._writer.lazy(self.transport, (data,))

