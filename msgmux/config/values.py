# -*- test-case-name: tests.test_config -*-
"""
The configuration's frozen values: what each half, broker and link is configured with.

Part of L{msgmux.config}; pure code.
"""

from __future__ import annotations

import attrs

from msgmux.amqp.tls import TlsConfig
from msgmux.tenantspec import SupervisionConfig, TenantSpec

#: SASL mechanisms, as oslo's C{rabbit_login_method} names them.
LOGIN_METHODS = ("PLAIN", "AMQPLAIN", "EXTERNAL")

#: oslo's notification priorities (oslo_messaging.notify.notifier).
PRIORITIES = ("audit", "debug", "info", "warn", "warning", "error", "critical", "sample")


@attrs.frozen
class QueueOptions:
    """
    The oslo.messaging rabbit driver options that shape queue and exchange
    declarations on one broker.  They must equal the values the oslo services
    on that broker use: RabbitMQ refuses a re-declaration with different
    arguments (PRECONDITION_FAILED).  Names and defaults are oslo's.
    """

    amqp_durable_queues: bool = False
    amqp_auto_delete: bool = False
    rabbit_ha_queues: bool = False
    rabbit_quorum_queue: bool = False
    rabbit_transient_quorum_queue: bool = False
    rabbit_transient_queues_ttl: int = 1800
    rabbit_quorum_delivery_limit: int = 0
    rabbit_quorum_max_memory_length: int = 0
    rabbit_quorum_max_memory_bytes: int = 0
    rabbit_stream_fanout: bool = False


@attrs.frozen
class BrokerHost:
    """One broker address from a transport URL, with its credentials."""

    host: str
    port: int
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class BrokerConfig:
    """
    How one half reaches and uses its broker.

    @ivar hosts: failover list, tried in order.
    @ivar virtual_host: the AMQP vhost.
    @ivar exchange: oslo's C{control_exchange} on this broker.
    @ivar queues: declaration options matching oslo's on this broker.
    @ivar heartbeat: AMQP heartbeat in seconds (0 disables).
    @ivar prefetch: C{basic.qos} prefetch per consumer.
    @ivar tls: TLS to every host, or L{None} for plain AMQP.
    @ivar login_method: the SASL mechanism (one of L{LOGIN_METHODS}).
    """

    hosts: tuple[BrokerHost, ...]
    virtual_host: str
    exchange: str
    queues: QueueOptions = QueueOptions()
    heartbeat: int = 30
    prefetch: int = 64
    tls: TlsConfig | None = None
    login_method: str = "PLAIN"


@attrs.frozen
class RpcRule:
    """
    One RPC route.

    Downstream, the control half consumes C{topic} (and C{topic.server} for
    each server, and a fanout queue) on the control broker.  Upstream, the
    tenant half consumes them on the tenant broker.

    @ivar methods: allowed method names; C{("*",)} allows all.  Required for
        upstream rules, optional (all) downstream.
    @ivar exchange: the exchange on both brokers, or L{None} for each
        broker's configured C{exchange}.
    """

    topic: str
    servers: tuple[str, ...] = ()
    fanout: bool = False
    methods: tuple[str, ...] = ("*",)
    exchange: str | None = None

    def allows_method(self, method: str) -> bool:
        """
        @param method: an oslo method name.
        @return: whether this rule lets it through.
        """
        return "*" in self.methods or method in self.methods


@attrs.frozen
class NotificationRule:
    """
    One notification route: C{topic.priority} for each priority.

    @ivar exchange: the notifier's exchange on both brokers, or L{None} for
        each broker's configured C{exchange}.
    """

    topic: str
    priorities: tuple[str, ...]
    exchange: str | None = None


