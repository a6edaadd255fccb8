# -*- test-case-name: tests.test_codec -*-
"""
A relayed message, apart from any wire: where it goes, its AMQP properties,
its body and its deadline.

The link codec, the relays, the policy and the routing all speak of messages;
only the link frame that carries one adds a sequence number
(L{msgmux.link.codec.MessageFrame}).  Keeping the two apart means code that
builds a message never invents a sequence number it does not have.  Pure
values, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import attrs

__all__ = [
    "MAX_NAME",
    "kind_of",
    "PROPERTY_TYPES",
    "Address",
    "CanaryAddress",
    "Message",
    "NotificationAddress",
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


@attrs.frozen
class Message:
    """
    One relayed AMQP message.

    @ivar address: where it goes, in oslo.messaging terms.
    @ivar properties: AMQP basic properties (keys of L{PROPERTY_TYPES}).
    @ivar body: the AMQP body, opaque here.
    @ivar deadline: absolute expiry (Unix time) for call requests and other
        messages with an AMQP expiration, else L{None}.
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
