# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin: C{twistd msgmux --config FILE}.

L{Options} parses and validates the configuration before twistd does
anything else, so a bad config ends the process with the file, the key and
the problem, and a non-zero status.  L{makeService} only composes objects.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from msgmux.config import Config, ConfigError, load
from msgmux.linkstore import LinkStore, StoredLink
from msgmux.service import MsgmuxService


class Options(usage.Options):
    """Command line of C{twistd msgmux}."""

    synopsis = "--config FILE"
    longdesc = (
        "Relay oslo.messaging RPC and notifications between a control-network RabbitMQ "
        "and tenant-network RabbitMQs over a Unix socket.  FILE is a TOML configuration "
        "with a [control] section, a [tenant] section, or both (see docs/configuration.md)."
    )
    optParameters = [["config", "c", None, "Path of the msgmux TOML configuration file."]]

    config: Config
    stored_links: list[StoredLink]

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required")
        try:
            self.config = load(path)
            check_endpoints(self.config)
            control = self.config.control
            self.stored_links = LinkStore(control.state_file).load(control) if control and control.state_file else []
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def check_endpoints(config: Config) -> None:
    """
    Parse the endpoint descriptions (only parse: a memory reactor binds
    nothing), so that a bad one is a config error naming its key instead of
    a traceback at startup.

    @raise ConfigError: naming the file and the key.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    for section, half in (("control", config.control), ("tenant", config.tenant)):
        address = getattr(half, "metrics", None)
        if address is None:
            continue
        try:
            serverFromString(MemoryReactor(), address)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(config.path, f"{section}.metrics", f"is not a valid endpoint ({e})") from None


def makeService(options: Options, reactor: Any = None) -> MsgmuxService:
    """
    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one by default.
    @return: the service tree for the configured halves.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return MsgmuxService(options.config, reactor, getattr(options, "stored_links", []), freeze_heap=True)
