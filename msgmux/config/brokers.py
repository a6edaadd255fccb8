# -*- test-case-name: tests.test_config -*-
"""
A half's broker: its transport URL, TLS table and oslo queue options.

Part of L{msgmux.config}; pure code.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from msgmux._toml import Section
from msgmux.amqp.tls import TLS_VERSIONS, TlsConfig, TlsFileError, load_material
from msgmux.config.checks import name_problem, non_negative
from msgmux.config.values import LOGIN_METHODS, BrokerConfig, BrokerHost, QueueOptions


def broker_section(section: Section) -> BrokerConfig:
    url = section.get("transport_url", str)
    try:
        hosts, vhost = parse_transport_url(url)
        url_ssl = transport_url_ssl(url)
    except ValueError as e:
        raise section.error("transport_url", str(e)) from None
    exchange = section.get("exchange", str, "openstack", name_problem)
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
        queues=queue_options_section(section.table("queues")),
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
    path_check = lambda v: None if v.startswith("/") else "must be an absolute path"
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


def queue_options_section(section: Section) -> QueueOptions:
    defaults = QueueOptions()
    values: dict[str, Any] = {}
    for field in attrs.fields(QueueOptions):
        default = getattr(defaults, field.name)
        check = None if isinstance(default, bool) else non_negative
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
