"""
Tests for the spawner's command protocol (L{msgmux.spawnproto}) and its
decisions (L{msgmux.spawner.Spawner}), with fake fork, kill and clock: what
it obeys, what it refuses, and what it reports.  Forking real halves into
namespaces is covered by C{tests.integration.test_lifecycle}.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import SupervisionConfig, TenantConfig, TenantSpec
from msgmux.spawner import Spawner
from msgmux.spawnproto import (
    MAX_LINE,
    Exited,
    ProtocolError,
    Ready,
    Refused,
    Start,
    Started,
    Stop,
    decode_command,
    decode_event,
    encode,
)

TENANT = {
    "namespace": "qrouter-1",
    "transport_url": "rabbit://t:secret@127.0.0.1:5672/v1",
    "user": "nobody",
    "group": "nogroup",
}


def start(link: str = "r1", **changes: Any) -> bytes:
    tenant = dict(TENANT, **changes)
    return encode(Start(link, f"/run/msgmux/{link}.sock", {k: v for k, v in tenant.items() if v is not None}))


class ProtocolTests(SynchronousTestCase):
    def test_round_trips(self) -> None:
        """Every command and event decodes to what was encoded."""
        command = Start("r1", "/run/r1.sock", dict(TENANT))
        decoded = decode_command(encode(command))
        assert isinstance(decoded, Start)
        self.assertEqual((decoded, decoded.tenant), (command, TENANT))
        self.assertEqual(decode_command(encode(Stop("r1", 2.5))), Stop("r1", 2.5))
        for event in (Ready(1), Started("r1", 2), Exited("r1", 2, 0, None), Exited("r1", 2, None, 9), Refused("", "x")):
            self.assertEqual(decode_event(encode(event)), event)

    def test_malformed_commands(self) -> None:
        """Anything but a well-formed start or stop is a ProtocolError."""
        for line in (
            b"",
            b"{",
            b"[]",
            b'{"type": "exec", "argv": ["/bin/sh"]}',
            b'{"type": "start", "link": "r1", "socket": "/s"}',
            b'{"type": "start", "link": 1, "socket": "/s", "tenant": {}}',
            b'{"type": "start", "link": "r1", "socket": "/s", "tenant": {}, "uid": 0}',
            b'{"type": "stop", "link": "r1", "timeout": true}',
            b'{"type": "stop", "link": "r1", "timeout": 1e9}',
            b'{"type": "stop", "link": "r1"}',
            b"[" * 100000,
        ):
            self.assertRaises(ProtocolError, decode_command, line)

    def test_malformed_events(self) -> None:
        for line in (b'{"type": "exited", "link": "r1", "pid": 1, "code": true, "signal": null}', b'{"type": "x"}', b"1"):
            self.assertRaises(ProtocolError, decode_event, line)

    def test_too_long(self) -> None:
        self.assertRaises(ProtocolError, encode, Start("r1", "/s", {"x": "y" * MAX_LINE}))
        self.assertRaises(ProtocolError, decode_command, b" " * (MAX_LINE + 1))


class SpawnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.netns = self.mktemp()
        os.makedirs(self.netns)
        open(os.path.join(self.netns, "qrouter-1"), "w").close()
        self.sent: list[Any] = []
        self.forked: list[tuple[TenantSpec, TenantConfig, str, int, int]] = []
        self.killed: list[tuple[int, int]] = []
        self.now = 100.0
        self.spawner = Spawner(
            SupervisionConfig(users=("nobody",), groups=("nogroup",)),
            lambda line: self.sent.append(decode_event(line)),
            self.fork,
            lambda pid, number: self.killed.append((pid, number)),
            lambda: self.now,
            netns_dir=self.netns,
            max_halves=3,
        )

    def fork(self, spec: TenantSpec, config: TenantConfig, path: str, uid: int, gid: int) -> int:
        self.forked.append((spec, config, path, uid, gid))
        return 1000 + len(self.forked)

    def refusal(self) -> str:
        event = self.sent[-1]
        assert isinstance(event, Refused), event
        reason: str = event.reason
        return reason

    def test_start(self) -> None:
        """A valid start forks a half with the checked settings and reports its pid."""
        self.spawner.received(start())
        [(spec, config, path, uid, gid)] = self.forked
        self.assertEqual((spec.namespace, spec.user, spec.group), ("qrouter-1", "nobody", "nogroup"))
        self.assertEqual((config.link, config.socket, config.broker.virtual_host), ("r1", "/run/msgmux/r1.sock", "v1"))
        self.assertEqual(config.broker.hosts[0].password, "secret")
        self.assertEqual((path, uid, gid), (os.path.join(self.netns, "qrouter-1"), 65534, 65534))
        self.assertEqual(self.sent, [Started("r1", 1001)])

    def test_refusals_name_the_key(self) -> None:
        """The spawner re-checks every setting with the configuration's rules and messages."""
        cases = [
            (start(user="root"), "spawner: tenant.user: must not be root (uid 0): a tenant half is assumed compromised"),
            (start(user="daemon"), "spawner: tenant.user: 'daemon' is not one of control.supervision.users"),
            (start(group="root"), "spawner: tenant.group: must not be the root group (gid 0)"),
            (start(namespace="../../proc/1/ns/net"), "spawner: tenant.namespace: must be a network namespace name"),
            (start(transport_url="http://x"), "spawner: tenant.transport_url: must start with rabbit://"),
            (start(user=None), "spawner: tenant.user: is required"),
            (start(shell="/bin/sh"), "spawner: tenant.shell: is not a known option"),
            (start("../x"), "spawner: name: must be 1-63 letters"),
            (encode(Start("r1", "relative.sock", dict(TENANT))), "spawner: socket: must be an absolute path"),
            (start(namespace="qrouter-2"), "no network namespace 'qrouter-2'"),
        ]
        for line, reason in cases:
            self.spawner.received(line)
            self.assertTrue(self.refusal().startswith(reason), (reason, self.refusal()))
        self.assertEqual(self.forked, [])

    def test_internal_error(self) -> None:
        """A request that trips an unexpected error is refused; the spawner goes on."""

        def broken(*args: Any) -> int:
            raise RuntimeError("boom")

        self.spawner._fork = broken
        err = self.patch_stderr()
        self.spawner.received(start())
        self.assertEqual(self.refusal(), "internal error: RuntimeError")
        self.assertIn("boom", err.getvalue())

    def patch_stderr(self) -> io.StringIO:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        return err

    def test_malformed(self) -> None:
        self.spawner.received(b'{"type": "exec"}')
        self.assertIn("malformed command", self.refusal())
        self.assertEqual(self.forked, [])

    def test_one_half_per_link(self) -> None:
        self.spawner.received(start())
        self.spawner.received(start())
        self.assertEqual(self.refusal(), "its tenant half already runs as pid 1001")
        self.assertEqual(len(self.forked), 1)

    def test_bounded(self) -> None:
        """A spawner runs at most max_halves halves."""
        for name in ("a", "b", "c", "d"):
            self.spawner.received(start(name))
        self.assertEqual(self.refusal(), "this spawner already runs 3 tenant halves")
        self.assertEqual(len(self.forked), 3)

    def test_stop_escalates(self) -> None:
        """Stop sends SIGTERM, then SIGKILL once the timeout passed; the exit is reported."""
        self.spawner.received(start())
        self.spawner.received(encode(Stop("r1", 5.0)))
        self.assertEqual(self.killed, [(1001, 15)])
        self.assertEqual(self.spawner.tick(), 5.0)
        self.now += 5.0
        self.spawner.tick()
        self.assertEqual(self.killed, [(1001, 15), (1001, 9)])
        self.spawner.received(encode(Stop("r1", 5.0)))
        self.assertEqual(len(self.killed), 2)
        self.spawner.reaped(1001, 9)
        self.assertEqual(self.sent[-1], Exited("r1", 1001, None, 9))
        self.assertEqual(self.spawner.children, {})
        self.assertIsNone(self.spawner.tick())

    def test_exit_reported(self) -> None:
        self.spawner.received(start())
        self.spawner.reaped(1001, 3 << 8)
        self.assertEqual(self.sent[-1], Exited("r1", 1001, 3, None))
        self.spawner.reaped(4242, 0)  # not a half: nothing to say
        self.assertEqual(len(self.sent), 2)

    def test_stop_unknown(self) -> None:
        self.spawner.received(encode(Stop("r9", 1.0)))
        self.assertEqual(self.sent, [Refused("r9", "no tenant half runs for this link")])

    def test_stop_all(self) -> None:
        self.spawner.received(start("a"))
        self.spawner.received(start("b"))
        self.spawner.stop_all(1.0)
        self.assertEqual(sorted(self.killed), [(1001, 15), (1002, 15)])

    def test_secret_not_in_repr(self) -> None:
        """A start command's repr (logged on errors) leaves out the tenant table with its password."""
        self.assertNotIn("secret", repr(decode_command(start())))
        self.assertIn("secret", json.dumps(TENANT))
