"""
Queue options changed with msgmux in place, as an operator changes them:
first C{rabbit_transient_queues_ttl}, then the move to quorum queues
(C{rabbit_quorum_queue}, C{rabbit_transient_quorum_queue}), on both brokers,
with real oslo services and messages waiting in msgmux's own queues at
each change.  This is the procedure of docs/operations.md, "Changing queue
options", step by step: msgmux moves its own queues and nothing they held is
lost; what it shares with the oslo services it reports, once, with what to
do; calls and casts flow both ways before and after.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import threads

from lab.lab import HalfProcess
from lab.peer import OsloPeer
from lab.rabbit import RabbitNode, SystemBroker
from tests.integration.support import LabTestCase, control_config, fetch_metrics, tenant_config
from tests.integration.test_rpc import received, settle

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1"], fanout = true } ]
up = [ { topic = "q-reports", methods = ["echo", "sleep"] } ]
notifications_up = [ { topic = "notifications", priorities = ["info"] } ]
"""
TTL = "rabbit_transient_queues_ttl = 3600"
QUORUM = TTL + "\nrabbit_quorum_queue = true\nrabbit_transient_quorum_queue = true"
QUORUM_OSLO = {"rabbit_transient_queues_ttl": 3600, "rabbit_quorum_queue": True, "rabbit_transient_quorum_queue": True}
STREAM = QUORUM + "\nrabbit_stream_fanout = true"
STREAM_OSLO = dict(QUORUM_OSLO, rabbit_stream_fanout=True, rabbit_qos_prefetch_count=64)
REPLY = "reply_msgmux_tenant-a"
POOL = "msgmux_tenant-a_openstack_notifications"

#: What the oslo services and msgmux share on each broker and whose
#: declaration the quorum options change: the topic and server queues, the
#: notifier's queue and the listener's pool.  Their control exchange too.
SHARED = {
    "control": ["l3_agent", "l3_agent.agent-1", "q-reports", "q-reports.q-server", "notifications.info", "ceilometer"],
    "tenant": ["l3_agent", "l3_agent.agent-1", "q-reports", "notifications.info"],
}
#: Queues nobody consumes in this scenario (the notifier's default queue,
#: kept for listeners without a pool): not empty, and that is no loss.
UNREAD = {"notifications.info"}


def queues(node: RabbitNode | SystemBroker, vhost: str) -> dict[str, dict[str, Any]]:
    """The vhost's queues as C{rabbitmqctl list_queues} shows them (blocking)."""
    listed = json.loads(node.ctl("--formatter", "json", "list_queues", "-p", vhost, "name", "messages", "type", "arguments"))
    for queue in listed:  # arguments come as [name, type, value] triples
        queue["arguments"] = {name: value for name, _, value in queue["arguments"]}
    return {queue["name"]: queue for queue in listed}


