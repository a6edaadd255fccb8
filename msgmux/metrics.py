# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics and the JSON status, served over HTTP.

The relays count into plain L{msgmux.stats.LinkStats} objects; the
L{MsgmuxCollector} turns them into metric families at scrape time, so the
message path never touches prometheus_client.  Scrapes are answered in the
reactor thread (prometheus_client's own Twisted resource collects in a
worker thread, which would race the relays).

C{/metrics} is the Prometheus text format; C{/status} is JSON for
C{msgmux status}.  Both are read-only.  The names and labels are documented
in C{docs/metrics.md}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.migrate import mover_for
from msgmux.calls import LATENCY_BUCKETS, CallTracker
from msgmux.stats import LinkStats

__all__ = ["COUNTERS", "MOVE_COUNTERS", "MetricsSite", "MsgmuxCollector", "Monitored"]

#: LinkStats counter -> (metric name, help, label names besides "link").
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "relayed": (
        "msgmux_messages_relayed_total",
        "Messages relayed and confirmed by the destination broker, by kind (rpc, notification, reply, canary).",
        ("direction", "kind"),
    ),
    "rejected": ("msgmux_messages_rejected_total", "Messages refused, by reason.", ("direction", "reason")),
    "refused_by_peer": ("msgmux_messages_refused_by_peer_total", "Messages the other half refused, by reason.", ("direction", "reason")),
    "expired": ("msgmux_messages_expired_total", "Messages dropped because their deadline passed.", ("direction",)),
    "returned": ("msgmux_messages_returned_total", "Mandatory publishes the broker could not route.", ("direction",)),
    "nacked": ("msgmux_publish_nacks_total", "Publishes the broker refused (retried).", ("direction",)),
    "undeliverable": (
        "msgmux_messages_undeliverable_total",
        "Replies dropped because the broker kept returning them (the caller's reply queue stayed missing).",
        ("direction",),
    ),
    "duplicates_dropped": (
        "msgmux_duplicates_dropped_total",
        "Upstream messages dropped because the same oslo _unique_id was already published (redelivered by the tenant broker).",
        ("direction",),
    ),
    "late_replies": ("msgmux_late_replies_total", "Replies from servers after the call's deadline (dropped).", ("direction",)),
    "calls_answered": ("msgmux_calls_answered_total", "Relayed calls whose final reply passed.", ("direction",)),
    "calls_timed_out": ("msgmux_calls_timed_out_total", "Relayed calls that reached their deadline unanswered.", ("direction",)),
    "protocol_violations": ("msgmux_link_protocol_violations_total", "Sessions closed for a protocol violation.", ("code",)),
    "sessions": ("msgmux_link_sessions_total", "Link sessions established.", ()),
    "sessions_ended": ("msgmux_link_sessions_ended_total", "Link sessions that ended, by reason code.", ("reason",)),
    "sessions_refused": ("msgmux_link_sessions_refused_total", "Handshakes refused because the link started too many sessions lately.", ()),
    "connections_refused": (
        "msgmux_link_connections_refused_total",
        "Connections refused because too many others had not completed the handshake.",
        (),
    ),
    "throttled": ("msgmux_link_throttled_total", "Times link credit was held back by the rate limit.", ()),
    "canaries_sent": ("msgmux_canaries_sent_total", "Canaries put on the control broker.", ()),
    "canaries_returned": ("msgmux_canaries_returned_total", "Canaries back after going round both brokers.", ()),
    "canaries_stale": (
        "msgmux_canaries_stale_total",
        "Canaries back that were no newer than one already back (redelivered or replayed); ignored.",
        (),
    ),
}


#: QueueMover count -> (metric name, help); labelled by broker and queue.
MOVE_COUNTERS: dict[str, tuple[str, str]] = {
    "moves": ("msgmux_queue_moves_total", "msgmux's own queues moved to new arguments (queue options changed)."),
    "messages": ("msgmux_queue_moved_messages_total", "Messages kept by those moves."),
    "lost": ("msgmux_queue_move_lost_total", "Messages a move could not keep (deleted with the old queue)."),
    "unreadable": ("msgmux_queue_move_unreadable_total", "Messages dropped by a move because msgmux could not read them."),
}


class Monitored(Protocol):
    """What the collector needs from a link (control or tenant)."""

    stats: LinkStats

    def status(self) -> dict[str, Any]:
        """A JSON-able description of the link now."""


