"""
Tests for C{monitoring/}: the Grafana dashboard is well-formed Grafana JSON
whose queries use only metrics msgmux exports (or the ones being added), and
the Prometheus alerting rules pass C{promtool check rules} and their unit
tests (C{promtool test rules}), with a firing and a quiet case per alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

import yaml
from prometheus_client.process_collector import ProcessCollector
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from msgmux.metrics import MsgmuxCollector

MONITORING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "monitoring")
DASHBOARD = os.path.join(MONITORING, "msgmux-dashboard.json")
RULES = os.path.join(MONITORING, "msgmux-alerts.yml")
RULE_TESTS = os.path.join(MONITORING, "msgmux-alerts.test.yml")

#: Metrics a control half exports only while it supervises tenant halves
#: (L{msgmux.lifecycle.ControlLifecycle.collect}; tests.test_lifecycle reads
#: them from a running supervisor).
SUPERVISION = {"msgmux_tenant_half_up", "msgmux_tenant_half_restarts_total"}

#: What Prometheus itself adds for every target.
SYNTHETIC = {"up"}

#: Sample names of each metric type.
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}

#: PromQL words that are not metric names.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf", "nan"}


def exported_metrics() -> set[str]:
    """The sample names a msgmux process serves on /metrics, from the collectors themselves."""
    families = list(MsgmuxCollector(lambda: [], []).collect()) + list(ProcessCollector(registry=None).collect())
    return {family.name + suffix for family in families for suffix in _SUFFIXES[family.type]}


def metric_names(expression: str) -> set[str]:
    """
    The metric names a PromQL expression selects: strings, label matchers,
    ranges, offsets, grouping clauses, numbers, function names and keywords
    removed.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if re.match(r"\s*\(", text[match.end() :]) or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


class MetricNameTests(SynchronousTestCase):
    """The helper the checks below rely on."""

    def test_metric_names(self) -> None:
        expression = (
            'histogram_quantile(0.99, sum by (le, link) (rate(msgmux_reply_latency_seconds_bucket{link=~"$link", x="a{b}"}[$__rate_interval])))'
            " / on (link) group_left (half) (msgmux_link_up offset 5m or up == bool 1e3) and ignoring (x) process_open_fds > inf"
        )
        self.assertEqual(metric_names(expression), {"msgmux_reply_latency_seconds_bucket", "msgmux_link_up", "up", "process_open_fds"})

    def test_exported(self) -> None:
        """Counters carry _total, histograms their three series, and the process collector is included."""
        exported = exported_metrics()
        for name in ("msgmux_messages_relayed_total", "msgmux_link_healthy", "msgmux_reply_latency_seconds_bucket", "process_cpu_seconds_total"):
            self.assertIn(name, exported)
        self.assertNotIn("msgmux_messages_relayed", exported)


