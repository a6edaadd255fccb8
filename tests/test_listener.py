"""
Tests for L{msgmux.control.listener}: a link socket is bound only in a
directory nobody else can write (as OpenSSH's StrictModes), with its mode,
and goes with its lock when the link stops.
"""

from __future__ import annotations

import os
import stat

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from msgmux.config import LinkConfig
from msgmux.control.listener import LinkListener, UnsafeSocketDirectory, check_socket_directory


class DirectoryTests(TestCase):
    def directory(self, mode: int) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        os.chmod(path, mode)
        return path

    def test_private_directory(self) -> None:
        """A directory only its owner (root or msgmux) can write is fine."""
        check_socket_directory(self.directory(0o750))

    def test_writable_by_others(self) -> None:
        """A directory others or the group can write is refused, even with the sticky bit."""
        for mode in (0o777, 0o770, 0o1777, 0o757):
            error = self.assertRaises(UnsafeSocketDirectory, check_socket_directory, self.directory(mode))
            self.assertIn("writable by group or others", str(error))

    def test_foreign_owner(self) -> None:
        """A directory owned by another user is refused."""
        path = self.directory(0o750)
        os.chown(path, 4242, -1)
        error = self.assertRaises(UnsafeSocketDirectory, check_socket_directory, path)
        self.assertIn("owned by uid 4242", str(error))

    def test_ancestor_writable_by_others(self) -> None:
        """An ancestor others can write (without the sticky bit) is refused: they could swap the directory."""
        parent = self.directory(0o777)
        child = os.path.join(parent, "sockets")
        os.mkdir(child, 0o750)
        error = self.assertRaises(UnsafeSocketDirectory, check_socket_directory, child)
        self.assertIn("above the socket", str(error))
        os.chmod(parent, 0o1777)  # like /tmp
        check_socket_directory(child)


class ListenTests(TestCase):
    def test_listen_and_stop(self) -> None:
        """The socket gets its mode; stopping removes it and its lock."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, 0o750)
        path = os.path.join(directory, "a.sock")
        listener = LinkListener(reactor, LinkConfig(name="a", socket=path, socket_mode=0o660), Factory.forProtocol(Protocol))
        listener.listen()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        self.assertTrue(os.path.lexists(path + ".lock"))
        d = listener.stop()

        def gone(_: object) -> None:
            self.assertFalse(os.path.exists(path))
            self.assertFalse(os.path.lexists(path + ".lock"))

        return defer.Deferred.fromCoroutine(d).addCallback(gone)

    def test_planted_lock_cannot_happen(self) -> None:
        """In a world-writable directory a local user could plant <socket>.lock; such a directory is refused before binding."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "a.sock")
        os.symlink("1", path + ".lock")
        listener = LinkListener(reactor, LinkConfig(name="a", socket=path), Factory.forProtocol(Protocol))
        self.assertRaises(UnsafeSocketDirectory, listener.listen)