class MsgmuxCollector:
    """
    Builds the metric families from the links and brokers of this process.

    @ivar links: (half, link) pairs; C{half} is C{"control"} or C{"tenant"}
        and labels every link metric, since a process running both halves
        has a control and a tenant view of the same link.
    """

    def __init__(self, links: Callable[[], Iterable[tuple[str, Monitored]]], brokers: Iterable[BrokerService]) -> None:
        """
        @param links: returns the links to report, asked at each scrape
            (links come and go at run time).
        """
        self.links = links
        self.brokers = list(brokers)
        #: More sources of metric families and status keys (C{collect()},
        #: C{status()}), such as the supervised tenant halves.
        self.extras: list[Any] = []

    def collect(self) -> Iterable[Any]:
        base = ("half", "link")
        families = {
            name: CounterMetricFamily(metric, text, labels=base + labels) for name, (metric, text, labels) in COUNTERS.items()
        }
        link_up = GaugeMetricFamily("msgmux_link_up", "1 while the session with the other half is up.", labels=base)
        healthy = GaugeMetricFamily(
            "msgmux_link_healthy", "1 when a canary went round both brokers recently (messages move).", labels=base
        )
        round_trip = GaugeMetricFamily("msgmux_canary_round_trip_seconds", "Latest canary round trip.", labels=base)
        inflight = GaugeMetricFamily(
            "msgmux_calls_inflight", "Relayed calls awaiting their final reply.", labels=base + ("direction",)
        )
        latency = HistogramMetricFamily(
            "msgmux_reply_latency_seconds", "Time from relaying a call to its final reply.", labels=base + ("direction",)
        )
        for half, link in self.links():
            stats = link.stats
            key = [half, stats.link_name]
            for (counter, pairs), value in stats.counts.items():
                if counter in families:
                    wanted = COUNTERS[counter][2]
                    labels = dict(pairs)
                    families[counter].add_metric(key + [labels.get(label, "") for label in wanted], value)
            link_up.add_metric(key, stats.gauges.get("link_up", 0))
            status = link.status()
            if "healthy" in status:
                healthy.add_metric(key, 1 if status["healthy"] else 0)
            if "canary_round_trip_seconds" in stats.gauges:
                round_trip.add_metric(key, stats.gauges["canary_round_trip_seconds"])
            calls: CallTracker | None = getattr(link, "calls", None)
            if calls is not None:
                for direction in ("down", "up"):
                    inflight.add_metric(key + [direction], calls.inflight(direction))
                for direction, (buckets, total) in calls.latency.items():
                    cumulative, running = [], 0
                    for bound, count in zip(LATENCY_BUCKETS + (float("inf"),), buckets):
                        running += count
                        cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
                    latency.add_metric(key + [direction], cumulative, total[0])
        yield from families.values()
        yield from (link_up, healthy, round_trip, inflight, latency)
        connected = GaugeMetricFamily("msgmux_broker_connected", "1 while logged in to the broker.", labels=("broker",))
        blocked = GaugeMetricFamily("msgmux_broker_blocked", "1 while the broker blocks our publishes.", labels=("broker",))
        for broker in self.brokers:
            protocol = broker.protocol
            connected.add_metric([broker.name], 0 if protocol is None else 1)
            blocked.add_metric([broker.name], 1 if protocol is not None and protocol.blocked else 0)
        failures = CounterMetricFamily(
            "msgmux_broker_connect_failures_total",
            "Failed attempts to connect and log in to the broker, by reason (connect, timeout, login, lost, tls-*).",
            labels=("broker", "reason"),
        )
        for broker in self.brokers:
            for reason, count in sorted(broker.failures.counts.items()):
                failures.add_metric([broker.name, reason], count)
        yield connected
        yield blocked
        yield failures
        moves = {name: CounterMetricFamily(metric, text, labels=("broker", "queue")) for name, (metric, text) in MOVE_COUNTERS.items()}
        for broker in self.brokers:
            mover = mover_for(broker)
            for name, family in moves.items():
                for queue, value in getattr(mover, name).items():
                    family.add_metric([broker.name, queue], value)
        yield from moves.values()
        for extra in self.extras:
            yield from extra.collect()

    def status(self) -> dict[str, Any]:
        """The JSON document behind C{/status}."""
        document = self._status()
        for extra in self.extras:
            document.update(extra.status())
        return document

    def _status(self) -> dict[str, Any]:
        return {
            "links": [dict(link.status(), half=half) for half, link in self.links()],
            "brokers": [
                {
                    "name": broker.name,
                    "connected": broker.protocol is not None,
                    "address": broker.display,
                    "blocked": broker.protocol.blocked if broker.protocol is not None else None,
                    "tls": broker.tls is not None,
                    "failing": broker.failures.failing(),
                }
                for broker in self.brokers
            ],
        }


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _Status(Resource):
    isLeaf = True

    def __init__(self, collector: MsgmuxCollector) -> None:
        super().__init__()
        self.collector = collector

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.collector.status(), default=str).encode()


class MetricsSite(Site):
    """C{/metrics} and C{/status} for this process."""

    noisy = False

    def __init__(self, collector: MsgmuxCollector) -> None:
        registry = CollectorRegistry()
        registry.register(collector)  # type: ignore[arg-type]
        registry.register(ProcessCollector(registry=None))  # process RSS and CPU, for memory per link
        root = Resource()
        root.putChild(b"metrics", _Metrics(registry))
        root.putChild(b"status", _Status(collector))
        super().__init__(root)
        self.displayTracebacks = False

    def log(self, request: Request) -> None:
        """Scrapes are not worth a log line each."""
