"""
Tests for the admin socket's protocol and its peer check (L{msgmux.admin}),
over L{StringTransport} with given credentials, and the peer check once
over a real Unix socket pair.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from msgmux.admin import AdminFactory, authorize, check_admin_directory, listen_admin, peer_groups
from msgmux.config import parse
from msgmux.control.listener import UnsafeSocketDirectory
from msgmux.linkadmin import LinkAdmin
from msgmux.linkstore import LinkStore
from tests.doubles import RecordingControlHalf
from tests.test_linkadmin import CONTROL, r1


class AuthorizeTests(SynchronousTestCase):
    def test_root(self) -> None:
        self.assertIsNone(authorize((10, 0, 0), (), None))

    def test_admin_group(self) -> None:
        """Members of the admin group pass, by primary or supplementary group."""
        self.assertIsNone(authorize((10, 1000, 50), (), 50))
        self.assertIsNone(authorize((10, 1000, 100), (7, 50), 50))

    def test_others_refused(self) -> None:
        self.assertEqual(
            authorize((10, 1000, 100), (7,), 50), "permission denied: uid 1000 is neither root nor in the admin group"
        )
        self.assertIsNotNone(authorize((10, 1000, 100), None, None))
        self.assertEqual(authorize(None, None, 50), "permission denied: the peer's credentials are unknown")

    def test_real_socket(self) -> None:
        """SO_PEERGROUPS reads this process's own groups over a socket pair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return ours

        groups = peer_groups(Transport())
        self.assertEqual(sorted(groups or ()), sorted(os.getgroups()))


class AdminProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, directory)
        config = parse(CONTROL.format(directory=directory)).control
        assert config is not None
        self.control = RecordingControlHalf(config)
        self.admin = LinkAdmin(
            self.control,
            LinkStore(os.path.join(directory, "links.json")),
            None,
            [],
            defer.DeferredLock().run,
            lambda f, *a: defer.maybeDeferred(f, *a),
        )

    def connect(self, credentials: tuple[int, int, int], groups: tuple[int, ...] = ()) -> tuple[Any, StringTransport]:
        factory = AdminFactory(self.admin, 50, credentials=lambda t: credentials, groups=lambda t: groups)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def ask(self, request: Any, credentials: tuple[int, int, int] = (1, 0, 0)) -> dict[str, Any]:
        protocol, transport = self.connect(credentials)
        protocol.dataReceived((request if isinstance(request, bytes) else json.dumps(request).encode()) + b"\n")
        lines = transport.value().splitlines()
        self.assertEqual(len(lines), 1)
        answer: dict[str, Any] = json.loads(lines[0])
        return answer

    def test_refused_peer(self) -> None:
        """A peer that is neither root nor in the admin group gets one refusal and is disconnected; nothing it sends is read."""
        protocol, transport = self.connect((10, 1000, 100), (7,))
        self.assertEqual(
            json.loads(transport.value()), {"ok": False, "error": "permission denied: uid 1000 is neither root nor in the admin group"}
        )
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(json.dumps({"command": "add", "link": r1()}).encode() + b"\n")
        self.assertEqual(self.control.calls, [])

    def test_admin_group_member(self) -> None:
        answer = self.ask({"command": "list"}, credentials=(10, 1000, 50))
        self.assertEqual([link["link"] for link in answer["links"]], ["static"])

    def test_add_remove(self) -> None:
        answer = self.ask({"command": "add", "link": r1(), "source": "r1.toml"})
        self.assertEqual((answer["ok"], answer["link"]["link"]), (True, "r1"))
        self.assertEqual(self.ask({"command": "show", "name": "r1"})["link"]["settings"], r1())
        self.assertEqual(self.ask({"command": "remove", "name": "r1"}), {"ok": True, "link": "r1", "removed": True})

    def test_errors(self) -> None:
        """Every bad request gets an answer saying what is wrong."""
        cases = [
            (b"{", "the request is not JSON"),
            (b"[]", "the request must be a JSON object"),
            ({"command": "reboot"}, "unknown command 'reboot' (add, remove, list, show)"),
            ({"command": "add", "link": r1(name="")}, "request: name: must be 1-63"),
            ({"command": "show", "name": "nope"}, "no link 'nope'"),
        ]
        for request, error in cases:
            answer = self.ask(request)
            self.assertFalse(answer["ok"])
            self.assertTrue(answer["error"].startswith(error), (error, answer))

    def test_several_requests_in_order(self) -> None:
        """Requests on one connection are answered one by one, in order."""
        protocol, transport = self.connect((1, 0, 0))
        lines = [{"command": "add", "link": r1()}, {"command": "list"}, {"command": "remove", "name": "r1"}, {"command": "list"}]
        protocol.dataReceived(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        answers = [json.loads(line) for line in transport.value().splitlines()]
        self.assertEqual([len(answer.get("links", [])) for answer in answers], [0, 2, 0, 1])

    def test_oversized_request(self) -> None:
        protocol, transport = self.connect((1, 0, 0))
        protocol.dataReceived(b"x" * (300 * 1024))
        self.assertIn(b"request longer than", transport.value())
        self.assertTrue(transport.disconnecting)


class AdminDirectoryTests(SynchronousTestCase):
    """
    Whoever can write in the admin socket's directory could plant a socket
    of their own there and be sent the tenant broker passwords of every
    C{msgmux link add}, or plant the socket's lock and keep msgmux from
    starting.
    """

    def directory(self, mode: int) -> str:
        path = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, path)
        os.chmod(path, mode)
        return path

    def factory(self, directory: str) -> AdminFactory:
        config = parse(CONTROL.format(directory=directory)).control
        assert config is not None
        admin = LinkAdmin(
            RecordingControlHalf(config),
            LinkStore(os.path.join(directory, "links.json")),
            None,
            [],
            defer.DeferredLock().run,
            lambda f, *a: defer.maybeDeferred(f, *a),
        )
        return AdminFactory(admin, None)

    def test_writable_by_others_is_not_bound(self) -> None:
        """A directory others can write is refused before anything is bound, naming the key."""
        directory = self.directory(0o777)
        os.symlink("1", os.path.join(directory, "admin.sock.lock"))
        reactor = MemoryReactor()
        path = os.path.join(directory, "admin.sock")
        error = self.assertRaises(UnsafeSocketDirectory, listen_admin, reactor, path, self.factory(directory))
        self.assertIn(f"admin_socket: {directory} is writable by group or others", str(error))
        self.assertEqual(reactor.unixServers, [])

    def test_private_directory_is_bound(self) -> None:
        """A directory only its owner can write is bound, with the socket's mode."""
        directory = self.directory(0o750)
        reactor = MemoryReactor()
        listen_admin(reactor, os.path.join(directory, "admin.sock"), self.factory(directory))
        [(path, _, _, mode, _)] = reactor.unixServers
        self.assertEqual((path, mode), (os.path.join(directory, "admin.sock"), 0o660))

    def test_owner_checked_unless_told_not_to(self) -> None:
        """Another user's directory is refused; root, before it knows msgmux's user, checks only who may write it."""
        if os.geteuid() != 0:
            raise SkipTest("needs root to give a directory to another user")
        directory = self.directory(0o750)
        os.chown(directory, 4242, -1)
        path = os.path.join(directory, "admin.sock")
        error = self.assertRaises(UnsafeSocketDirectory, check_admin_directory, path)
        self.assertIn("admin_socket:", str(error))
        self.assertIn("owned by uid 4242", str(error))
        check_admin_directory(path, owners=False)
