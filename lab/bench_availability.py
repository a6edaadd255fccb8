"""
C{make bench}, availability part: what a hostile tenant costs the other links.

A control half serves two links.  A real oslo client calls a real oslo
server through link C{good} (tenant half in the lab's namespace), first
with nothing else going on, then while a compromised tenant half on link
C{bad} runs each attack of L{lab.attacks} over and over.  The rows compare
the good link's call latency (p50, p99) under each attack with the unloaded
run.  A last row times, in this process, how long the codec takes over the
worst frames a peer can send.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task, threads

from lab import attacks
from lab.hostile import connect_raw, oslo_body
from lab.lab import Lab
from msgmux.control.upstream import HEADERS_READ
from msgmux.link import codec

LINKS = """
[[control.links]]
name = "good"
socket = "{good}"
down = [ {{ topic = "agent" }} ]

[[control.links]]
name = "bad"
socket = "{bad}"
down = [ {{ topic = "victim" }} ]
up = [ {{ topic = "q-reports", methods = ["report_state"] }} ]
notifications_up = [ {{ topic = "notifications", priorities = ["info"] }} ]
"""

Attack = Callable[[Any, str], Awaitable[object]]


async def _quietly(attack: Awaitable[object]) -> None:
    try:
        await attack
    except Exception:
        pass  # a refused or closed attacker just tries again


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return 1000 * ordered[len(ordered) // 2], 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _largest_heads(reactor: Any, socket: str) -> None:
    """Allowed reports whose heads are the largest a MSG may have, all empty arrays: decoded, stamped, published."""
    await _reports(reactor, socket, codec.MAX_HEAD - len(attacks.hostile_head(1)) - 3)


async def _busy_tenant(reactor: Any, socket: str) -> None:
    """The same reports with heads of an oslo message's size: a tenant using its whole rate, the reference."""
    await _reports(reactor, socket, 0)


async def _reports(reactor: Any, socket: str, items: int) -> None:
    """Allowed reports as fast as the link's credit allows for five seconds, with C{items} empty arrays in a header."""
    tenant = await connect_raw(reactor, socket, "bad")
    body = oslo_body({"method": "report_state", "args": {}})
    end = reactor.seconds() + 5
    while reactor.seconds() < end and not tenant.closed.called:
        while tenant.next_seq <= tenant.credit():
            head = attacks.hostile_head(items, tenant.next_seq)
            tenant.send_raw(attacks.raw_message(head, body))
            tenant.next_seq += 1
        await task.deferLater(reactor, 0.01, lambda: None)
    tenant.transport.loseConnection()


ATTACKS: list[tuple[str, Attack]] = [
    ("frame flood", lambda reactor, socket: attacks.frame_flood(reactor, socket, "bad", 300_000)),
    ("8.4 MB header bomb", lambda reactor, socket: attacks.header_bomb(reactor, socket, "bad")),
    ("busy tenant at its rate limit", _busy_tenant),
    ("largest heads, hostile", _largest_heads),
    ("8 MB JSON bombs, refused method", lambda reactor, socket: attacks.json_bomb(reactor, socket, "bad", "forbidden", 10)),
    ("8 MB JSON bombs, allowed method", lambda reactor, socket: attacks.json_bomb(reactor, socket, "bad", "report_state", 10)),
    ("poison properties", lambda reactor, socket: attacks.poison_property(reactor, socket, "bad")),
    ("notifications with call fields", lambda reactor, socket: attacks.notification_with_call_fields(reactor, socket, "bad")),
    ("connection churn", lambda reactor, socket: attacks.connection_churn(reactor, socket, 200)),
]


def _down_attacks(client: Any) -> list[tuple[str, Attack]]:
    """
    The attacks on what the control half sends down, with C{client} (an oslo
    peer on the control broker) sending it: run last, because a slow
    reader leaves casts queued for the bad link.
    """

    async def repeated_final_replies(reactor: Any, socket: str) -> None:
        answering = await connect_raw(reactor, socket, "bad")
        try:
            call = client.request("call", topic="victim", method="echo", kwargs={}, timeout=30)
            await attacks.repeated_final_replies(answering)
            await call
        finally:
            answering.transport.loseConnection()

    async def slow_reader(reactor: Any, socket: str) -> None:
        reader = await attacks.slow_reader(reactor, socket, "bad")
        try:
            await client.request("casts", topic="victim", method="echo", count=150, kwargs={"blob": "x" * 100_000})
            await reader.wait_for(lambda: reader.closed.called, timeout=60)
        finally:
            reader.transport.loseConnection()

    return [
        ("five final replies to each call", repeated_final_replies),
        ("slow reader, 100 KB casts sent down", slow_reader),
    ]


