"""
One control half serving 200 links, one per tenant network, all live at once.

The 200 tenant halves run in one process inside the tenant namespace
(L{lab.many_tenants}); the control half is a normal twistd process.  Every
link must come up and turn healthy (a canary went round both brokers on
it), and calls must reach servers at both ends of the range.
"""

from __future__ import annotations

import sys

from twisted.internet import task

from msgmux.cli import fetch_status
from tests.integration.support import LabTestCase, tenant_config

LINKS = 200


class ManyLinksTests(LabTestCase):
    timeout = 300

    async def test_two_hundred_links(self) -> None:
        """200 links on one control half are all up and healthy, and carry calls."""
        metrics = f"unix:{self.lab.path('sockets', f'metrics-{self.tag}.sock')}"
        blocks = []
        tenant_configs = []
        for index in range(LINKS):
            name = f"t{index:03d}"
            socket = self.socket_path(name)
            blocks.append(f'[[control.links]]\nname = "{name}"\nsocket = "{socket}"\ndown = [ {{ topic = "agent-{index}" }} ]\n')
            tenant_configs.append(tenant_config(self.lab, self.tenant_vhost, socket, name))
        path = self.lab.write(
            f"many-{self.tag}.toml",
            f'[control]\ntransport_url = "{self.lab.control_node.url(self.control_vhost)}"\n'
            f'metrics = "{metrics}"\ncanary_interval = 1.0\n\n' + "\n".join(blocks),
        )
        control_half = self.lab.spawn_half(path, f"many-{self.tag}", in_tenant_network=False)
        await self.lab.wait_for_log(control_half, "listening on", count=LINKS)
        tenants = self.lab.spawn([sys.executable, "-m", "lab.many_tenants"] + tenant_configs, f"many-{self.tag}-tenants", True)
        waited = 0.0
        while True:
            status = await fetch_status(self.lab.reactor, metrics)
            healthy = [link for link in status["links"] if link["healthy"]]
            if len(healthy) == LINKS:
                break
            self.assertTrue(tenants.running, tenants.output[-2000:])
            self.assertLess(waited, 180, f"{len(healthy)} of {LINKS} links healthy")
            await task.deferLater(self.lab.reactor, 1.0, lambda: None)
            waited += 1.0
        self.assertEqual(len({link["session"] for link in status["links"]}), LINKS)
        control, tenant = await self.peers()
        for index in (0, LINKS - 1):
            await tenant.request("server", name=f"s{index}", topic=f"agent-{index}", server=f"s{index}")
        await task.deferLater(self.lab.reactor, 0.5, lambda: None)
        for index in (0, LINKS - 1):
            reply = await control.request("call", topic=f"agent-{index}", method="echo", kwargs={"link": index})
            self.assertEqual(reply["server"], f"s{index}")
