# -*- test-case-name: tests.test_config -*-
"""
The msgmux configuration: TOML in, frozen value objects out.

Pure code: no reactor, no sockets (the TLS files a C{[control.tls]} or
C{[tenant.tls]} table names are read and checked with
L{msgmux.amqp.tls.load_material}).  L{load} reads a file, L{parse} a string;
both raise L{ConfigError} naming the file and the dotted key of the first
problem, so C{twistd msgmux --config FILE} can refuse to start before anything
is bound or connected.  The keys are documented in C{docs/configuration.md}.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from msgmux._toml import ConfigError, Section
from msgmux.amqp.tls import TLS_VERSIONS, TlsConfig, TlsFileError, load_material
from msgmux.oslo.tokens import MAX_VERIFY_KEYS
from msgmux.tenantspec import SupervisionConfig, TenantSpec, read_supervision, read_tenant_spec

__all__ = [
    "BrokerConfig",
    "BrokerHost",
    "Config",
    "ConfigError",
    "ControlConfig",
    "Limits",
    "LinkConfig",
    "NotificationRule",
    "QueueOptions",
    "RpcRule",
    "SupervisionConfig",
    "TenantConfig",
    "TenantSpec",
    "TlsConfig",
    "load",
    "parse",
    "parse_link",
    "parse_transport_url",
    "transport_url_ssl",
]

#: SASL mechanisms, as oslo's C{rabbit_login_method} names them.
LOGIN_METHODS = ("PLAIN", "AMQPLAIN", "EXTERNAL")

#: oslo's notification priorities (oslo_messaging.notify.notifier).
PRIORITIES = ("audit", "debug", "info", "warn", "warning", "error", "critical", "sample")

# AMQP short strings are at most 255 bytes; oslo builds "<topic>.<server>" and
# "<topic>_fanout_<32 hex>" out of these, so keep names comfortably shorter.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-:@]{0,159}$")
_LINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def _name_problem(value: str) -> str | None:
    if not _NAME.match(value):
        return "must be 1-160 characters of letters, digits and _ . - : @ (not starting with . - : @)"
    return None


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


def load(path: str) -> Config:
    """
    Read and validate a configuration file.

    @param path: the TOML file.
    @return: the configuration.
    @raise ConfigError: on any problem, naming the file and key.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"is not UTF-8: {e}") from None
    return parse(text, path)


