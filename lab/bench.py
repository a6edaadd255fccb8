"""
C{make bench}: msgmux against the alternatives, on this machine, in one run.

 1. raw relay throughput with publisher confirms: msgmux (control half and
    tenant half, each its own process) against a RabbitMQ Shovel
    (ack-mode on-confirm), both moving a preloaded queue from one vhost to
    another of the same node; plus the CPU each msgmux half spent per message;
 2. oslo.messaging calls: directly on one broker, and through msgmux from
    the control broker to the tenant broker (in its network namespace):
    latency p50/p99 of sequential calls, and calls/s with 8 client threads;
 3. memory per link: the control half's RSS growth with 200 links up;
 4. availability: a good link's call latency while a hostile tenant half
    attacks another link of the same control half, and what the codec
    costs over the worst frames a peer can send (L{lab.bench_availability}).
 5. TLS: the raw relay and oslo calls again with msgmux and oslo on TLS to
    both brokers (same nodes, their TLS listeners; certificates made for the
    run), next to the plain AMQP figures of the same run.

Ratios are within this run, so they hold on whatever machine runs it.
Results are discussed in C{docs/performance.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task, threads

from lab.bench_availability import availability, decode_costs
from lab.bench_availability import rows as availability_rows
from lab.lab import HalfProcess, Lab
from msgmux.amqp.broker import BrokerService
from msgmux.config import BrokerConfig, parse_transport_url

BODY = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps({"method": "bench", "args": {"x": "y" * 120}})}).encode()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Broker:
    """A small AMQP helper on one vhost: declare, preload, count."""

    def __init__(self, reactor: Any, url: str) -> None:
        hosts, vhost = parse_transport_url(url)
        self.service = BrokerService(BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack"), "bench", reactor)

    async def start(self) -> None:
        self.service.startService()
        self.protocol = await self.service.when_connected()
        self.channel = await self.protocol.open_channel()
        await self.channel.select_confirms()

    async def queue(self, name: str, exchange: str | None = None) -> None:
        await self.channel.declare_queue(name, durable=False, auto_delete=False)
        if exchange:
            await self.channel.declare_exchange(exchange, "topic", durable=False, auto_delete=False)
            await self.channel.bind_queue(name, exchange, name)

    async def preload(self, queue: str, count: int) -> None:
        """Publish C{count} messages to C{queue}, 2000 unconfirmed at most."""
        pending: list[defer.Deferred[None]] = []
        for _ in range(count):
            pending.append(self.channel.publish("", queue, {"content_type": "application/json", "delivery_mode": 2}, BODY))
            if len(pending) >= 2000:
                await defer.gatherResults(pending)
                pending = []
        await defer.gatherResults(pending)

    async def count(self, queue: str) -> int:
        tx = self.channel.txamqp_channel
        declared = await tx.queue_declare(queue=queue, passive=True)
        return int(declared.message_count)

    async def stop(self) -> None:
        await self.service.stopService()


async def wait_moved(reactor: Any, destination: Broker, queue: str, count: int, pids: list[int]) -> tuple[float, float]:
    """
    Wait until C{queue} holds C{count} messages.

    @return: messages per second (from the first arrival) and CPU seconds
        the processes C{pids} spent meanwhile.
    """
    started = None
    arrived = 0
    cpu_start = 0.0
    while True:
        now_count = await destination.count(queue)
        now = time.monotonic()
        if started is None and now_count > 0:
            started, arrived, cpu_start = now, now_count, sum(cpu_seconds(p) for p in pids)
        if now_count >= count:
            assert started is not None
            cpu = sum(cpu_seconds(p) for p in pids) - cpu_start
            return (count - arrived) / max(now - started, 1e-9), cpu
        await task.deferLater(reactor, 0.05, lambda: None)


async def raw_relay_msgmux(lab: Lab, reactor: Any, count: int, tls: bool = False) -> dict[str, float]:
    """@param tls: both halves reach the broker over TLS (its TLS listener)."""
    tag = "-tls" if tls else ""
    source_vhost, destination_vhost = f"bench-msgmux{tag}-a", f"bench-msgmux{tag}-b"
    for vhost in (source_vhost, destination_vhost):
        await threads.deferToThread(lab.control_node.add_vhost, vhost)
    source = Broker(reactor, lab.control_node.url(source_vhost, tls=False))
    destination = Broker(reactor, lab.control_node.url(destination_vhost, tls=False))
    broker_options = lab.broker_options("control") if tls else ""
    await source.start()
    await destination.start()
    await source.queue("bench", "openstack")
    await destination.queue("bench", "openstack")
    await source.preload("bench", count)
    socket = lab.path("sockets", "bench.sock")
    control_config = lab.write(
        "bench-control.toml",
        f'[control]\ntransport_url = "{lab.control_node.url(source_vhost, tls=tls)}"\nprefetch = 1000\nlink_window = 1000\n'
        f'{broker_options}\n\n[[control.links]]\nname = "bench"\nsocket = "{socket}"\ndown = [ {{ topic = "bench" }} ]\n',
    )
    tenant_config = lab.write(
        "bench-tenant.toml",
        f'[tenant]\ntransport_url = "{lab.control_node.url(destination_vhost, tls=tls)}"\nsocket = "{socket}"\nprefetch = 1000\n'
        f"link_window = 1000\n{broker_options}\n",
    )
    control = lab.spawn_half(control_config, "bench-control", in_tenant_network=False)
    await lab.wait_for_log(control, "listening on")
    tenant = lab.spawn_half(tenant_config, "bench-tenant", in_tenant_network=False)
    pids = [control.transport.pid, tenant.transport.pid]
    beam = lab.control_node.pid()
    assert beam is not None
    broker_before = cpu_seconds(beam)
    rate, cpu = await wait_moved(reactor, destination, "bench", count, pids)
    broker = cpu_seconds(beam) - broker_before
    await control.stop()
    await tenant.stop()
    await source.stop()
    await destination.stop()
    return {"rate": rate, "cpu_us_per_msg_per_half": cpu / count / 2 * 1e6, "broker_cpu_us_per_msg": broker / count * 1e6}


async def raw_relay_shovel(lab: Lab, reactor: Any, count: int, network: bool) -> dict[str, float]:
    """
    @param network: connect the Shovel over AMQP on TCP, as between two
        brokers; otherwise it uses the node's internal (direct) client,
        which is only possible between vhosts of one node.
    """
    tag = "net" if network else "direct"
    source_vhost, destination_vhost = f"bench-shovel-{tag}-a", f"bench-shovel-{tag}-b"
    for vhost in (source_vhost, destination_vhost):
        await threads.deferToThread(lab.control_node.add_vhost, vhost)
    source = Broker(reactor, lab.control_node.url(source_vhost, tls=False))
    destination = Broker(reactor, lab.control_node.url(destination_vhost, tls=False))
    await source.start()
    await destination.start()
    await source.queue("bench")
    await destination.queue("bench")
    await source.preload("bench", count)
    port = lab.control_node.port

    def uri(vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port}/{vhost}" if network else f"amqp:///{vhost}"

    definition = {
        "src-protocol": "amqp091",
        "src-uri": uri(source_vhost),
        "src-queue": "bench",
        "dest-protocol": "amqp091",
        "dest-uri": uri(destination_vhost),
        "dest-queue": "bench",
        "ack-mode": "on-confirm",
        "src-prefetch-count": 1000,
    }
    beam = lab.control_node.pid()
    assert beam is not None
    await threads.deferToThread(lab.control_node.ctl, "set_parameter", "-p", source_vhost, "shovel", "bench", json.dumps(definition))
    rate, cpu = await wait_moved(reactor, destination, "bench", count, [beam])
    await threads.deferToThread(lab.control_node.ctl, "clear_parameter", "-p", source_vhost, "shovel", "bench")
    await source.stop()
    await destination.stop()
    return {"rate": rate, "broker_cpu_us_per_msg": cpu / count * 1e6}


async def oslo_calls(lab: Lab, through_msgmux: bool, calls: int) -> dict[str, float]:
    """oslo calls (and msgmux, if C{through_msgmux}) on TLS to the sides in C{lab.tls}."""
    tag = ("via" if through_msgmux else "direct") + ("-tls" if lab.tls else "")
    control_vhost, tenant_vhost = await threads.deferToThread(lab.vhosts, f"bench-{tag}")
    halves: list[HalfProcess] = []
    if through_msgmux:
        halves.extend(await lab.start_halves("bench-oslo", control_vhost, tenant_vhost, 'down = [ { topic = "bench" } ]'))
        server = lab.spawn_peer("tenant", tenant_vhost)
    else:
        server = lab.spawn_peer("control", control_vhost)
    client = lab.spawn_peer("control", control_vhost)
    await server.ready
    await client.ready
    await server.request("server", name="bench", topic="bench", server="bench")
    await task.deferLater(lab.reactor, 1.0, lambda: None)
    await client.request("calls", topic="bench", count=50, threads=1)  # warm up
    sequential = await client.request("calls", topic="bench", count=calls, threads=1)
    pids = [half.transport.pid for half in halves]
    cpu_before = sum(cpu_seconds(p) for p in pids)
    parallel = await client.request("calls", topic="bench", count=calls * 4, threads=8)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
    latencies = sorted(sequential["latencies"])
    result = {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "calls_per_s": len(parallel["latencies"]) / parallel["elapsed"],
        "errors": len(sequential["errors"]) + len(parallel["errors"]),
    }
    if halves:
        # Each call is two messages (request down, reply up) through each half.
        result["cpu_us_per_msg_per_half"] = cpu / (calls * 4 * 2) / 2 * 1e6
    await lab.stop_processes()
    await threads.deferToThread(lab.drop_vhosts, control_vhost, tenant_vhost)
    return result


async def memory_per_link(lab: Lab, links: int) -> dict[str, float]:
    control_vhost, tenant_vhost = await threads.deferToThread(lab.vhosts, "bench-links")
    blocks, tenant_configs = [], []
    for index in range(links):
        name = f"m{index:03d}"
        socket = lab.path("sockets", f"{name}.sock")
        blocks.append(f'[[control.links]]\nname = "{name}"\nsocket = "{socket}"\ndown = [ {{ topic = "agent-{index}" }} ]\n')
        tenant_configs.append(
            lab.write(
                f"links/{name}.toml",
                f'[tenant]\ntransport_url = "{lab.url("tenant", tenant_vhost)}"\nsocket = "{socket}"\nlink = "{name}"\n',
            )
        )
    control_config = lab.write(
        "bench-links.toml",
        f'[control]\ntransport_url = "{lab.url("control", control_vhost)}"\ncanary_interval = 1.0\n\n' + "\n".join(blocks),
    )
    control = lab.spawn_half(control_config, "bench-links-control", in_tenant_network=False)
    await lab.wait_for_log(control, "listening on", count=links)
    await task.deferLater(lab.reactor, 1.0, lambda: None)
    before = rss_bytes(control.transport.pid)
    lab.spawn([sys.executable, "-m", "lab.many_tenants"] + tenant_configs, "bench-links-tenants", True)
    await lab.wait_for_log(control, "control broker channel ready", count=links, timeout=180)
    await task.deferLater(lab.reactor, 3.0, lambda: None)
    after = rss_bytes(control.transport.pid)
    await lab.stop_processes()
    await threads.deferToThread(lab.drop_vhosts, control_vhost, tenant_vhost)
    return {"rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20, "kib_per_link": (after - before) / links / 1024}


class Diff(float):
    """A difference (printed with its sign), where other rows show a ratio."""


async def main(reactor: Any, arguments: argparse.Namespace) -> None:
    both = ("control", "tenant")
    lab = Lab("bench", reactor, private_control=True, control_plugins=("rabbitmq_shovel",), tls=both, keep_plain=True)
    lab.tls = ()  # plain AMQP until the TLS measurements
    print("Starting the lab (private control broker with the Shovel plugin, tenant broker in a namespace)...", flush=True)
    await threads.deferToThread(lab.up)
    try:
        print(f"Raw relay, {arguments.messages} messages of {len(BODY)} bytes, publisher confirms...", flush=True)
        shovel = await raw_relay_shovel(lab, reactor, arguments.messages, network=True)
        direct_shovel = await raw_relay_shovel(lab, reactor, arguments.messages, network=False)
        relay = await raw_relay_msgmux(lab, reactor, arguments.messages)
        print(f"oslo.messaging calls ({arguments.calls} sequential, {4 * arguments.calls} over 8 threads)...", flush=True)
        direct = await oslo_calls(lab, False, arguments.calls)
        via = await oslo_calls(lab, True, arguments.calls)
        print(f"Memory with {arguments.links} links...", flush=True)
        memory = await memory_per_link(lab, arguments.links)
        print(f"Availability: {arguments.calls} calls on a good link, unloaded and under each attack on another...", flush=True)
        hostile = await availability(lab, arguments.calls)
        print("The raw relay and oslo calls again, on TLS to both brokers...", flush=True)
        lab.tls = both
        relay_tls = await raw_relay_msgmux(lab, reactor, arguments.messages, tls=True)
        direct_tls = await oslo_calls(lab, False, arguments.calls)
        via_tls = await oslo_calls(lab, True, arguments.calls)
    finally:
        await lab.stop_processes()
        await threads.deferToThread(lab.down)
    rows = [
        ("raw relay msg/s vs Shovel over AMQP", f"{shovel['rate']:.0f}", f"{relay['rate']:.0f}", relay["rate"] / shovel["rate"], ">= 1.3"),
        (
            "raw relay msg/s vs in-node Shovel",
            f"{direct_shovel['rate']:.0f}",
            f"{relay['rate']:.0f}",
            relay["rate"] / direct_shovel["rate"],
            "",
        ),
        ("msgmux CPU us/msg per half", "-", f"{relay['cpu_us_per_msg_per_half']:.1f}", None, "<= 20"),
        (
            "relay CPU us/msg, broker + relay",
            f"{shovel['broker_cpu_us_per_msg']:.1f}",
            f"{relay['broker_cpu_us_per_msg'] + 2 * relay['cpu_us_per_msg_per_half']:.1f}",
            (relay["broker_cpu_us_per_msg"] + 2 * relay["cpu_us_per_msg_per_half"]) / shovel["broker_cpu_us_per_msg"],
            "",
        ),
        ("oslo call p50, ms", f"{direct['p50_ms']:.2f}", f"{via['p50_ms']:.2f}", Diff(via["p50_ms"] - direct["p50_ms"]), "<= +0.5 ms"),
        ("oslo call p99, ms", f"{direct['p99_ms']:.2f}", f"{via['p99_ms']:.2f}", via["p99_ms"] / direct["p99_ms"], ""),
        ("oslo calls/s, 8 threads", f"{direct['calls_per_s']:.0f}", f"{via['calls_per_s']:.0f}", via["calls_per_s"] / direct["calls_per_s"], ">= 0.9"),
        ("msgmux CPU us/msg per half (oslo)", "-", f"{via['cpu_us_per_msg_per_half']:.1f}", None, ""),
        ("control half RSS per link, KiB", "-", f"{memory['kib_per_link']:.0f}", None, ""),
        *availability_rows(hostile),
        *[(name + ", ms", "-", f"{ms:.3f}", None, "<= 10") for name, ms in decode_costs()],
        ("TLS: raw relay msg/s vs plain", f"{relay['rate']:.0f}", f"{relay_tls['rate']:.0f}", relay_tls["rate"] / relay["rate"], ">= 0.7"),
        (
            "TLS: CPU us/msg per half vs plain",
            f"{relay['cpu_us_per_msg_per_half']:.1f}",
            f"{relay_tls['cpu_us_per_msg_per_half']:.1f}",
            relay_tls["cpu_us_per_msg_per_half"] / relay["cpu_us_per_msg_per_half"],
            "",
        ),
        ("TLS: oslo call p50 ms vs plain", f"{via['p50_ms']:.2f}", f"{via_tls['p50_ms']:.2f}", Diff(via_tls["p50_ms"] - via["p50_ms"]), ""),
        (
            "TLS: oslo call p50 ms, oslo on TLS",
            f"{direct_tls['p50_ms']:.2f}",
            f"{via_tls['p50_ms']:.2f}",
            Diff(via_tls["p50_ms"] - direct_tls["p50_ms"]),
            "<= +0.5 ms",
        ),
        ("TLS: oslo calls/s, 8 threads", f"{direct_tls['calls_per_s']:.0f}", f"{via_tls['calls_per_s']:.0f}", via_tls["calls_per_s"] / direct_tls["calls_per_s"], ""),
    ]
    print()
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':{width}} {'baseline':>16} {'msgmux':>10} {'ratio/diff':>11} {'target':>11}")
    print("-" * (width + 52))
    for name, baseline, ours, ratio, target in rows:
        shown = "" if ratio is None else (f"{ratio:+.2f}" if isinstance(ratio, Diff) else f"{ratio:.2f}x")
        print(f"{name:{width}} {baseline:>16} {ours:>10} {shown:>11} {target:>11}")
    print()
    print(f"baseline: the Shovel for raw relay, oslo on one broker for calls; errors: direct {direct['errors']}, via msgmux {via['errors']}")
    print("relay CPU: the Shovel runs inside the broker node; msgmux's is the node's plus both halves' (all on this machine's cores)")
    print(
        "TLS rows: baseline is the same measure on plain AMQP in this run (oslo on TLS: oslo direct on one TLS broker); "
        f"errors: direct {direct_tls['errors']}, via msgmux {via_tls['errors']}"
    )
    print(f"memory: control half RSS {memory['rss_before_mib']:.1f} MiB with no link up, {memory['rss_after_mib']:.1f} MiB with {arguments.links}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100000, help="messages for the raw relay comparison")
    parser.add_argument("--calls", type=int, default=500, help="sequential calls (and 4x that over 8 threads)")
    parser.add_argument("--links", type=int, default=200, help="links for the memory measurement")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))


if __name__ == "__main__":
    cli()
