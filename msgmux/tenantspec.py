# -*- test-case-name: tests.test_tenantspec -*-
"""
Supervised tenant halves in the configuration.

A link may carry a C{tenant} table saying where its tenant half runs: the
network namespace, the tenant broker, and the unprivileged user and group.
The control half then has the tenant half started there (see
L{msgmux.supervisor}).  C{[control.supervision]} lists the users and groups
tenant halves may run as; the privileged spawner gets that list when it
starts and refuses anything else, so a compromised control half cannot have
tenant halves run as other accounts.

The same reader serves the configuration file, links added at run time and
the spawner's own re-check, so all three give the same error for the same
mistake.  Pure code, like L{msgmux.config}: the only look-ups are the
account databases (L{pwd}, L{grp}).
"""

from __future__ import annotations

import grp
import pwd
import re
from typing import TYPE_CHECKING, Any, Callable

import attrs

from msgmux._toml import Section

if TYPE_CHECKING:
    from msgmux.config import BrokerConfig

__all__ = ["SupervisionConfig", "TenantSpec", "read_supervision", "read_tenant_spec"]

#: What C{ip netns} names look like in practice (neutron's C{qrouter-<uuid>},
#: C{qdhcp-<uuid>}, C{snat-...}): a file name in C{/run/netns}, so no slash
#: and no leading dot.
_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
#: POSIX portable user and group names (with the C{$} Samba machine accounts use).
_ACCOUNT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,31}\$?$")


@attrs.frozen
class SupervisionConfig:
    """
    C{[control.supervision]}: who tenant halves may run as, and how they are
    restarted.

    @ivar users: user names a link's tenant half may run as; never root.
    @ivar groups: group names likewise.
    @ivar restart_delay: seconds before the first restart of a half that
        exited; doubles with each exit in a row.
    @ivar max_restart_delay: ceiling of that delay.
    @ivar stable_after: a half that ran this long is restarted after
        C{restart_delay} again, however often it failed before.
    @ivar stop_timeout: seconds a stopping half gets after SIGTERM (it drains
        its link) before SIGKILL.
    @ivar namespace_poll: seconds between checks that each half's network
        namespace still exists.
    """

    users: tuple[str, ...]
    groups: tuple[str, ...]
    restart_delay: float = 1.0
    max_restart_delay: float = 60.0
    stable_after: float = 30.0
    stop_timeout: float = 10.0
    namespace_poll: float = 1.0

    def to_arguments(self) -> list[str]:
        """@return: the spawner's command line options for these limits."""
        arguments = []
        for user in self.users:
            arguments += ["--user", user]
        for group in self.groups:
            arguments += ["--group", group]
        return arguments + ["--stop-timeout", repr(self.stop_timeout)]


@attrs.frozen
class TenantSpec:
    """
    Where and how one link's tenant half runs.

    @ivar namespace: the network namespace (a name in C{/run/netns}).
    @ivar user: the user it runs as.
    @ivar group: the only group it runs with.
    @ivar broker: the tenant broker, as seen from inside the namespace.
    @ivar link_window: the tenant half's C{link_window}.
    @ivar table: the table as written, which is what the spawner is sent
        (it parses it again) and what the state file keeps.
    """

    namespace: str
    user: str
    group: str
    broker: BrokerConfig
    link_window: int = 256
    table: dict[str, Any] = attrs.field(factory=dict, eq=False, hash=False, repr=False)


def _positive(high: float) -> Callable[[float], str | None]:
    return lambda value: None if 0 < value <= high else f"must be greater than 0 and at most {high:g} seconds"


def read_supervision(section: Section) -> SupervisionConfig:
    """
    Read C{[control.supervision]}.

    @raise ConfigError: naming the key.
    """
    users = section.strings("users")
    groups = section.strings("groups")
    if not users:
        raise section.error("users", "must list at least one user tenant halves may run as")
    if not groups:
        raise section.error("groups", "must list at least one group tenant halves may run as")
    for index, user in enumerate(users):
        problem = _user_problem(user)
        if problem:
            raise section.error(f"users[{index}]", problem)
    for index, group in enumerate(groups):
        problem = _group_problem(group)
        if problem:
            raise section.error(f"groups[{index}]", problem)
    restart_delay = section.get("restart_delay", float, 1.0, _positive(3600))
    max_restart_delay = section.get("max_restart_delay", float, 60.0, _positive(86400))
    if max_restart_delay < restart_delay:
        raise section.error("max_restart_delay", "must not be less than restart_delay")
    supervision = SupervisionConfig(
        users=users,
        groups=groups,
        restart_delay=restart_delay,
        max_restart_delay=max_restart_delay,
        stable_after=section.get("stable_after", float, 30.0, _positive(86400)),
        stop_timeout=section.get("stop_timeout", float, 10.0, _positive(600)),
        namespace_poll=section.get("namespace_poll", float, 1.0, _positive(600)),
    )
    section.finish()
    return supervision


def read_tenant_spec(
    section: Section,
    supervision: SupervisionConfig | None,
    read_broker: Callable[[Section], BrokerConfig],
    table: dict[str, Any],
) -> TenantSpec:
    """
    Read a link's C{tenant} table.

    @param supervision: the allowed users and groups; L{None} when the
        control half has no C{[control.supervision]}, which refuses the
        table.
    @param read_broker: L{msgmux.config}'s reader of broker keys
        (C{transport_url}, C{exchange}, C{heartbeat}, C{prefetch},
        C{login_method}, C{queues}, C{tls}), the same as for C{[tenant]}.
    @param table: the table itself, kept in the result.
    @raise ConfigError: naming the key.
    """
    if supervision is None:
        raise section.error("", "needs a [control.supervision] section (who tenant halves may run as)")
    namespace = section.get("namespace", str, check=_namespace_problem)
    broker = read_broker(section)
    user = section.get("user", str, check=_user_problem)
    if user not in supervision.users:
        raise section.error("user", f"{user!r} is not one of control.supervision.users")
    group = section.get("group", str, check=_group_problem)
    if group not in supervision.groups:
        raise section.error("group", f"{group!r} is not one of control.supervision.groups")
    window = section.get("link_window", int, 256, lambda v: None if 1 <= v <= 65535 else "must be 1-65535")
    section.finish()
    return TenantSpec(namespace=namespace, user=user, group=group, broker=broker, link_window=window, table=table)


def _namespace_problem(value: str) -> str | None:
    if not _NAMESPACE.match(value):
        return "must be a network namespace name: 1-128 letters, digits and _ . - (no slash, not starting with . or -)"
    return None


def _user_problem(value: str) -> str | None:
    if not _ACCOUNT.match(value):
        return "is not a valid user name"
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        return f"no user {value!r} on this host"
    if entry.pw_uid == 0:
        return "must not be root (uid 0): a tenant half is assumed compromised"
    return None


def _group_problem(value: str) -> str | None:
    if not _ACCOUNT.match(value):
        return "is not a valid group name"
    try:
        entry = grp.getgrnam(value)
    except KeyError:
        return f"no group {value!r} on this host"
    if entry.gr_gid == 0:
        return "must not be the root group (gid 0)"
    return None


def resolve_account(user: str, group: str) -> tuple[int, int]:
    """
    @return: the uid and gid to run a tenant half as, checked again at the
        moment of use (accounts can change after the configuration was read).
    @raise ValueError: when either is missing or privileged.
    """
    for problem in (_user_problem(user), _group_problem(group)):
        if problem:
            raise ValueError(problem)
    return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
