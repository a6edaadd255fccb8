"""
Tests for L{msgmux.routing}: the WELCOME route map, the queues each half
consumes, what it declares before publishing, and where each address is
published.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

import msgmux
from msgmux.config import LinkConfig, NotificationRule, QueueOptions, RpcRule
from msgmux.message import CanaryAddress, NotificationAddress, ReplyAddress, RpcAddress
from msgmux.oslo.topology import ExchangeSpec, OsloTopology
from msgmux.routing import (
    Destination,
    LinkRoutes,
    Source,
    canary_queue,
    destination,
    publish_topology,
    reply_queue,
    reply_queue_name,
    sources,
)

DOWN = (RpcRule("l3_agent", ("agent-1", "agent-2"), True, ("sync",)), RpcRule("dhcp", exchange="neutron"))
UP = (RpcRule("q-reports", methods=("report_state",)),)
NOTIFY_UP = (NotificationRule("notifications", ("info", "error")),)
NOTIFY_DOWN = (NotificationRule("versioned", ("audit",), "nova"),)
ROUTES = LinkRoutes("tenant-a", DOWN, UP, NOTIFY_DOWN, NOTIFY_UP)


def topology(**options: Any) -> OsloTopology:
    """oslo's declarations on a broker whose control exchange is C{openstack}."""
    return OsloTopology(QueueOptions(**options), "openstack")


class LinkRoutesTests(SynchronousTestCase):
    """The route map sent to the tenant half in WELCOME."""

    def test_round_trip(self) -> None:
        """from_wire(to_wire()) gives the routes back, minus the allowed methods."""
        back = LinkRoutes.from_wire("tenant-a", ROUTES.to_wire())
        self.assertEqual(back.link, "tenant-a")
        self.assertEqual(back.down, (RpcRule("l3_agent", ("agent-1", "agent-2"), True), RpcRule("dhcp", exchange="neutron")))
        self.assertEqual(back.up, (RpcRule("q-reports"),))
        self.assertEqual((back.notifications_down, back.notifications_up), (NOTIFY_DOWN, NOTIFY_UP))

    def test_methods_stay_home(self) -> None:
        """The wire map carries no method lists."""
        wire = ROUTES.to_wire()
        self.assertEqual(
            wire["up"], [{"topic": "q-reports", "servers": [], "fanout": False, "exchange": None}]
        )
        self.assertNotIn("report_state", repr(wire))
        self.assertNotIn("methods", repr(wire))

    def test_from_link(self) -> None:
        """The routes of a configured link; the reply queue derives from its name."""
        link = LinkConfig("tenant-a", "/run/a.sock", down=DOWN, up=UP, notifications_down=NOTIFY_DOWN, notifications_up=NOTIFY_UP)
        self.assertEqual(LinkRoutes.from_link(link), ROUTES)
        self.assertEqual(ROUTES.reply_queue, "reply_msgmux_tenant-a")
        self.assertEqual(reply_queue_name("x"), "reply_msgmux_x")

    def test_empty(self) -> None:
        """A link with no routes round-trips too."""
        empty = LinkRoutes("b")
        self.assertEqual(empty.to_wire(), {"down": [], "up": [], "notifications_down": [], "notifications_up": []})
        self.assertEqual(LinkRoutes.from_wire("b", empty.to_wire()), empty)

    def test_malformed(self) -> None:
        """Every malformed map is a ValueError."""
        good = ROUTES.to_wire()
        rpc = good["down"][0]
        note = good["notifications_up"][0]
        bad: list[Any] = [
            None,
            [],
            "routes",
            {},
            {**good, "up": None},
            {**good, "down": [None]},
            {**good, "down": ["x"]},
            {**good, "down": [{k: v for k, v in rpc.items() if k != "topic"}]},
            {**good, "down": [{**rpc, "topic": ""}]},
            {**good, "down": [{**rpc, "topic": 5}]},
            {**good, "down": [{**rpc, "servers": None}]},
            {**good, "down": [{**rpc, "servers": [1]}]},
            {**good, "down": [{**rpc, "exchange": 3}]},
            {**good, "notifications_up": [{**note, "priorities": [None]}]},
            {**good, "notifications_up": [{**note, "exchange": ""}]},
            {k: v for k, v in good.items() if k != "notifications_down"},
        ]
        for data in bad:
            self.assertRaises(ValueError, LinkRoutes.from_wire, "a", data)


