"""
Tests for the C{msgmux} command: check-config, the status table, and a
quiet exit when the reader of its output goes away.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from msgmux.cli import EXIT_BROKEN_PIPE, check_config, client_endpoint, render_status

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class CheckConfigTests(SynchronousTestCase):
    def test_examples_are_valid(self) -> None:
        """Every example configuration passes, with a summary of its links and routes."""
        for name in sorted(os.listdir(EXAMPLES)):
            out = io.StringIO()
            self.assertEqual(check_config(os.path.join(EXAMPLES, name), out), 0, name)
            self.assertIn(": OK", out.getvalue())
        out = io.StringIO()
        check_config(os.path.join(EXAMPLES, "control.toml"), out)
        self.assertIn("link tenant-a: socket /run/msgmux/tenant-a.sock", out.getvalue())
        self.assertIn("up    rpc q-reports-state", out.getvalue())
        self.assertIn(
            "    msgmux's own queues on the tenant broker (if its exchange is 'neutron' too):"
            " msgmux_tenant-a_neutron_notifications, reply_msgmux_tenant-a, msgmux_canary_tenant-a\n",
            out.getvalue(),
        )
        self.assertRegex(
            out.getvalue(),
            r"msgmux's own queues on the control broker: l3_agent_fanout_[0-9a-f]{32}, .*reply_msgmux_tenant-a, msgmux_canary_tenant-a",
        )

    def test_error(self) -> None:
        """A bad file gives exit status 1, nothing on standard output, and the file, key and problem on standard error."""
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write('[tenant]\ntransport_url = "amqp://h/"\nsocket = "/run/x.sock"\n')
        self.addCleanup(os.unlink, f.name)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(check_config(f.name, out), 1)
        self.assertEqual(out.getvalue(), "")
        self.assertTrue(err.getvalue().startswith(f"msgmux: {f.name}: tenant.transport_url: "), err.getvalue())
        self.assertIn("rabbit", err.getvalue())


    def test_reply_key_ids(self) -> None:
        """The summary names the reply keys by their ids, so operators can compare control halves without seeing keys."""
        from msgmux.oslo.tokens import key_id

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        keys = {}
        for name in ("new", "old"):
            keys[name] = os.path.join(directory, f"{name}.key")
            with open(keys[name], "w") as f:
                f.write(f"{name}-key-0123456789abcdef\n")
        with open(os.path.join(EXAMPLES, "control.toml")) as f:
            text = f.read().replace("[control]\n", f'[control]\nreply_key_file = "{keys["new"]}"\nreply_verify_key_files = ["{keys["old"]}"]\n', 1)
        path = os.path.join(directory, "control.toml")
        with open(path, "w") as f:
            f.write(text)
        out = io.StringIO()
        self.assertEqual(check_config(path, out), 0)
        new, old = key_id(b"new-key-0123456789abcdef"), key_id(b"old-key-0123456789abcdef")
        self.assertIn(f"  reply keys: signing with {new}, also verifying {old}\n", out.getvalue())
        self.assertNotIn("key-0123456789abcdef", out.getvalue())


class StatusTests(SynchronousTestCase):
    def test_rates_and_health(self) -> None:
        """Two samples a second apart give per-second rates; unhealthy links and broker trouble stand out."""
        link = {
            "half": "control", "link": "tenant-a", "up": True, "healthy": False, "canary_round_trip": 0.0031,
            "inflight_calls": {"down": 2, "up": 1}, "relayed": {"down": 10, "up": 4}, "rejected": {"down": 0, "up": 3},
        }  # fmt: skip
        later = dict(link, relayed={"down": 30, "up": 6})
        brokers = [{"name": "control", "connected": True, "address": "r1:5672", "blocked": "memory alarm"}]
        table = render_status({"links": [link], "brokers": brokers}, {"links": [later], "brokers": brokers}, 2.0)
        lines = table.splitlines()
        self.assertEqual(lines[1].split(), ["control", "tenant-a", "yes", "NO", "3.1", "10.0", "1.0", "3", "3"])
        self.assertEqual(lines[2], "broker control: connected to r1:5672 (blocked: memory alarm)")

    def test_tls_and_failing_hosts(self) -> None:
        """A broker reached over TLS says so; hosts failing now are listed with their reason."""
        brokers = [
            {"name": "control", "connected": True, "address": "r2:5671", "blocked": None, "tls": True, "failing": {"r1:5671": "tls-expired"}},
            {"name": "tenant", "connected": False, "address": "", "blocked": None, "tls": True, "failing": {"127.0.0.1:5671": "tls-untrusted"}},
        ]
        table = render_status({"links": [], "brokers": brokers}, {"links": [], "brokers": brokers}, 1.0)
        self.assertEqual(
            table.splitlines()[-2:],
            [
                "broker control: connected to r2:5671 over TLS; r1:5671 failing (tls-expired)",
                "broker tenant: DISCONNECTED; 127.0.0.1:5671 failing (tls-untrusted)",
            ],
        )

    def test_endpoints(self) -> None:
        """The metrics endpoint of a configuration turns into a client endpoint for the same place."""
        from twisted.internet.testing import MemoryReactor

        reactor = MemoryReactor()
        self.assertEqual(client_endpoint(reactor, "unix:/run/msgmux/m.sock")._path, "/run/msgmux/m.sock")
        tcp = client_endpoint(reactor, "tcp:9464:interface=127.0.0.2")
        self.assertEqual((tcp._host, tcp._port), ("127.0.0.2", 9464))
        tcp6 = client_endpoint(reactor, "tcp6:9464:interface=\\:\\:1")  # escaped as Twisted's parser wants it
        self.assertEqual((tcp6._host, tcp6._port), ("::1", 9464))
        self.assertEqual(client_endpoint(reactor, "tcp:port=9465")._port, 9465)


def run_cli(arguments: list[str], reader_closed: bool) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{msgmux ARGUMENTS} in a subprocess whose standard output is a real
    pipe.  With C{reader_closed}, the pipe's read end is closed before the
    command starts, as when C{head} has exited: every write to it fails.
    """
    read, write = os.pipe()
    if reader_closed:
        os.close(read)
    try:
        # As the console script does: msgmux.cli is not __main__ (whose
        # DeprecationWarnings Python would print).
        command = [sys.executable, "-c", "from msgmux.cli import main; main()", *arguments]
        result = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write)
    if not reader_closed:
        with os.fdopen(read, "rb") as pipe:
            result.stdout = pipe.read()
    return result