@attrs.frozen
class Limits:
    """
    What one link may send up into the control network.

    @ivar max_message_size: largest message body in bytes; larger messages
        are rejected and counted.
    @ivar max_rate: sustained messages per second (token bucket rate);
        enforced by withholding link credit, so the excess waits on the
        tenant broker.
    @ivar burst: token bucket depth.
    @ivar max_inflight_calls: upstream calls awaiting a reply; more are
        rejected (the caller times out) and counted.
    @ivar max_call_timeout: upper bound, in seconds, on how long msgmux
        keeps accepting replies for one call.
    @ivar max_byte_rate: sustained body bytes per second (a second token
        bucket, next to C{max_rate}); its burst is one second's worth, and
        at least one largest message.
    @ivar max_inflight_bytes: body bytes the link may have received and
        not yet settled (its byte credit window): what one link can make
        the control half hold in memory.  At least C{max_message_size};
        when not set, twice C{max_message_size} if that is more.
    @ivar max_json_containers: JSON arrays and objects an upstream body may
        hold (counted cheaply, before parsing); more are refused as
        C{too-complex}, so that no body costs much CPU to refuse.
    """

    max_message_size: int = 8 * 1024 * 1024
    max_rate: float = 2000.0
    burst: int = 500
    max_inflight_calls: int = 200
    max_call_timeout: float = 3600.0
    max_byte_rate: float = 32 * 1024 * 1024
    max_inflight_bytes: int = 16 * 1024 * 1024
    max_json_containers: int = 100_000


@attrs.frozen
class LinkConfig:
    """
    One tenant network served by the control half.

    @ivar socket: path of the Unix socket the control half listens on.
    @ivar socket_mode: file mode of that socket.
    @ivar down: routes from the control broker to the tenant broker.
    @ivar up: routes from the tenant broker to the control broker.
    @ivar tenant: where the control half runs this link's tenant half, or
        L{None} when the tenant half is started some other way.
    """

    name: str
    socket: str
    socket_mode: int = 0o660
    down: tuple[RpcRule, ...] = ()
    up: tuple[RpcRule, ...] = ()
    notifications_down: tuple[NotificationRule, ...] = ()
    notifications_up: tuple[NotificationRule, ...] = ()
    limits: Limits = Limits()
    tenant: TenantSpec | None = None


@attrs.frozen
class ControlConfig:
    """
    The control half: the trust boundary.

    @ivar reply_key: secret for signing reply tokens; L{None} means a random
        key per process (calls in flight across a restart then time out).
    @ivar reply_verify_keys: secrets that only verify reply tokens (and
        canaries), so that keys rotate without failing calls in flight.
    @ivar link_heartbeat: seconds between link heartbeats; a peer silent for
        three intervals is disconnected.
    @ivar link_window: messages one half may have unacknowledged on the link.
    @ivar metrics: endpoint description for the Prometheus listener, or
        L{None}.
    @ivar canary_interval: seconds between canaries, msgmux's own probe
        messages that go round through both brokers; a link is healthy when
        one made it round within three intervals.
    @ivar default_limits: C{[control.limits]}, the limits of links that do
        not set their own (links added at run time need them too).
    @ivar admin_socket: path of the Unix socket C{msgmux link ...} talks
        to, or L{None} for no run-time link changes.
    @ivar admin_group: the group, besides root, allowed on that socket.
    @ivar state_file: where links added at run time are kept across
        restarts.
    @ivar supervision: C{[control.supervision]}, or L{None} when no tenant
        half is supervised.
    """

    broker: BrokerConfig
    links: tuple[LinkConfig, ...]
    reply_key: bytes | None = attrs.field(default=None, repr=False)
    reply_verify_keys: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    link_heartbeat: float = 5.0
    link_window: int = 256
    metrics: str | None = None
    canary_interval: float = 10.0
    default_limits: Limits = Limits()
    admin_socket: str | None = None
    admin_group: str | None = None
    state_file: str | None = None
    supervision: SupervisionConfig | None = None


@attrs.frozen
class TenantConfig:
    """
    The tenant half: runs inside the tenant network, holds no control
    credentials and no policy.

    @ivar link: the link name this half expects to serve, checked against
        the control half's; L{None} accepts whatever link the socket serves.
    """

    broker: BrokerConfig
    socket: str
    link: str | None = None
    link_window: int = 256
    metrics: str | None = None


@attrs.frozen
class Config:
    """A whole msgmux configuration file; at least one half is present."""

    path: str
    control: ControlConfig | None
    tenant: TenantConfig | None
