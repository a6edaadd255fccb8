"""
Many tenant networks for supervised tenant halves, as on a network node
with one namespace per router.

A L{Fleet} makes C{count} network namespaces and one vhost per namespace on
the lab's tenant RabbitMQ; every namespace reaches that broker at its own
C{127.0.0.1:5672} through L{lab.nsforward}.  It writes the control half's
configuration for supervision (C{admin_socket}, C{state_file},
C{[control.supervision]}), runs the control half as an unprivileged user
the way C{twistd --uid/--gid} does in production, and builds the link
tables C{msgmux link add} takes.  Used by the lifecycle integration test,
C{make scale} and C{make demo}.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from typing import Any
from urllib.parse import quote

from twisted.internet import task

from lab.lab import TWISTD, HalfProcess, Lab
from lab.rabbit import Namespace
from msgmux.linkcli import exchange

#: The control half runs as CONTROL_USER:CONTROL_GROUP; the tenant halves as
#: TENANT_USER:TENANT_GROUP.  The link sockets live in a set-group-ID
#: directory of TENANT_GROUP, so tenant halves can connect to them (mode
#: 0660) and to nothing else of the control half's: the admin and metrics
#: sockets are in another directory.  (Production names these msgmux,
#: msgmux-tenant and msgmux-tenants; see docs/operations.md.)
CONTROL_USER, CONTROL_GROUP = "nobody", "nogroup"
TENANT_USER, TENANT_GROUP = "daemon", "daemon"


class Fleet:
    """
    C{count} tenant networks.

    @ivar namespaces: their names, C{<prefix>-<i>}.
    @ivar vhosts: their tenant vhosts, in the same order.
    """

    def __init__(self, lab: Lab, prefix: str, count: int) -> None:
        self.lab = lab
        self.prefix = prefix
        self.namespaces = [f"{prefix}-{index:03d}" for index in range(count)]
        self.vhosts = [f"msgmux-{prefix}-{index:03d}" for index in range(count)]
        self.run = os.path.join(lab.root, prefix, "run")
        self.sockets = os.path.join(lab.root, prefix, "links")
        self.state = os.path.join(lab.root, prefix, "state")
        self.forwarder: HalfProcess | None = None
        self.control: HalfProcess | None = None

    # --- blocking set-up and tear-down (in a thread) -----------------------

    def create(self) -> None:
        """The namespaces, the vhosts, and directories the control half's user owns."""
        for name in self.namespaces:
            Namespace(name).create()
        self.lab.tenant_node.add_vhosts(self.vhosts, self.lab.root)
        shutil.rmtree(os.path.dirname(self.run), ignore_errors=True)  # a state file left by an earlier run
        control = pwd.getpwnam(CONTROL_USER)
        tenants = grp.getgrnam(TENANT_GROUP)
        for directory, mode, gid in (
            (os.path.dirname(self.run), 0o755, None),
            (self.run, 0o755, control.pw_gid),
            (self.sockets, 0o2750, tenants.gr_gid),
            (self.state, 0o700, control.pw_gid),
        ):
            os.makedirs(directory, exist_ok=True)
            if gid is not None:
                os.chown(directory, control.pw_uid, gid)
            os.chmod(directory, mode)

    def destroy(self) -> None:
        """Remove whatever namespaces and vhosts are left."""
        existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
        for name in self.namespaces:
            if name in existing:
                Namespace(name).delete()
        self.lab.tenant_node.delete_vhosts(self.vhosts)

    # --- processes ------------------------------------------------------------

    async def start_forwarder(self) -> HalfProcess:
        """One process in the broker's namespace listening in every fleet namespace."""
        argv = [sys.executable, "-m", "lab.nsforward", "--target", f"127.0.0.1:{self.lab.tenant_node.port}"]
        argv += [f"{name}:5672" for name in self.namespaces]
        self.forwarder = self.lab.spawn(argv, f"{self.prefix}-forwarder", in_tenant_network=True)
        waited = 0.0
        while b"ready" not in self.forwarder.output:
            if not self.forwarder.running or waited > 60:
                raise AssertionError(f"forwarder did not start: {self.forwarder.output.decode(errors='replace')}")
            await task.deferLater(self.lab.reactor, 0.1, lambda: None)
            waited += 0.1
        return self.forwarder

    def control_config(
        self, control_vhost: str, links: str = "", extra: str = "", canary_interval: float = 0.5, link_heartbeat: float = 1.0
    ) -> str:
        """
        Write the control half's configuration: admin socket, state file,
        supervision, metrics; C{links} are more TOML (static links).  The
        canary and heartbeat are quick by default, for tests.
        """
        return self.lab.write(
            f"{self.prefix}/control.toml",
            f"""
[control]
transport_url = "{self.lab.control_node.url(control_vhost)}"
metrics = "unix:{self.run}/metrics.sock"
admin_socket = "{self.run}/admin.sock"
admin_group = "{CONTROL_GROUP}"
state_file = "{self.state}/links.json"
canary_interval = {canary_interval}
link_heartbeat = {link_heartbeat}
{extra}

[control.supervision]
users = ["{TENANT_USER}"]
groups = ["{TENANT_GROUP}"]
restart_delay = 0.5
namespace_poll = 0.5
stop_timeout = 10.0
{links}
""",
        )

    def spawn_control(self, config: str, label: str, environment: dict[str, str] | None = None) -> HalfProcess:
        """
        C{twistd -n msgmux} as root, dropping to the control user after the
        spawner started.

        @param environment: more environment variables (systemd's, say).
        """
        log_path = self.lab.path("logs", f"{label}.log")
        if os.path.exists(log_path):
            os.remove(log_path)
        argv = [TWISTD, "-n", "--pidfile=", f"--logfile={log_path}", f"--uid={CONTROL_USER}", f"--gid={CONTROL_GROUP}"]
        argv += ["msgmux", "--config", config]
        self.control = self.lab.spawn(argv, label, in_tenant_network=False, log_path=log_path, environment_extra=environment)
        return self.control

    def link_table(self, index: int, routes: dict[str, Any] | None = None) -> dict[str, Any]:
        """The table C{msgmux link add} takes for the link of namespace C{index}."""
        name = f"l{index:03d}"
        table: dict[str, Any] = {
            "name": name,
            "socket": f"{self.sockets}/{name}.sock",
            "down": [{"topic": f"agent-{name}"}],
            "tenant": {
                "namespace": self.namespaces[index],
                # The forwarder's port in the namespace, whatever the broker's own.
                "transport_url": f"rabbit://guest:guest@127.0.0.1:5672/{quote(self.vhosts[index], safe='')}",
                "user": TENANT_USER,
                "group": TENANT_GROUP,
            },
        }
        if routes:
            table.update(routes)
        return table

    def link_toml(self, table: dict[str, Any]) -> str:
        """Write a link table as the TOML file C{msgmux link add} reads; @return: its path."""
        return self.lab.write(f"{self.prefix}/link-files/{table['name']}.toml", toml_table(table))


    # --- talking to the control half -------------------------------------------

    def admin(self, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        """One admin socket request (blocking; run it in a thread); @return: the answer, ok or not."""
        return exchange(f"{self.run}/admin.sock", request, timeout)

    def cli(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run C{msgmux link --socket ADMIN ...} (blocking)."""
        environment = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        argv = [sys.executable, "-m", "msgmux.cli", "link", "--socket", f"{self.run}/admin.sock", *arguments]
        return subprocess.run(argv, capture_output=True, text=True, timeout=180, env=environment)

    @property
    def metrics(self) -> str:
        return f"unix:{self.run}/metrics.sock"


def _toml(value: Any) -> str:
    """TOML for the JSON-like values of a link table (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


async def wait_for(reactor: Any, what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
    """Poll the coroutine function C{check} until it returns something true."""
    waited = 0.0
    while True:
        result = await check()
        if result:
            return result
        if waited > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


def pss_kib(pid: int) -> dict[str, int]:
    """C{/proc/PID/smaps_rollup} in KiB (Rss, Pss, Private_Dirty, ...)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1])
    return values


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def toml_table(table: dict[str, Any], header: str = "", prefix: str = "") -> str:
    """
    A link table as TOML: C{header} (such as C{[[control.links]]}) first,
    sub-tables as C{[PREFIXkey]}.
    """
    lines = [header] if header else []
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"\n[{prefix}{key}]")
            lines += [f"{k} = {_toml(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"