def parse(text: str, path: str = "<string>") -> Config:
    """
    Validate configuration text.

    @param text: TOML.
    @param path: the file name to use in error messages.
    @return: the configuration.
    @raise ConfigError: on any problem, naming the file and key.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"is not valid TOML: {e}") from None
    root = Section(path, "", document)
    control = _control(root.table("control")) if root.has("control") else None
    tenant = _tenant(root.table("tenant")) if root.has("tenant") else None
    root.finish()
    if control is None and tenant is None:
        raise ConfigError(path, "", "needs a [control] section, a [tenant] section, or both")
    return Config(path=path, control=control, tenant=tenant)


def _between(low: float, high: float, unit: str, low_inclusive: bool = False) -> Callable[[float], str | None]:
    """
    A check for a number in a range; the upper bound keeps out TOML's C{inf}
    and values so large that timers built from them overflow.
    """

    def problem(value: float) -> str | None:
        if (value >= low if low_inclusive else value > low) and value <= high:
            return None
        below = "at least" if low_inclusive else "greater than"
        return f"must be {below} {low:g} and at most {high:g} {unit}"

    return problem


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _control(section: Section) -> ControlConfig:
    broker = _broker(section)
    reply_key = _read_key(section, "reply_key_file", section.get("reply_key_file", str)) if section.has("reply_key_file") else None
    verify_paths = section.strings("reply_verify_key_files", ())
    if verify_paths and reply_key is None:
        raise section.error("reply_verify_key_files", "needs reply_key_file (the key that signs)")
    if len(verify_paths) > MAX_VERIFY_KEYS:
        raise section.error(
            "reply_verify_key_files", f"lists {len(verify_paths)} files; at most {MAX_VERIFY_KEYS} (each costs an HMAC per forged reply)"
        )
    verify_keys = tuple(_read_key(section, f"reply_verify_key_files[{i}]", path) for i, path in enumerate(verify_paths))
    heartbeat = section.get("link_heartbeat", float, 5.0, _between(0, 600, "seconds"))
    window = section.get("link_window", int, 256, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    metrics = section.get("metrics", str, None, _endpoint_problem)
    canary_interval = section.get("canary_interval", float, 10.0, _between(0.1, 600, "seconds", low_inclusive=True))
    default_limits = _limits(section.table("limits"), Limits())
    admin_socket = section.get("admin_socket", str, None, _socket_problem)
    admin_group = section.get("admin_group", str, None, _admin_group_problem)
    state_file = section.get("state_file", str, None, lambda v: None if v.startswith("/") else "must be an absolute path")
    if admin_socket is not None and state_file is None:
        raise section.error("state_file", "is required with admin_socket: links added at run time must survive a restart")
    supervision = read_supervision(section.table("supervision")) if section.has("supervision") else None
    links = tuple(_link(link, default_limits, broker.exchange, supervision) for link in section.tables("links"))
    if not links and admin_socket is None:
        raise section.error("links", "needs at least one [[control.links]] entry (or an admin_socket to add links at run time)")
    _unique(section, "links", [link.name for link in links], "name")
    _unique(section, "links", [link.socket for link in links], "socket")
    section.finish()
    return ControlConfig(
        broker=broker,
        links=links,
        reply_key=reply_key,
        reply_verify_keys=verify_keys,
        link_heartbeat=heartbeat,
        link_window=window,
        metrics=metrics,
        canary_interval=canary_interval,
        default_limits=default_limits,
        admin_socket=admin_socket,
        admin_group=admin_group,
        state_file=state_file,
        supervision=supervision,
    )


def _read_key(section: Section, name: str, path: str) -> bytes:
    """
    @param name: the key naming the file, for errors.
    @param path: a file holding a secret.
    @return: its bytes, without leading and trailing whitespace.
    """
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise section.error(name, f"cannot read {path}: {e.strerror or e}") from None
    if len(key) < 16:
        raise section.error(name, f"{path} must hold at least 16 bytes of secret")
    return key
def _admin_group_problem(value: str) -> str | None:
    import grp

    try:
        grp.getgrnam(value)
    except KeyError:
        return f"no group {value!r} on this host"
    return None


def parse_link(table: dict[str, Any], source: str, control: ControlConfig, prefix: str = "") -> LinkConfig:
    """
    Validate one link given as a table, exactly as a C{[[control.links]]}
    entry of the configuration file is validated: links added at run time
    and the state file get the same checks and the same messages.

    @param table: the link's keys (C{name}, C{socket}, C{down}, ...).
    @param source: what to name as the file in errors (the state file, or
        the request's origin).
    @param control: the running control half's configuration (its
        exchange, default limits and supervision settings apply).
    @param prefix: the dotted key of the table, for errors.
    @raise ConfigError: naming the key.
    """
    return _link(Section(source, prefix, table), control.default_limits, control.broker.exchange, control.supervision)


def _unique(section: Section, name: str, values: list[str], what: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise section.error(f"{name}[{index}].{what}", f"{value!r} is used by another link")
        seen.add(value)


def _tenant(section: Section) -> TenantConfig:
    broker = _broker(section)
    socket = section.get("socket", str, check=_socket_problem)
    link = section.get("link", str, None, lambda v: None if _LINK_NAME.match(v) else "is not a valid link name")
    window = section.get("link_window", int, 256, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    metrics = section.get("metrics", str, None, _endpoint_problem)
    section.finish()
    return TenantConfig(broker=broker, socket=socket, link=link, link_window=window, metrics=metrics)


def _endpoint_problem(value: str) -> str | None:
    kind = value.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix"):
        return "must be a Twisted endpoint like \"tcp:9464:interface=127.0.0.1\" or \"unix:/run/msgmux/metrics.sock\""
    return None


def _socket_mode_problem(value: str) -> str | None:
    if not re.fullmatch(r"0?[0-7]{3}", value):
        return "must be an octal mode like \"0660\""
    if int(value, 8) & 0o007:
        return "must grant nothing to others (the last digit must be 0): any local user could connect as the tenant half"
    return None


def _socket_problem(value: str) -> str | None:
    if not value.startswith("/"):
        return "must be an absolute path"
    if len(value.encode()) > 107:
        return "is longer than a Unix socket path may be (107 bytes)"
    return None


def _broker(section: Section) -> BrokerConfig:
    url = section.get("transport_url", str)
    try:
        hosts, vhost = parse_transport_url(url)
        url_ssl = transport_url_ssl(url)
    except ValueError as e:
        raise section.error("transport_url", str(e)) from None
    exchange = section.get("exchange", str, "openstack", _name_problem)
    heartbeat = section.get("heartbeat", int, 30, lambda v: None if 0 <= v <= 600 else "must be 0-600 seconds")
    prefetch = section.get("prefetch", int, 64, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    login_method = section.get(
        "login_method", str, "PLAIN", lambda v: None if v in LOGIN_METHODS else "must be one of " + ", ".join(LOGIN_METHODS)
    )
    tls = _tls(section, url_ssl)
    if login_method == "EXTERNAL" and (tls is None or tls.cert_file is None):
        raise section.error("login_method", "EXTERNAL logs in with the TLS client certificate: set tls.cert_file and tls.key_file")
    return BrokerConfig(
        hosts=hosts,
        virtual_host=vhost,
        exchange=exchange,
        queues=_queue_options(section.table("queues")),
        heartbeat=heartbeat,
        prefetch=prefetch,
        tls=tls,
        login_method=login_method,
    )


def _tls(broker: Section, url_ssl: bool | None) -> TlsConfig | None:
    """
    The C{tls} table of a broker section.  TLS is on when the transport URL
    says C{?ssl=1} or the table says C{enabled = true} (oslo's C{ssl});
    the files it names are read and checked now.
    """
    section = broker.table("tls")
    enabled = section.get("enabled", bool, None)
    if enabled is not None and url_ssl is not None and enabled != url_ssl:
        raise section.error("enabled", f"contradicts the transport_url's ssl={'1' if url_ssl else '0'}")
    if not (enabled or url_ssl):
        known = [name for name in section.names() if name != "enabled"]
        if known:
            raise section.error(known[0], "is set but TLS is off (add ?ssl=1 to transport_url or set tls.enabled = true)")
        section.finish()
        return None
    path_check = lambda v: None if v.startswith("/") else "must be an absolute path"  # noqa: E731
    config = TlsConfig(
        ca_file=section.get("ca_file", str, None, path_check),
        cert_file=section.get("cert_file", str, None, path_check),
        key_file=section.get("key_file", str, None, path_check),
        verify=section.get("verify", bool, True),
        minimum_version=section.get(
            "minimum_version", str, "TLSv1.2", lambda v: None if v in TLS_VERSIONS else "must be \"TLSv1.2\" or \"TLSv1.3\""
        ),
    )
    if (config.cert_file is None) != (config.key_file is None):
        missing = "key_file" if config.key_file is None else "cert_file"
        raise section.error(missing, "is required with " + ("cert_file" if missing == "key_file" else "key_file"))
    section.finish()
    try:
        load_material(config)
    except TlsFileError as e:
        raise section.error(e.key, e.problem) from None
    return config


def parse_transport_url(url: str) -> tuple[tuple[BrokerHost, ...], str]:
    """
    Parse an oslo.messaging transport URL,
    C{rabbit://user:pass@host:port[,user:pass@host:port...]/vhost}.

    A host without credentials uses the previous host's (oslo's driver would
    fall back to guest/guest, which is never what an operator means when
    listing failover hosts).  An empty path is the C{/} vhost, as in oslo.

    @param url: the URL.
    @return: the hosts in failover order, and the virtual host.
    @raise ValueError: describing what is wrong.
    """
    parts = urlsplit(url)
    if parts.scheme != "rabbit":
        raise ValueError(f"must start with rabbit:// (got {parts.scheme or 'no'} scheme)")
    transport_url_ssl(url)
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    hosts: list[BrokerHost] = []
    username, password = "guest", "guest"
    for netloc in parts.netloc.split(","):
        if not netloc:
            continue
        hostport = netloc
        if "@" in netloc:
            userinfo, hostport = netloc.rsplit("@", 1)
            user, _, secret = userinfo.partition(":")
            username, password = unquote(user), unquote(secret)
        host, port = _host_port(hostport)
        hosts.append(BrokerHost(host=host, port=port, username=username, password=password))
    if not hosts:
        raise ValueError("names no broker host")
    vhost = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    return tuple(hosts), vhost or "/"


#: oslo's spellings of C{?ssl=} (oslo.utils C{bool_from_string}).
_SSL_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def transport_url_ssl(url: str) -> bool | None:
    """
    Read the one query option msgmux takes from a transport URL: oslo's
    C{ssl} (C{?ssl=1}, C{?ssl=true}), which turns TLS on for every host.

    @return: its value, or L{None} when the URL does not say.
    @raise ValueError: for another option or a value that is not a boolean.
    """
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    unsupported = sorted(set(query) - {"ssl"})
    if unsupported:
        raise ValueError(f"query options other than ssl are not supported: {', '.join(unsupported)}")
    if "ssl" not in query:
        return None
    values = query["ssl"]
    if len(values) != 1 or values[0].lower() not in _SSL_VALUES:
        raise ValueError(f"ssl must be 1, true, 0 or false, not {','.join(values)!r}")
    return _SSL_VALUES[values[0].lower()]


def _host_port(hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after the address in {hostport!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"host missing in {hostport!r}")
    if not port_text:
        return host, 5672
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {hostport!r}")
    return host, int(port_text)


def _queue_options(section: Section) -> QueueOptions:
    defaults = QueueOptions()
    values: dict[str, Any] = {}
    for field in attrs.fields(QueueOptions):
        default = getattr(defaults, field.name)
        check = None if isinstance(default, bool) else _non_negative
        values[field.name] = section.get(field.name, type(default), default, check)
    # The same combinations oslo's driver refuses to start with.
    if values["rabbit_quorum_queue"] and values["rabbit_ha_queues"]:
        raise section.error("rabbit_quorum_queue", "cannot be combined with rabbit_ha_queues (oslo refuses it too)")
    if values["rabbit_transient_quorum_queue"] and values["rabbit_ha_queues"]:
        # oslo's reply and fanout consumers pass the transient flag as their
        # quorum flag, and refuse it together with HA queues.
        raise section.error(
            "rabbit_transient_quorum_queue", "cannot be combined with rabbit_ha_queues (oslo refuses it too)"
        )
    if values["rabbit_stream_fanout"] and not values["rabbit_transient_quorum_queue"]:
        raise section.error("rabbit_stream_fanout", "needs rabbit_transient_quorum_queue = true (as in oslo)")
    section.finish()
    return QueueOptions(**values)


def _limits(section: Section, base: Limits) -> Limits:
    limits = Limits(
        max_message_size=section.get("max_message_size", int, base.max_message_size, _message_size_problem),
        max_rate=section.get("max_rate", float, base.max_rate, _between(0, 1e6, "messages per second")),
        burst=section.get("burst", int, base.burst, _between(0, 1e6, "messages")),
        max_inflight_calls=section.get("max_inflight_calls", int, base.max_inflight_calls, _non_negative),
        max_call_timeout=section.get("max_call_timeout", float, base.max_call_timeout, _between(0, 86400, "seconds")),
        max_byte_rate=section.get("max_byte_rate", float, base.max_byte_rate, _between(0, 1 << 40, "bytes per second")),
        max_inflight_bytes=section.get(
            "max_inflight_bytes", int, base.max_inflight_bytes, _between(1024, 1 << 32, "bytes", low_inclusive=True)
        ),
        max_json_containers=section.get(
            "max_json_containers", int, base.max_json_containers, _between(1, 100_000_000, "arrays and objects", low_inclusive=True)
        ),
    )
    if limits.max_inflight_bytes < limits.max_message_size:
        if section.has("max_inflight_bytes"):
            raise section.error(
                "max_inflight_bytes",
                f"must be at least max_message_size ({limits.max_message_size}), or the largest message could never be sent",
            )
        # Not set here: the inherited window grows with the message size.
        limits = attrs.evolve(limits, max_inflight_bytes=2 * limits.max_message_size)
    section.finish()
    return limits


def _message_size_problem(value: int) -> str | None:
    if not 1024 <= value <= 128 * 1024 * 1024:
        return "must be between 1024 and 134217728 bytes (RabbitMQ's own ceiling)"
    return None


def _link(section: Section, default_limits: Limits, exchange: str, supervision: SupervisionConfig | None = None) -> LinkConfig:
    name = section.get("name", str, check=_link_name_problem)
    socket = section.get("socket", str, check=_socket_problem)
    mode_text = section.get("socket_mode", str, "0660", _socket_mode_problem)
    down = tuple(_rpc_rule(rule, upstream=False) for rule in section.tables("down"))
    up = tuple(_rpc_rule(rule, upstream=True) for rule in section.tables("up"))
    notifications_down = tuple(_notification_rule(rule) for rule in section.tables("notifications_down"))
    notifications_up = tuple(_notification_rule(rule) for rule in section.tables("notifications_up"))
    limits = _limits(section.table("limits"), default_limits)
    _no_loops(section, exchange, down, up, notifications_down, notifications_up)
    tenant = None
    if section.has("tenant"):
        tenant_section = section.table("tenant")
        tenant = read_tenant_spec(tenant_section, supervision, _broker, section.get("tenant", dict))
    section.finish()
    return LinkConfig(
        name=name,
        socket=socket,
        socket_mode=int(mode_text, 8),
        down=down,
        up=up,
        notifications_down=notifications_down,
        notifications_up=notifications_up,
        limits=limits,
        tenant=tenant,
    )


def _link_name_problem(value: str) -> str | None:
    if not _LINK_NAME.match(value):
        return "must be 1-63 letters, digits, _ . - starting with a letter or digit"
    return None


def supervised_tenant(
    name: str, socket: str, table: dict[str, Any], supervision: SupervisionConfig, source: str
) -> tuple[TenantSpec, TenantConfig]:
    """
    Check a supervised tenant half's settings again, where they are used (the
    privileged spawner trusts nothing it is sent), with the checks of the
    configuration file.

    @param name: the link's name.
    @param socket: the link's socket.
    @param table: the link's C{tenant} table.
    @param supervision: the users and groups allowed.
    @param source: what to name as the file in errors.
    @return: the settings, and the configuration the tenant half runs with.
    @raise ConfigError: naming the key.
    """
    section = Section(source, "", {"name": name, "socket": socket, "tenant": table})
    name = section.get("name", str, check=_link_name_problem)
    socket = section.get("socket", str, check=_socket_problem)
    spec = read_tenant_spec(section.table("tenant"), supervision, _broker, table)
    section.finish()
    return spec, TenantConfig(broker=spec.broker, socket=socket, link=name, link_window=spec.link_window)


def _rpc_rule(section: Section, upstream: bool) -> RpcRule:
    topic = section.get("topic", str, check=_name_problem)
    servers = section.strings("servers", ())
    for index, server in enumerate(servers):
        problem = _name_problem(server)
        if problem:
            raise section.error(f"servers[{index}]", problem)
    fanout = section.get("fanout", bool, False)
    if upstream:
        methods = section.strings("methods")
        if not methods:
            raise section.error("methods", "must list the allowed methods (use [\"*\"] to allow all)")
    else:
        methods = section.strings("methods", ("*",))
    exchange = section.get("exchange", str, None, _name_problem)
    section.finish()
    return RpcRule(topic=topic, servers=servers, fanout=fanout, methods=methods, exchange=exchange)


def _notification_rule(section: Section) -> NotificationRule:
    topic = section.get("topic", str, check=_name_problem)
    priorities = section.strings("priorities")
    if not priorities:
        raise section.error("priorities", "must list at least one priority")
    for index, priority in enumerate(priorities):
        if priority not in PRIORITIES:
            raise section.error(f"priorities[{index}]", f"must be one of {', '.join(PRIORITIES)}")
    exchange = section.get("exchange", str, None, _name_problem)
    section.finish()
    return NotificationRule(topic=topic, priorities=priorities, exchange=exchange)


def _no_loops(
    section: Section,
    exchange: str,
    down: tuple[RpcRule, ...],
    up: tuple[RpcRule, ...],
    notifications_down: tuple[NotificationRule, ...],
    notifications_up: tuple[NotificationRule, ...],
) -> None:
    """
    Refuse a topic routed both ways on one link: what msgmux publishes on one
    broker it would consume again and send back, forever.  A rule without an
    exchange means the section's C{exchange}.
    """
    down_topics = {(rule.exchange or exchange, rule.topic) for rule in down}
    for index, rule in enumerate(up):
        if (rule.exchange or exchange, rule.topic) in down_topics:
            raise section.error(f"up[{index}].topic", f"{rule.topic!r} is also routed down; it would loop")
    down_keys = {(rule.exchange or exchange, rule.topic, p) for rule in notifications_down for p in rule.priorities}
    for index, rule in enumerate(notifications_up):
        for priority in rule.priorities:
            if (rule.exchange or exchange, rule.topic, priority) in down_keys:
                raise section.error(
                    f"notifications_up[{index}].topic",
                    f"{rule.topic}.{priority} is also routed down; it would loop",
                )
