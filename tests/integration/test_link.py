"""
The link between real halves: it comes up across the namespace boundary,
survives garbage on the socket, and bad configurations stop twistd before
anything starts.
"""

from __future__ import annotations

import os
import socket
import stat
import struct

from twisted.internet import threads

from lab.lab import TWISTD
from tests.integration.support import LabTestCase

ROUTES = """
down = [ { topic = "l3_agent", servers = ["agent-1"], fanout = true } ]
up = [ { topic = "q-reports", methods = ["report_state"] } ]
"""


class LinkUpTests(LabTestCase):
    async def test_link_comes_up(self) -> None:
        """Both halves start as twistd processes, handshake and open their broker channels."""
        control, tenant = await self.start_link(ROUTES)
        log = control.log()
        self.assertIn("Link tenant-a: session", log)
        # SO_PEERCRED: the real process on the other end of the socket.
        self.assertIn(f"tenant half connected (pid {tenant.transport.pid}, uid {os.getuid()}, gid {os.getgid()})", log)
        self.assertIn("Connected to control broker", log)
        self.assertIn("Connected to tenant broker", tenant.log())
        mode = stat.S_IMODE(os.stat(self.socket_path("tenant-a")).st_mode)
        self.assertEqual(mode, 0o660)

    async def test_failover_to_the_next_broker(self) -> None:
        """A control transport_url whose first host is down: the control half moves on to the next and the link comes up."""
        from tests.integration.support import control_config

        path = control_config(self.lab, self.control_vhost, self.socket_path("tenant-a"), "tenant-a", ROUTES)
        with open(path) as f:
            text = f.read()
        # Port 1 on loopback refuses connections: a dead first broker.
        text = text.replace("rabbit://guest:guest@127.0.0.1:5672/", "rabbit://guest:guest@127.0.0.1:1,127.0.0.1:5672/")
        self.assertIn("127.0.0.1:1,", text)
        with open(path, "w") as f:
            f.write(text)
        control = self.lab.spawn_half(path, f"failover-{self.tag}-control", in_tenant_network=False)
        await self.lab.wait_for_log(control, "Connected to control broker at 127.0.0.1:5672")
        from tests.integration.support import tenant_config

        self.lab.spawn_half(
            tenant_config(self.lab, self.tenant_vhost, self.socket_path("tenant-a"), "tenant-a"),
            f"failover-{self.tag}-tenant",
            in_tenant_network=True,
        )
        await self.lab.wait_for_log(control, "control broker channel ready")

    async def test_tenant_network_is_isolated(self) -> None:
        """The tenant namespace has only loopback, and its 127.0.0.1:5672 is a broker without the control vhost."""
        import subprocess

        links = await threads.deferToThread(
            lambda: subprocess.run(self.lab.namespace.argv(["ip", "-o", "link"]), capture_output=True, text=True).stdout
        )
        self.assertEqual([line.split(":")[1].strip() for line in links.splitlines()], ["lo"])
        vhosts = await threads.deferToThread(self.lab.tenant_node.ctl, "list_vhosts")
        self.assertIn(self.tenant_vhost, vhosts)
        self.assertNotIn(self.control_vhost, vhosts)

    async def test_garbage_on_socket(self) -> None:
        """Garbage from a local peer is a logged protocol violation; the real tenant half still connects."""
        control = self.lab.spawn_half(
            self._control_only_config(), f"garbage-{self.tag}-control", in_tenant_network=False
        )
        await self.lab.wait_for_log(control, "listening on")

        def send_garbage() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.socket_path("tenant-a"))
                s.sendall(struct.pack(">I", 11) + b"not cbor!!!")
                s.settimeout(5)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return data
                    data += chunk

        answer = await threads.deferToThread(send_garbage)
        self.assertIn(b"bad-frame", answer)
        await self.lab.wait_for_log(control, "protocol violation (bad-frame)")
        self.assertNotIn("Traceback", control.log())
        self.assertTrue(control.running)

    def _control_only_config(self) -> str:
        from tests.integration.support import control_config

        return control_config(self.lab, self.control_vhost, self.socket_path("tenant-a"), "tenant-a", ROUTES)


class BadConfigTests(LabTestCase):
    async def _run_twistd(self, config_text: str) -> tuple[int, str]:
        path = self.lab.write(f"bad-{self.tag}.toml", config_text)

        def run() -> tuple[int, str]:
            import subprocess

            result = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "msgmux", "--config", path], capture_output=True, text=True, timeout=60
            )
            return result.returncode, result.stdout + result.stderr

        return await threads.deferToThread(run)

    async def test_bad_key(self) -> None:
        """A config error names the file and key, exits non-zero, prints no traceback."""
        code, output = await self._run_twistd(
            '[tenant]\ntransport_url = "rabbit://h/"\nsocket = "relative.sock"\n'
        )
        self.assertNotEqual(code, 0)
        self.assertIn("tenant.socket: must be an absolute path", output)
        self.assertIn(f"bad-{self.tag}.toml", output)
        self.assertNotIn("Traceback", output)

    async def test_unparseable(self) -> None:
        """Invalid TOML is reported with the file name and no traceback."""
        code, output = await self._run_twistd("[control\n")
        self.assertNotEqual(code, 0)
        self.assertIn("is not valid TOML", output)
        self.assertNotIn("Traceback", output)