class SourcesTests(SynchronousTestCase):
    """What one half consumes for its routes."""

    def setUp(self) -> None:
        self.topology = topology()
        self.found = sources("tenant-a", DOWN, NOTIFY_UP, self.topology)
        self.by_queue = {source.queue.name: source for source in self.found}

    def test_rpc_queues(self) -> None:
        """A topic queue and one topic.server queue per server, bound to the rule's exchange."""
        openstack = self.topology.topic_exchange()
        neutron = self.topology.topic_exchange("neutron")
        rule = DOWN[0]
        self.assertEqual(
            self.by_queue["l3_agent"],
            Source(self.topology.topic_queue("l3_agent"), (openstack,), RpcAddress(None, "l3_agent"), rpc_rule=rule),
        )
        self.assertEqual(
            self.by_queue["l3_agent.agent-2"],
            Source(
                self.topology.topic_queue("l3_agent.agent-2"),
                (openstack,),
                RpcAddress(None, "l3_agent", "agent-2"),
                rpc_rule=rule,
            ),
        )
        self.assertEqual(self.by_queue["l3_agent.agent-1"].address, RpcAddress(None, "l3_agent", "agent-1"))
        dhcp = self.by_queue["dhcp"]
        self.assertEqual((dhcp.exchanges, dhcp.queue.bindings, dhcp.address), ((neutron,), (("neutron", "dhcp"),), RpcAddress("neutron", "dhcp")))

    def test_fanout_queue(self) -> None:
        """A fanout rule adds one expiring fanout queue on the topic's fanout exchange."""
        fanouts = [s for s in self.found if s.address == RpcAddress(None, "l3_agent", None, True)]
        self.assertEqual(len(fanouts), 1)
        fanout = fanouts[0]
        self.assertRegex(fanout.queue.name, r"^l3_agent_fanout_[0-9a-f]{32}$")
        self.assertEqual(fanout.exchanges, (self.topology.fanout_exchange("l3_agent"),))
        expected = self.topology.fanout_queue("l3_agent", fanout.queue.name.rsplit("_", 1)[1])
        self.assertEqual(fanout.queue, attrs.evolve(expected, owned=True))
        self.assertFalse(any("dhcp_fanout" in name for name in self.by_queue))

    def fanout_name(self, link: str, rules: tuple[RpcRule, ...] = DOWN) -> str:
        """The fanout queue consumed for C{rules} on C{link}."""
        return next(s.queue.name for s in sources(link, rules, (), self.topology) if isinstance(s.address, RpcAddress) and s.address.fanout)

    def test_fanout_name_stable(self) -> None:
        """The fanout queue name is the same across calls and processes, different per link and exchange."""
        name = self.fanout_name("tenant-a")
        self.assertEqual(self.fanout_name("tenant-a"), name)
        self.assertNotEqual(self.fanout_name("tenant-b"), name)
        self.assertNotEqual(self.fanout_name("tenant-a", (RpcRule("l3_agent", fanout=True, exchange="other"),)), name)
        code = (
            "from msgmux.routing import sources; from msgmux.config import RpcRule, QueueOptions;"
            "from msgmux.oslo.topology import OsloTopology;"
            "print([s.queue.name for s in sources('tenant-a', (RpcRule('l3_agent', fanout=True),), (),"
            " OsloTopology(QueueOptions(), 'openstack')) if 'fanout' in s.queue.name][0])"
        )
        root = os.path.dirname(os.path.dirname(msgmux.__file__))
        env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "random"}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        self.assertEqual(run.stdout.strip(), name)

    def test_notification_pool(self) -> None:
        """A notification rule consumes its own pool queue bound to every topic.priority."""
        pool = self.by_queue["msgmux_tenant-a_openstack_notifications"]
        self.assertEqual(pool.queue.bindings, (("openstack", "notifications.info"), ("openstack", "notifications.error")))
        self.assertEqual(pool.exchanges, (self.topology.topic_exchange(),))
        self.assertEqual((pool.address, pool.notification_rule), (None, NOTIFY_UP[0]))
        other = sources("tenant-a", (), NOTIFY_DOWN, self.topology)[0]
        self.assertEqual(other.queue.name, "msgmux_tenant-a_nova_versioned")
        self.assertEqual(other.queue.bindings, (("nova", "versioned.audit"),))

    def test_pool_address_for(self) -> None:
        """A pool delivery's address comes from its routing key."""
        pool = self.by_queue["msgmux_tenant-a_openstack_notifications"]
        self.assertEqual(pool.address_for("notifications.error"), NotificationAddress(None, "notifications", "error"))
        self.assertEqual(pool.address_for("notifications.info"), NotificationAddress(None, "notifications", "info"))
        rpc = self.by_queue["l3_agent"]
        self.assertEqual(rpc.address_for("anything"), RpcAddress(None, "l3_agent"))

    def test_reply_and_canary_queues(self) -> None:
        """The half's own reply and canary queues come last, unbound, with their addresses."""
        reply, canary = self.found[-2:]
        own_reply = attrs.evolve(self.topology.reply_queue("reply_msgmux_tenant-a"), owned=True)
        self.assertEqual(reply, Source(own_reply, (), ReplyAddress()))
        self.assertEqual(reply.queue, reply_queue("tenant-a", self.topology))
        self.assertEqual(canary, Source(canary_queue("tenant-a"), (), CanaryAddress()))
        self.assertEqual(
            sources("x", (), (), self.topology),
            [Source(reply_queue("x", self.topology), (), ReplyAddress()), Source(canary_queue("x"), (), CanaryAddress())],
        )
        self.assertEqual(canary.queue.name, "msgmux_canary_tenant-a")
        self.assertEqual(dict(canary.queue.arguments), {"x-expires": 600000, "x-message-ttl": 60000})

    def test_owned(self) -> None:
        """
        The queues only msgmux uses are marked as its own (it may move
        them); those oslo servers of the topics share are not.
        """
        owned = {name for name, source in self.by_queue.items() if source.queue.owned}
        self.assertEqual(
            owned,
            {
                self.fanout_name("tenant-a"),
                "msgmux_tenant-a_openstack_notifications",
                "reply_msgmux_tenant-a",
                "msgmux_canary_tenant-a",
            },
        )

    def test_stream_is_shared(self) -> None:
        """
        With rabbit_stream_fanout the fanout source is oslo's shared stream,
        not msgmux's; the fanout queue of msgmux's own from before is
        listed as retired, with its binding and address, to be relayed and
        deleted.
        """
        options = QueueOptions(rabbit_transient_quorum_queue=True, rabbit_stream_fanout=True)
        found = sources("tenant-a", DOWN, (), OsloTopology(options, "openstack"))
        stream, retired = [s for s in found if isinstance(s.address, RpcAddress) and s.address.fanout]
        self.assertEqual((stream.queue.name, stream.queue.owned, stream.queue.retired), ("l3_agent_fanout", False, False))
        self.assertEqual((retired.queue.name, retired.queue.owned, retired.queue.retired), (self.fanout_name("tenant-a"), True, True))
        self.assertEqual(retired.queue.bindings, (("l3_agent_fanout", "l3_agent"),))
        self.assertEqual((retired.address, retired.exchanges), (stream.address, ()))
        self.assertFalse(any(s.queue.retired for s in self.found))

    def test_exact_set(self) -> None:
        """Nothing else is consumed."""
        self.assertEqual(
            sorted(self.by_queue),
            sorted(
                [
                    "l3_agent",
                    "l3_agent.agent-1",
                    "l3_agent.agent-2",
                    self.fanout_name("tenant-a"),
                    "dhcp",
                    "msgmux_tenant-a_openstack_notifications",
                    "reply_msgmux_tenant-a",
                    "msgmux_canary_tenant-a",
                ]
            ),
        )
        self.assertEqual(len(self.found), 8)

    def test_options_apply(self) -> None:
        """The broker's oslo options shape the consumed queues."""
        durable = topology(amqp_durable_queues=True)
        found = {s.queue.name: s for s in sources("a", DOWN, NOTIFY_UP, durable)}
        self.assertTrue(found["l3_agent"].queue.durable)
        self.assertTrue(found["msgmux_a_openstack_notifications"].queue.durable)
        self.assertFalse(found["reply_msgmux_a"].queue.durable)


