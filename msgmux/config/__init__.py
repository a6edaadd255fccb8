# -*- test-case-name: tests.test_config -*-
"""
The msgmux configuration: TOML in, frozen value objects out.

Pure code: no reactor, no sockets (the TLS files a C{[control.tls]} or
C{[tenant.tls]} table names are read and checked with
L{msgmux.amqp.tls.load_material}).  L{load} reads a file, L{parse} a string;
both raise L{ConfigError} naming the file and the dotted key of the first
problem, so C{twistd msgmux --config FILE} can refuse to start before anything
is bound or connected.  The keys are documented in C{docs/configuration.md}.

The package: L{msgmux.config.values} (the frozen values),
L{msgmux.config.halves}, L{msgmux.config.brokers} and
L{msgmux.config.links} (reading the sections),
L{msgmux.config.checks} (checks of single values).
"""

from __future__ import annotations

import tomllib

from msgmux._toml import ConfigError, Section
from msgmux.amqp.tls import TlsConfig
from msgmux.config.brokers import parse_transport_url, transport_url_ssl
from msgmux.config.halves import control_section, tenant_section
from msgmux.config.links import parse_link, supervised_tenant
from msgmux.config.values import (
    LOGIN_METHODS,
    PRIORITIES,
    BrokerConfig,
    BrokerHost,
    Config,
    ControlConfig,
    Limits,
    LinkConfig,
    NotificationRule,
    QueueOptions,
    RpcRule,
    TenantConfig,
)
from msgmux.tenantspec import SupervisionConfig, TenantSpec

__all__ = [
    "LOGIN_METHODS",
    "PRIORITIES",
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
    "supervised_tenant",
    "transport_url_ssl",
]


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
    control = control_section(root.table("control")) if root.has("control") else None
    tenant = tenant_section(root.table("tenant")) if root.has("tenant") else None
    root.finish()
    if control is None and tenant is None:
        raise ConfigError(path, "", "needs a [control] section, a [tenant] section, or both")
    return Config(path=path, control=control, tenant=tenant)
