"""
Tests for L{msgmux.service.MsgmuxService} without brokers: reloads (SIGHUP)
and the stop run one at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import ControlConfig, load
from msgmux.service import MsgmuxService

CONFIG = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"

[[control.links]]
name = "tenant-a"
socket = "{directory}/tenant-a.sock"
"""


class ReloadOrderTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="msgmux-test-")  # short enough for Unix socket paths
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "msgmux.toml")
        with open(self.path, "w") as f:
            f.write(CONFIG.format(directory=directory))
        self.service = MsgmuxService(load(self.path), MemoryReactorClock())
        self.service.running = True  # as after startService, without listening or connecting
        self.applied: list[tuple[str, ControlConfig]] = []
        self.gates: list[defer.Deferred[None]] = []
        assert self.service.control is not None

        async def slow_reload(config: ControlConfig) -> None:
            """Stands in for ControlHalf.reload, which waits for removed links to drain."""
            self.applied.append(("start", config))
            gate: defer.Deferred[None] = defer.Deferred()
            self.gates.append(gate)
            await gate
            self.applied.append(("end", config))

        self.patch(self.service.control, "reload", slow_reload)

    def test_reloads_one_at_a_time(self) -> None:
        """A second SIGHUP during a reload waits for it, then applies the file as it is by then."""
        first = self.service.reload()
        with open(self.path, "a") as f:
            f.write('\n[[control.links]]\nname = "tenant-b"\nsocket = "/tmp/tenant-b.sock"\n')
        second = self.service.reload()
        self.assertEqual([step for step, _ in self.applied], ["start"])
        self.gates[0].callback(None)
        self.successResultOf(first)
        self.assertEqual([step for step, _ in self.applied], ["start", "end", "start"])
        self.assertEqual([link.name for link in self.applied[2][1].links], ["tenant-a", "tenant-b"])
        self.gates[1].callback(None)
        self.successResultOf(second)

    def test_reload_waiting_for_a_stop_does_nothing(self) -> None:
        """A reload queued behind the stop finds the service stopped and leaves it alone."""
        first = self.service.reload()
        self.service.running = False
        late = self.service.reload()
        self.gates[0].callback(None)
        self.successResultOf(first)
        self.successResultOf(late)
        self.assertEqual([step for step, _ in self.applied], ["start", "end"])
