"""
What a compromised tenant half can throw at the control half, as code.

Each attack connects a L{RawTenant} (a tenant half that speaks the link
protocol frame by frame) to a link socket and does one thing a hostile
tenant network would try: oversized heads, JSON bombs, floods of frames
that carry no work, properties that make RabbitMQ close the channel, a
tenant half that stops reading, connections that hang up at once.  The
integration tests run them against a real control half and check each is
refused, counted or ends its session with a named reason; C{make bench}
runs them to measure what they cost the other links.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import cbor2
from twisted.internet import defer, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from lab.hostile import RawTenant, connect_raw, oslo_body
from msgmux.link import codec
from msgmux.message import NotificationAddress, ReplyAddress, RpcAddress

__all__ = [
    "connection_churn",
    "frame_flood",
    "header_bomb",
    "json_bomb",
    "notification_with_call_fields",
    "poison_property",
    "repeated_final_replies",
    "slow_reader",
]

#: What a legitimate tenant half of the lab sends, for the attacks to mimic.
OSLO_PROPERTIES = {"content_type": "application/json", "content_encoding": "utf-8"}


async def _pause(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def header_bomb(reactor: Any, socket: str, link: str, size: int = 8_400_000) -> RawTenant:
    """
    A MSG whose head (properties and headers) is C{size} bytes of empty
    CBOR arrays: the control half must refuse it from its first bytes.

    @return: the attacker, closed by the control half.
    """
    head = hostile_head(size)
    tenant = await connect_raw(reactor, socket, link)
    tenant.send_raw(raw_message(head, b""))
    await tenant.wait_for(lambda: tenant.closed.called)
    return tenant


def raw_message(head: bytes, body: bytes, head_length: int | None = None) -> bytes:
    """
    A MSG frame around a head and a body given as bytes (a head no honest
    encoder would write).

    @param head_length: the head length to announce, if not C{len(head)}
        (the frame then claims more bytes than C{head} and C{body}).
    """
    length = len(head) if head_length is None else head_length
    return struct.pack(">IBI", 1 + 4 + length + len(body), codec.MSG, length) + head + body


def hostile_head(items: int, seq: int = 1) -> bytes:
    """
    The CBOR head of a MSG whose one header holds C{items} empty arrays
    (one byte each): the cheapest bytes to send and among the dearest to
    decode.
    """
    marker = "HEADER-VALUE"
    head = cbor2.dumps([seq, codec.KIND_RPC, [None, "q-reports", None, False], dict(OSLO_PROPERTIES, headers={"h": marker}), None])
    array = (b"\x9a" + struct.pack(">I", items) if items > 0xFFFF else b"\x99" + struct.pack(">H", items)) + b"\x80" * items
    return head.replace(cbor2.dumps(marker), array)


def bomb_body(method: str, size: int) -> bytes:
    """An oslo request of C{size} bytes whose arguments are empty lists, nothing but."""
    head = oslo_body({"method": method, "args": {"x": []}})
    opening = head[: head.index(b"[]") + 1]
    closing = head[head.index(b"[]") + 1 :]
    filler = b"[]," * ((size - len(opening) - len(closing) - 2) // 3)
    return opening + filler + b"[]" + closing


async def json_bomb(reactor: Any, socket: str, link: str, method: str, count: int = 5, size: int = 8_000_000) -> list[str]:
    """
    Requests of C{size} bytes holding millions of empty lists, on an allowed
    topic, with C{method}: refused cheaply whether the method is allowed or
    not.

    @return: the REJECT reasons.
    """
    tenant = await connect_raw(reactor, socket, link)
    body = bomb_body(method, size)
    sent = []
    for _ in range(count):
        await tenant.wait_for(lambda: tenant.credit() >= tenant.next_seq and tenant.byte_credit() >= len(body) * tenant.next_seq)
        sent.append(tenant.send_message(RpcAddress(None, "q-reports"), body))
    reasons = [await tenant.wait_outcome(seq) for seq in sent]
    tenant.transport.loseConnection()
    return reasons


async def frame_flood(reactor: Any, socket: str, link: str, frames: int = 3_000_000) -> RawTenant:
    """Heartbeats, as fast as the socket takes them: the session must close with frame-flood."""
    tenant = await connect_raw(reactor, socket, link)
    chunk = codec.encode(codec.Heartbeat()) * 10_000
    for _ in range(frames // 10_000):
        if tenant.closed.called:
            break
        tenant.send_raw(chunk)
        await _pause(reactor, 0)
    await tenant.wait_for(lambda: tenant.closed.called)
    return tenant


async def poison_property(reactor: Any, socket: str, link: str) -> list[str]:
    """Upstream messages with delivery modes RabbitMQ closes the channel over; @return: their REJECT reasons."""
    tenant = await connect_raw(reactor, socket, link)
    report = oslo_body({"method": "report_state", "args": {}})
    seqs = [tenant.send_message(RpcAddress(None, "q-reports"), report, {"delivery_mode": mode}) for mode in (3, 255, 0)]
    reasons = [await tenant.wait_outcome(seq) for seq in seqs]
    tenant.transport.loseConnection()
    return reasons


async def notification_with_call_fields(reactor: Any, socket: str, link: str) -> str:
    """A notification carrying a reply queue and a message id of the wrong types; @return: its REJECT reason."""
    tenant = await connect_raw(reactor, socket, link)
    body = oslo_body({"event_type": "x", "payload": {}, "_reply_q": 0, "_msg_id": []})
    seq = tenant.send_message(NotificationAddress(None, "notifications", "info"), body)
    reason = await tenant.wait_outcome(seq)
    tenant.transport.loseConnection()
    return reason


async def repeated_final_replies(tenant: RawTenant, copies: int = 5) -> list[int]:
    """
    Answer the first call the control half sent down with C{copies} final
    replies in one write (and acknowledge the request).

    @return: the sequence numbers of the replies.
    """
    tenant.send(codec.Credit(10, 1 << 20))  # let the control half send the call down
    await tenant.wait_for(lambda: any(isinstance(f, codec.MessageFrame) for f in tenant.frames), timeout=30)
    request = next(f for f in tenant.frames if isinstance(f, codec.MessageFrame))
    token = json.loads(json.loads(request.message.body)["oslo.message"])["_msg_id"]
    tenant.send(codec.Ack((request.seq,)))
    reply = oslo_body({"_msg_id": token, "result": "answered", "failure": None, "ending": True})
    return [tenant.send_message(ReplyAddress(None), reply) for _ in range(copies)]


async def slow_reader(reactor: Any, socket: str, link: str) -> RawTenant:
    """
    A tenant half that grants plenty of credit, then reads nothing while it
    keeps its heartbeats going; whatever is sent down piles up on the
    control half until it gives up on the session.
    """
    tenant = await connect_raw(reactor, socket, link)
    tenant.send(codec.Credit(1_000_000, 1 << 40))
    tenant.transport.pauseProducing()
    return tenant


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(codec.encode(codec.Hello((codec.PROTOCOL_VERSION,), None, "churn")))
        self.transport.loseConnection()


async def connection_churn(reactor: Any, socket: str, count: int = 300) -> None:
    """C{count} connections that say HELLO and hang up at once."""
    attempts = [connectProtocol(UNIXClientEndpoint(reactor, socket), _HangUp()) for _ in range(count)]
    await defer.DeferredList(attempts, consumeErrors=True)
