"""Tests for L{msgmux.metrics}: link counters and gauges as Prometheus series, and the status document."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from msgmux.control import ControlLink
from msgmux.amqp.migrate import mover_for
from msgmux.metrics import COUNTERS, MOVE_COUNTERS, MsgmuxCollector
from msgmux.oslo.tokens import TokenSigner
from tests.doubles import clock, control_config, idle_broker, one_link

CONFIG = one_link()


class CollectorTests(SynchronousTestCase):
    def test_counters_gauges_and_histograms_exported(self) -> None:
        """Counters keep their labels, calls give the in-flight gauge and the latency histogram, brokers their state."""
        c = clock()
        config = control_config(CONFIG)
        broker = idle_broker()
        link = ControlLink(config.links[0], config, broker, TokenSigner(b"k" * 32), c)
        link.stats.count("relayed", 3, direction="down", kind="rpc")
        link.stats.count("rejected", direction="up", reason="route")
        link.stats.gauges["link_up"] = 1
        link.canaries.returned(link.signer.canary("tenant-a", c.seconds()))
        link.calls.begin("t", c.seconds() + 10, "down")
        c.advance(0.02)
        link.calls.answered("t")
        link.calls.begin("u", c.seconds() + 10, "up")
        self.addCleanup(link.forget_calls)
        for _ in range(3):
            broker.failures.failed("127.0.0.1:5671", "tls-untrusted", "the broker's certificate was not accepted")
        mover_for(broker)._count("reply_msgmux_tenant-a", 5, 0, 1)
        registry = CollectorRegistry()
        registry.register(MsgmuxCollector(lambda: [("control", link)], [broker]))
        text = generate_latest(registry).decode()
        for line in (
            'msgmux_messages_relayed_total{direction="down",half="control",kind="rpc",link="tenant-a"} 3.0',
            'msgmux_messages_rejected_total{direction="up",half="control",link="tenant-a",reason="route"} 1.0',
            'msgmux_link_up{half="control",link="tenant-a"} 1.0',
            'msgmux_link_healthy{half="control",link="tenant-a"} 1.0',
            'msgmux_calls_inflight{direction="up",half="control",link="tenant-a"} 1.0',
            'msgmux_reply_latency_seconds_bucket{direction="down",half="control",le="0.025",link="tenant-a"} 1.0',
            'msgmux_reply_latency_seconds_bucket{direction="down",half="control",le="0.01",link="tenant-a"} 0.0',
            'msgmux_broker_connected{broker="control"} 0.0',
            'msgmux_broker_connect_failures_total{broker="control",reason="tls-untrusted"} 3.0',
            'msgmux_queue_moves_total{broker="control",queue="reply_msgmux_tenant-a"} 1.0',
            'msgmux_queue_moved_messages_total{broker="control",queue="reply_msgmux_tenant-a"} 5.0',
            'msgmux_queue_move_unreadable_total{broker="control",queue="reply_msgmux_tenant-a"} 1.0',
        ):
            self.assertIn(line, text)
        self.assertNotIn("msgmux_queue_move_lost_total{", text)

    def test_every_counter_is_documented(self) -> None:
        """docs/metrics.md names every metric the collector exports."""
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "metrics.md")
        with open(path, encoding="utf-8") as f:
            document = f.read()
        for name, _, _ in COUNTERS.values():
            self.assertIn(name, document)
        self.assertIn("msgmux_broker_connect_failures_total", document)
        for name, _ in MOVE_COUNTERS.values():
            self.assertIn(name, document)
