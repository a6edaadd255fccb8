"""
Tests for L{msgmux.spawnerclient}: how the control half starts the spawner
(what the new process inherits), and how it reads the spawner's events.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import BrokerConfig, BrokerHost, LinkConfig, SupervisionConfig, TenantSpec
from msgmux.spawnerclient import SpawnerProcess, SupervisorChannel
from msgmux.spawnproto import Exited, Ready, Start, Stop, decode_command, encode


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None, path: Any = None, childFDs: Any = None, **kw: Any) -> None:
        self.spawned.append({"protocol": protocol, "executable": executable, "args": args, "env": env, "path": path, "childFDs": childFDs})


class SpawnerProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.events: list[Any] = []
        self.lost: list[bool] = []
        self.process = SpawnerProcess(
            self.reactor,
            SupervisionConfig(users=("nobody", "daemon"), groups=("nogroup",)),
            self.events.append,
            lambda: self.lost.append(True),
            python="/opt/msgmux/bin/python",
        )
        os.environ["MSGMUX_TEST_SECRET"] = "x"
        self.addCleanup(os.environ.pop, "MSGMUX_TEST_SECRET")
        self.process.start()
        [self.spawned] = self.reactor.spawned
        [(_, _, factory)] = self.reactor.adoptedStreamConnections
        self.channel = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_what_the_spawner_inherits(self) -> None:
        """A fresh interpreter with the allow-lists, descriptor 3, and no environment but PATH and PYTHONPATH."""
        self.assertEqual(
            self.spawned["args"],
            ["/opt/msgmux/bin/python", "-m", "msgmux.spawner", "--fd", "3", "--user", "nobody", "--user", "daemon", "--group", "nogroup"]
            + ["--stop-timeout", "10.0"],
        )
        self.assertLessEqual(set(self.spawned["env"]), {"PATH", "PYTHONPATH"})
        self.assertEqual(sorted(self.spawned["childFDs"]), [0, 1, 2, 3])

    def test_events(self) -> None:
        self.channel.dataReceived(encode(Ready(77)) + encode(Exited("r1", 5, 1, None)) + b"garbage\n")
        self.assertEqual(self.events, [Ready(77), Exited("r1", 5, 1, None)])
        self.assertEqual(self.successResultOf(self.process.ready), 77)
        self.flushLoggedErrors()

    def test_commands(self) -> None:
        broker = BrokerConfig(hosts=(BrokerHost("127.0.0.1", 5672, "u", "p"),), virtual_host="/", exchange="openstack")
        table = {"namespace": "q", "transport_url": "rabbit://u:p@127.0.0.1/", "user": "nobody", "group": "nogroup"}
        link = LinkConfig(name="r1", socket="/run/r1.sock", tenant=TenantSpec("q", "nobody", "nogroup", broker, table=table))
        channel = SupervisorChannel(self.process)
        channel.start(link)
        channel.stop("r1", 3.0)
        first, second = self.transport.value().splitlines()
        start = decode_command(first)
        assert isinstance(start, Start)
        self.assertEqual((start.link, start.socket, start.tenant), ("r1", "/run/r1.sock", table))
        self.assertEqual(decode_command(second), Stop("r1", 3.0))

    def test_unexpected_exit(self) -> None:
        """A spawner that goes away unasked is reported once."""
        self.spawned["protocol"].processEnded(Failure(Exception()))
        self.channel.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.lost, [True])
        self.flushLoggedErrors()

    def test_stop(self) -> None:
        """Stopping closes the command socket and waits for the exit; nothing is reported as lost."""
        ended = self.process.stop()
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(ended)
        self.channel.connectionLost(Failure(ConnectionError()))
        self.spawned["protocol"].processEnded(Failure(Exception()))
        self.successResultOf(ended)
        self.assertEqual(self.lost, [])
