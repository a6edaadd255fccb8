"""
C{make faults}: fault injection under load, with real brokers and processes.

For each fault, a fresh pair of vhosts, both msgmux halves (the tenant half
connects through L{lab.cutter}, so the link can be cut), oslo services on
both brokers, and four streams of load at once: casts and calls down, casts
and notifications up.  A third of the way in, the fault is injected and
repaired.  When the load is over and delivery has settled, every stream is
accounted for: sent (confirmed by the sending oslo client), delivered
(distinct ids seen by the receiving oslo service), lost, duplicated (seen
more than once by the service), the duplicates oslo's own C{_unique_id}
check dropped before the service, and the outage (the longest pause in
deliveries after the fault).

Both brokers are private nodes here (the control one on port 5673), because
restarting them is one of the faults; queues are durable (as a deployment
that wants messages to survive a broker restart configures oslo).

A second run repeats the halves' and brokers' faults with both brokers
listening for TLS only (certificates made for the run; oslo services and
both halves on TLS, the tenant side logging in with its certificate).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import defer, task, threads

from lab.lab import HalfProcess, Lab
from lab.peer import OsloPeer

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1"] } ]
up = [ { topic = "q-reports", methods = ["echo", "report_state"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info"] } ]
"""


@attrs.define
class Stream:
    """One kind of traffic under load."""

    label: str
    sender: str  # "control" or "tenant"
    kind: str  # "cast", "call" or "notify"
    topic: str
    method: str
    receiver: str
    count: int
    rate: float
    sent: list[list[Any]] = attrs.field(factory=list)

    def received(self, records: list[dict[str, Any]]) -> list[tuple[int, float]]:
        if self.kind == "notify":
            return [(r["payload"]["i"], r["at"]) for r in records if r["event_type"] == "load.event"]
        return [(r["kwargs"]["i"], r["at"]) for r in records if r["method"] == self.method and "i" in r["kwargs"]]


@attrs.frozen
class Row:
    fault: str
    stream: str
    sent: int
    delivered: int
    lost: int
    duplicated: int
    failed_sends: int
    outage: float
    #: Whether the halves' logs show the fault happened (a session or broker
    #: connection lost and made again), so that a fault that did nothing
    #: cannot pass for one that lost nothing.
    fault_seen: bool = False


