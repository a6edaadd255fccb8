"""
C{python -m lab.hops}: where the time of one oslo call through msgmux goes.

Sequential oslo calls from a control-network client to a tenant-network
server cross both brokers and both msgmux halves.  This captures the AMQP
traffic on both brokers' loopbacks (tcpdump, on the host and inside the
tenant namespace) and lines up, call by call, the moments each hop's
message appears on the wire:

  client publishes -> control broker delivers to the control half ->
  tenant half publishes -> tenant broker delivers to the server ->
  server publishes the reply -> tenant broker delivers it to the tenant half ->
  control half publishes it -> control broker delivers it to the client.

The difference between neighbours is the time spent in that hop (a broker,
the server, or msgmux: one half, the Unix socket, the other half).  Needs
root and tcpdump (C{apt-get install tcpdump}); the results are discussed in
C{docs/performance.md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import struct
import subprocess
from typing import Any

from twisted.internet import defer, task, threads

from lab.lab import Lab

#: (event, broker, routing key test) in the order one call produces them.
EVENTS = [
    ("publish", "control", lambda key: key == "bench"),
    ("deliver", "control", lambda key: key == "bench"),
    ("publish", "tenant", lambda key: key == "bench"),
    ("deliver", "tenant", lambda key: key == "bench"),
    ("publish", "tenant", lambda key: key.startswith("reply_msgmux_")),
    ("deliver", "tenant", lambda key: key.startswith("reply_msgmux_")),
    ("publish", "control", lambda key: key.startswith("reply_") and not key.startswith("reply_msgmux_")),
    ("deliver", "control", lambda key: key.startswith("reply_") and not key.startswith("reply_msgmux_")),
]

HOPS = [
    "control broker (request)",
    "msgmux: control half, socket, tenant half",
    "tenant broker (request)",
    "oslo server",
    "tenant broker (reply)",
    "msgmux: tenant half, socket, control half",
    "control broker (reply)",
]


def _short_string(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    return data[offset + 1 : offset + 1 + length].decode("utf-8", "replace"), offset + 1 + length


def amqp_events(path: str) -> list[tuple[float, str, str]]:
    """
    @param path: a pcap file of AMQP over TCP on loopback.
    @return: (time, "publish" or "deliver", routing key) of every
        basic.publish and basic.deliver method frame seen.
    """
    with open(path, "rb") as f:
        data = f.read()
    nanoseconds = struct.unpack("<I", data[:4])[0] == 0xA1B23C4D
    link_header = {1: 14, 113: 16, 276: 20}.get(struct.unpack("<I", data[20:24])[0], 14)
    events = []
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, captured, _ = struct.unpack("<IIII", data[offset : offset + 16])
        packet = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        when = seconds + fraction / (1e9 if nanoseconds else 1e6)
        ip = packet[link_header:]
        if not ip or ip[0] >> 4 != 4:
            continue
        tcp = ip[(ip[0] & 15) * 4 :]
        payload = tcp[(tcp[12] >> 4) * 4 :]
        start = 0
        while (found := payload.find(b"\x00\x3c\x00", start)) >= 0:
            start = found + 1
            # A method frame header (type 1, channel, size) precedes class 60.
            if found < 7 or payload[found - 7] != 1 or found + 4 >= len(payload):
                continue
            try:
                if payload[found + 3] == 40:  # basic.publish: reserved, exchange, routing key
                    _, at = _short_string(payload, found + 6)
                    key, _ = _short_string(payload, at)
                    events.append((when, "publish", key))
                elif payload[found + 3] == 60:  # basic.deliver: tag, delivery tag, redelivered, exchange, key
                    _, at = _short_string(payload, found + 4)
                    _, at = _short_string(payload, at + 9)
                    key, _ = _short_string(payload, at)
                    events.append((when, "deliver", key))
            except IndexError:
                continue
    return events


def hop_times(control: list[tuple[float, str, str]], tenant: list[tuple[float, str, str]]) -> list[list[float]]:
    """
    @return: per call, the times of the eight events of L{EVENTS}, each the
        first of its kind after the previous one (calls are sequential).
    """
    streams = []
    for kind, broker, matches in EVENTS:
        source = control if broker == "control" else tenant
        streams.append(sorted(when for when, event, key in source if event == kind and matches(key)))
    calls = []
    for first in streams[0]:
        chain = [first]
        for stream in streams[1:]:
            following = next((when for when in stream if when >= chain[-1]), None)
            if following is None:
                break
            chain.append(following)
        if len(chain) == len(EVENTS) and chain[-1] - chain[0] < 0.1:
            calls.append(chain)
    return calls


async def main(reactor: Any, arguments: argparse.Namespace) -> None:
    if shutil.which("tcpdump") is None:
        raise SystemExit("lab.hops needs tcpdump (apt-get install tcpdump)")
    lab = Lab("hops", reactor, private_control=True)
    await threads.deferToThread(lab.up)
    captures: list[subprocess.Popen[bytes]] = []
    try:
        control_vhost, tenant_vhost = await threads.deferToThread(lab.vhosts, "hops")
        await lab.start_halves("hops", control_vhost, tenant_vhost, 'down = [ { topic = "bench" } ]', "canary_interval = 3600")
        server = lab.spawn_peer("tenant", tenant_vhost)
        client = lab.spawn_peer("control", control_vhost)
        await server.ready
        await client.ready
        await server.request("server", name="bench", topic="bench", server="bench")
        await task.deferLater(reactor, 1.0, lambda: None)
        await client.request("calls", topic="bench", count=50, threads=1)
        dump = ["tcpdump", "-i", "lo", "-s", "600", "-U"]
        captures.append(subprocess.Popen(dump + ["-w", lab.path("hops-control.pcap"), "tcp", "port", str(lab.control_node.port)], stderr=subprocess.DEVNULL))
        captures.append(
            subprocess.Popen(lab.namespace.argv(dump + ["-w", lab.path("hops-tenant.pcap"), "tcp", "port", "5672"]), stderr=subprocess.DEVNULL)
        )
        await task.deferLater(reactor, 1.5, lambda: None)
        result = await client.request("calls", topic="bench", count=arguments.calls, threads=1)
        await task.deferLater(reactor, 0.5, lambda: None)
    finally:
        for capture in captures:
            capture.terminate()
            capture.wait()
        await lab.stop_processes()
        await threads.deferToThread(lab.down)
    calls = hop_times(amqp_events(lab.path("hops-control.pcap")), amqp_events(lab.path("hops-tenant.pcap")))
    latencies = sorted(result["latencies"])
    print(f"{len(calls)} of {arguments.calls} sequential calls lined up; client-side p50 {1000 * latencies[len(latencies) // 2]:.2f} ms\n")
    print(f"{'hop':44} {'p50 us':>8} {'mean us':>8}")
    for index, name in enumerate(HOPS):
        spent = sorted(1e6 * (call[index + 1] - call[index]) for call in calls)
        print(f"{name:44} {spent[len(spent) // 2]:8.0f} {statistics.mean(spent):8.0f}")
    total = sorted(1e6 * (call[-1] - call[0]) for call in calls)
    print(f"{'on the wire, request to reply':44} {total[len(total) // 2]:8.0f} {statistics.mean(total):8.0f}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="sequential calls to time")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))


if __name__ == "__main__":
    cli()
