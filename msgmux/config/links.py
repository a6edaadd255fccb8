# -*- test-case-name: tests.test_config -*-
"""
A link of the control half: its routes, limits and supervised tenant half.

Part of L{msgmux.config}; pure code.
"""

from __future__ import annotations

from typing import Any

import attrs

from msgmux._toml import Section
from msgmux.config.brokers import broker_section
from msgmux.config.checks import (
    between,
    link_name_problem,
    message_size_problem,
    name_problem,
    non_negative,
    socket_mode_problem,
    socket_problem,
)
from msgmux.config.values import (
    PRIORITIES,
    ControlConfig,
    Limits,
    LinkConfig,
    NotificationRule,
    RpcRule,
    TenantConfig,
)
from msgmux.tenantspec import SupervisionConfig, TenantSpec, read_tenant_spec


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
    return link_section(Section(source, prefix, table), control.default_limits, control.broker.exchange, control.supervision)


def unique(section: Section, name: str, values: list[str], what: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise section.error(f"{name}[{index}].{what}", f"{value!r} is used by another link")
        seen.add(value)


def limits_section(section: Section, base: Limits) -> Limits:
    limits = Limits(
        max_message_size=section.get("max_message_size", int, base.max_message_size, message_size_problem),
        max_rate=section.get("max_rate", float, base.max_rate, between(0, 1e6, "messages per second")),
        burst=section.get("burst", int, base.burst, between(0, 1e6, "messages")),
        max_inflight_calls=section.get("max_inflight_calls", int, base.max_inflight_calls, non_negative),
        max_call_timeout=section.get("max_call_timeout", float, base.max_call_timeout, between(0, 86400, "seconds")),
        max_byte_rate=section.get("max_byte_rate", float, base.max_byte_rate, between(0, 1 << 40, "bytes per second")),
        max_inflight_bytes=section.get(
            "max_inflight_bytes", int, base.max_inflight_bytes, between(1024, 1 << 32, "bytes", low_inclusive=True)
        ),
        max_json_containers=section.get(
            "max_json_containers", int, base.max_json_containers, between(1, 100_000_000, "arrays and objects", low_inclusive=True)
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


def link_section(section: Section, default_limits: Limits, exchange: str, supervision: SupervisionConfig | None = None) -> LinkConfig:
    name = section.get("name", str, check=link_name_problem)
    socket = section.get("socket", str, check=socket_problem)
    mode_text = section.get("socket_mode", str, "0660", socket_mode_problem)
    down = tuple(_rpc_rule(rule, upstream=False) for rule in section.tables("down"))
    up = tuple(_rpc_rule(rule, upstream=True) for rule in section.tables("up"))
    notifications_down = tuple(_notification_rule(rule) for rule in section.tables("notifications_down"))
    notifications_up = tuple(_notification_rule(rule) for rule in section.tables("notifications_up"))
    limits = limits_section(section.table("limits"), default_limits)
    _no_loops(section, exchange, down, up, notifications_down, notifications_up)
    tenant = None
    if section.has("tenant"):
        tenant_section = section.table("tenant")
        tenant = read_tenant_spec(tenant_section, supervision, broker_section, section.get("tenant", dict))
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
    name = section.get("name", str, check=link_name_problem)
    socket = section.get("socket", str, check=socket_problem)
    spec = read_tenant_spec(section.table("tenant"), supervision, broker_section, table)
    section.finish()
    return spec, TenantConfig(broker=spec.broker, socket=socket, link=name, link_window=spec.link_window)


def _rpc_rule(section: Section, upstream: bool) -> RpcRule:
    topic = section.get("topic", str, check=name_problem)
    servers = section.strings("servers", ())
    for index, server in enumerate(servers):
        problem = name_problem(server)
        if problem:
            raise section.error(f"servers[{index}]", problem)
    fanout = section.get("fanout", bool, False)
    if upstream:
        methods = section.strings("methods")
        if not methods:
            raise section.error("methods", "must list the allowed methods (use [\"*\"] to allow all)")
    else:
        methods = section.strings("methods", ("*",))
    exchange = section.get("exchange", str, None, name_problem)
    section.finish()
    return RpcRule(topic=topic, servers=servers, fanout=fanout, methods=methods, exchange=exchange)


def _notification_rule(section: Section) -> NotificationRule:
    topic = section.get("topic", str, check=name_problem)
    priorities = section.strings("priorities")
    if not priorities:
        raise section.error("priorities", "must list at least one priority")
    for index, priority in enumerate(priorities):
        if priority not in PRIORITIES:
            raise section.error(f"priorities[{index}]", f"must be one of {', '.join(PRIORITIES)}")
    exchange = section.get("exchange", str, None, name_problem)
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