def streams(scale: float) -> list[Stream]:
    n = max(20, int(1500 * scale))
    return [
        Stream("casts down", "control", "cast", "l3_agent", "echo", "agent-1", n, 150.0),
        Stream("calls down", "control", "call", "l3_agent", "report_state", "agent-1", max(10, n // 5), 30.0),
        Stream("casts up", "tenant", "cast", "q-reports", "echo", "q-server", n, 150.0),
        Stream("notifications up", "tenant", "notify", "notifications", "", "listener", max(10, n // 2), 75.0),
    ]


class Scenario:
    """One fault, from fresh vhosts to the accounting."""

    def __init__(self, lab: Lab, name: str, scale: float) -> None:
        self.lab = lab
        self.name = name
        self.scale = scale
        self.tag = name.replace(" ", "-")
        self.control_half: HalfProcess | None = None
        self.tenant_half: HalfProcess | None = None
        self.cutter: HalfProcess | None = None
        #: Every half this scenario started, with its side, replacements included.
        self.halves: list[tuple[str, HalfProcess]] = []

    # --- set-up -----------------------------------------------------------

    async def start(self) -> None:
        lab = self.lab
        self.control_vhost, self.tenant_vhost = await threads.deferToThread(lab.vhosts, self.tag)
        key = lab.write("reply.key", "k" * 32)
        self.socket = lab.path("sockets", f"{self.tag}.sock")
        self.cut_socket = lab.path("sockets", f"{self.tag}-cut.sock")
        queues = "amqp_durable_queues = true"
        self.control_config = lab.write(
            f"{self.tag}-control.toml",
            f"""
[control]
transport_url = "{lab.url("control", self.control_vhost)}"
{lab.broker_options("control")}
reply_key_file = "{key}"
link_heartbeat = 1.0

[control.queues]
{queues}

[[control.links]]
name = "faults"
socket = "{self.socket}"
{ROUTES}
""",
        )
        self.tenant_config = lab.write(
            f"{self.tag}-tenant.toml",
            f"""
[tenant]
transport_url = "{lab.url("tenant", self.tenant_vhost)}"
{lab.broker_options("tenant")}
socket = "{self.cut_socket}"
link = "faults"

[tenant.queues]
{queues}
""",
        )
        self.control_half = lab.spawn_half(self.control_config, f"{self.tag}-control", in_tenant_network=False)
        await lab.wait_for_log(self.control_half, "listening on")
        self.cutter = lab.spawn([sys.executable, "-m", "lab.cutter", self.cut_socket, self.socket], f"{self.tag}-cutter")
        self.tenant_half = lab.spawn_half(self.tenant_config, f"{self.tag}-tenant", in_tenant_network=True)
        self.halves += [("control", self.control_half), ("tenant", self.tenant_half)]
        await lab.wait_for_log(self.control_half, "control broker channel ready")
        await lab.wait_for_log(self.tenant_half, "tenant broker channel ready")
        rabbit = {"amqp_durable_queues": True, "rabbit_retry_interval": 1, "rabbit_retry_backoff": 1}
        self.control = lab.spawn_peer("control", self.control_vhost, **rabbit)
        self.tenant = lab.spawn_peer("tenant", self.tenant_vhost, **rabbit)
        await self.control.ready
        await self.tenant.ready
        await self.tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await self.control.request("server", name="q-server", topic="q-reports", server="q-server")
        await self.control.request("listener", name="listener", topics=["notifications"], pool="faults")
        await task.deferLater(lab.reactor, 1.0, lambda: None)

    def peer(self, side: str) -> OsloPeer:
        return self.control if side == "control" else self.tenant

    # --- faults -------------------------------------------------------------

    async def restart_half(self, which: str, downtime: float = 1.0) -> None:
        half = self.control_half if which == "control" else self.tenant_half
        assert half is not None
        await half.kill()
        await task.deferLater(self.lab.reactor, downtime, lambda: None)
        config = self.control_config if which == "control" else self.tenant_config
        replacement = self.lab.spawn_half(config, f"{self.tag}-{which}-again", in_tenant_network=which == "tenant")
        self.halves.append((which, replacement))
        if which == "control":
            self.control_half = replacement
        else:
            self.tenant_half = replacement

    async def restart_broker(self, which: str) -> None:
        node = self.lab.control_node if which == "control" else self.lab.tenant_node
        await threads.deferToThread(node.stop)  # type: ignore[union-attr]
        await threads.deferToThread(node.start)  # type: ignore[union-attr]

    async def drop_connections(self) -> None:
        """The brokers close every connection of the scenario's vhosts (msgmux's and oslo's)."""
        for node, vhost in ((self.lab.control_node, self.control_vhost), (self.lab.tenant_node, self.tenant_vhost)):
            await threads.deferToThread(node.ctl, "close_all_connections", "-p", vhost, "fault injection")

    async def cut_link(self) -> None:
        assert self.cutter is not None
        self.cutter.signal(signal.SIGUSR1)

    # --- the run --------------------------------------------------------------

    async def run(self, fault: Callable[[], Awaitable[None]]) -> list[Row]:
        await self.start()
        load = streams(self.scale)
        duration = max(s.count / s.rate for s in load)

        async def drive(stream: Stream) -> None:
            stream.sent = await self.peer(stream.sender).request(
                "load", kind=stream.kind, topic=stream.topic, method=stream.method, count=stream.count, rate=stream.rate, timeout=20
            )

        running = [defer.Deferred.fromCoroutine(drive(s)) for s in load]
        await task.deferLater(self.lab.reactor, duration / 3, lambda: None)
        fault_at = time.time()
        await fault()
        await defer.gatherResults(running, consumeErrors=True)
        await self.settle(load)
        rows = []
        for stream in load:
            receiver = "control" if stream.sender == "tenant" else "tenant"
            records = await self.peer(receiver).request("received", name=stream.receiver)
            got = stream.received(records)
            ids = [i for i, _ in got]
            sent_ok = {i for i, ok, _, _ in stream.sent if ok}
            times = sorted(at for _, at in got if at >= fault_at - 0.5)
            gaps = [b - a for a, b in zip([fault_at] + times, times)]
            rows.append(
                Row(
                    fault=self.name,
                    stream=stream.label,
                    sent=len(sent_ok),
                    delivered=len(set(ids)),
                    lost=len(sent_ok - set(ids)),
                    duplicated=len(ids) - len(set(ids)),
                    failed_sends=sum(1 for _, ok, _, _ in stream.sent if not ok),
                    outage=max(gaps, default=0.0),
                )
            )
        self.oslo_dropped = await self.control.request("duplicates") + await self.tenant.request("duplicates")
        seen = self.fault_seen()
        return [attrs.evolve(row, fault_seen=seen) for row in rows]

    def fault_seen(self) -> bool:
        """Whether the halves' logs show what the fault must have caused."""
        logs = {side: "".join(half.log() for s, half in self.halves if s == side) for side in ("control", "tenant")}
        tenant_sessions = len(re.findall(r"Link faults: session \w+ up", logs["tenant"]))
        lost_control = "Lost the control broker" in logs["control"]
        lost_tenant = "Lost the tenant broker" in logs["tenant"]
        evidence = {
            "kill -9 control half": tenant_sessions >= 2 and sum(s == "control" for s, _ in self.halves) == 2,
            "kill -9 tenant half": tenant_sessions >= 2 and sum(s == "tenant" for s, _ in self.halves) == 2,
            "restart control broker": lost_control,
            "restart tenant broker": lost_tenant,
            "cut the socket": tenant_sessions >= 2,
            "drop broker connections": lost_control and lost_tenant,
        }
        return evidence[self.name]

    async def settle(self, load: list[Stream], quiet: float = 5.0, limit: float = 90.0) -> None:
        """Wait until every sent message arrived, or nothing arrived for C{quiet} seconds."""
        started = last_change = time.monotonic()
        previous = -1
        while time.monotonic() - started < limit:
            total = 0
            missing = 0
            for stream in load:
                receiver = "control" if stream.sender == "tenant" else "tenant"
                got = {i for i, _ in stream.received(await self.peer(receiver).request("received", name=stream.receiver))}
                total += len(got)
                missing += len({i for i, ok, _, _ in stream.sent if ok} - got)
            if missing == 0:
                return
            if total != previous:
                previous, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                return
            await task.deferLater(self.lab.reactor, 0.5, lambda: None)

    async def stop(self) -> None:
        await self.lab.stop_processes()
        await threads.deferToThread(self.lab.drop_vhosts, self.control_vhost, self.tenant_vhost)


FAULTS: dict[str, Callable[[Scenario], Awaitable[None]]] = {
    "kill -9 control half": lambda s: s.restart_half("control"),
    "kill -9 tenant half": lambda s: s.restart_half("tenant"),
    "restart control broker": lambda s: s.restart_broker("control"),
    "restart tenant broker": lambda s: s.restart_broker("tenant"),
    "cut the socket": lambda s: s.cut_link(),
    "drop broker connections": lambda s: s.drop_connections(),
}


#: The faults repeated with TLS brokers.
TLS_FAULTS = ["kill -9 control half", "kill -9 tenant half", "restart control broker", "restart tenant broker"]


async def run_faults(lab: Lab, names: list[str], scale: float) -> list[tuple[Row, int]]:
    """Run the named faults in order; @return: rows with oslo's dropped-duplicate count."""
    results = []
    for name in names:
        scenario = Scenario(lab, name, scale)
        try:
            rows = await scenario.run(lambda: FAULTS[name](scenario))
            if lab.tls:
                rows = [attrs.evolve(row, fault=f"{row.fault} [TLS]") for row in rows]
            results += [(row, scenario.oslo_dropped) for row in rows]
        finally:
            await scenario.stop()
    return results


def table(results: list[tuple[Row, int]]) -> str:
    header = f"{'fault':30} {'stream':18} {'sent':>6} {'delivered':>9} {'lost':>5} {'dup':>5} {'oslo-dropped':>12} {'failed-sends':>12} {'outage s':>8}"
    lines = [header, "-" * len(header)]
    for row, dropped in results:
        lines.append(
            f"{row.fault:30} {row.stream:18} {row.sent:>6} {row.delivered:>9} {row.lost:>5} {row.duplicated:>5}"
            f" {dropped:>12} {row.failed_sends:>12} {row.outage:>8.1f}"
        )
    return "\n".join(lines)


async def main(reactor: Any, arguments: argparse.Namespace) -> None:
    results: list[tuple[Row, int]] = []
    if not arguments.tls_only:
        lab = Lab("faults", reactor, private_control=True)
        print("Starting the lab (tenant broker in a namespace, private control broker)...", flush=True)
        await threads.deferToThread(lab.up)
        try:
            results += await run_faults(lab, arguments.fault or list(FAULTS), arguments.scale)
        finally:
            await lab.stop_processes()
            await threads.deferToThread(lab.down)
    tls_faults = [name for name in (arguments.fault or list(FAULTS)) if name in TLS_FAULTS]
    if not arguments.no_tls and tls_faults:
        lab = Lab("faults-tls", reactor, tls=("control", "tenant"), external=("tenant",))
        print("Starting the TLS lab (both brokers TLS only, the tenant side logging in by certificate)...", flush=True)
        await threads.deferToThread(lab.up)
        try:
            results += await run_faults(lab, tls_faults, arguments.scale)
        finally:
            await lab.stop_processes()
            await threads.deferToThread(lab.down)
    print()
    print(table(results))
    print()
    print("sent: casts/notifications the oslo client saw confirmed, and calls that returned;")
    print("lost: sent but never seen by the receiving oslo service (must be 0 for casts and notifications);")
    print("dup: seen more than once by the service; oslo-dropped: duplicates oslo's _unique_id check dropped (per scenario);")
    print("failed-sends: client-side errors (calls timing out during the fault); outage: longest pause in deliveries after the fault.")
    unseen = sorted({row.fault for row, _ in results if not row.fault_seen})
    if unseen:
        print(f"NOT SEEN in the halves' logs (the fault may not have happened): {', '.join(unseen)}")
    if unseen or any(row.lost for row, _ in results if row.stream != "calls down"):
        raise SystemExit(1)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", action="append", choices=list(FAULTS), help="run only this fault (repeatable)")
    parser.add_argument("--scale", type=float, default=1.0, help="load multiplier (1.0: 1500 casts per direction)")
    parser.add_argument("--no-tls", action="store_true", help="skip the run with TLS brokers")
    parser.add_argument("--tls-only", action="store_true", help="only the run with TLS brokers")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))


if __name__ == "__main__":
    cli()
