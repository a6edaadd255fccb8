"""
Tests for L{msgmux.supervisor}: restarts with backoff, namespaces that go
and come back, removal, and reports, driven by a L{task.Clock} and a recording
spawner channel (L{tests.doubles.RecordingSpawner}).
"""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import BrokerConfig, BrokerHost, LinkConfig, RpcRule, SupervisionConfig, TenantSpec
from msgmux.spawnproto import Exited, Ready, Refused, Started
from msgmux.supervisor import HalfState, TenantSupervisor
from tests.doubles import RecordingSpawner

SUPERVISION = SupervisionConfig(
    users=("nobody",), groups=("nogroup",), restart_delay=1.0, max_restart_delay=8.0, stable_after=30.0, namespace_poll=2.0
)


def link(name: str = "r1", namespace: str = "qrouter-1", exchange: str = "openstack") -> LinkConfig:
    broker = BrokerConfig(hosts=(BrokerHost("127.0.0.1", 5672, "guest", "guest"),), virtual_host="/", exchange=exchange)
    spec = TenantSpec(namespace=namespace, user="nobody", group="nogroup", broker=broker)
    return LinkConfig(name=name, socket=f"/run/msgmux/{name}.sock", tenant=spec)


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.spawner = RecordingSpawner()
        self.namespaces = {"qrouter-1"}
        self.supervisor = TenantSupervisor(SUPERVISION, self.spawner, self.clock, self.namespaces.__contains__)
        self.supervisor.start()
        self.supervisor.event(Ready(99))

    def running(self, name: str = "r1", pid: int = 100) -> None:
        self.supervisor.add(link(name))
        self.supervisor.event(Started(name, pid))

    def state(self, name: str = "r1") -> HalfState:
        return self.supervisor.halves[name].state

    def test_start(self) -> None:
        """A link whose namespace exists gets its half started, and reported running once started."""
        self.supervisor.add(link())
        self.assertEqual(self.spawner.commands, [("start", "r1")])
        self.assertEqual(self.state(), HalfState.STARTING)
        self.supervisor.event(Started("r1", 100))
        self.clock.advance(5)
        [status] = self.supervisor.status()
        self.assertEqual(
            status,
            {
                "link": "r1",
                "namespace": "qrouter-1",
                "state": "running",
                "pid": 100,
                "restarts": 0,
                "uptime": 5.0,
                "last_exit": None,
                "last_reason": None,
            },
        )

    def test_only_the_supervised_half_may_connect(self) -> None:
        """
        Halves share users and groups: for a supervised link, only the pid
        the supervisor started may take the session; links it does not
        supervise are left to their sockets' permissions.
        """
        self.running("r1", pid=100)
        self.assertIsNone(self.supervisor.peer_problem("r1", (100, 65534, 65534)))
        self.assertIn("only its tenant half (pid 100)", self.supervisor.peer_problem("r1", (101, 65534, 65534)) or "")
        self.assertIsNotNone(self.supervisor.peer_problem("r1", None))
        self.assertIsNone(self.supervisor.peer_problem("other", (101, 0, 0)))
        self.supervisor.event(Exited("r1", 100, 1, None))
        self.assertIsNotNone(self.supervisor.peer_problem("r1", (100, 65534, 65534)))

    def test_restart_with_backoff(self) -> None:
        """Each exit in a row doubles the delay, up to the ceiling; restarts are counted."""
        self.running()
        delays = []
        for attempt in range(6):
            self.supervisor.event(Exited("r1", 100 + attempt, None, 9))
            self.assertEqual(self.state(), HalfState.RESTARTING)
            call = self.supervisor.halves["r1"].restart_call
            assert call is not None
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
            self.assertEqual(self.spawner.commands[-1], ("start", "r1"))
            self.supervisor.event(Started("r1", 101 + attempt))
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        [status] = self.supervisor.status()
        self.assertEqual((status["restarts"], status["last_exit"], status["last_reason"]), (6, "killed by signal 9", "exited unexpectedly"))

    def test_backoff_resets_after_a_stable_run(self) -> None:
        """A half that ran longer than stable_after is restarted after the first delay again."""
        self.running()
        self.supervisor.event(Exited("r1", 100, 1, None))
        self.clock.advance(1.0)
        self.supervisor.event(Started("r1", 101))
        self.clock.advance(31)
        self.supervisor.event(Exited("r1", 101, 1, None))
        call = self.supervisor.halves["r1"].restart_call
        assert call is not None
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.0)
        self.assertEqual(self.supervisor.status()[0]["last_exit"], "exit code 1")

    def test_refused_start_is_retried(self) -> None:
        """A start the spawner refuses is retried with backoff, and the reason is reported."""
        self.supervisor.add(link())
        self.supervisor.event(Refused("r1", "no user 'x'"))
        self.assertEqual(self.state(), HalfState.RESTARTING)
        self.assertEqual(self.supervisor.status()[0]["last_reason"], "start refused: no user 'x'")
        self.clock.advance(1.0)
        self.assertEqual(self.spawner.commands, [("start", "r1"), ("start", "r1")])

    def test_remove_stops_and_forgets(self) -> None:
        """Removing a link stops its half; it is forgotten once it exited."""
        self.running()
        done = self.supervisor.remove("r1")
        self.assertEqual(self.spawner.commands[-1], ("stop", "r1"))
        self.assertNoResult(done)
        self.assertEqual(self.state(), HalfState.STOPPING)
        self.supervisor.event(Exited("r1", 100, 0, None))
        self.successResultOf(done)
        self.assertEqual(self.supervisor.status(), [])

    def test_remove_while_starting(self) -> None:
        """A half removed before its start was confirmed is stopped as soon as its pid is known."""
        self.supervisor.add(link())
        done = self.supervisor.remove("r1")
        self.assertEqual(self.spawner.commands, [("start", "r1")])
        self.supervisor.event(Started("r1", 100))
        self.assertEqual(self.spawner.commands, [("start", "r1"), ("stop", "r1")])
        self.supervisor.event(Exited("r1", 100, 0, None))
        self.successResultOf(done)

    def test_remove_while_restarting(self) -> None:
        """A half waiting for its restart is forgotten at once; the restart never happens."""
        self.running()
        self.supervisor.event(Exited("r1", 100, 1, None))
        self.successResultOf(self.supervisor.remove("r1"))
        self.clock.advance(100)
        self.assertEqual(self.spawner.commands, [("start", "r1")])

    def test_stop_crossing_an_exit(self) -> None:
        """A stop refused because the half just exited still completes the removal."""
        self.running()
        done = self.supervisor.remove("r1")
        self.supervisor.event(Refused("r1", "no tenant half runs for this link"))
        self.successResultOf(done)

    def test_waiting_for_namespace(self) -> None:
        """A half whose namespace does not exist yet starts when it appears."""
        self.supervisor.add(link(namespace="qrouter-2"))
        self.assertEqual((self.spawner.commands, self.state()), ([], HalfState.WAITING_FOR_NAMESPACE))
        self.namespaces.add("qrouter-2")
        self.clock.advance(2.0)
        self.assertEqual(self.spawner.commands, [("start", "r1")])

    def test_namespace_gone_and_back(self) -> None:
        """A half whose namespace disappears is stopped and reported; it starts again when the namespace returns."""
        self.running()
        self.namespaces.clear()
        self.clock.advance(2.0)
        self.assertEqual(self.spawner.commands[-1], ("stop", "r1"))
        self.supervisor.event(Exited("r1", 100, 0, None))
        [status] = self.supervisor.status()
        self.assertEqual((status["state"], status["pid"], status["last_reason"]), ("namespace-gone", None, "namespace-gone"))
        self.clock.advance(10.0)
        self.assertEqual(len(self.spawner.commands), 2)
        self.namespaces.add("qrouter-1")
        self.clock.advance(2.0)
        self.assertEqual(self.spawner.commands[-1], ("start", "r1"))

    def test_namespace_gone_before_restart(self) -> None:
        """A half that crashed is not restarted into a namespace that is gone."""
        self.running()
        self.supervisor.event(Exited("r1", 100, 1, None))
        self.namespaces.clear()
        self.clock.advance(1.0)
        self.assertEqual(self.state(), HalfState.NAMESPACE_GONE)
        self.assertEqual(self.spawner.commands, [("start", "r1")])

    def test_removed_after_namespace_gone(self) -> None:
        """Removal during a namespace-gone stop wins: the half is forgotten when it exits."""
        self.running()
        self.namespaces.clear()
        self.clock.advance(2.0)
        done = self.supervisor.remove("r1")
        self.supervisor.event(Exited("r1", 100, 0, None))
        self.successResultOf(done)
        self.assertEqual(self.supervisor.halves, {})

    def test_stale_exit_ignored(self) -> None:
        """An exit report for another pid than the running one changes nothing."""
        self.running()
        self.supervisor.event(Exited("r1", 55, 1, None))
        self.assertEqual(self.state(), HalfState.RUNNING)

    def test_unknown_started_is_stopped(self) -> None:
        """A half the supervisor does not know about is stopped, never left running."""
        self.supervisor.event(Started("ghost", 7))
        self.assertEqual(self.spawner.commands, [("stop", "ghost")])

    def test_stop_all(self) -> None:
        """stop_all stops every half and fires once all have exited."""
        self.running("r1", 100)
        self.running("r2", 200)
        done = self.supervisor.stop_all()
        self.assertEqual(sorted(self.spawner.commands[-2:]), [("stop", "r1"), ("stop", "r2")])
        self.supervisor.event(Exited("r1", 100, 0, None))
        self.assertNoResult(done)
        self.supervisor.event(Exited("r2", 200, None, 15))
        self.successResultOf(done)

    def test_sync(self) -> None:
        """sync starts new supervised links, stops gone ones and restarts changed ones."""
        self.running("r1", 100)
        self.running("r2", 200)
        changed = link("r2", exchange="other")
        self.supervisor.sync([changed, link("r3"), LinkConfig(name="plain", socket="/run/p.sock")])
        self.assertEqual(
            self.spawner.commands[2:], [("stop", "r1"), ("stop", "r2"), ("start", "r3")]
        )
        self.supervisor.event(Exited("r2", 200, 0, None))
        self.assertEqual(self.spawner.commands[-1], ("start", "r2"))
        self.assertIs(self.supervisor.halves["r2"].link, changed)

    def test_sync_keeps_a_half_whose_routes_changed(self) -> None:
        """New routes alone do not restart the half (its session is renewed by the control half)."""
        self.running("r1", 100)
        rerouted = attrs.evolve(link("r1"), down=(RpcRule("l3_agent"),))
        self.supervisor.sync([rerouted])
        self.assertEqual(self.spawner.commands, [("start", "r1")])
        self.assertIs(self.supervisor.halves["r1"].link, rerouted)

    def test_add_twice_refused(self) -> None:
        self.supervisor.add(link())
        self.assertRaises(ValueError, self.supervisor.add, link())
        self.assertRaises(ValueError, self.supervisor.add, LinkConfig(name="plain", socket="/run/p.sock"))
