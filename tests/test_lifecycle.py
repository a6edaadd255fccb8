"""
Tests for L{msgmux.lifecycle.ControlLifecycle} inside L{MsgmuxService},
on a memory reactor: what starts while root, what starts after, what a
reload may change, and what the metrics and status show.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from msgmux.config import load
from msgmux.control.listener import UnsafeSocketDirectory
from msgmux.service import MsgmuxService
from msgmux.spawnproto import Ready, Start, Started, decode_command, encode
from tests.test_spawnerclient import ProcessReactor

CONFIG = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"
admin_socket = "{directory}/admin.sock"
state_file = "{directory}/links.json"

[control.supervision]
users = ["nobody"]
groups = ["nogroup"]

[[control.links]]
name = "r1"
socket = "{directory}/r1.sock"

[control.links.tenant]
namespace = "msgmux-test-no-such-namespace"
transport_url = "rabbit://t:t@127.0.0.1:5672/"
user = "nobody"
group = "nogroup"
"""


class LifecycleServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "control.toml")
        with open(self.path, "w") as f:
            f.write(CONFIG.format(directory=self.directory))
        self.reactor = ProcessReactor()
        self.service = MsgmuxService(load(self.path), self.reactor)
        lifecycle = self.service.lifecycle
        assert lifecycle is not None and lifecycle.supervisor is not None
        self.lifecycle = lifecycle
        self.supervisor = lifecycle.supervisor

    def test_privileged_start(self) -> None:
        """While still root: the spawner is started and the admin socket bound; nothing else."""
        self.service.privilegedStartService()
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["args"][1:4], ["-m", "msgmux.spawner", "--fd"])
        [(path, _, _, mode, _)] = self.reactor.unixServers
        self.assertEqual((path, mode), (f"{self.directory}/admin.sock", 0o660))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_start_supervises_configured_links(self) -> None:
        """After the drop, a configured link with a tenant table is supervised (here its namespace is missing)."""
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertEqual(self.supervisor.status()[0]["state"], "waiting-for-namespace")
        self.assertEqual(len(self.reactor.spawned), 1)  # not started twice

    def test_admin_directory_owned_by_another_user(self) -> None:
        """
        Bound as root before twistd drops to msgmux's user, the admin
        socket's directory has its owner checked once msgmux runs as itself:
        another user's directory ends the start, naming the key.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root to give a directory to another user")
        admin = os.path.join(self.directory, "admin")
        os.mkdir(admin, 0o750)
        os.chown(admin, 4242, -1)
        with open(self.path, "w") as f:
            f.write(CONFIG.format(directory=self.directory).replace(f"{self.directory}/admin.sock", f"{admin}/admin.sock"))
        service = MsgmuxService(load(self.path), self.reactor)
        service.privilegedStartService()
        self.assertEqual([server[0] for server in self.reactor.unixServers], [f"{admin}/admin.sock"])
        error = self.assertRaises(UnsafeSocketDirectory, service.startService)
        self.addCleanup(service.stopService)
        self.assertEqual(str(error), f"admin_socket: {admin} is owned by uid 4242, not by root or msgmux (uid 0)")

    def test_start_command_reaches_the_spawner(self) -> None:
        """A supervised start goes out over the spawner's socket with the link's tenant table."""
        self.supervisor.namespace_exists = lambda name: True
        self.service.privilegedStartService()
        [(_, _, factory)] = self.reactor.adoptedStreamConnections
        channel = factory.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        command = decode_command(transport.value().splitlines()[0])
        assert isinstance(command, Start)
        self.assertEqual((command.link, command.socket, command.tenant["namespace"]), ("r1", f"{self.directory}/r1.sock", "msgmux-test-no-such-namespace"))
        channel.dataReceived(encode(Ready(7)) + encode(Started("r1", 4242)))
        status = self.service.collector.status()
        self.assertEqual(status["spawner"], {"pid": 7})
        self.assertEqual((status["tenant_halves"][0]["state"], status["tenant_halves"][0]["pid"]), ("running", 4242))
        registry = CollectorRegistry()
        registry.register(self.service.collector)
        text = generate_latest(registry).decode()
        self.assertIn('msgmux_tenant_half_up{link="r1"} 1.0', text)
        self.assertIn('msgmux_tenant_half_restarts_total{link="r1"} 0.0', text)
        self.assertIn('msgmux_tenant_half_state{link="r1",state="running"} 1.0', text)

    def test_reload_keeps_start_up_settings(self) -> None:
        """A reload cannot change who tenant halves run as: the spawner got that at start-up."""
        changed = load(self.path).control
        assert changed is not None
        changed = attrs.evolve(changed, supervision=attrs.evolve(changed.supervision, users=("daemon",)), admin_socket="/x.sock")
        pinned = self.lifecycle.pin(changed)
        assert not isinstance(pinned, str)
        self.assertEqual((pinned.supervision, pinned.admin_socket), (self.lifecycle.config.supervision, f"{self.directory}/admin.sock"))
