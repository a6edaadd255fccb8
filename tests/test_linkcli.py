"""
Tests for C{msgmux link ...} (L{msgmux.linkcli}) against a stand-in admin
socket served from a thread, and for the tenant-half table of
C{msgmux status}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from msgmux.cli import render_status
from msgmux.linkcli import add_arguments, render_links, run


class FakeAdminSocket:
    """Answers each request on a Unix socket with the next canned answer, recording the requests."""

    def __init__(self, path: str, answers: list[dict[str, Any]]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(5)
        self.answers = answers
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for answer in self.answers:
            connection, _ = self.listener.accept()
            with connection:
                data = b""
                while not data.endswith(b"\n"):
                    data += connection.recv(65536)
                self.requests.append(json.loads(data))
                connection.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


class LinkCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.socket = os.path.join(self.directory, "admin.sock")

    def arguments(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser.add_subparsers(dest="command"))
        return parser.parse_args(["link", "--socket", self.socket, *argv])

    def command(self, answers: list[dict[str, Any]], *argv: str, stdin: str = "") -> tuple[int, str, FakeAdminSocket]:
        server = FakeAdminSocket(self.socket, answers)
        self.addCleanup(server.close)
        out = io.StringIO()
        code = run(self.arguments(*argv), out, io.StringIO(stdin))
        return code, out.getvalue(), server

    def test_add_sends_the_file_as_a_table(self) -> None:
        path = os.path.join(self.directory, "r1.toml")
        with open(path, "w") as f:
            f.write('name = "r1"\nsocket = "/run/r1.sock"\ndown = [ { topic = "l3_agent" } ]\n[tenant]\nnamespace = "q1"\n')
        answer = {"ok": True, "link": {"link": "r1", "socket": "/run/r1.sock", "tenant_half": {"namespace": "q1", "state": "starting"}}}
        code, out, server = self.command([answer], "add", path)
        self.assertEqual(code, 0)
        self.assertEqual(out, "link r1 added: socket /run/r1.sock, tenant half in namespace q1 (starting)\n")
        self.assertEqual(
            server.requests,
            [
                {
                    "command": "add",
                    "source": path,
                    "link": {"name": "r1", "socket": "/run/r1.sock", "down": [{"topic": "l3_agent"}], "tenant": {"namespace": "q1"}},
                }
            ],
        )

    def test_add_from_stdin(self) -> None:
        code, _, server = self.command([{"ok": True, "link": {"link": "r1", "socket": "/s"}}], "add", "-", stdin='name = "r1"\n')
        self.assertEqual((code, server.requests[0]["source"], server.requests[0]["link"]), (0, "<stdin>", {"name": "r1"}))

    def test_refusal(self) -> None:
        """A refusal is printed on standard error with exit status 1."""
        error = "r1.toml: down[0].topic: must be 1-160 characters"
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        code, out, _ = self.command([{"ok": False, "error": error}], "remove", "r1")
        self.assertEqual((code, out, err.getvalue()), (1, "", f"msgmux: {error}\n"))

    def test_bad_file(self) -> None:
        """A file that is not TOML never reaches the socket."""
        path = os.path.join(self.directory, "bad.toml")
        with open(path, "w") as f:
            f.write("name = \n")
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(run(self.arguments("add", path), io.StringIO()), 1)
        self.assertIn(f"msgmux: {path}: is not valid TOML", err.getvalue())

    def test_unreachable(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(run(self.arguments("list"), io.StringIO()), 1)
        self.assertIn("cannot reach the admin socket", err.getvalue())

    def test_socket_others_could_plant(self) -> None:
        """A socket in a directory others can write may be anyone's: nothing is sent to it."""
        os.chmod(self.directory, 0o777)
        server = FakeAdminSocket(self.socket, [])
        self.addCleanup(server.close)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(run(self.arguments("add", "-"), io.StringIO(), io.StringIO('name = "r1"\nsocket = "/run/r1.sock"\n')), 1)
        unsafe = f"{self.directory} is writable by group or others"
        self.assertIn(f"not sending to the admin socket {self.socket}: {unsafe}", err.getvalue())
        self.assertEqual(server.requests, [])

    def test_list(self) -> None:
        links = [
            {"link": "static", "origin": "config", "status": {"up": True, "healthy": True}},
            {
                "link": "r1",
                "origin": "runtime",
                "status": {"up": False, "healthy": False},
                "tenant_half": {"state": "running", "pid": 42, "restarts": 2},
            },
        ]
        code, out, _ = self.command([{"ok": True, "links": links}], "list")
        self.assertEqual(code, 0)
        self.assertEqual(out, render_links(links) + "\n")
        self.assertRegex(out, r"r1\s+runtime\s+no\s+no\s+running pid 42, 2 restarts")


class StatusTableTests(SynchronousTestCase):
    def test_tenant_halves(self) -> None:
        """msgmux status shows each supervised half's state, pid, restarts, uptime and last exit."""
        document = {
            "links": [],
            "brokers": [],
            "tenant_halves": [
                {"link": "r1", "state": "running", "pid": 42, "restarts": 1, "uptime": 12.5, "last_exit": "killed by signal 9", "last_reason": "exited unexpectedly"},
                {"link": "r2", "state": "namespace-gone", "pid": None, "restarts": 0, "uptime": None, "last_exit": "exit code 0", "last_reason": "namespace-gone"},
            ],
        }
        lines = render_status(document, document, 1.0).splitlines()
        self.assertRegex(lines[-2], r"^r1\s+running\s+42\s+1\s+12.5\s+killed by signal 9 \(exited unexpectedly\)$")
        self.assertRegex(lines[-1], r"^r2\s+namespace-gone\s+-\s+0\s+-\s+exit code 0 \(namespace-gone\)$")