class ClosedPipeTests(SynchronousTestCase):
    """C{msgmux check-config FILE | head}: no traceback when head leaves early."""

    def test_check_config(self) -> None:
        """The reader gone, check-config exits with SIGPIPE's status and writes nothing to stderr."""
        path = os.path.join(EXAMPLES, "control.toml")
        result = run_cli(["check-config", path], reader_closed=True)
        self.assertEqual((result.returncode, result.stderr.decode()), (EXIT_BROKEN_PIPE, ""))
        # The same command with a reader prints its summary: the closed pipe made the difference.
        result = run_cli(["check-config", path], reader_closed=False)
        self.assertEqual((result.returncode, result.stderr.decode()), (0, ""))
        self.assertIn(b"control.toml: OK", result.stdout)


STATUS = {
    "links": [
        {"half": "control", "link": "tenant-a", "up": True, "healthy": True, "canary_round_trip": 0.002,
         "inflight_calls": {"down": 0, "up": 0}, "relayed": {"down": 5, "up": 1}, "rejected": {"down": 0, "up": 0}}
    ],
    "brokers": [{"name": "control", "connected": True, "address": "127.0.0.1:5672", "blocked": None}],
}  # fmt: skip


class ClosedPipeStatusTests(TestCase):
    """C{msgmux status ... | head}, against a real HTTP endpoint serving a status document."""

    async def serve_status(self) -> str:
        root = Resource()
        root.putChild(b"status", Data(json.dumps(STATUS).encode(), "application/json"))
        path = os.path.abspath(self.mktemp())
        port = await UNIXServerEndpoint(reactor, path).listen(Site(root))
        self.addCleanup(port.stopListening)
        return f"unix:{path}"

    def test_status(self) -> defer.Deferred[None]:
        """The reader gone, status (table or --json) exits with SIGPIPE's status and writes nothing to stderr."""

        async def check() -> None:
            endpoint = await self.serve_status()
            for extra in ([], ["--json"]):
                arguments = ["status", "--metrics", endpoint, "--interval", "0.05", *extra]
                result = await threads.deferToThread(run_cli, arguments, True)
                self.assertEqual((result.returncode, result.stderr.decode()), (EXIT_BROKEN_PIPE, ""), extra)
                result = await threads.deferToThread(run_cli, arguments, False)
                self.assertEqual((result.returncode, result.stderr.decode()), (0, ""), extra)
                self.assertIn(b"tenant-a", result.stdout)

        return defer.Deferred.fromCoroutine(check())
