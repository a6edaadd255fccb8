"""
Tenant halves that follow the routers, end to end.

One control half (as root, dropping to an unprivileged user after starting
its spawner) serves a configured link, "steady", whose tenant half it
supervises and over which casts flow for the whole test.  Then, with real
network namespaces, a tenant RabbitMQ (a vhost per link) and real processes:

 - 20 links are added with C{msgmux link add}, each with a tenant half in a
   namespace of its own; all must turn healthy (the canary went round);
 - a refused add changes nothing, and a tenant user cannot use the admin
   socket;
 - kill -9 of the steady link's tenant half: it is restarted, healthy again;
 - C{ip netns delete} of one namespace: its half is stopped and reported
   C{namespace-gone};
 - C{msgmux link remove}: the half is stopped, the socket gone, the link
   gone from the status;
 - the control half restarts: the added links come back from the state
   file;
 - and not one cast on the steady link is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any

from twisted.internet import defer, threads

from lab.fleet import TENANT_USER, Fleet, toml_table, wait_for
from lab.peer import OsloPeer
from msgmux.cli import fetch_status
from msgmux.tenantchild import NICENESS
from tests.integration.support import LabTestCase

LINKS = 20
#: Casts per round of steady traffic, and their rate.
ROUND, RATE = 40, 40.0


class SteadyTraffic:
    """Rounds of casts on one link until stopped; remembers what was sent."""

    def __init__(self, peer: OsloPeer, topic: str) -> None:
        self.peer = peer
        self.topic = topic
        self.sent: set[int] = set()
        self.failed: list[Any] = []
        self._running = True
        self.done = defer.Deferred.fromCoroutine(self._pump())

    async def _pump(self) -> None:
        first = 0
        while self._running:
            results = await self.peer.request(
                "load", kind="cast", topic=self.topic, method="echo", count=ROUND, rate=RATE, first=first, timeout=20
            )
            self.sent.update(index for index, ok, _, _ in results if ok)
            self.failed += [result for result in results if not result[1]]
            first += ROUND

    async def stop(self) -> None:
        self._running = False
        await self.done


class LifecycleTests(LabTestCase):
    timeout = 600

    async def status(self, fleet: Fleet) -> dict[str, Any]:
        return await fetch_status(self.lab.reactor, fleet.metrics)

    async def healthy(self, fleet: Fleet, names: set[str], timeout: float = 90) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            try:
                document = await self.status(fleet)
            except Exception:
                return None  # not listening yet
            good = {link["link"] for link in document["links"] if link.get("healthy")}
            return document if names <= good else None

        document: dict[str, Any] = await wait_for(self.lab.reactor, f"links {sorted(names)} healthy", check, timeout)
        return document

    def half(self, document: dict[str, Any], name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = next((half for half in document.get("tenant_halves", []) if half["link"] == name), None)
        return found

    def known_half(self, document: dict[str, Any], name: str) -> dict[str, Any]:
        found = self.half(document, name)
        assert found is not None, f"no tenant half of {name} in the status"
        return found

    async def tear_down(self, fleet: Fleet) -> None:
        for process in (fleet.control, fleet.forwarder):
            if process is not None and process.running:
                await process.stop()
        await threads.deferToThread(fleet.destroy)

    async def test_links_follow_routers(self) -> None:
        fleet = Fleet(self.lab, f"lc{self.tag[:6]}", LINKS + 1)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.tear_down(fleet)))
        await threads.deferToThread(fleet.create)
        await fleet.start_forwarder()

        # The configured link with steady traffic; its tenant half is supervised too.
        steady = fleet.link_table(LINKS, {"name": "steady", "socket": f"{fleet.sockets}/steady.sock", "down": [{"topic": "steady"}]})
        config = fleet.control_config(self.control_vhost, toml_table(steady, "[[control.links]]", "control.links."))
        notify = self.systemd_socket(fleet)
        control = fleet.spawn_control(
            config, f"lc-{self.tag}-control", {"NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "1000000"}
        )
        await self.healthy(fleet, {"steady"})
        control_peer = self.lab.spawn_peer("control", self.control_vhost)
        tenant_peer = self.lab.spawn_peer("tenant", fleet.vhosts[LINKS])
        await control_peer.ready
        await tenant_peer.ready
        await tenant_peer.request("server", name="steady", topic="steady")
        traffic = SteadyTraffic(control_peer, "steady")

        # The control half does not keep root; its spawner does, and inherits
        # nothing of systemd's.
        with open(f"/proc/{self.control_pid(control)}/status") as f:
            self.assertRegex(f.read(), r"\nUid:\t65534\t65534\t65534\t65534\n")
        document = await self.status(fleet)
        with open(f"/proc/{document['spawner']['pid']}/environ", "rb") as f:
            self.assertEqual(sorted(item.split(b"=")[0] for item in f.read().split(b"\0") if item), [b"PATH", b"PYTHONPATH"])
        # systemd heard READY=1, and the watchdog pings every half second.
        await wait_for(self.lab.reactor, "the watchdog", lambda: self.notified(notify, "WATCHDOG=1", 3), 10)
        self.assertIn("READY=1\nSTATUS=serving 1 links", self.notifications)

        # 20 links added at run time, through the command.
        names = {f"l{index:03d}" for index in range(LINKS)}
        for index in range(LINKS):
            result = await threads.deferToThread(fleet.cli, "add", fleet.link_toml(fleet.link_table(index)))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(f"link l{index:03d} added", result.stdout)
        document = await self.healthy(fleet, names | {"steady"})
        for name in names:
            half = self.half(document, name)
            assert half is not None
            self.assertEqual(half["state"], "running")
            self.assert_in_namespace(half["pid"], fleet.namespaces[int(name[1:])])

        # A refused add changes nothing; its error names the key, as the file's would.
        with open(f"{fleet.state}/links.json", "rb") as f:
            stored = f.read()
        bad = fleet.link_table(LINKS - 1, {"name": "bad", "socket": f"{fleet.sockets}/bad.sock", "down": [{"topic": ""}]})
        result = await threads.deferToThread(fleet.cli, "add", fleet.link_toml(bad))
        self.assertEqual(result.returncode, 1)
        self.assertIn("bad.toml: down[0].topic: must be 1-160 characters", result.stderr)
        with open(f"{fleet.state}/links.json", "rb") as f:
            self.assertEqual(f.read(), stored)
        self.assertFalse(os.path.exists(f"{fleet.sockets}/bad.sock"))
        listing = await threads.deferToThread(fleet.cli, "list")
        self.assertEqual(len(listing.stdout.splitlines()), LINKS + 2, listing.stdout)
        # The tenant halves' user cannot reach the admin socket.
        outsider = await threads.deferToThread(
            subprocess.run,
            ["runuser", "-u", TENANT_USER, "--", "socat", "-", f"UNIX-CONNECT:{fleet.run}/admin.sock"],
            input='{"command": "list"}\n',
            capture_output=True,
            text=True,
        )
        self.assertNotEqual(outsider.returncode, 0)
        self.assertIn("Permission denied", outsider.stderr)

        # kill -9 of the steady link's tenant half, under traffic.
        killed = self.half(await self.status(fleet), "steady")
        assert killed is not None
        os.kill(killed["pid"], signal.SIGKILL)

        async def restarted() -> dict[str, Any] | None:
            half = self.half(await self.status(fleet), "steady")
            return half if half and half["state"] == "running" and half["pid"] != killed["pid"] else None

        half = await wait_for(self.lab.reactor, "steady restarted", restarted, 30)
        self.assertEqual((half["restarts"], half["last_exit"], half["last_reason"]), (1, "killed by signal 9", "exited unexpectedly"))
        await self.healthy(fleet, {"steady"})

        # A router goes away: its namespace is deleted.
        gone = "l005"
        gone_pid = self.known_half(await self.status(fleet), gone)["pid"]
        await threads.deferToThread(subprocess.run, ["ip", "netns", "delete", fleet.namespaces[5]], check=True)

        async def namespace_gone() -> dict[str, Any] | None:
            half = self.half(await self.status(fleet), gone)
            return half if half and half["state"] == "namespace-gone" else None

        half = await wait_for(self.lab.reactor, f"{gone} namespace-gone", namespace_gone, 30)
        self.assertEqual((half["pid"], half["last_reason"]), (None, "namespace-gone"))
        self.assertFalse(self.alive(gone_pid))

        # A link removed with the command: drained, half stopped, socket gone.
        removed = "l007"
        removed_pid = self.known_half(await self.status(fleet), removed)["pid"]
        result = await threads.deferToThread(fleet.cli, "remove", removed)
        self.assertEqual(result.returncode, 0, result.stderr)
        document = await self.status(fleet)
        self.assertNotIn(removed, {link["link"] for link in document["links"]})
        self.assertIsNone(self.half(document, removed))
        self.assertFalse(os.path.exists(f"{fleet.sockets}/{removed}.sock"))
        self.assertFalse(self.alive(removed_pid))
        result = await threads.deferToThread(fleet.cli, "remove", "steady")
        self.assertEqual(result.returncode, 1)
        self.assertIn("is in the configuration file", result.stderr)

        # Restart the control half: the added links come back from the state file.
        pids = [half["pid"] for half in document["tenant_halves"] if half["pid"]]
        await self.notified(notify, "", 0)  # room in the socket's short queue for STOPPING=1
        await control.stop()
        self.assertIn("msgmux stopped", control.log())  # a clean stop (twistd ends by re-raising SIGTERM)
        await self.notified(notify, "STOPPING=1", 1)
        self.assertIn("STOPPING=1", self.notifications)
        self.assertEqual([pid for pid in pids if self.alive(pid)], [])
        control = fleet.spawn_control(config, f"lc-{self.tag}-control-2")
        back = names - {gone, removed}
        document = await self.healthy(fleet, back | {"steady"})
        self.assertEqual({link["link"] for link in document["links"]}, back | {gone, "steady"})
        # A fresh control half has never seen that namespace: it waits for it.
        self.assertEqual(self.known_half(document, gone)["state"], "waiting-for-namespace")
        self.assertIn("restored from", control.log())

        # Nothing lost on the steady link, throughout.
        await traffic.stop()
        self.assertEqual(traffic.failed, [])
        self.assertGreater(len(traffic.sent), 0)

        async def all_received() -> set[int] | None:
            received = {record["kwargs"]["i"] for record in await tenant_peer.request("received", name="steady")}
            return received if traffic.sent <= received else None

        try:
            await wait_for(self.lab.reactor, "every steady cast received", all_received, 60)
        except AssertionError:
            received = {record["kwargs"]["i"] for record in await tenant_peer.request("received", name="steady")}
            self.fail(f"lost {len(traffic.sent - received)} of {len(traffic.sent)} casts: {sorted(traffic.sent - received)[:20]}")

    def systemd_socket(self, fleet: Fleet) -> socket.socket:
        """A datagram socket standing in for systemd's NOTIFY_SOCKET, writable by the control half's user."""
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(f"{fleet.run}/notify.sock")
        os.chmod(f"{fleet.run}/notify.sock", 0o666)
        receiver.setblocking(False)
        self.notifications: list[str] = []
        return receiver

    async def notified(self, receiver: socket.socket, message: str, count: int) -> bool:
        while True:
            try:
                self.notifications.append(receiver.recv(4096).decode())
            except BlockingIOError:
                return self.notifications.count(message) >= count

    def control_pid(self, control: Any) -> int:
        pid: int = control.transport.pid
        return pid

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"

    def assert_in_namespace(self, pid: int, namespace: str) -> None:
        """The process runs in that network namespace, as the tenant user, nicer than the control half."""
        self.assertEqual(os.stat(f"/proc/{pid}/ns/net").st_ino, os.stat(f"/run/netns/{namespace}").st_ino)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, pid), os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        self.assertRegex(status, r"\nUid:\t1\t1\t1\t1\n")
        self.assertRegex(status, r"\nGroups:\t *\n")
        self.assertRegex(status, r"\nCapEff:\t0+\n")
        self.assertRegex(status, r"\nNoNewPrivs:\t1\n")