class PublishTopologyTests(SynchronousTestCase):
    """What a half declares before publishing its routes."""

    def test_exchanges_and_default_queues(self) -> None:
        """Exchanges are declared once each; notifier default queues are created."""
        t = topology()
        rules = DOWN + (RpcRule("other"), RpcRule("l3_agent.x", fanout=True))
        notes = NOTIFY_UP + (NotificationRule("notifications", ("info", "warn")), NotificationRule("n2", ("debug",), "neutron"))
        exchanges, queues = publish_topology(rules, notes, t)
        self.assertEqual(
            exchanges,
            [t.topic_exchange(), t.fanout_exchange("l3_agent"), t.topic_exchange("neutron"), t.fanout_exchange("l3_agent.x")],
        )
        self.assertEqual(
            queues,
            [
                t.notification_queue("notifications.info"),
                t.notification_queue("notifications.error"),
                t.notification_queue("notifications.warn"),
                t.notification_queue("n2.debug", "neutron"),
            ],
        )

    def test_no_routes_declare_nothing(self) -> None:
        """No routes, nothing to declare."""
        self.assertEqual(publish_topology((), (), topology()), ([], []))


class DestinationTests(SynchronousTestCase):
    """Where oslo itself would have published each address."""

    def test_topic(self) -> None:
        """A topic cast goes to the control exchange with the topic as key."""
        self.assertEqual(destination(RpcAddress(None, "t"), topology()), Destination("openstack", "t"))
        self.assertEqual(destination(RpcAddress("neutron", "t"), topology()), Destination("neutron", "t"))

    def test_server(self) -> None:
        """A server cast uses topic.server as key."""
        self.assertEqual(destination(RpcAddress(None, "t", "s1"), topology()), Destination("openstack", "t.s1"))

    def test_fanout(self) -> None:
        """A fanout goes to the topic's fanout exchange, re-declared first since it auto-deletes."""
        t = topology(rabbit_transient_quorum_queue=True)
        self.assertEqual(
            destination(RpcAddress("neutron", "t", None, True), t), Destination("t_fanout", "", redeclare=t.fanout_exchange("t"))
        )
        self.assertTrue(t.fanout_exchange("t").durable)

    def test_notification(self) -> None:
        """A notification goes to its exchange with topic.priority as key."""
        self.assertEqual(destination(NotificationAddress(None, "n", "info"), topology()), Destination("openstack", "n.info"))
        self.assertEqual(destination(NotificationAddress("nova", "n", "error"), topology()), Destination("nova", "n.error"))

    def test_reply_goes_to_callers_queue_mandatory(self) -> None:
        """A reply goes through the default exchange to the caller's queue, mandatory."""
        self.assertEqual(destination(ReplyAddress("reply_abc"), topology()), Destination("", "reply_abc", mandatory=True))

    def test_auto_delete_redeclare(self) -> None:
        """With amqp_auto_delete the control exchange may vanish, so it is re-declared."""
        t = topology(amqp_auto_delete=True)
        exchange = ExchangeSpec("openstack", "topic", False, True)
        self.assertEqual(destination(RpcAddress(None, "t"), t), Destination("openstack", "t", redeclare=exchange))
        self.assertEqual(destination(RpcAddress(None, "t", "s"), t).redeclare, exchange)
        self.assertEqual(destination(NotificationAddress(None, "n", "info"), t), Destination("openstack", "n.info", redeclare=exchange))
        self.assertIsNone(destination(RpcAddress(None, "t"), topology()).redeclare)
        self.assertEqual(destination(ReplyAddress("q"), t), Destination("", "q", mandatory=True))
