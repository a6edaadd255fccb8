# -*- test-case-name: tests.test_config -*-
"""
The C{[control]} and C{[tenant]} sections.

Part of L{msgmux.config}; pure code.
"""

from __future__ import annotations

from msgmux._toml import Section
from msgmux.config.brokers import broker_section
from msgmux.config.checks import (
    LINK_NAME,
    admin_group_problem,
    between,
    endpoint_problem,
    socket_problem,
)
from msgmux.config.links import limits_section, link_section, unique
from msgmux.config.values import ControlConfig, Limits, TenantConfig
from msgmux.oslo.tokens import MAX_VERIFY_KEYS
from msgmux.tenantspec import read_supervision


def control_section(section: Section) -> ControlConfig:
    broker = broker_section(section)
    reply_key = _read_key(section, "reply_key_file", section.get("reply_key_file", str)) if section.has("reply_key_file") else None
    verify_paths = section.strings("reply_verify_key_files", ())
    if verify_paths and reply_key is None:
        raise section.error("reply_verify_key_files", "needs reply_key_file (the key that signs)")
    if len(verify_paths) > MAX_VERIFY_KEYS:
        raise section.error(
            "reply_verify_key_files", f"lists {len(verify_paths)} files; at most {MAX_VERIFY_KEYS} (each costs an HMAC per forged reply)"
        )
    verify_keys = tuple(_read_key(section, f"reply_verify_key_files[{i}]", path) for i, path in enumerate(verify_paths))
    heartbeat = section.get("link_heartbeat", float, 5.0, between(0, 600, "seconds"))
    window = section.get("link_window", int, 256, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    metrics = section.get("metrics", str, None, endpoint_problem)
    canary_interval = section.get("canary_interval", float, 10.0, between(0.1, 600, "seconds", low_inclusive=True))
    default_limits = limits_section(section.table("limits"), Limits())
    admin_socket = section.get("admin_socket", str, None, socket_problem)
    admin_group = section.get("admin_group", str, None, admin_group_problem)
    state_file = section.get("state_file", str, None, lambda v: None if v.startswith("/") else "must be an absolute path")
    if admin_socket is not None and state_file is None:
        raise section.error("state_file", "is required with admin_socket: links added at run time must survive a restart")
    supervision = read_supervision(section.table("supervision")) if section.has("supervision") else None
    links = tuple(link_section(link, default_limits, broker.exchange, supervision) for link in section.tables("links"))
    if not links and admin_socket is None:
        raise section.error("links", "needs at least one [[control.links]] entry (or an admin_socket to add links at run time)")
    unique(section, "links", [link.name for link in links], "name")
    unique(section, "links", [link.socket for link in links], "socket")
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


def tenant_section(section: Section) -> TenantConfig:
    broker = broker_section(section)
    socket = section.get("socket", str, check=socket_problem)
    link = section.get("link", str, None, lambda v: None if LINK_NAME.match(v) else "is not a valid link name")
    window = section.get("link_window", int, 256, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    metrics = section.get("metrics", str, None, endpoint_problem)
    section.finish()
    return TenantConfig(broker=broker, socket=socket, link=link, link_window=window, metrics=metrics)
