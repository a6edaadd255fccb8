# -*- test-case-name: tests.test_control_policy -*-
"""
What the control half does to messages on their way down.

Control-side messages are trusted, but a few things are msgmux's to do
before they reach a tenant network: a call gets a reply token in place of
its ids (so its reply can only come back to its caller, and only while it
is expected), a reply from a control server to a tenant's call gets its
caller's id back, a message that came up this link is not sent back down
it, and the down routes may restrict the methods a tenant's servers get.
Pure code: no I/O.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from msgmux.amqp.channel import Delivery
from msgmux.config import LinkConfig
from msgmux.control.rewrite import CallRewriter
from msgmux.control.upstream import COMPRESSED, IDENTITY_HEADER, expiration_seconds
from msgmux.message import CanaryAddress, Message, ReplyAddress, RpcAddress
from msgmux.oslo import envelope
from msgmux.policy import Refusal
from msgmux.routing import Source
from msgmux.stats import LinkStats

__all__ = ["DownstreamRewrite"]


class DownstreamRewrite:
    """The downstream side of one link's policy."""

    def __init__(self, config: LinkConfig, rewriter: CallRewriter, clock: IReactorTime, stats: LinkStats) -> None:
        self.config = config
        self.rewriter = rewriter
        self.clock = clock
        self.stats = stats

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        """
        @return: the message to send down, or L{None} when the delivery ends
            here (a reply that came too late).
        @raise Refusal: to reject the delivery for good.
        """
        properties = delivery.properties
        headers = properties.get("headers")
        if headers:
            if headers.get(IDENTITY_HEADER) == self.config.name:
                raise Refusal("loop", f"message from link {self.config.name} routed back to it")
            if "compression" in headers:
                raise Refusal("malformed", COMPRESSED)
        if "user_id" in properties:
            properties = {k: v for k, v in properties.items() if k != "user_id"}
        if isinstance(source.address, ReplyAddress):
            return self._reply(delivery.body, properties)
        if isinstance(source.address, CanaryAddress):
            return Message(CanaryAddress(), properties, delivery.body)
        address = source.address_for(delivery.routing_key)
        expiration = expiration_seconds(properties)
        deadline = None if expiration is None else self.clock.seconds() + expiration
        body = delivery.body
        rule = source.rpc_rule
        restricted = rule is not None and not rule.allows_method("*")
        if isinstance(address, RpcAddress) and (restricted or envelope.might_be_call(body)):
            try:
                request: envelope.Envelope | None = envelope.parse(body)
            except envelope.EnvelopeError:
                request = None  # not ours to judge: relay it as it is
            if restricted:
                method = request.method if request is not None else None
                if rule is None or method is None or not rule.allows_method(method):
                    raise Refusal("method", f"method {method!r} is not allowed down {address.topic}")
            if request is not None:
                try:
                    request.check_request()
                except envelope.EnvelopeError as e:
                    raise Refusal("malformed", str(e)) from None
                if request.is_call:
                    body, deadline = self.rewriter.call(request, "down", expiration, self.config.limits.max_call_timeout)
        return Message(address, properties, body, deadline)

    def _reply(self, body: bytes, properties: Any) -> Message | None:
        """A control server answered a tenant's call: restore its id and send it down."""
        try:
            reply = envelope.parse(body)
        except envelope.EnvelopeError as e:
            raise Refusal("unsolicited-reply", str(e)) from None
        token = self.rewriter.reply(reply, "up")
        if self.clock.seconds() >= token.deadline:
            self.stats.count("late_replies", direction="down")
            return None
        if reply.inner.get("ending"):
            self.rewriter.answered(reply.msg_id or "")
        return Message(ReplyAddress(token.reply_queue), properties, self.rewriter.restored(reply, token), token.deadline)
