"""
Operating msgmux: the status command and metrics against a running proxy,
health that follows messages rather than connections, JSON logs, and a
SIGHUP reload that changes one link without disturbing the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from twisted.internet import task, threads

from msgmux.cli import fetch_status
from tests.integration.support import LabTestCase, tenant_config

ROUTES = """
down = [ { topic = "l3_agent" } ]
up = [ { topic = "q-reports", methods = ["report_state"] } ]
"""


class OperationsTests(LabTestCase):
    def metrics_endpoint(self) -> str:
        return f"unix:{self.lab.path('sockets', f'metrics-{self.tag}.sock')}"

    async def status(self) -> dict[str, Any]:
        return await fetch_status(self.lab.reactor, self.metrics_endpoint())

    async def wait_status(self, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
        waited = 0.0
        while True:
            document = await self.status()
            if predicate(document):
                return document
            if waited > timeout:
                raise AssertionError(f"status never matched: {document}")
            await task.deferLater(self.lab.reactor, 0.2, lambda: None)
            waited += 0.2

    async def test_status_metrics_and_health(self) -> None:
        """msgmux status and /metrics report the link; health follows canaries, not the connection."""
        extra = f'metrics = "{self.metrics_endpoint()}"\ncanary_interval = 0.3'
        # The link heartbeat outlasts the freeze below: the test must see the
        # link unhealthy while its session is still up.
        control_half, tenant_half = await self.start_link(ROUTES, extra=extra, link_heartbeat=10.0)
        control, tenant = await self.peers()
        await tenant.request("server", name="agent", topic="l3_agent", server="agent")
        await control.request("call", topic="l3_agent", method="echo", kwargs={"x": 1})
        document = await self.wait_status(lambda d: d["links"][0]["healthy"])
        link = document["links"][0]
        self.assertEqual((link["link"], link["half"], link["up"]), ("tenant-a", "control", True))
        self.assertGreaterEqual(link["relayed"]["down"], 1)
        self.assertEqual(document["brokers"][0]["connected"], True)

        config = self.lab.path("tenant-a-control.toml")
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "msgmux.cli", "status", "--config", config, "--interval", "0.2"],
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"control\s+tenant-a\s+yes\s+yes")

        from twisted.web.client import Agent, readBody

        from msgmux.cli import client_endpoint

        class Factory:
            def endpointForURI(self, uri: Any) -> Any:
                return client_endpoint(reactor_, endpoint)

        reactor_, endpoint = self.lab.reactor, self.metrics_endpoint()
        response = await Agent.usingEndpointFactory(reactor_, Factory()).request(b"GET", b"http://msgmux/metrics")
        text = (await readBody(response)).decode()
        self.assertIn('msgmux_link_healthy{half="control",link="tenant-a"} 1.0', text)
        self.assertIn('msgmux_reply_latency_seconds_count{direction="down",half="control",link="tenant-a"} 1.0', text)
        self.assertIn('msgmux_messages_relayed_total{direction="down",half="control",kind="rpc",link="tenant-a"}', text)
        self.assertIn("process_resident_memory_bytes", text)

        # Freeze the tenant half: the socket stays connected, messages stop.
        tenant_half.signal("STOP")
        document = await self.wait_status(lambda d: not d["links"][0]["healthy"])
        self.assertTrue(document["links"][0]["up"])
        tenant_half.signal("CONT")
        await self.wait_status(lambda d: d["links"][0]["healthy"])

    async def test_json_logs(self) -> None:
        """With --logger=msgmux.logs.json_stdout every event is a flat JSON object: rendered message, level name, fields."""
        from tests.integration.support import control_config

        path = control_config(self.lab, self.control_vhost, self.socket_path("tenant-a"), "tenant-a", ROUTES)
        control_half = self.lab.spawn_half(path, f"json-{self.tag}", in_tenant_network=False, logger="msgmux.logs.json_stdout")
        self.lab.spawn_half(
            tenant_config(self.lab, self.tenant_vhost, self.socket_path("tenant-a"), "tenant-a"),
            f"json-{self.tag}-tenant",
            in_tenant_network=True,
        )
        waited = 0.0
        while b"control broker channel ready" not in control_half.output and waited < 20:
            await task.deferLater(self.lab.reactor, 0.2, lambda: None)
            waited += 0.2
        events = [json.loads(line) for line in control_half.output.decode().splitlines() if line.strip()]
        for event in events:
            self.assertIsInstance(event["message"], str)
            self.assertIn(event["levelname"], ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
            self.assertEqual(event["process"], control_half.transport.pid)
            self.assertEqual([key for key in event if key.startswith("log_")], [])
        ready = [e for e in events if "channel ready" in e["message"]]
        self.assertRegex(ready[0]["message"], r"^Link tenant-a: control broker channel ready \(\d+ queues consumed\)$")
        self.assertEqual((ready[0]["link"], ready[0]["broker"], ready[0]["levelname"]), ("tenant-a", "control", "INFO"))
        self.assertTrue(any(e["name"] == "msgmux.link.handshake.ControlLinkProtocol" for e in events))

    async def test_sighup_reload(self) -> None:
        """SIGHUP applies a changed link and a new link; an untouched link keeps its session."""
        extra = f'metrics = "{self.metrics_endpoint()}"'
        links = {
            "alpha": ('down = [ { topic = "alpha_agent" } ]', 'down = [ { topic = "alpha_agent" } ]'),
            "beta": (
                'up = [ { topic = "q-reports", methods = ["report_state"] } ]',
                'up = [ { topic = "q-reports", methods = ["report_state", "echo"] } ]',
            ),
        }

        def write(version: int, with_gamma: bool) -> str:
            blocks = [
                f'[[control.links]]\nname = "{name}"\nsocket = "{self.socket_path(name)}"\n{routes[version]}\n'
                for name, routes in links.items()
            ]
            if with_gamma:
                blocks.append(f'[[control.links]]\nname = "gamma"\nsocket = "{self.socket_path("gamma")}"\n')
            return self.lab.write(
                f"reload-{self.tag}.toml",
                f'[control]\ntransport_url = "{self.lab.control_node.url(self.control_vhost)}"\n{extra}\n\n' + "\n".join(blocks),
            )

        path = write(0, False)
        control_half = self.lab.spawn_half(path, f"reload-{self.tag}", in_tenant_network=False)
        await self.lab.wait_for_log(control_half, "listening on", count=2)
        for name in links:
            self.lab.spawn_half(
                tenant_config(self.lab, self.tenant_vhost, self.socket_path(name), name), f"reload-{self.tag}-{name}", in_tenant_network=True
            )
        before = await self.wait_status(lambda d: all(link["up"] for link in d["links"]))
        sessions = {link["link"]: link["session"] for link in before["links"]}
        control, tenant = await self.peers()
        await control.request("server", name="q", topic="q-reports", server="q")
        await task.deferLater(self.lab.reactor, 0.5, lambda: None)
        failure = await self.assertFailure(tenant.request("call", topic="q-reports", method="echo", timeout=3), Exception)
        self.assertEqual(failure.error, "MessagingTimeout")

        write(1, True)
        control_half.signal("HUP")
        await self.lab.wait_for_log(control_half, "Reloaded")
        after = await self.wait_status(
            lambda d: len(d["links"]) == 3 and next(l for l in d["links"] if l["link"] == "beta")["up"]
            and next(l for l in d["links"] if l["link"] == "beta")["session"] != sessions["beta"]
        )
        by_name = {link["link"]: link for link in after["links"]}
        self.assertEqual(by_name["alpha"]["session"], sessions["alpha"])
        self.assertFalse(by_name["gamma"]["up"])
        self.assertIn("Link gamma: listening on", control_half.log())
        reply = await tenant.request("call", topic="q-reports", method="echo", kwargs={"now": "allowed"})
        self.assertEqual(reply["kwargs"], {"now": "allowed"})

        with open(path, "a") as f:
            f.write("\n[control.bogus]\n")
        control_half.signal("HUP")
        await self.lab.wait_for_log(control_half, "Reload refused")
        self.assertTrue(control_half.running)