class DashboardTests(SynchronousTestCase):
    """monitoring/msgmux-dashboard.json loads as a Grafana dashboard and queries only real metrics."""

    def setUp(self) -> None:
        with open(DASHBOARD) as f:
            self.dashboard = json.load(f)

    def test_dashboard_model(self) -> None:
        """The top-level keys Grafana needs, a data source variable, unique panel ids, panels on the 24-column grid, not overlapping."""
        dashboard = self.dashboard
        self.assertEqual(type(dashboard["schemaVersion"]), int)
        self.assertTrue(dashboard["title"] and dashboard["uid"])
        self.assertIsNone(dashboard["id"])  # importable anywhere: Grafana assigns the id
        variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
        self.assertEqual((variables["datasource"]["type"], variables["datasource"]["query"]), ("datasource", "prometheus"))
        ids = [panel["id"] for panel in panels(dashboard)]
        self.assertEqual(len(ids), len(set(ids)))
        occupied: dict[tuple[int, int], str] = {}
        for panel in panels(dashboard):
            self.assertTrue(panel["title"], panel)
            grid = panel["gridPos"]
            self.assertTrue(all(type(grid[key]) is int and grid[key] >= 0 for key in "hwxy"), panel["title"])
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            for cell in ((x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])):
                self.assertNotIn(cell, occupied, f"{panel['title']} overlaps {occupied.get(cell)}")
                occupied[cell] = panel["title"]

    def test_panels_query_prometheus(self) -> None:
        """Every panel reads the chosen Prometheus data source, with at least one query, each with its own refId."""
        for panel in panels(self.dashboard):
            if panel["type"] == "row":
                continue
            self.assertIn(panel["type"], ("timeseries", "stat", "state-timeline"), panel["title"])
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": "${datasource}"}, panel["title"])
            targets = panel["targets"]
            self.assertTrue(targets, panel["title"])
            self.assertEqual(len({target["refId"] for target in targets}), len(targets), panel["title"])
            for target in targets:
                self.assertTrue(target["expr"].strip(), panel["title"])
                self.assertEqual(target["datasource"], panel["datasource"], panel["title"])

    def expressions(self) -> list[tuple[str, str]]:
        """(where, PromQL) for every query of the dashboard, panels and variables."""
        found = [(panel["title"], target["expr"]) for panel in panels(self.dashboard) for target in panel.get("targets", [])]
        for variable in self.dashboard["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
                assert match is not None, variable["name"]
                found.append((f"variable {variable['name']}", match.group(1)))
        return found

    def test_metrics_exist(self) -> None:
        """Every metric a query uses is one msgmux exports."""
        known = exported_metrics() | SUPERVISION
        unknown = [(where, name) for where, expression in self.expressions() for name in metric_names(expression) - known]
        self.assertEqual(unknown, [])
        used = set().union(*(metric_names(expression) for _, expression in self.expressions()))
        self.assertLessEqual(SUPERVISION, used)


def promtool() -> str:
    """
    The promtool binary.  Without it the checks are skipped in a plain
    trial run, and fail under C{make test} (MSGMUX_INTEGRATION=1), which
    must check the rules: C{.ci/run} installs Debian's prometheus package.
    """
    path = shutil.which("promtool")
    if path is not None:
        return path
    message = "promtool is missing: apt-get install prometheus (Debian's package has it; .ci/run installs it)"
    if os.environ.get("MSGMUX_INTEGRATION") == "1":
        raise AssertionError(message)
    raise SkipTest(message)


class AlertRuleTests(SynchronousTestCase):
    """monitoring/msgmux-alerts.yml, checked and unit-tested by promtool."""

    def setUp(self) -> None:
        with open(RULES) as f:
            self.rules = [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]
        with open(RULE_TESTS) as f:
            self.tests = yaml.safe_load(f)["tests"]

    def run_promtool(self, *arguments: str) -> None:
        result = subprocess.run([promtool(), *arguments], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            self.fail(f"promtool {' '.join(arguments)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def test_check_rules(self) -> None:
        """promtool check rules accepts the file (syntax, PromQL, templates)."""
        self.run_promtool("check", "rules", os.path.basename(RULES))

    def test_rule_unit_tests(self) -> None:
        """promtool test rules passes every case of msgmux-alerts.test.yml."""
        self.run_promtool("test", "rules", os.path.basename(RULE_TESTS))

    def test_each_alert_fires_and_stays_quiet(self) -> None:
        """Each alert has a case where it fires and one where it does not; every rule is an alert with a severity."""
        fires: set[str] = set()
        quiet: set[str] = set()
        for case in self.tests:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
        alerts = {rule["alert"] for rule in self.rules}
        self.assertEqual(len(alerts), len(self.rules))
        self.assertEqual((alerts - fires, alerts - quiet, (fires | quiet) - alerts), (set(), set(), set()))
        for rule in self.rules:
            self.assertIn(rule["labels"]["severity"], ("warning", "critical"), rule["alert"])
            self.assertTrue(rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"])

    def test_alert_metrics_exist(self) -> None:
        """Every metric an alert uses is one msgmux exports or Prometheus's up."""
        known = exported_metrics() | SUPERVISION | SYNTHETIC
        unknown = [(rule["alert"], name) for rule in self.rules for name in metric_names(rule["expr"]) - known]
        self.assertEqual(unknown, [])

    def test_dashboard_queries_parse(self) -> None:
        """promtool accepts every dashboard query as PromQL, once Grafana's variables are filled in."""
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*", "$link": ".*"}
        rules = []
        for index, (title, expression) in enumerate(
            (panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])
        ):
            for variable, value in substitutions.items():
                expression = expression.replace(variable, value)
            self.assertNotIn("$", expression, title)
            rules.append({"record": f"dashboard:query_{index}", "expr": expression})
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "dashboard-queries.yml")
        with open(path, "w") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        self.run_promtool("check", "rules", path)
