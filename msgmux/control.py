# -*- test-case-name: tests.test_control -*-
"""
The control half: the trust boundary.

It runs in the control network with the control broker's credentials and
one listening Unix socket per link.  Everything the tenant half sends is
checked here (L{ControlRelay.inbound}): the route and method against the
link's policy, the message size, the envelope, the call limits and, for
replies, the signed reply token.  Whatever passes is stamped with the link's
identity (AMQP header C{x-msgmux-link}) before it reaches the control broker.
Link credit is paced by a token bucket, so a tenant cannot send faster than
its C{max_rate}; the excess waits on the tenant broker.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.channel import Delivery
from msgmux.calls import CallTracker
from msgmux.config import ControlConfig, LinkConfig, RpcRule
from msgmux.link.codec import FRAME_OVERHEAD, CanaryAddress, Message, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.link.protocol import ControlLinkProtocol, LinkProtocol
from msgmux.oslo import envelope
from msgmux.oslo.tokens import TokenError, TokenSigner
from msgmux.oslo.topology import ExchangeSpec, OsloTopology, QueueSpec
from msgmux.relay import RETURN_RETRY_LIMIT, Publication, Refusal, Relay
from msgmux.routing import Destination, LinkRoutes, Source, canary_queue_name, publish_topology, sources
from msgmux.stats import LinkStats
from msgmux.streams import StreamPosition

__all__ = ["ControlLink", "ControlLinkFactory", "ControlRelay", "IDENTITY_HEADER"]

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

#: Sessions a link may start in a burst, and per second after it: each new
#: session opens a channel and declares topology on the control broker.
SESSION_BURST = 5
SESSION_RATE = 1.0

#: Canaries older than this when they come back are refused (a replay).
CANARY_MAX_AGE = 3600.0

#: oslo C{_unique_id}s of upstream messages a link remembers as published.
#: A tenant broker redelivers what the tenant half had not acknowledged when
#: its connection went, which includes messages already published here;
#: oslo's own check remembers only the last 16 ids per listener, so without
#: this they would reach the servers twice.  More than link window plus
#: prefetch, the most that can be redelivered at once.
RECENT_IDS = 2048

#: Final replies remembered per link, so that a tenant half cannot answer a
#: call again once it was answered (until its deadline, the token alone
#: would let it).  Down calls come from control clients, so a tenant half
#: cannot push entries out by making calls.
ANSWERED_CALLS = 8192

_EXPIRATION = re.compile(r"[0-9]{1,10}", re.ASCII)

#: Why a message compressed by kombu (oslo's kombu_compression) is refused:
#: msgmux must read calls and replies to rewrite them, and does not
#: decompress.
COMPRESSED = "compressed by kombu (kombu_compression), which msgmux does not relay; leave kombu_compression unset"


class TokenBucket:
    """
    Classic token bucket: C{rate} tokens per second, at most C{burst} saved.
    """

    def __init__(self, rate: float, burst: int, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self._updated = clock.seconds()

    def _refill(self) -> None:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now

    def take(self, wanted: int) -> int:
        """@return: how many of C{wanted} tokens were available (and taken)."""
        self._refill()
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def seconds_until_one(self) -> float:
        """@return: how long until at least one token is available."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate)


