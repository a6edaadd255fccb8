"""
Notifications through msgmux with real oslo notifiers and listeners: the
configured directions and priorities only, and without taking messages away
from the listeners already on either broker.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from lab.peer import OsloPeer
from tests.integration.support import LabTestCase

ROUTES = """
down = [ { topic = "l3_agent" } ]
notifications_up = [ { topic = "notifications", priorities = ["info", "error"] } ]
notifications_down = [ { topic = "versioned_notifications", priorities = ["info"], exchange = "nova" } ]
"""


async def collected(peer: OsloPeer, name: str, count: int, reactor: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    waited = 0.0
    while True:
        got = await peer.request("received", name=name)
        if len(got) >= count or waited >= timeout:
            return got
        await task.deferLater(reactor, 0.2, lambda: None)
        waited += 0.2


class NotificationTests(LabTestCase):
    async def test_up_by_priority_without_stealing(self) -> None:
        """Allowed priorities go up to every control pool; tenant listeners keep getting everything."""
        await self.start_link(ROUTES)
        control, tenant = await self.peers()
        await control.request("listener", name="ceilometer", topics=["notifications"], pool="ceilometer")
        await control.request("listener", name="audit", topics=["notifications"], pool="audit")
        await tenant.request("listener", name="local", topics=["notifications"], pool="local")
        await task.deferLater(self.lab.reactor, 0.5, lambda: None)
        for priority in ("info", "warn", "error"):
            await tenant.request(
                "notify", topic="notifications", priority=priority, event_type=f"agent.{priority}", payload={"p": priority}
            )
        for name in ("ceilometer", "audit"):
            got = await collected(control, name, 2, self.lab.reactor)
            self.assertEqual(sorted(n["event_type"] for n in got), ["agent.error", "agent.info"], name)
            self.assertEqual({n["publisher_id"] for n in got}, {"lab.host"})
        local = await collected(tenant, "local", 3, self.lab.reactor)
        self.assertEqual(sorted(n["event_type"] for n in local), ["agent.error", "agent.info", "agent.warn"])
        await task.deferLater(self.lab.reactor, 1.0, lambda: None)
        got = await control.request("received", name="ceilometer")
        self.assertEqual(len(got), 2)  # the warn never came up, nothing came twice

    async def test_down_on_its_exchange(self) -> None:
        """Notifications routed down reach tenant listeners on the configured exchange."""
        await self.start_link(ROUTES)
        control = self.lab.spawn_peer("control", self.control_vhost, exchange="nova")
        tenant = self.lab.spawn_peer("tenant", self.tenant_vhost, exchange="nova")
        await control.ready
        await tenant.ready
        await tenant.request("listener", name="vm-agent", topics=["versioned_notifications"], pool="vm-agent")
        await task.deferLater(self.lab.reactor, 0.5, lambda: None)
        await control.request(
            "notify", topic="versioned_notifications", priority="info", event_type="instance.create.end", payload={"uuid": "i-1"}
        )
        await control.request(
            "notify", topic="versioned_notifications", priority="error", event_type="instance.failed", payload={}
        )
        await control.request(
            "notify", topic="versioned_notifications", priority="info", event_type="instance.sentinel", payload={}
        )
        await collected(tenant, "vm-agent", 2, self.lab.reactor)
        await task.deferLater(self.lab.reactor, 1.0, lambda: None)  # room for a wrongly relayed error to show up
        got = await tenant.request("received", name="vm-agent")
        self.assertEqual(
            [(n["event_type"], n["payload"]) for n in got], [("instance.create.end", {"uuid": "i-1"}), ("instance.sentinel", {})]
        )
