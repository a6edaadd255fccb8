"""Tests for the C{msgmux} command: check-config, and the status table."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from msgmux.cli import check_config, client_endpoint, render_status

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