async def _during(reactor: Any, attack: Attack, socket: str, work: defer.Deferred[Any]) -> Any:
    """Run C{attack} over and over until C{work} is done; @return: C{work}'s result."""
    while not work.called:
        await _quietly(attack(reactor, socket))
        await task.deferLater(reactor, 0.05, lambda: None)
    return await work


def decode_costs() -> list[tuple[str, float]]:
    """
    @return: milliseconds the codec takes over the worst frames a peer can
        send: the largest head of empty arrays, decoded; an 8.4 MB header
        bomb, refused.
    """
    results = []
    head = attacks.hostile_head(codec.MAX_HEAD - len(attacks.hostile_head(1)) - 3)
    frame = attacks.raw_message(head, b"")
    for label, header_names in (("as the control half", HEADERS_READ), ("checking every header", None)):
        timings = []
        for _ in range(20):
            decoder = codec.FrameDecoder(header_names=header_names)
            started = time.perf_counter()
            decoder.feed(frame)
            timings.append(time.perf_counter() - started)
        results.append((f"decode a largest hostile head ({len(head)} bytes) {label}", 1000 * min(timings)))
    bomb = attacks.raw_message(b"\x80" * 65536, b"", head_length=8_400_000)
    timings = []
    for _ in range(20):
        decoder = codec.FrameDecoder()
        started = time.perf_counter()
        try:
            decoder.feed(bomb)
        except codec.FrameError:
            pass
        timings.append(time.perf_counter() - started)
    results.append(("refuse an 8.4 MB header bomb", 1000 * min(timings)))
    return results


async def availability(lab: Lab, calls: int) -> dict[str, Any]:
    """
    @param calls: sequential calls per phase.
    @return: C{{"unloaded": (p50, p99), attack name: (p50, p99, errors)...}}.
    """
    reactor = lab.reactor
    control_vhost, tenant_vhost = await threads.deferToThread(lab.vhosts, "bench-avail")
    good, bad = lab.path("sockets", "avail-good.sock"), lab.path("sockets", "avail-bad.sock")
    config = lab.write(
        "bench-availability.toml",
        f'[control]\ntransport_url = "{lab.url("control", control_vhost)}"\n' + LINKS.format(good=good, bad=bad),
    )
    control = lab.spawn_half(config, "bench-availability-control", in_tenant_network=False)
    await lab.wait_for_log(control, "listening on", count=2)
    tenant_config = lab.write(
        "bench-availability-tenant.toml",
        f'[tenant]\ntransport_url = "{lab.url("tenant", tenant_vhost)}"\nsocket = "{good}"\nlink = "good"\n',
    )
    tenant = lab.spawn_half(tenant_config, "bench-availability-tenant", in_tenant_network=True)
    await lab.wait_for_log(tenant, "tenant broker channel ready")
    server = lab.spawn_peer("tenant", tenant_vhost)
    client = lab.spawn_peer("control", control_vhost)
    await server.ready
    await client.ready
    await server.request("server", name="agent", topic="agent")
    await task.deferLater(reactor, 1.0, lambda: None)
    await client.request("calls", topic="agent", count=50, threads=1)  # warm up
    results: dict[str, Any] = {}
    unloaded = await client.request("calls", topic="agent", count=calls, threads=1)
    results["unloaded"] = (*_percentiles(unloaded["latencies"]), len(unloaded["errors"]))
    for name, attack in ATTACKS + _down_attacks(client):
        await task.deferLater(reactor, 2.0, lambda: None)  # the link's session budget refills
        work = client.request("calls", topic="agent", count=calls, threads=1)
        loaded = await _during(reactor, attack, bad, work)
        results[name] = (*_percentiles(loaded["latencies"]), len(loaded["errors"]))
    await lab.stop_processes()
    await threads.deferToThread(lab.drop_vhosts, control_vhost, tenant_vhost)
    return results


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, float | None, str]]:
    """The bench table rows: p50 and p99 under each attack against the unloaded run."""
    base50, base99, _ = results["unloaded"]
    table: list[tuple[str, str, str, float | None, str]] = []
    for name, (p50, p99, errors) in results.items():
        if name == "unloaded":
            continue
        note = f" ({errors} failed)" if errors else ""
        table.append((f"good link p50 ms, {name}{note}", f"{base50:.2f}", f"{p50:.2f}", p50 / base50, ""))
        table.append((f"good link p99 ms, {name}", f"{base99:.2f}", f"{p99:.2f}", p99 / base99, "<= 2.0"))
    return table
