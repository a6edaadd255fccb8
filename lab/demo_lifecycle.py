"""
The second part of C{make demo}: a link added at run time, its tenant half
started by msgmux inside the router's namespace, a call crossing it, and the
link removed again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet import task, threads

from lab.fleet import Fleet, wait_for
from lab.lab import Lab
from msgmux.cli import fetch_status


def say(text: str = "") -> None:
    print(text, flush=True)


async def lifecycle_demo(lab: Lab, reactor: Any, control_vhost: str) -> None:
    fleet = Fleet(lab, "demo-rt", 1)
    say("\n== Links at run time, with supervised tenant halves")
    await threads.deferToThread(fleet.create)
    try:
        await _run(lab, reactor, control_vhost, fleet)
    finally:
        if fleet.control is not None and fleet.control.running:
            await fleet.control.stop()
        if fleet.forwarder is not None and fleet.forwarder.running:
            await fleet.forwarder.stop()
        await threads.deferToThread(fleet.destroy)


async def _run(lab: Lab, reactor: Any, control_vhost: str, fleet: Fleet) -> None:
    namespace = fleet.namespaces[0]
    say(f"   a router's namespace: {namespace}; its tenant broker answers there at 127.0.0.1:5672")
    await fleet.start_forwarder()
    config = fleet.control_config(control_vhost, canary_interval=1.0)
    say(f"   control half with an admin socket and no links yet: twistd -n --uid=nobody --gid=nogroup msgmux --config {config}")
    control = fleet.spawn_control(config, "demo-rt-control")

    async def listening() -> bool:
        return os.path.exists(f"{fleet.run}/admin.sock")

    await wait_for(reactor, "the admin socket", listening, 30)
    table = fleet.link_table(0)
    path = fleet.link_toml(table)
    say(f"\n   {path}:")
    with open(path) as f:
        for line in f.read().splitlines():
            say(f"     {line}")
    say(f"\n   $ msgmux link --socket {fleet.run}/admin.sock add {path}")
    result = await threads.deferToThread(fleet.cli, "add", path)
    say("   " + (result.stdout or result.stderr).strip())

    async def healthy() -> dict[str, Any] | None:
        document = await fetch_status(reactor, fleet.metrics)
        return document if all(link["healthy"] for link in document["links"]) and document["links"] else None

    document = await wait_for(reactor, "the new link healthy", healthy, 60)
    half = document["tenant_halves"][0]
    with open(f"/proc/{half['pid']}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    same = os.stat(f"/proc/{half['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{namespace}").st_ino
    say(f"   tenant half: pid {half['pid']}, uid {fields['Uid'].split()[0]}, in namespace {namespace}: {same}, state {half['state']}")
    say("   $ msgmux status")
    status = await threads.deferToThread(
        subprocess.run,
        [sys.executable, "-m", "msgmux.cli", "status", "--metrics", fleet.metrics, "--interval", "0.5"],
        capture_output=True,
        text=True,
    )
    for line in status.stdout.splitlines():
        say(f"     {line}")

    control_peer = lab.spawn_peer("control", control_vhost)
    tenant_peer = lab.spawn_peer("tenant", fleet.vhosts[0])
    await control_peer.ready
    await tenant_peer.ready
    topic = table["down"][0]["topic"]
    await tenant_peer.request("server", name="agent", topic=topic, server="agent")
    await task.deferLater(reactor, 0.5, lambda: None)  # the server's queues are declared
    reply = await control_peer.request("call", topic=topic, method="echo", kwargs={"router": namespace})
    say(f"   call {topic}.echo(router={namespace!r}) through the new link -> answered by {reply['server']}")

    say(f"\n   $ msgmux link --socket {fleet.run}/admin.sock remove {table['name']}")
    result = await threads.deferToThread(fleet.cli, "remove", table["name"])
    say("   " + (result.stdout or result.stderr).strip())
    document = await fetch_status(reactor, fleet.metrics)
    say(
        f"   links now: {[link['link'] for link in document['links']]}, tenant halves: {document['tenant_halves']},"
        f" socket still there: {os.path.exists(table['socket'])}"
    )
    await control_peer.quit()
    await tenant_peer.quit()
    await control.stop()
