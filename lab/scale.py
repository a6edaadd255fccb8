"""
C{make scale}: many supervised tenant halves on one host.

Builds the lab (a tenant RabbitMQ in a namespace of its own; the machine's
RabbitMQ as the control broker), makes one network namespace per router and
a tenant vhost for each, starts a control half that drops to an unprivileged
user after starting its spawner, adds one link per namespace through the
admin socket, and prints:

 - the time until every tenant half's session is up, and until every link is
   healthy (a canary went round both brokers);
 - memory: the PSS (C{/proc/PID/smaps_rollup}) of every tenant half, the
   spawner and the control half, and their total;
 - the CPU the control half and the halves use at idle (canaries only);
 - how long the stop takes (every half drains and exits).

C{python -m lab.scale --halves 200} (the default); C{--halves 50} for the
figure the memory target is stated at.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from twisted.internet import defer, task, threads

from lab.fleet import Fleet, cpu_seconds, pss_kib, wait_for
from lab.lab import Lab
from msgmux.cli import fetch_status


def say(text: str = "") -> None:
    print(text, flush=True)


async def run(lab: Lab, reactor: Any, arguments: argparse.Namespace, control_vhost: str) -> None:
    count = arguments.halves
    fleet = Fleet(lab, "sc", count)
    say(f"== {count} namespaces, {count} tenant vhosts, one forwarder")
    started = time.monotonic()
    await threads.deferToThread(fleet.create)
    await fleet.start_forwarder()
    say(f"   ready in {time.monotonic() - started:.1f}s")
    try:
        await measure(lab, reactor, arguments, control_vhost, fleet)
    finally:
        say("\n== Tearing down")
        if fleet.control is not None and fleet.control.running:
            await fleet.control.stop()
        if fleet.forwarder is not None and fleet.forwarder.running:
            await fleet.forwarder.stop()
        await threads.deferToThread(fleet.destroy)


async def measure(lab: Lab, reactor: Any, arguments: argparse.Namespace, control_vhost: str, fleet: Fleet) -> None:
    count = arguments.halves
    # The shipped defaults, so that "idle" means what it will in production.
    config = fleet.control_config(control_vhost, canary_interval=arguments.canary_interval, link_heartbeat=5.0)
    control = fleet.spawn_control(config, "scale-control")

    async def spawner_ready() -> dict[str, Any] | None:
        try:
            document = await fetch_status(reactor, fleet.metrics)
        except Exception:
            return None
        return document if document.get("spawner", {}).get("pid") else None

    document = await wait_for(reactor, "the control half and its spawner", spawner_ready, 60)
    spawner_pid = document["spawner"]["pid"]
    control_pid = control.transport.pid
    say(f"\n== Adding {count} links with supervised tenant halves through the admin socket")
    started = time.monotonic()

    def add_all() -> None:
        for index in range(count):
            answer = fleet.admin({"command": "add", "link": fleet.link_table(index), "source": "scale"})
            if not answer.get("ok"):
                raise RuntimeError(f"link {index} refused: {answer.get('error')}")

    await threads.deferToThread(add_all)
    added = time.monotonic() - started

    async def all_up() -> dict[str, Any] | None:
        document = await fetch_status(reactor, fleet.metrics)
        return document if sum(1 for link in document["links"] if link["up"]) == count else None

    await wait_for(reactor, "every session up", all_up, 600, interval=0.5)
    up = time.monotonic() - started

    async def all_healthy() -> dict[str, Any] | None:
        document = await fetch_status(reactor, fleet.metrics)
        return document if sum(1 for link in document["links"] if link["healthy"]) == count else None

    document = await wait_for(reactor, "every link healthy", all_healthy, 600, interval=0.5)
    healthy = time.monotonic() - started
    halves = [half["pid"] for half in document["tenant_halves"] if half["state"] == "running"]
    say(f"   {len(halves)} halves running; letting them settle for {arguments.settle:.0f}s")
    await task.deferLater(reactor, arguments.settle, lambda: None)

    memory = {pid: pss_kib(pid) for pid in halves}
    spawner, control_memory = pss_kib(spawner_pid), pss_kib(control_pid)
    pss = [values["Pss"] / 1024 for values in memory.values()]
    private = [values["Private_Dirty"] / 1024 for values in memory.values()]
    rss = [values["Rss"] / 1024 for values in memory.values()]

    before = {pid: cpu_seconds(pid) for pid in halves + [control_pid, spawner_pid]}
    await task.deferLater(reactor, arguments.idle, lambda: None)
    after = {pid: cpu_seconds(pid) for pid in before}
    control_cpu = 100 * (after[control_pid] - before[control_pid]) / arguments.idle
    halves_cpu = 100 * sum(after[pid] - before[pid] for pid in halves) / arguments.idle
    document = await fetch_status(reactor, fleet.metrics)
    still_healthy = sum(1 for link in document["links"] if link["healthy"])

    say("\n== Stopping the control half (every half drains and exits)")
    started = time.monotonic()
    await control.stop()
    stopped = time.monotonic() - started

    total = sum(pss) + spawner["Pss"] / 1024 + control_memory["Pss"] / 1024
    say(f"\n== {count} supervised tenant halves on one host ({lab.reactor.__class__.__name__}, 2 cores shared)")
    rows = [
        ("links added through the admin socket", f"{added:.1f} s"),
        ("time until every session is up", f"{up:.1f} s"),
        (f"time until every link is healthy (canary every {arguments.canary_interval:g} s)", f"{healthy:.1f} s"),
        ("PSS per tenant half (target <= 12 MB)", f"{statistics.mean(pss):.1f} MB mean, {max(pss):.1f} MB max"),
        ("  private dirty per half / RSS per half", f"{statistics.mean(private):.1f} MB / {statistics.mean(rss):.1f} MB"),
        ("PSS of the spawner", f"{spawner['Pss'] / 1024:.1f} MB"),
        ("PSS of the control half", f"{control_memory['Pss'] / 1024:.1f} MB"),
        ("total memory (PSS: halves + spawner + control half)", f"{total:.0f} MB"),
        (f"control half CPU at idle (over {arguments.idle:.0f} s)", f"{control_cpu:.1f} % of one core"),
        ("all tenant halves' CPU at idle", f"{halves_cpu:.1f} % of one core"),
        ("links healthy after the idle period", f"{still_healthy} of {count}"),
        ("stop of the control half with every half", f"{stopped:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        say(f"   {label:{width}}  {value}")


async def main(reactor: Any, arguments: argparse.Namespace) -> None:
    lab = Lab("scale", reactor)
    say("== Setting up the lab")
    seconds = await threads.deferToThread(lab.up)
    say(f"   tenant RabbitMQ up in {seconds:.1f}s; control broker: the machine's RabbitMQ")
    control_vhost = "msgmux-scale-control"
    await threads.deferToThread(lab.control_node.add_vhost, control_vhost)
    try:
        await run(lab, reactor, arguments, control_vhost)
    finally:
        await lab.stop_processes()
        await threads.deferToThread(lab.control_node.delete_vhost, control_vhost)
        await threads.deferToThread(lab.down)
        say("   done")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--halves", type=int, default=200, help="tenant halves to run (default 200)")
    parser.add_argument("--canary-interval", type=float, default=10.0, help="the control half's canary_interval (default 10, as shipped)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after all are healthy before measuring memory")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds over which idle CPU is measured")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))


if __name__ == "__main__":
    sys.exit(cli())
