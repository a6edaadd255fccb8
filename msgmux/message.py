# -*- test-case-name: tests.test_codec -*-
"""
A relayed message, as both halves and the link protocol see it.

A L{Message} is one AMQP message on its way from one broker to the other:
what it is in oslo.messaging terms (its address), its AMQP properties, its
body and, for calls and other messages with an AMQP C{expiration}, the
moment after which it is useless.  It knows nothing of the link session
that carries it: the link numbers it in a MSG frame
(L{msgmux.link.codec.MessageFrame}).  Pure code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import attrs

__all__ = [
    "Address",
    "CanaryAddress",
    "MAX_NAME",
    "Message",
    "NotificationAddress",
    "PROPERTY_TYPES",
    "ReplyAddress",
    "RpcAddress",
]

#: Longest name in an address, in UTF-8 bytes: exchange names, routing keys
#: and queue names are AMQP short strings.
MAX_NAME = 255

#: The AMQP basic properties a message may carry, with their Python types.
PROPERTY_TYPES: Mapping[str, type | tuple[type, ...]] = {
    "content_type": str,
    "content_encoding": str,
    "headers": dict,
    "delivery_mode": int,
    "priority": int,
    "correlation_id": str,
    "reply_to": str,
    "expiration": str,
    "message_id": str,
    "timestamp": int,
    "type": str,
    "user_id": str,
    "app_id": str,
    "cluster_id": str,
}


@attrs.frozen
class RpcAddress:
    """An oslo RPC target: exchange (L{None}: the broker's), topic, server, fanout."""

    exchange: str | None
    topic: str
    server: str | None = None
    fanout: bool = False


@attrs.frozen
class NotificationAddress:
    """An oslo notification target: exchange (L{None}: the broker's), topic, priority."""

    exchange: str | None
    topic: str
    priority: str


@attrs.frozen
class ReplyAddress:
    """
    An RPC reply.  Downstream it names the caller's reply queue on the tenant
    broker; upstream it is empty (the control half reads the reply token).
    """

    queue: str | None = None


@attrs.frozen
class CanaryAddress:
    """
    msgmux's own probe message: it travels control broker, link, tenant
    broker, link and ends at the control half, proving messages move.
    """


Address = Union[RpcAddress, NotificationAddress, ReplyAddress, CanaryAddress]


@attrs.frozen(slots=True)
class Message:
    """
    One relayed AMQP message.

    @ivar address: what the message is, in oslo.messaging terms; each half
        maps it to its own broker's exchange and routing key.
    @ivar properties: AMQP basic properties (keys of L{PROPERTY_TYPES}).
    @ivar deadline: absolute expiry (Unix time) for calls and messages with
        an AMQP C{expiration}, else L{None}.
    """

    address: Address
    properties: Mapping[str, Any]
    body: bytes
    deadline: float | None = None


def kind_of(address: Address) -> str:
    """The C{kind} label of a message's counters."""
    if isinstance(address, RpcAddress):
        return "rpc"
    if isinstance(address, NotificationAddress):
        return "notification"
    if isinstance(address, CanaryAddress):
        return "canary"
    return "reply"
