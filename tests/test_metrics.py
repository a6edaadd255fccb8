"""
Tests for L{msgmux.metrics}: link counters and gauges as Prometheus series,
and docs/metrics.md naming exactly the metrics msgmux exports.
"""

from __future__ import annotations

import os
import re

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.migrate import mover_for
from msgmux.control import ControlLink
from msgmux.lifecycle import ControlLifecycle
from msgmux.metrics import MsgmuxCollector
from msgmux.oslo.tokens import TokenSigner
from msgmux.spawnproto import Started
from msgmux.supervisor import TenantSupervisor
from tests.doubles import RecordingControlHalf, RecordingSpawner, clock, control_config, idle_broker, one_link
from tests.test_monitoring import exported_metrics

CONFIG = one_link()

#: One link with a supervised tenant half.
SUPERVISED = (
    CONFIG
    + '[control.links.tenant]\nnamespace = "qrouter-1"\ntransport_url = "rabbit://t:t@127.0.0.1:5672/"\n'
    + 'user = "nobody"\ngroup = "nogroup"\n\n[control.supervision]\nusers = ["nobody"]\ngroups = ["nogroup"]\n'
)

DOCUMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "metrics.md")

#: The samples of each metric type, from the name docs/metrics.md gives the
#: metric (a counter's with its C{_total}, as it is queried).
_SAMPLE_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def read_document() -> str:
    with open(DOCUMENT, encoding="utf-8") as f:
        return f.read()


def documented_metrics(document: str) -> dict[str, str]:
    """
    The metrics the metrics tables of a document describe (those whose
    columns start with C{metric} and C{type}): each backquoted name in a
    row's first column, with the row's type.
    """
    found: dict[str, str] = {}
    in_table = False
    for line in document.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:2] == ["metric", "type"]:
            in_table = True
        elif in_table and not re.fullmatch(r"[-:]+", cells[0]):
            for name in re.findall(r"`([^`]*)`", cells[0]):
                found[name] = cells[1]
    return found


def mentioned_metrics(document: str) -> set[str]:
    """Every backquoted msgmux or process metric name anywhere in a document."""
    return {name for name in re.findall(r"`([^`]*)`", document) if re.fullmatch(r"(?:msgmux|process)_[a-z0-9_]+", name)}


def sample_names(documented: dict[str, str]) -> set[str]:
    """The names of the samples of documented metrics, as Prometheus scrapes them (a histogram's three series)."""
    return {name + suffix for name, kind in documented.items() for suffix in _SAMPLE_SUFFIXES.get(kind, ("",))}


def supervision_metrics() -> set[str]:
    """
    The sample names a control half adds while it supervises tenant halves
    (L{ControlLifecycle.collect}; L{exported_metrics} reads a process that
    supervises none), from one supervising a running half, so that every
    family has a sample.
    """
    config = control_config(SUPERVISED)
    assert config.supervision is not None
    lifecycle = ControlLifecycle(RecordingControlHalf(config), MemoryReactorClock(), [], defer.DeferredLock().run, lambda: None)
    # A recording spawner instead of the spawner process: nothing is spawned.
    supervisor = TenantSupervisor(config.supervision, RecordingSpawner(), clock(), lambda namespace: True)
    lifecycle.supervisor = supervisor
    supervisor.add(config.links[0])
    supervisor.event(Started(config.links[0].name, 100))
    families = list(lifecycle.collect())
    assert families and all(family.samples for family in families), families
    return {sample.name for family in families for sample in family.samples}


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


class DocumentTests(SynchronousTestCase):
    """docs/metrics.md names exactly the metrics msgmux exports."""

    def test_exported_metrics_are_documented(self) -> None:
        """
        Every metric msgmux exports (counters, gauges, histograms, those of
        supervised tenant halves) is in a metrics table of docs/metrics.md;
        the process collector's are documented together, by the sentence
        naming it.
        """
        document = read_document()
        exported = exported_metrics() | supervision_metrics()
        self.assertIn("prometheus_client's process collector adds", document)
        undocumented = {name for name in exported - sample_names(documented_metrics(document)) if not name.startswith("process_")}
        self.assertEqual(undocumented, set())

    def test_documented_metrics_are_exported(self) -> None:
        """
        Every metric docs/metrics.md names, in its metrics tables (with their
        type) or anywhere else, is one msgmux exports.
        """
        document = read_document()
        exported = exported_metrics() | supervision_metrics()
        documented = documented_metrics(document)
        self.assertEqual(set(documented.values()) - set(_SAMPLE_SUFFIXES), set())
        self.assertEqual(sample_names(documented) - exported, set())
        self.assertEqual(mentioned_metrics(document) - set(documented) - exported, set())

    def test_document_parsing(self) -> None:
        """The readers below find names in metrics tables only, with their types, and backquoted names anywhere."""
        document = (
            "| metric | type | labels | meaning |\n|---|---|---|---|\n"
            "| `msgmux_a_total`, `msgmux_b_total` | counter | link | a `msgmux_c` |\n"
            "| `msgmux_d_seconds` | histogram | link | d |\n\n"
            "| alert | severity | fires when | metric |\n|---|---|---|---|\n| `A` | warning | x | `msgmux_e` |\n"
            "Queues are `msgmux_canary_<link>`; see `process_open_fds`.\n"
        )
        documented = documented_metrics(document)
        self.assertEqual(documented, {"msgmux_a_total": "counter", "msgmux_b_total": "counter", "msgmux_d_seconds": "histogram"})
        self.assertEqual(
            sample_names(documented),
            {"msgmux_a_total", "msgmux_b_total", "msgmux_d_seconds_bucket", "msgmux_d_seconds_count", "msgmux_d_seconds_sum"},
        )
        self.assertEqual(
            mentioned_metrics(document),
            {"msgmux_a_total", "msgmux_b_total", "msgmux_c", "msgmux_d_seconds", "msgmux_e", "process_open_fds"},
        )
