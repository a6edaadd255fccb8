# -*- test-case-name: tests.test_control_policy -*-
"""
The checks on everything a tenant half sends up: the trust boundary.

Every upstream message is checked against the link's routes, methods and
limits before anything of it reaches the control broker, and what passes
is stamped with the link's identity (AMQP header C{x-msgmux-link}, and no
other header).  Refusing costs little whatever the message holds: the
route is read from the frame, a request laid out as oslo lays it out shows
its method in its first bytes, and a body is only parsed once a count of
its brackets says parsing it is cheap (L{msgmux.oslo.envelope}).

Pure code: no I/O.  The relay publishes what L{UpstreamChecks.inbound}
returns and refuses what it raises.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

from msgmux.config import LinkConfig, RpcRule
from msgmux.control.canaries import Canaries
from msgmux.control.memory import LinkMemory
from msgmux.control.rewrite import CallRewriter
from msgmux.message import Address, CanaryAddress, Message, NotificationAddress, RpcAddress
from msgmux.oslo import envelope
from msgmux.policy import Copy, Publication, Refusal
from msgmux.routing import Destination
from msgmux.stats import LinkStats

__all__ = ["COMPRESSED", "HEADERS_READ", "IDENTITY_HEADER", "OSLO_CONTENT", "RETURN_RETRY_LIMIT", "UPSTREAM_PROPERTIES", "UpstreamChecks", "expiration_seconds"]

#: The AMQP header carrying the link a message came up from.
IDENTITY_HEADER = "x-msgmux-link"

#: The basic properties a tenant's message keeps on its way up.  Headers are
#: replaced by the identity header alone: RabbitMQ routes on some of them
#: (C{CC}, C{BCC}), and oslo sets none.  C{user_id} would be checked by the
#: broker against msgmux's own login; C{reply_to} and C{cluster_id} mean
#: nothing to oslo.
UPSTREAM_PROPERTIES = frozenset(
    ("content_type", "content_encoding", "delivery_mode", "priority", "expiration", "correlation_id", "message_id", "timestamp", "type", "app_id")
)

#: What every oslo.messaging message says of its body.  A consumer picks its
#: decoder from these, so anything else could make a server read other bytes
#: than the ones msgmux checked.
OSLO_CONTENT = {"content_type": "application/json", "content_encoding": "utf-8"}

#: The only headers of a tenant's message the upstream checks read: the
#: rest are replaced by the link's identity, so the link decodes no more.
HEADERS_READ = frozenset({"compression"})

#: Why a message compressed by kombu (oslo's kombu_compression) is refused:
#: msgmux must read calls and replies to rewrite them, and does not
#: decompress.
COMPRESSED = "compressed by kombu (kombu_compression), which msgmux does not relay; leave kombu_compression unset"

#: Seconds a reply the broker returns (its caller's queue is missing) is
#: tried again, at most: oslo's own server gives up after 60 s
#: (missing_destination_retry_timeout).
RETURN_RETRY_LIMIT = 60.0

_EXPIRATION = re.compile(r"[0-9]{1,10}", re.ASCII)


def expiration_seconds(properties: Any) -> float | None:
    """
    @return: the AMQP C{expiration} in seconds, or L{None} without one.
    @raise Refusal: for an expiration RabbitMQ would refuse by closing the
        channel: only 1 to 10 ASCII digits (C{str.isdigit} and C{int} also
        take other scripts' digits).
    """
    value = properties.get("expiration")
    if value is None:
        return None
    if type(value) is not str or not _EXPIRATION.fullmatch(value):
        raise Refusal("malformed", f"expiration {value!r} is not a number of milliseconds"[:200])
    return int(value) / 1000.0


class UpstreamChecks:
    """
    The upstream policy of one link session.

    @ivar in_flight: the L{Publication.identity} of each message accepted
        in this session whose end (confirmed, dropped or refused) is not
        known yet.  Another message with the same identity is a L{Copy}
        (the tenant broker redelivered it, or the tenant half answers a call
        twice) and waits for it; a non-final reply after a final one ends
        here.
    """

    def __init__(
        self,
        config: LinkConfig,
        rewriter: CallRewriter,
        memory: LinkMemory,
        canaries: Canaries,
        destination: Callable[[Address], Destination],
        clock: IReactorTime,
        stats: LinkStats,
    ) -> None:
        self.config = config
        self.rewriter = rewriter
        self.memory = memory
        self.canaries = canaries
        self.destination = destination
        self.clock = clock
        self.stats = stats
        self.in_flight: set[tuple[str, str]] = set()

    def inbound(self, message: Message) -> Publication | None:
        """
        @return: what to publish, or L{None} when the message ends here
            (a canary, or a duplicate of something already published).
        @raise Refusal: for anything the link may not send.
        """
        limit = self.config.limits.max_message_size
        if len(message.body) > limit:
            raise Refusal("too-large", f"{len(message.body)} bytes, the limit is {limit}")
        address = message.address
        if isinstance(address, CanaryAddress):
            self.canaries.returned(message.body)  # ends here: never published
            return None
        headers = message.properties.get("headers")
        if headers and "compression" in headers:
            raise Refusal("malformed", COMPRESSED)
        properties = self._stamped(message.properties)
        try:
            if isinstance(address, RpcAddress):
                publication = self._request(address, properties, message.body)
            elif isinstance(address, NotificationAddress):
                publication = self._notification(address, properties, message.body)
            else:
                publication = self._reply(properties, message.body)
        except _Duplicate:
            self.stats.count("duplicates_dropped", direction="up")
            return None
        if publication.identity is not None:
            self.in_flight.add(publication.identity)
        return publication

    def _stamped(self, properties: Any) -> dict[str, Any]:
        """
        Keep only the properties oslo uses, insist on oslo's content type and
        encoding, and replace the headers with the link's identity.

        @raise Refusal: for a content type or encoding other than oslo's, or
            an expiration RabbitMQ would refuse.
        """
        for name, value in OSLO_CONTENT.items():
            if properties.get(name) != value:
                raise Refusal("malformed", f"{name} must be {value!r}, as oslo.messaging sends it"[:200])
        stamped = {name: value for name, value in properties.items() if name in UPSTREAM_PROPERTIES}
        expiration_seconds(stamped)
        stamped["headers"] = {IDENTITY_HEADER: self.config.name}
        return stamped

    def _parse(self, body: bytes) -> envelope.Envelope:
        """
        Parse a body, unless counting its brackets shows that parsing it
        could cost more than any oslo message should.
        """
        most = self.config.limits.max_json_containers
        if envelope.container_count(body, most) > most:
            raise Refusal("too-complex", f"more than {most} JSON arrays and objects")
        try:
            return envelope.parse(body)
        except envelope.EnvelopeError as e:
            raise Refusal("malformed", str(e)) from None

    def _rule(self, address: RpcAddress) -> RpcRule | None:
        for rule in self.config.up:
            if rule.topic != address.topic or rule.exchange != address.exchange:
                continue
            if address.fanout and not rule.fanout:
                continue
            if address.server is not None and address.server not in rule.servers:
                continue
            return rule
        return None

    def _request(self, address: RpcAddress, properties: dict[str, Any], body: bytes) -> Publication | None:
        rule = self._rule(address)
        if rule is None:
            raise Refusal("route", f"no up route for {_describe(address)}")
        leading = envelope.leading_method(body)
        if leading is not None and not rule.allows_method(leading):
            raise Refusal("method", f"method {leading!r} is not allowed on {_describe(address)}"[:300])
        request = self._parse(body)
        method = request.method
        if method is None or not rule.allows_method(method):
            raise Refusal("method", f"method {method!r} is not allowed on {_describe(address)}"[:300])
        try:
            request.check_request()
        except envelope.EnvelopeError as e:
            raise Refusal("malformed", str(e)) from None
        unique_id = self._new_unique_id(request)
        deadline = None
        if request.is_call:
            limits = self.config.limits
            if self.rewriter.calls.inflight("up") >= limits.max_inflight_calls:
                raise Refusal("inflight", f"{limits.max_inflight_calls} calls already in flight")
            body, deadline = self.rewriter.call(request, "up", expiration_seconds(properties), limits.max_call_timeout)
        return Publication(self.destination(address), properties, body, deadline, unique_id=unique_id)

    def _notification(self, address: NotificationAddress, properties: dict[str, Any], body: bytes) -> Publication | None:
        for rule in self.config.notifications_up:
            if rule.topic == address.topic and rule.exchange == address.exchange and address.priority in rule.priorities:
                break
        else:
            raise Refusal("route", f"no up route for notification {address.topic}.{address.priority}")
        notification = self._parse(body)
        if "_msg_id" in notification.inner or "_reply_q" in notification.inner:
            # oslo's notifier never sets them; a listener could take them
            # for a call and answer into any queue.
            raise Refusal("malformed", "a notification with _msg_id or _reply_q")
        unique_id = self._new_unique_id(notification)
        return Publication(self.destination(address), properties, body, unique_id=unique_id)

    def _new_unique_id(self, parsed: envelope.Envelope) -> str | None:
        """
        @return: the message's oslo C{_unique_id}, if it has a usable one.
        @raise _Duplicate: when the control broker already confirmed it.
        @raise Copy: when a message with it is still on its way.
        """
        value = parsed.inner.get("_unique_id")
        unique_id = value if type(value) is str and 0 < len(value) <= 64 else None
        if unique_id is None:
            return None
        if unique_id in self.memory.published_ids:
            raise _Duplicate()
        if ("unique_id", unique_id) in self.in_flight:
            raise Copy(("unique_id", unique_id))
        return unique_id

    def _reply(self, properties: dict[str, Any], body: bytes) -> Publication | None:
        reply = self._parse(body)
        token = self.rewriter.reply(reply, "down")
        msg_id = reply.msg_id or ""
        ending = bool(reply.inner.get("ending"))
        if msg_id in self.memory.answered_calls:
            raise _Duplicate()  # a redelivered final reply, or a second answer
        if ("answers", msg_id) in self.in_flight:
            if ending:
                raise Copy(("answers", msg_id))  # even if late: it ends as the first does
            raise _Duplicate()  # a heartbeat after the answer
        if self.clock.seconds() >= token.deadline:
            raise Refusal("late-reply", "reply after the call's deadline")
        if ending:
            self.rewriter.answered(msg_id)
        retry_until = min(token.deadline, self.clock.seconds() + RETURN_RETRY_LIMIT)
        return Publication(
            Destination("", token.reply_queue, mandatory=True),
            properties,
            self.rewriter.restored(reply, token),
            retry_until=retry_until,
            answers=msg_id if ending else None,
        )

    def published(self, publication: Publication) -> None:
        """The control broker confirmed C{publication}: remember what must not happen twice."""
        if publication.identity is not None:
            self.in_flight.discard(publication.identity)
        if publication.unique_id is not None:
            self.memory.published_ids.add(publication.unique_id)
        if publication.answers is not None:
            self.memory.answered_calls.add(publication.answers)

    def publish_failed(self, publication: Publication) -> None:
        """C{publication} was dropped or refused: a message with its identity may come again."""
        if publication.identity is not None:
            self.in_flight.discard(publication.identity)


class _Duplicate(Exception):
    """Already published: the message ends here, counted as a duplicate."""


def _describe(address: RpcAddress) -> str:
    target = address.topic if address.server is None else f"{address.topic}.{address.server}"
    return f"{target} (fanout)" if address.fanout else target
