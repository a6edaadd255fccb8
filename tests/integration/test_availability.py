"""
One hostile tenant must not slow, bloat or wedge the other links.

A control half (a real C{twistd msgmux} process) serves two links.  On link
C{good}, a real tenant half in the lab's namespace relays calls from a real
oslo client on the control broker to a real oslo server on the tenant
broker, all the time.  On link C{bad}, the test plays a compromised tenant
half (L{lab.attacks}) and runs each attack in turn.  No call on the good
link may fail; each attack must be refused and counted, or end its session
with the reason the protocol names; and the control half's memory must stay
under L{RSS_LIMIT}.  Latency is not asserted here: C{make bench} measures it.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, task

from lab import attacks
from lab.bench import rss_bytes
from lab.bench_availability import LINKS as TWO_LINKS
from lab.hostile import connect_raw
from tests.integration.support import LabTestCase, fetch_metrics, tenant_config

#: The control half's resident memory must stay below this during the attacks.
RSS_LIMIT = 200 * 1024 * 1024

# The attacker's link may send faster than the default, so that each attack
# takes seconds, not minutes.
LINKS = TWO_LINKS + "\n[control.links.limits]\nmax_rate = 5000.0\nburst = 1000\n"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus series over the label sets that include C{labels}."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{(.*)\} ([0-9.e+-]+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


class HostileNeighbourTests(LabTestCase):
    timeout = 300

    async def test_one_link_cannot_harm_another(self) -> None:
        reactor = self.lab.reactor
        good, bad = self.socket_path("good"), self.socket_path("bad")
        metrics = f"unix:{self.lab.path('sockets', f'metrics-{self.tag}.sock')}"
        control_path = self.lab.write(
            f"availability-{self.tag}.toml",
            f'[control]\ntransport_url = "{self.lab.control_node.url(self.control_vhost)}"\nlink_heartbeat = 1.0\n'
            f'metrics = "{metrics}"\n' + LINKS.format(good=good, bad=bad),
        )
        control_half = self.lab.spawn_half(control_path, f"availability-{self.tag}", in_tenant_network=False)
        await self.lab.wait_for_log(control_half, "listening on", count=2)
        tenant_half = self.lab.spawn_half(
            tenant_config(self.lab, self.tenant_vhost, good, "good"), f"availability-{self.tag}-tenant", in_tenant_network=True
        )
        await self.lab.wait_for_log(tenant_half, "tenant broker channel ready")
        client, server = await self.peers()
        await server.request("server", name="agent", topic="agent")
        await client.request("call", topic="agent", method="echo", kwargs={"warm": 1})

        pid = control_half.transport.pid
        peak = [rss_bytes(pid)]

        def sample() -> None:
            peak[0] = max(peak[0], rss_bytes(pid))

        sampler = task.LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.1)
        self.addCleanup(lambda: sampler.stop() if sampler.running else None)

        # Calls on the good link in rounds of two seconds until the last
        # attack is over, however long the attacks take on this machine.
        attacking = [True]

        async def good_link_calls() -> list[list[Any]]:
            results: list[list[Any]] = []
            while attacking[0]:
                round_ = client.request("load", kind="call", topic="agent", method="echo", count=20, rate=10, first=len(results))
                results += await round_
            return results

        load = defer.Deferred.fromCoroutine(good_link_calls())

        # The attacker may not read the CLOSE (its writes can meet the closed
        # socket first): the control half's log says why it ended the session.
        await attacks.frame_flood(reactor, bad, "bad")
        await self.lab.wait_for_log(control_half, "ended (frame-flood)")
        await self.pause()

        await attacks.header_bomb(reactor, bad, "bad")
        await self.lab.wait_for_log(control_half, "ended (bad-frame)")
        await self.pause()

        self.assertEqual(await attacks.json_bomb(reactor, bad, "bad", "forbidden"), ["method"] * 5)
        await self.pause()
        self.assertEqual(await attacks.json_bomb(reactor, bad, "bad", "report_state"), ["too-complex"] * 5)
        await self.pause()

        self.assertEqual(await attacks.poison_property(reactor, bad, "bad"), ["malformed"] * 3)
        await self.pause()
        self.assertEqual(await attacks.notification_with_call_fields(reactor, bad, "bad"), "malformed")
        await self.pause()

        answering = await connect_raw(reactor, bad, "bad")
        call = client.request("call", topic="victim", method="echo", kwargs={}, timeout=30)
        replies = await attacks.repeated_final_replies(answering)
        self.assertEqual(await call, "answered")
        for seq in replies:
            self.assertEqual(await answering.wait_outcome(seq), "ack")
        answering.transport.loseConnection()
        await self.pause()

        reader = await attacks.slow_reader(reactor, bad, "bad")
        await client.request("casts", topic="victim", method="echo", count=150, kwargs={"blob": "x" * 100_000})
        await self.lab.wait_for_log(control_half, "ended (slow-reader)", timeout=60)
        reader.transport.loseConnection()

        await attacks.connection_churn(reactor, bad, 300)

        attacking[0] = False
        results = await load
        failed = [r for r in results if not r[1]]
        self.assertEqual(failed, [], "calls on the good link failed during the attacks")

        text = await fetch_metrics(reactor, metrics)
        self.assertEqual(metric(text, "msgmux_link_sessions_ended_total", link="bad", reason="frame-flood"), 1)
        self.assertEqual(metric(text, "msgmux_link_protocol_violations_total", link="bad", code="bad-frame"), 1)
        self.assertEqual(metric(text, "msgmux_messages_rejected_total", link="bad", reason="method"), 5)
        self.assertEqual(metric(text, "msgmux_messages_rejected_total", link="bad", reason="too-complex"), 5)
        self.assertEqual(metric(text, "msgmux_messages_rejected_total", link="bad", reason="malformed"), 4)
        self.assertEqual(metric(text, "msgmux_duplicates_dropped_total", link="bad", direction="up"), 4)
        self.assertEqual(metric(text, "msgmux_messages_relayed_total", link="bad", direction="up", kind="reply"), 1)
        self.assertEqual(metric(text, "msgmux_link_sessions_ended_total", link="bad", reason="slow-reader"), 1)
        self.assertEqual(metric(text, "msgmux_messages_rejected_total", link="good"), 0)

        log = control_half.log()
        self.assertLessEqual(log.count("tenant half connected"), 30, "connection log lines are not rate-limited")
        sampler.stop()
        self.assertLess(peak[0], RSS_LIMIT, f"the control half grew to {peak[0] // 2**20} MiB")

    async def pause(self) -> None:
        """Let a second pass between attacks: a link may start one session per second after its first five."""
        await task.deferLater(self.lab.reactor, 1.0, lambda: None)