class QueueMoveTests(LabTestCase):
    timeout = 300

    async def test_ttl_then_quorum_queues(self) -> None:
        self.metrics = f"unix:{self.lab.path('sockets', f'control-metrics-{self.tag}.sock')}"
        self.key = self.lab.write(f"reply-{self.tag}.key", "msgmux-test-reply-key-0123456789\n")
        self.starts = 0
        control_half, tenant_half = await self.start_link(ROUTES, extra=self.control_extra())
        control, tenant = await self.services({})
        await self.traffic(control, tenant, "defaults")

        # 1. rabbit_transient_queues_ttl: only msgmux's own queues (and each
        # oslo process's own) have it, so the oslo services need not stop.
        down_call = control.request("call", topic="l3_agent", method="sleep", kwargs={"seconds": 3}, timeout=120)
        up_call = tenant.request("call", topic="q-reports", method="sleep", kwargs={"seconds": 3}, timeout=120)
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"seconds": 3})
        await received(control, "q-server", 1, self.lab.reactor, kwargs={"seconds": 3})
        await tenant_half.stop()  # the session ends; neither half consumes until both are back
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"waited": "ttl"})
        await tenant.request("notify", topic="notifications", priority="info", event_type="waited.ttl", payload={})
        await control_half.stop()
        # The replies of both calls, the fanout cast and the notification wait in msgmux's own queues.
        await self.until_waiting({"control": {REPLY: 1, "fanout": 1}, "tenant": {REPLY: 1, POOL: 1}})
        control_half, tenant_half = await self.restart(TTL)
        self.assertEqual((await down_call, await up_call), (3, 3))
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"waited": "ttl"})
        await self.notified(control, "waited.ttl")
        for half, broker in ((control_half, "control"), (tenant_half, "tenant")):
            self.assertIn(f"Moved queue {REPLY} on the {broker} broker to its new arguments: 1 messages kept", half.log())
            self.assertNotIn("could not set up", half.log())
        self.assertRegex(
            control_half.log(), r"Moved queue l3_agent_fanout_\w+ on the control broker to its new arguments: 1 messages kept"
        )
        self.assertNotIn(f"Moving queue {POOL}", tenant_half.log())  # a pool has no TTL: it stays as it is
        text = await fetch_metrics(self.lab.reactor, self.metrics)
        self.assertIn(f'msgmux_queue_moved_messages_total{{broker="control",queue="{REPLY}"}} 1.0', text)
        self.assertNotIn("msgmux_queue_move_lost_total{", text)
        await self.traffic(control, tenant, "ttl")

        # 2. Quorum queues.  Messages wait in msgmux's own queues again.
        await tenant_half.stop()
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"waited": "quorum"})
        await tenant.request("notify", topic="notifications", priority="info", event_type="waited.quorum", payload={})
        await control_half.stop()
        await self.until_waiting({"control": {"fanout": 1}, "tenant": {POOL: 1}})
        # msgmux alone on the new options says what it shares with the oslo
        # services and what to do, once however often it retries.
        control_half, tenant_half = await self.restart(QUORUM, wait=False)
        for half, broker in ((control_half, "control"), (tenant_half, "tenant")):
            await self.lab.wait_for_log(half, f"could not set up the {broker} broker channel")
        await settle(self.lab.reactor, 3.5)  # three more attempts
        for half, broker in ((control_half, "control"), (tenant_half, "tenant")):
            log = half.log()
            self.assertEqual(log.count(f"could not set up the {broker} broker channel"), 1, log[-3000:])
            self.assertIn(
                f"exchange 'openstack' differs on the {broker} broker: durable is false there, msgmux declares true"
                f" (set by amqp_durable_queues, rabbit_quorum_queue in [{broker}.queues])",
                log,
            )
            self.assertIn("the services and msgmux must change together", log)
        # The operator: stop the oslo services and msgmux, delete what they
        # share and what changes, start them with the new options.
        await control.quit()
        await tenant.quit()
        await control_half.stop()
        await tenant_half.stop()
        await self.delete_shared()
        control, tenant = await self.services(QUORUM_OSLO)
        control_half, tenant_half = await self.restart(QUORUM)
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"waited": "quorum"})
        await self.notified(control, "waited.quorum")
        self.assertIn("Exchange l3_agent_fanout on the control broker had other properties", control_half.log())
        self.assertIn(f"Moved queue {POOL} on the tenant broker to its new arguments: 1 messages kept", tenant_half.log())
        await self.traffic(control, tenant, "quorum")
        listed = await threads.deferToThread(queues, self.lab.control_node, self.control_vhost)
        self.assertEqual((listed[REPLY]["type"], listed[REPLY]["arguments"]["x-expires"]), ("quorum", 3600000))
        self.assertEqual(listed["l3_agent"]["type"], "quorum")
        self.assertFalse([name for name in listed if name.endswith(".msgmux-moving")])

        # 3. Fanout through streams: the fanout queue msgmux had becomes
        # unused; what waits in it is relayed all the same, then it goes.
        await tenant_half.stop()
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"waited": "stream"})
        await control_half.stop()
        await self.until_waiting({"control": {"fanout": 1}, "tenant": {}})
        await control.quit()
        await tenant.quit()
        control, tenant = await self.services(STREAM_OSLO)
        control_half, tenant_half = await self.restart(STREAM)
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"waited": "stream"})
        self.assertRegex(control_half.log(), r"Relaying the 1 messages left in queue l3_agent_fanout_\w+ on the control broker")
        await self.traffic(control, tenant, "stream")
        await control.request("cast", topic="l3_agent", fanout=True, method="echo", kwargs={"fan": "stream"})
        await received(tenant, "agent-1", 1, self.lab.reactor, kwargs={"fan": "stream"})
        await tenant_half.stop()  # the next session finds the old fanout queue empty
        tenant_half = await self.restart_tenant(STREAM)
        self.assertRegex(control_half.log(), r"Deleted queue l3_agent_fanout_\w+ on the control broker")
        listed = await threads.deferToThread(queues, self.lab.control_node, self.control_vhost)
        self.assertEqual([name for name in listed if name.startswith("l3_agent_fanout")], ["l3_agent_fanout"])
        self.assertEqual(listed["l3_agent_fanout"]["type"], "stream")

    # --- the operator's and the services' side ---------------------------

    def control_extra(self) -> str:
        return f'reply_key_file = "{self.key}"\nmetrics = "{self.metrics}"'

    async def restart(self, queues: str, wait: bool = True) -> tuple[HalfProcess, HalfProcess]:
        """Start both halves with new queue options (as after editing both configuration files)."""
        self.starts += 1
        socket = self.socket_path("tenant-a")
        control_path = control_config(
            self.lab, self.control_vhost, socket, "tenant-a", ROUTES, extra=self.control_extra(), queues=queues
        )
        tenant_path = tenant_config(self.lab, self.tenant_vhost, socket, "tenant-a", queues)
        control_half = self.lab.spawn_half(control_path, f"tenant-a-{self.tag}-control-{self.starts}", in_tenant_network=False)
        await self.lab.wait_for_log(control_half, "listening on")
        tenant_half = self.lab.spawn_half(tenant_path, f"tenant-a-{self.tag}-tenant-{self.starts}", in_tenant_network=True)
        if wait:
            await self.lab.wait_for_log(control_half, "control broker channel ready", timeout=60)
            await self.lab.wait_for_log(tenant_half, "tenant broker channel ready", timeout=60)
        return control_half, tenant_half

    async def restart_tenant(self, queues: str) -> HalfProcess:
        self.starts += 1
        path = tenant_config(self.lab, self.tenant_vhost, self.socket_path("tenant-a"), "tenant-a", queues)
        tenant_half = self.lab.spawn_half(path, f"tenant-a-{self.tag}-tenant-{self.starts}", in_tenant_network=True)
        await self.lab.wait_for_log(tenant_half, "tenant broker channel ready", timeout=60)
        return tenant_half

    async def services(self, rabbit: dict[str, Any]) -> tuple[OsloPeer, OsloPeer]:
        """The oslo services: an agent on the tenant broker, a server and a notification listener on the control one."""
        control, tenant = await self.peers(**rabbit)
        await tenant.request("server", name="agent-1", topic="l3_agent", server="agent-1")
        await control.request("server", name="q-server", topic="q-reports", server="q-server")
        await control.request("listener", name="ceilometer", topics=["notifications"], pool="ceilometer")
        await settle(self.lab.reactor, 0.5)
        return control, tenant

    async def traffic(self, control: OsloPeer, tenant: OsloPeer, mark: str) -> None:
        """Calls and casts both ways."""
        reply = await control.request("call", topic="l3_agent", method="echo", kwargs={"call": mark})
        self.assertEqual(reply["kwargs"], {"call": mark})
        reply = await tenant.request("call", topic="q-reports", method="echo", kwargs={"call": mark})
        self.assertEqual(reply["kwargs"], {"call": mark})
        await control.request("cast", topic="l3_agent", server="agent-1", method="echo", kwargs={"cast": mark})
        await tenant.request("cast", topic="q-reports", method="echo", kwargs={"cast": mark})
        for peer, name in ((tenant, "agent-1"), (control, "q-server")):
            got = await received(peer, name, 1, self.lab.reactor, kwargs={"cast": mark})
            self.assertIn({"cast": mark}, [r["kwargs"] for r in got], name)

    async def notified(self, control: OsloPeer, event_type: str) -> None:
        for _ in range(100):
            if event_type in [n["event_type"] for n in await control.request("received", name="ceilometer")]:
                return
            await settle(self.lab.reactor, 0.2)
        self.fail(f"the listener never got {event_type}")

    async def until_waiting(self, expected: dict[str, dict[str, int]]) -> None:
        """Wait until msgmux's own queues hold these messages (C{fanout}: the link's fanout queue)."""
        nodes = {"control": (self.lab.control_node, self.control_vhost), "tenant": (self.lab.tenant_node, self.tenant_vhost)}
        seen: dict[str, dict[str, int]] = {}
        for _ in range(40):
            for broker, (node, vhost) in nodes.items():
                listed = await threads.deferToThread(queues, node, vhost)
                counts = {name: queue["messages"] for name, queue in listed.items()}
                fanout = [count for name, count in counts.items() if name.startswith("l3_agent_fanout_")]
                seen[broker] = {
                    name: fanout[0] if name == "fanout" and fanout else counts.get(name, 0) for name in expected[broker]
                }
            if seen == expected:
                return
            await settle(self.lab.reactor, 0.5)
        self.assertEqual(seen, expected)

    async def delete_shared(self) -> None:
        """What docs/operations.md has the operator delete: shared queues (once drained) and the control exchange."""
        nodes = {"control": (self.lab.control_node, self.control_vhost), "tenant": (self.lab.tenant_node, self.tenant_vhost)}
        for broker, (node, vhost) in nodes.items():
            listed = await threads.deferToThread(queues, node, vhost)
            waiting = {name: listed[name]["messages"] for name in SHARED[broker] if name in listed and name not in UNREAD}
            self.assertEqual(waiting, dict.fromkeys(waiting, 0), broker)  # nothing relayed is deleted
            for name in SHARED[broker]:
                await threads.deferToThread(node.ctl, "delete_queue", "--vhost", vhost, name)
            admin = self.lab.spawn(
                [sys.executable, "-m", "lab.brokeradmin", node.url(vhost), "delete-exchange", "openstack"],
                f"brokeradmin-{broker}-{self.tag}",
                in_tenant_network=broker == "tenant",
            )
            self.assertEqual(await admin.ended, 0, admin.output)
