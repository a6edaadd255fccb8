# -*- test-case-name: tests.test_private_apis -*-
"""
Every private detail of Twisted and txAMQP that msgmux relies on, in one
place.

msgmux goes below the public API of its dependencies in two spots, each for
a measured reason: the AMQP hot path (L{msgmux.amqp.protocol}) takes frames
away from txAMQP and must still hand the others back and keep txAMQP's
channel table straight; the write-through path (L{msgmux._writethrough})
sends on an idle socket without waiting for the reactor.  Those two
modules use some of these details directly, where a function would cost a
call per frame; the rest reach them through the functions below.
L{RELIED_ON} names every one of them with the reason, so that
C{tests.test_private_apis} fails loudly when a Twisted or txAMQP upgrade
renames or removes one, instead of msgmux misbehaving subtly.  setup.py
bounds the versions these were checked against.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import abstract, tcp, unix
from twisted.protocols import tls
from txamqp.protocol import AMQChannel, AMQClient

__all__ = [
    "RELIED_ON",
    "Reliance",
    "flush_tls_writes",
    "forget_txamqp_channel",
    "txamqp_channel_closed",
    "txamqp_channel_numbers",
    "unpack_txamqp_frame",
]


@attrs.frozen
class Reliance:
    """
    One private name msgmux uses.

    @ivar owner: the class it belongs to.
    @ivar name: the attribute.
    @ivar instance: whether only instances have it (set in C{__init__} or
        later), so the check needs an instance.
    @ivar why: what msgmux needs it for.
    """

    owner: type
    name: str
    instance: bool
    why: str


RELIED_ON: tuple[Reliance, ...] = (
    Reliance(AMQClient, "_unpack_frame", False, "decode a frame the hot path hands back to txAMQP"),
    Reliance(AMQClient, "channels", True, "txAMQP's channel table: pick free channel numbers, forget closed channels"),
    Reliance(AMQClient, "queues", True, "closed in BrokerProtocol.do_close, which replaces txAMQP's"),
    Reliance(AMQClient, "do_close", False, "overridden: txAMQP's iterates over dicts that callbacks change"),
    Reliance(AMQClient, "checkHB", True, "the heartbeat check timer, re-armed by BrokerProtocol.check_heartbeat"),
    Reliance(AMQClient, "check_heartbeat", False, "overridden: judge silence by bytes received, not by frames txAMQP saw"),
    Reliance(AMQClient, "reschedule_check_heartbeat", False, "overridden to do nothing (most frames never reach txAMQP)"),
    Reliance(
        AMQChannel,
        "closed",
        True,
        "has the broker closed the channel? then Channel.close_after_failure leaves it to BrokerProtocol.channel_failed",
    ),
    Reliance(abstract.FileDescriptor, "_tempDataBuffer", True, "write-through: is anything queued?"),
    Reliance(abstract.FileDescriptor, "dataBuffer", False, "write-through: is anything queued?"),
    Reliance(abstract.FileDescriptor, "offset", False, "write-through: is anything queued?"),
    Reliance(abstract.FileDescriptor, "_writeDisconnected", False, "write-through: is the write side closed?"),
    Reliance(unix.Server, "_sendmsgQueue", True, "write-through: file descriptors waiting to be sent (Unix sockets)"),
    Reliance(tcp.Connection, "socket", True, "write-through: the socket to send on"),
    Reliance(abstract.FileDescriptor, "doWrite", False, "write-through: flush now what the reactor would flush next turn"),
    Reliance(tls.BufferingTLSTransport, "_aggregator", True, "write-through over TLS: encrypt now the small writes TLS keeps for next turn"),
)


def unpack_txamqp_frame(protocol: AMQClient, raw: bytes) -> Any:
    """
    @param protocol: a txAMQP client.
    @param raw: one whole AMQP frame, frame-end octet included.
    @return: txAMQP's frame object for it.
    """
    return protocol._unpack_frame(raw)


def txamqp_channel_numbers(protocol: AMQClient) -> set[int]:
    """@return: the channel numbers txAMQP has objects for."""
    return set(protocol.channels)


def flush_tls_writes(transport: tls.TLSMemoryBIOProtocol) -> None:
    """
    Encrypt and pass down now the small writes Twisted's TLS transport keeps
    until its next turn (a Twisted without that buffering writes at once).
    """
    aggregator = getattr(transport, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()


def forget_txamqp_channel(protocol: AMQClient, channel: AMQChannel) -> None:
    """
    Drop txAMQP's object for a channel that is closed (or never opened),
    unless its number already belongs to a newer channel.
    """
    if protocol.channels.get(channel.id) is channel:
        del protocol.channels[channel.id]


def txamqp_channel_closed(channel: AMQChannel) -> bool:
    """@return: whether txAMQP considers the channel closed (by the broker or by us)."""
    return bool(channel.closed)
