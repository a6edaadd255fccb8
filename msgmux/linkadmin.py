# -*- test-case-name: tests.test_linkadmin -*-
"""
Links added and removed at run time (C{msgmux link add | remove | list |
show}).

A link added here is validated with the configuration file's own code
(L{msgmux.config.parse_link}), so the errors are the file's, naming the key.
A refused request changes nothing: the link is listened on first, then
written to the state file, and the listener is taken down again if the write
fails.  Removal drains the link (L{ControlHalfLike.remove_link}: stop
consuming, settle what is in flight, close the session, remove the socket)
and then stops its supervised tenant half.  Links of the configuration file
cannot be removed here: the file is the operator's record of them.

Changes run one at a time, together with reloads and the stop, through the
C{exclusive} runner the service passes in.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from msgmux._toml import ConfigError
from msgmux.config import ControlConfig, LinkConfig, parse_link
from msgmux.linkstore import LinkStore, StoredLink
from msgmux.supervisor import TenantSupervisor

__all__ = ["AdminError", "ControlHalfLike", "LinkAdmin"]


class AdminError(Exception):
    """A request that was refused; the message is the answer."""


class ControlHalfLike(Protocol):
    """What run-time links need from the control half."""

    config: ControlConfig
    links: dict[str, Any]
    peer_check: Callable[[str, tuple[int, int, int] | None], str | None]

    def add_link(self, link: LinkConfig) -> None:
        """Listen on and serve a new link; raise if its socket cannot be bound."""

    async def remove_link(self, name: str) -> None:
        """Drain and stop a link, and remove its socket."""


class LinkAdmin:
    """
    The run-time links of one control half.

    @ivar dynamic: the links added at run time, by name, with the tables
        they were added with.
    """

    _log = Logger()

    def __init__(
        self,
        control: ControlHalfLike,
        store: LinkStore,
        supervisor: TenantSupervisor | None,
        stored: list[StoredLink],
        exclusive: Callable[[Callable[[], defer.Deferred[Any]]], defer.Deferred[Any]],
        run_blocking: Callable[..., defer.Deferred[Any]],
    ) -> None:
        """
        @param stored: the links of the state file, served from L{start}.
        @param exclusive: runs a change after any other change, reload or
            stop in progress (a C{DeferredLock.run}).
        @param run_blocking: runs a blocking call in a thread (the state
            file is flushed to disk).
        """
        self.control = control
        self.store = store
        self.supervisor = supervisor
        self.dynamic: dict[str, StoredLink] = {link.name: (table, link) for table, link in stored}
        self._exclusive = exclusive
        self._run_blocking = run_blocking
        #: Called after a link was added or removed (the metrics follow).
        self.on_change: list[Callable[[], None]] = []

    def start(self) -> None:
        """Serve the links of the state file (after the configured ones)."""
        for name, (_, link) in list(self.dynamic.items()):
            try:
                self.control.add_link(link)
            except Exception as e:
                self._log.error("Link {link} from {path}: cannot listen: {error}", link=name, path=self.store.path, error=str(e))
                del self.dynamic[name]
                continue
            self._log.info("Link {link}: restored from {path}", link=name, path=self.store.path)

    def supervised(self) -> list[LinkConfig]:
        """Every link, configured or added, whose tenant half is supervised."""
        links = list(self.control.config.links) + [link for _, link in self.dynamic.values()]
        return [link for link in links if link.tenant is not None]

    def clash(self, control: ControlConfig) -> str | None:
        """
        @return: why a reloaded configuration cannot be applied (one of its
            links has the name or socket of a link added at run time), or
            L{None}.
        """
        for link in control.links:
            for _, added in self.dynamic.values():
                if link.name == added.name or link.socket == added.socket:
                    return f"link {link.name!r} of the file clashes with link {added.name!r} added at run time; remove that first"
        return None

    # --- requests ------------------------------------------------------------

    def add(self, table: Any, source: str) -> defer.Deferred[dict[str, Any]]:
        """Add a link; fires with its description, or fails with L{AdminError}."""
        return self._exclusive(lambda: defer.Deferred.fromCoroutine(self._add(table, source)))

    def remove(self, name: Any) -> defer.Deferred[dict[str, Any]]:
        """Drain and remove a link added at run time."""
        return self._exclusive(lambda: defer.Deferred.fromCoroutine(self._remove(name)))

    def list(self) -> list[dict[str, Any]]:
        """Every link, with where it comes from."""
        return [self.describe(name) for name in self.control.links]

    def show(self, name: Any) -> dict[str, Any]:
        """One link's settings and state."""
        if not isinstance(name, str) or name not in self.control.links:
            raise AdminError(f"no link {name!r}")
        return self.describe(name, full=True)

    def describe(self, name: str, full: bool = False) -> dict[str, Any]:
        """A link's origin, socket and state; with C{full}, its settings too."""
        link = self.control.links[name]
        config: LinkConfig = link.config
        description: dict[str, Any] = {
            "link": name,
            "origin": "runtime" if name in self.dynamic else "config",
            "socket": config.socket,
            "status": link.status(),
        }
        if self.supervisor is not None and name in self.supervisor.halves:
            description["tenant_half"] = next(h for h in self.supervisor.status() if h["link"] == name)
        if full:
            table = self.dynamic[name][0] if name in self.dynamic else None
            description["settings"] = _redacted(table) if table is not None else _describe_config(config)
        return description

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    async def _add(self, table: Any, source: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise AdminError(f"{source}: the link must be a table")
        try:
            link = parse_link(table, source, self.control.config)
        except ConfigError as e:
            raise AdminError(str(e)) from None
        for key, value in (("name", link.name), ("socket", link.socket)):
            if any(getattr(other.config, key) == value for other in self.control.links.values()):
                raise AdminError(str(ConfigError(source, key, f"{value!r} is used by another link")))
        try:
            self.control.add_link(link)
        except Exception as e:
            raise AdminError(f"{source}: socket: cannot listen on {link.socket}: {e}") from None
        tables = [stored for stored, _ in self.dynamic.values()] + [table]
        try:
            await self._run_blocking(self.store.save, tables)
        except OSError as e:
            await self.control.remove_link(link.name)
            raise AdminError(f"cannot write {self.store.path}: {e.strerror or e}; link not added") from None
        self.dynamic[link.name] = (table, link)
        if link.tenant is not None and self.supervisor is not None:
            self.supervisor.add(link)
        self._log.info("Link {link}: added at run time", link=link.name)
        self._changed()
        return self.describe(link.name)

    async def _remove(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or name not in self.control.links:
            raise AdminError(f"no link {name!r}")
        if name not in self.dynamic:
            raise AdminError(f"link {name!r} is in the configuration file; remove it there and reload")
        tables = [table for other, (table, _) in self.dynamic.items() if other != name]
        try:
            await self._run_blocking(self.store.save, tables)
        except OSError as e:
            raise AdminError(f"cannot write {self.store.path}: {e.strerror or e}; link not removed") from None
        _, link = self.dynamic.pop(name)
        await self.control.remove_link(name)
        if self.supervisor is not None:
            await self.supervisor.remove(name)
        self._log.info("Link {link}: removed at run time", link=name)
        self._changed()
        return {"link": name, "removed": True}


_SECRET_KEYS = ("transport_url",)


def _redacted(table: dict[str, Any]) -> dict[str, Any]:
    """A link table without passwords (in C{transport_url}s)."""
    result: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            result[key] = _redacted(value)
        elif key in _SECRET_KEYS and isinstance(value, str):
            result[key] = _hide_password(value)
        else:
            result[key] = value
    return result


def _hide_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    hosts, slash, path = rest.partition("/")
    shown = []
    for host in hosts.split(","):
        if "@" in host:
            userinfo, _, address = host.rpartition("@")
            user = userinfo.split(":", 1)[0]
            host = f"{user}:***@{address}"
        shown.append(host)
    return f"{scheme}://{','.join(shown)}{slash}{path}"


def _describe_config(config: LinkConfig) -> dict[str, Any]:
    """The settings of a link from the configuration file, for C{show}."""

    def plain(item: Any) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.asdict(item, recurse=False).items()}

    return {
        "name": config.name,
        "socket": config.socket,
        "socket_mode": f"{config.socket_mode:04o}",
        "down": [plain(rule) for rule in config.down],
        "up": [plain(rule) for rule in config.up],
        "notifications_down": [plain(rule) for rule in config.notifications_down],
        "notifications_up": [plain(rule) for rule in config.notifications_up],
        "limits": plain(config.limits),
        "tenant": None if config.tenant is None else _redacted(config.tenant.table),
    }
