"""
Tests for L{msgmux.sdnotify}: messages reach a real datagram socket, as
systemd's would receive them; the watchdog follows an injected clock.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from msgmux.sdnotify import Notifier


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "notify")
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.receiver.close)
        self.receiver.bind(self.path)
        self.receiver.setblocking(False)

    def received(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.receiver.recv(4096).decode())
            except BlockingIOError:
                return messages

    def test_from_environment(self) -> None:
        """The variables are read, then removed, so that child processes never see them."""
        environ = {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42", "OTHER": "x"}
        notifier = Notifier.from_environment(environ, pid=42)
        self.assertEqual((notifier.address, notifier.watchdog_interval), (self.path, 2.0))
        self.assertEqual(environ, {"OTHER": "x"})

    def test_watchdog_for_another_process(self) -> None:
        """WATCHDOG_PID naming another process means the watchdog is not ours to feed."""
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, pid=42)
        self.assertIsNone(notifier.watchdog_interval)

    def test_not_under_systemd(self) -> None:
        notifier = Notifier.from_environment({}, pid=1)
        self.assertFalse(notifier.notify("READY=1"))

    def test_ready_and_stopping(self) -> None:
        notifier = Notifier(self.path)
        notifier.ready("serving 3 links")
        notifier.stopping()
        self.assertEqual(self.received(), ["READY=1\nSTATUS=serving 3 links", "STOPPING=1"])

    def test_watchdog(self) -> None:
        """WATCHDOG=1 goes out at once and then every half interval, until stopping."""
        clock = task.Clock()
        notifier = Notifier(self.path, watchdog_usec=10_000_000)
        notifier.start_watchdog(clock)
        clock.advance(5.0)
        clock.advance(5.0)
        self.assertEqual(self.received(), ["WATCHDOG=1"] * 3)
        notifier.stopping()
        clock.advance(20.0)
        self.assertEqual(self.received(), ["STOPPING=1"])

    def test_abstract_socket(self) -> None:
        """An address starting with @ is in the abstract namespace."""
        name = f"msgmux-test-{os.getpid()}"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind("\0" + name)
        self.assertTrue(Notifier("@" + name).notify("READY=1"))
        self.assertEqual(receiver.recv(100), b"READY=1")

    def test_full_queue_never_blocks(self) -> None:
        """When systemd does not read, messages are dropped rather than blocking the caller."""
        notifier = Notifier(self.path)
        sent = [notifier.notify("WATCHDOG=1") for _ in range(1000)]
        self.assertIn(False, sent)
        self.assertTrue(sent[0])
        self.flushLoggedErrors()

    def test_unreachable_socket(self) -> None:
        """A socket that is gone is logged, not raised."""
        self.assertFalse(Notifier(self.path + "-missing").notify("READY=1"))
        self.flushLoggedErrors()