class RecentIds:
    """The last C{size} ids added, for membership tests."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: collections.deque[str] = collections.deque()
        self._ids: set[str] = set()

    def add(self, value: str) -> None:
        if value in self._ids:
            return
        self._ids.add(value)
        self._order.append(value)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())

    def __contains__(self, value: object) -> bool:
        return value in self._ids

    def __len__(self) -> int:
        return len(self._order)


class ControlLink:
    """
    Everything about one link that outlives its sessions: policy, counters,
    outstanding calls, and the session currently attached.
    """

    _log = Logger()

    def __init__(
        self,
        config: LinkConfig,
        control: ControlConfig,
        broker: BrokerService,
        signer: TokenSigner,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.control = control
        self.broker = broker
        self.signer = signer
        self.clock = clock
        self.routes = LinkRoutes.from_link(config)
        self.topology = OsloTopology(control.broker.queues, control.broker.exchange)
        self.stats = LinkStats(config.name, clock)
        self.calls = CallTracker(clock, self.stats)
        self.bucket = TokenBucket(config.limits.max_rate, config.limits.burst, clock)
        self.sessions = TokenBucket(SESSION_RATE, SESSION_BURST, clock)
        self.relay: ControlRelay | None = None
        #: When the newest canary that came back was sent (our clock).
        self.last_canary: float | None = None
        self.stats.gauges["link_up"] = 0
        self.published_ids: RecentIds = RecentIds(RECENT_IDS)
        #: Reply tokens of down calls whose final reply was published: the
        #: call is over, and the tenant half may not answer it again.
        self.answered_calls: RecentIds = RecentIds(ANSWERED_CALLS)
        self.streams: dict[str, StreamPosition] = {}
        #: Set when the link is removed from the configuration: a
        #: connection accepted before that cannot start a session any more.
        self.retired = False

    def status(self) -> dict[str, Any]:
        """The link now, for C{/status} and C{msgmux status}."""
        relay = self.relay if self.relay is not None and self.relay.active else None
        return {
            "link": self.config.name,
            "socket": self.config.socket,
            "up": relay is not None,
            "healthy": self.healthy(),
            "session": relay.link.session if relay is not None else None,
            "peer": getattr(relay.link, "peer", None) if relay is not None else None,
            "last_canary_age": None if self.last_canary is None else round(self.clock.seconds() - self.last_canary, 3),
            "canary_round_trip": self.stats.gauges.get("canary_round_trip_seconds"),
            "inflight_calls": {"down": self.calls.inflight("down"), "up": self.calls.inflight("up")},
            "relayed": {d: self.stats.relayed(d) for d in ("down", "up")},
            "rejected": {"down": self.stats.get("rejected", direction="down"), "up": self.stats.get("rejected", direction="up")},
        }

    def healthy(self) -> bool:
        """
        Messages are moving: a canary sent within the last three canary
        intervals went round both brokers and came back.  (Connection state
        alone says nothing: a link can be up while a broker blocks or a
        channel is stuck.)
        """
        if self.last_canary is None:
            return False
        return self.clock.seconds() - self.last_canary <= 3 * self.control.canary_interval

    def reconfigure(self, config: LinkConfig, control: ControlConfig) -> None:
        """
        Take new routes and limits (SIGHUP).  A session in progress is
        closed so that the tenant half reconnects and learns the new routes;
        counters and calls in flight are kept.
        """
        self.config = config
        self.control = control
        self.routes = LinkRoutes.from_link(config)
        self.bucket = TokenBucket(config.limits.max_rate, config.limits.burst, self.clock)
        if self.relay is not None and self.relay.active:
            self.relay.link.close("reconfigured", "the control half reloaded its configuration; reconnect")

    @property
    def max_frame(self) -> int:
        """Largest frame accepted from the tenant half."""
        return self.config.limits.max_message_size + FRAME_OVERHEAD

    def attach(self, protocol: LinkProtocol) -> ControlRelay | str:
        """
        A tenant half completed HELLO.

        @return: the relay for its session, or why there is none: another
            tenant half holds this link, or this link started too many
            sessions lately (each costs a channel and declarations on the
            control broker).
        """
        if self.retired:
            return f"link {self.config.name!r} was removed from the configuration"
        if self.relay is not None and self.relay.active:
            return f"link {self.config.name!r} already has a tenant half connected"
        if not self.sessions.take(1):
            self.stats.count("sessions_refused")
            return f"link {self.config.name!r} started {SESSION_BURST} sessions lately; retry in a second"
        self.relay = ControlRelay(self, protocol)
        self.stats.count("sessions")
        return self.relay


#: Connections one link socket holds open before their handshake: a real
#: tenant half needs one; more are turned away so that nobody can pile up
#: sockets and buffers on the control half.
MAX_PENDING_CONNECTIONS = 4


class ControlLinkFactory(Factory):
    """Builds the control end of the link for connections on one socket."""

    _log = Logger()

    def __init__(self, link: ControlLink) -> None:
        self.link = link
        self._pending: set[ControlLinkProtocol] = set()

    def close_pending(self, code: str, detail: str) -> None:
        """Close the connections that have not completed their handshake."""
        for protocol in list(self._pending):
            if protocol.session is None:
                protocol.close(code, detail)
        self._pending.clear()

    def buildProtocol(self, addr: Any) -> ControlLinkProtocol | None:
        link = self.link
        self._pending = {p for p in self._pending if p.session is None and p.close_reason is None}
        if len(self._pending) >= MAX_PENDING_CONNECTIONS:
            link.stats.count("connections_refused")
            self._log.warn(
                "Link {link}: refusing a connection, {count} others have not completed the handshake",
                link=link.config.name,
                count=len(self._pending),
            )
            return None
        protocol = ControlLinkProtocol(
            clock=link.clock,
            heartbeat=link.control.link_heartbeat,
            max_frame=link.max_frame,
            link_name=link.config.name,
            routes=lambda: link.routes.to_wire(),
            attach=link.attach,
        )
        protocol.violation_observers.append(lambda code, detail: link.stats.count("protocol_violations", code=code))
        protocol.factory = self
        self._pending.add(protocol)
        return protocol


def _expiration_seconds(properties: dict[str, Any]) -> float | None:
    value = properties.get("expiration")
    if value is None:
        return None
    # ASCII digits only: str.isdigit() and int() also take other scripts'
    # digits, which RabbitMQ refuses by closing the channel.
    if type(value) is not str or not _EXPIRATION.fullmatch(value):
        raise Refusal("malformed", f"expiration {value!r} is not a number of milliseconds"[:200])
    return int(value) / 1000.0


class ControlRelay(Relay):
    """One tenant session of a link, seen from the control half."""

    direction_out = "down"
    direction_in = "up"

    def __init__(self, owner: ControlLink, link: LinkProtocol) -> None:
        super().__init__(link, owner.broker, owner.clock, owner.control.link_window, owner.stats, owner.streams)
        self.owner = owner
        self.config = owner.config
        self._owed_credit = 0
        self._credit_call: Any = None
        self._canaries = LoopingCall(self._send_canary)
        self._canaries.clock = owner.clock

    # --- topology -------------------------------------------------------

    def topology(self) -> OsloTopology:
        return self.owner.topology

    def sources(self) -> list[Source]:
        return sources(self.config.name, self.config.down, self.config.notifications_down, self.owner.topology)

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        return publish_topology(self.config.up, self.config.notifications_up, self.owner.topology)

    def published(self, publication: Publication) -> None:
        if publication.unique_id is not None:
            self.owner.published_ids.add(publication.unique_id)
        if publication.answers is not None:
            self.owner.answered_calls.add(publication.answers)

    # --- credit pacing ----------------------------------------------------

    def return_credit(self, count: int) -> None:
        self._owed_credit += count
        if self._credit_call is not None and self._credit_call.active():
            return  # already throttled: the pending payment pays this too
        self._pay_credit()

    def _pay_credit(self) -> None:
        """
        Grant what the token bucket allows of the owed credit, and come back
        for the rest. At most one payment is ever scheduled, however many
        settlements arrive while the link is throttled.
        """
        self._credit_call = None
        if not self.active or not self._owed_credit:
            return
        granted = self.owner.bucket.take(self._owed_credit)
        if granted:
            self._owed_credit -= granted
            self.link.grant(granted)
        if self._owed_credit:
            self.stats.count("throttled")
            self._credit_call = self.clock.callLater(max(0.005, self.owner.bucket.seconds_until_one()), self._pay_credit)

    def session_ended(self, reason: str) -> None:
        if self._credit_call is not None and self._credit_call.active():
            self._credit_call.cancel()
        if self._canaries.running:
            self._canaries.stop()
        super().session_ended(reason)

    # --- canaries: health means messages move ------------------------------

    def session_started(self, link: LinkProtocol) -> None:
        super().session_started(link)
        self._canaries.start(self.owner.control.canary_interval, now=False)

    def _send_canary(self) -> None:
        """Put a canary on the control broker; it comes back through the tenant broker."""
        channel = self.channel
        if channel is None:
            return
        body = self.owner.signer.canary(self.config.name, self.clock.seconds())
        canary = channel.publish("", canary_queue_name(self.config.name), {"content_type": "application/json"}, body)
        canary.addErrback(lambda failure: None)  # a lost canary is what the health check is for
        self.stats.count("canaries_sent")

    def _canary_back(self, body: bytes) -> None:
        try:
            sent = self.owner.signer.verify_canary(self.config.name, body)
        except TokenError as e:
            raise Refusal("malformed", str(e)) from None
        now = self.clock.seconds()
        if not now - CANARY_MAX_AGE <= sent <= now:
            raise Refusal("malformed", "canary from the future or replayed")
        last = self.owner.last_canary
        if last is not None and sent <= last:
            # A redelivered canary, or one the tenant half kept to replay:
            # health is the newest canary back, so this says nothing.
            self.stats.count("canaries_stale")
            return
        self.owner.last_canary = sent
        self.stats.gauges["canary_round_trip_seconds"] = now - sent
        self.stats.count("canaries_returned")

    # --- downstream: control broker -> tenant -------------------------------

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        properties = delivery.properties
        headers = properties.get("headers")
        if headers:
            if headers.get(IDENTITY_HEADER) == self.config.name:
                delivery.reject(requeue=False)
                self.stats.reject("down", "loop", f"message from link {self.config.name} routed back to it")
                return None
            if "compression" in headers:
                delivery.reject(requeue=False)
                self.stats.reject("down", "malformed", COMPRESSED)
                return None
        if "user_id" in properties:
            properties = {k: v for k, v in properties.items() if k != "user_id"}
        if isinstance(source.address, ReplyAddress):
            return self._reply_down(delivery, properties)
        if isinstance(source.address, CanaryAddress):
            return Message(0, CanaryAddress(), properties, delivery.body)
        address = source.address_for(delivery.routing_key)
        now = self.clock.seconds()
        try:
            expiration = _expiration_seconds(properties)
        except Refusal as refusal:
            delivery.reject(requeue=False)
            self.stats.reject("down", refusal.reason, refusal.detail)
            return None
        deadline = None if expiration is None else now + expiration
        body = delivery.body
        rule = source.rpc_rule
        restricted = rule is not None and not rule.allows_method("*")
        if isinstance(address, RpcAddress) and (restricted or envelope.might_be_call(body)):
            try:
                parsed = envelope.parse(body)
            except envelope.EnvelopeError:
                parsed = None  # not ours to judge: relay it as it is
            if restricted and (parsed is None or not rule.allows_method(parsed.method or "")):  # type: ignore[union-attr]
                delivery.reject(requeue=False)
                method = parsed.method if parsed is not None else None
                self.stats.reject("down", "method", f"method {method!r} is not allowed down {address.topic}")
                return None
            if parsed is not None:
                try:
                    parsed.check_request()
                except envelope.EnvelopeError as e:
                    delivery.reject(requeue=False)
                    self.stats.reject("down", "malformed", str(e))
                    return None
            if parsed is not None and parsed.is_call:
                limit = self.config.limits.max_call_timeout
                deadline = now + min(expiration if expiration is not None else limit, limit)
                try:
                    token = self.owner.signer.issue(
                        self.config.name, "down", parsed.msg_id or "", parsed.reply_queue or "", deadline
                    )
                except TokenError as e:
                    delivery.reject(requeue=False)
                    self.stats.reject("down", "malformed", str(e))
                    return None
                body = parsed.with_inner(_msg_id=token, _reply_q=self.owner.routes.reply_queue)
                self.owner.calls.begin(token, deadline, "down")
        return Message(0, address, properties, body, deadline)

    def _reply_down(self, delivery: Delivery, properties: dict[str, Any]) -> Message | None:
        """A control server answered a tenant's call: restore and send it down."""
        try:
            parsed = envelope.parse(delivery.body)
            token = self.owner.signer.verify(self.config.name, "up", parsed.msg_id or "")
        except (envelope.EnvelopeError, TokenError) as e:
            delivery.reject(requeue=False)
            self.stats.reject("down", "unsolicited-reply", str(e))
            return None
        if self.clock.seconds() >= token.deadline:
            delivery.ack()
            self.stats.count("late_replies", direction="down")
            return None
        if parsed.inner.get("ending"):
            self.owner.calls.answered(parsed.msg_id or "")
        body = parsed.with_inner(_msg_id=token.msg_id)
        return Message(0, ReplyAddress(token.reply_queue), properties, body, token.deadline)

    # --- upstream: tenant -> control broker: the policy ---------------------

    def inbound(self, message: Message) -> Publication | None:
        limit = self.config.limits.max_message_size
        if len(message.body) > limit:
            raise Refusal("too-large", f"{len(message.body)} bytes, the limit is {limit}")
        address = message.address
        if isinstance(address, CanaryAddress):
            self._canary_back(message.body)  # ends here: never published
            return None
        headers = message.properties.get("headers")
        if headers and "compression" in headers:
            raise Refusal("malformed", COMPRESSED)
        properties = self._stamped(message.properties)
        if isinstance(address, RpcAddress):
            return self._rpc_up(address, properties, message.body)
        if isinstance(address, NotificationAddress):
            return self._notification_up(address, properties, message.body)
        return self._reply_up(properties, message.body)

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
        _expiration_seconds(stamped)
        stamped["headers"] = {IDENTITY_HEADER: self.config.name}
        return stamped

    def _up_rule(self, address: RpcAddress) -> RpcRule | None:
        for rule in self.config.up:
            if rule.topic != address.topic or rule.exchange != address.exchange:
                continue
            if address.fanout and not rule.fanout:
                continue
            if address.server is not None and address.server not in rule.servers:
                continue
            return rule
        return None

    def _rpc_up(self, address: RpcAddress, properties: dict[str, Any], body: bytes) -> Publication | None:
        rule = self._up_rule(address)
        if rule is None:
            raise Refusal("route", f"no up route for {_describe(address)}")
        parsed = _parse(body)
        method = parsed.method
        if method is None or not rule.allows_method(method):
            raise Refusal("method", f"method {method!r} is not allowed on {_describe(address)}"[:300])
        try:
            parsed.check_request()
        except envelope.EnvelopeError as e:
            raise Refusal("malformed", str(e)) from None
        unique_id = _unique_id(parsed)
        if unique_id in self.owner.published_ids:
            self.stats.count("duplicates_dropped", direction="up")
            return None
        deadline = None
        if parsed.is_call:
            limits = self.config.limits
            if self.owner.calls.inflight("up") >= limits.max_inflight_calls:
                raise Refusal("inflight", f"{limits.max_inflight_calls} calls already in flight")
            expiration = _expiration_seconds(properties)
            now = self.clock.seconds()
            deadline = now + min(expiration if expiration is not None else limits.max_call_timeout, limits.max_call_timeout)
            try:
                token = self.owner.signer.issue(self.config.name, "up", parsed.msg_id or "", parsed.reply_queue or "", deadline)
            except TokenError as e:
                raise Refusal("malformed", str(e)) from None
            body = parsed.with_inner(_msg_id=token, _reply_q=self.owner.routes.reply_queue)
            self.owner.calls.begin(token, deadline, "up")
        return Publication(self._destination(address), properties, body, deadline, unique_id=unique_id)

    def _notification_up(self, address: NotificationAddress, properties: dict[str, Any], body: bytes) -> Publication | None:
        for rule in self.config.notifications_up:
            if rule.topic == address.topic and rule.exchange == address.exchange and address.priority in rule.priorities:
                break
        else:
            raise Refusal("route", f"no up route for notification {address.topic}.{address.priority}")
        unique_id = _unique_id(_parse(body))
        if unique_id in self.owner.published_ids:
            self.stats.count("duplicates_dropped", direction="up")
            return None
        return Publication(self._destination(address), properties, body, unique_id=unique_id)

    def _reply_up(self, properties: dict[str, Any], body: bytes) -> Publication | None:
        parsed = _parse(body)
        try:
            token = self.owner.signer.verify(self.config.name, "down", parsed.msg_id or "")
        except TokenError as e:
            raise Refusal("unsolicited-reply", f"reply for a call this link was not asked: {e}") from None
        if self.clock.seconds() >= token.deadline:
            raise Refusal("late-reply", "reply after the call's deadline")
        msg_id = parsed.msg_id or ""
        if msg_id in self.owner.answered_calls:
            # A redelivered final reply, or a tenant half answering twice.
            self.stats.count("duplicates_dropped", direction="up")
            return None
        ending = bool(parsed.inner.get("ending"))
        if ending:
            self.owner.calls.answered(msg_id)
        body = parsed.with_inner(_msg_id=token.msg_id)
        retry_until = min(token.deadline, self.clock.seconds() + RETURN_RETRY_LIMIT)
        return Publication(
            Destination("", token.reply_queue, mandatory=True),
            properties,
            body,
            retry_until=retry_until,
            answers=msg_id if ending else None,
        )


def _unique_id(parsed: envelope.Envelope) -> str | None:
    value = parsed.inner.get("_unique_id")
    return value if type(value) is str and 0 < len(value) <= 64 else None


def _parse(body: bytes) -> envelope.Envelope:
    try:
        return envelope.parse(body)
    except envelope.EnvelopeError as e:
        raise Refusal("malformed", str(e)) from None


def _describe(address: RpcAddress) -> str:
    target = address.topic if address.server is None else f"{address.topic}.{address.server}"
    return f"{target} (fanout)" if address.fanout else target
