"""
C{make demo}: msgmux relaying real oslo.messaging traffic between two brokers.

It builds the lab (a tenant network namespace with its own RabbitMQ; the
machine's RabbitMQ as the control broker), starts both msgmux halves as
C{twistd msgmux} processes, starts unmodified oslo.messaging servers and
clients on each side, shows calls, casts, fanout, notifications and a refused
method crossing the proxy; then adds a link at run time, whose tenant half
msgmux starts in a router's namespace, and removes it; and takes everything
down again.

C{make demo TLS=1} (C{python -m lab.demo --tls}) does the same with both
brokers listening for TLS only: a private control broker node instead of
the machine's RabbitMQ, certificates made for the run, oslo services and
both halves on TLS, the tenant side logging in with its client certificate
(EXTERNAL).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from twisted.internet import defer, task, threads

from lab.demo_lifecycle import lifecycle_demo
from lab.lab import Lab
from lab.peer import OsloPeer, PeerFailure

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1", "agent-2"], fanout = true } ]
up = [ { topic = "q-reports", methods = ["report_state"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info", "error"] } ]
"""


def say(text: str = "") -> None:
    print(text, flush=True)


async def pause(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_received(peer: OsloPeer, name: str, reactor: Any, predicate: Any, timeout: float = 15) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = await peer.request("received", name=name)
        if any(predicate(item) for item in got) or time.monotonic() > deadline:
            return got
        await pause(reactor, 0.2)


async def demo(reactor: Any, tls: bool = False) -> None:
    if tls:
        lab = Lab("demo-tls", reactor, tls=("control", "tenant"), external=("tenant",))
    else:
        lab = Lab("demo", reactor)
    say("== Setting up the lab")
    say(f"   tenant network: namespace {lab.namespace.name} with its own RabbitMQ node")
    seconds = await threads.deferToThread(lab.up)
    if tls:
        assert lab.pki is not None
        say(f"   both RabbitMQ nodes are up ({seconds:.1f}s), listening for TLS only; certificates in {lab.pki.directory}")
        say(f"   control broker {lab.url('control', '')}, tenant broker {lab.url('tenant', '')} (inside the namespace)")
    else:
        say(f"   tenant RabbitMQ is up ({seconds:.1f}s); the control broker is the machine's RabbitMQ at 127.0.0.1:5672")
    control_vhost, tenant_vhost = await threads.deferToThread(lab.vhosts, "run")
    try:
        await run(lab, reactor, control_vhost, tenant_vhost)
        await lab.stop_processes()
        if not tls:  # the run-time link part uses the plain lab
            await lifecycle_demo(lab, reactor, control_vhost)
    finally:
        say("\n== Tearing down")
        await lab.stop_processes()
        await threads.deferToThread(lab.drop_vhosts, control_vhost, tenant_vhost)
        await threads.deferToThread(lab.down)
        say("   done")


async def run(lab: Lab, reactor: Any, control_vhost: str, tenant_vhost: str) -> None:
    socket = lab.path("sockets", "tenant-a.sock")
    control_config = lab.write(
        "control.toml",
        f"""
[control]
transport_url = "{lab.url("control", control_vhost)}"
exchange = "openstack"
{lab.broker_options("control")}

[[control.links]]
name = "tenant-a"
socket = "{socket}"
{ROUTES}
""",
    )
    tenant_config = lab.write(
        "tenant.toml",
        f"""
[tenant]
transport_url = "{lab.url("tenant", tenant_vhost)}"
exchange = "openstack"
{lab.broker_options("tenant")}
socket = "{socket}"
link = "tenant-a"
""",
    )
    say("\n== Starting msgmux")
    say(f"   control half (host network):   twistd -n msgmux --config {control_config}")
    control_half = lab.spawn_half(control_config, "demo-control", in_tenant_network=False)
    await lab.wait_for_log(control_half, "listening on")
    say(f"   tenant half (tenant network):  ip netns exec {lab.namespace.name} twistd -n msgmux --config {tenant_config}")
    tenant_half = lab.spawn_half(tenant_config, "demo-tenant", in_tenant_network=True)
    await lab.wait_for_log(control_half, "control broker channel ready")
    await lab.wait_for_log(tenant_half, "tenant broker channel ready")
    say(f"   link up over {socket}")
    for half in (control_half, tenant_half):
        for line in half.log().splitlines():
            if "Connected to" in line:
                say("   " + line.split("] ", 1)[-1])

    say("\n== Starting unmodified oslo.messaging services")
    control = lab.spawn_peer("control", control_vhost)
    tenant = lab.spawn_peer("tenant", tenant_vhost)
    await control.ready
    await tenant.ready
    await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
    await tenant.request("server", name="agent-2", topic="l3_agent", server="agent-2")
    await control.request("server", name="q-server", topic="q-reports", server="q-server")
    await control.request("listener", name="listener", topics=["notifications"], pool="demo-pool")
    say("   tenant broker:  RPC servers agent-1 and agent-2 on topic l3_agent")
    say("   control broker: RPC server q-server on topic q-reports, a notification listener")
    await pause(reactor, 0.5)

    say("\n== Downstream: a control-network client calls the tenant agents")
    started = time.monotonic()
    reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"router": "r1"}, context={"user": "admin"})
    say(f"   call l3_agent.echo(router='r1')        -> answered by {reply['server']} in {1000 * (time.monotonic() - started):.1f} ms")
    reply = await control.request("call", topic="l3_agent", server="agent-2", method="echo", kwargs={"router": "r2"})
    say(f"   call l3_agent.agent-2.echo(router='r2') -> answered by {reply['server']}")
    try:
        await control.request("call", topic="l3_agent", method="boom")
    except PeerFailure as failure:
        say(f"   call l3_agent.boom()                   -> remote exception {failure.error}: {failure.message.splitlines()[0]}")
    result = await control.request(
        "call", topic="l3_agent", method="sleep", kwargs={"seconds": 3}, timeout=20, call_monitor_timeout=2
    )
    say(f"   call l3_agent.sleep(3) with call_monitor_timeout=2 -> {result} (heartbeats crossed the proxy)")
    await control.request("cast", topic="l3_agent", server="agent-1", method="echo", kwargs={"cast": "direct"})
    got = await wait_received(tenant, "agent-1", reactor, lambda r: r["kwargs"] == {"cast": "direct"})
    say(f"   cast l3_agent.agent-1.echo(cast='direct') -> agent-1 received it: {any(r['kwargs'] == {'cast': 'direct'} for r in got)}")
    await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"cast": "fanout"})
    counts = []
    for name in ("agent-1", "agent-2"):
        got = await wait_received(tenant, name, reactor, lambda r: r["kwargs"] == {"cast": "fanout"})
        counts.append(f"{name} x{sum(1 for r in got if r['kwargs'] == {'cast': 'fanout'})}")
    say(f"   fanout cast l3_agent.echo(cast='fanout') -> {', '.join(counts)}")
    result = await control.request("calls", topic="l3_agent", count=200, threads=8)
    latencies = sorted(result["latencies"])
    say(
        f"   200 calls over 8 threads: {len(latencies)} answered, {len(result['errors'])} errors, "
        f"{len(latencies) / result['elapsed']:.0f} calls/s, p50 {1000 * latencies[len(latencies) // 2]:.1f} ms"
    )

    say("\n== Upstream: a tenant agent reports to the control network")
    reply = await tenant.request("call", topic="q-reports", method="report_state", kwargs={"agent": "agent-1"})
    say(f"   call q-reports.report_state(agent='agent-1') -> {reply}")
    try:
        await tenant.request("call", topic="q-reports", method="forbidden", timeout=3)
    except PeerFailure as failure:
        say(f"   call q-reports.forbidden() -> {failure.error}: msgmux refused it (method not allowed for this link)")
    got = await control.request("received", name="q-server")
    say(f"   q-server saw only: {[r['method'] for r in got]}")
    await tenant.request("notify", topic="notifications", priority="info", event_type="router.update", payload={"id": "r1"})
    got = await wait_received(control, "listener", reactor, lambda n: n["event_type"] == "router.update")
    say(f"   notification router.update (info) -> control listener got {[(n['event_type'], n['payload']) for n in got]}")

    say("\n== What msgmux logged about the refusal")
    for line in control_half.log().splitlines():
        if "rejected" in line:
            say("   " + line.split("] ", 1)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", action="store_true", help="both brokers TLS only")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(demo(reactor, arguments.tls)))


if __name__ == "__main__":
    sys.exit(main())
