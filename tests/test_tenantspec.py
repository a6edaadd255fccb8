"""
Tests for the configuration of supervised tenant halves and run-time links:
C{[control.supervision]}, a link's C{tenant} table, C{admin_socket} and
C{state_file} (L{msgmux.tenantspec}, L{msgmux.config}).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from lab.pki import make_pki
from msgmux.config import ConfigError, SupervisionConfig, parse, supervised_tenant

BASE = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"
{control}

[control.supervision]
users = ["nobody"]
groups = ["nogroup"]
{supervision}

[[control.links]]
name = "r1"
socket = "/run/msgmux/r1.sock"

[control.links.tenant]
namespace = "qrouter-1"
transport_url = "rabbit://t:secret@127.0.0.1:5673/v"
user = "nobody"
group = "nogroup"
{tenant}
"""


def config(control: str = "", supervision: str = "", tenant: str = "") -> str:
    return BASE.format(control=control, supervision=supervision, tenant=tenant)


class TenantTableTests(SynchronousTestCase):
    def error(self, text: str) -> ConfigError:
        return self.assertRaises(ConfigError, parse, text, "c.toml")

    def test_valid(self) -> None:
        control = parse(config(tenant='exchange = "neutron"\nlink_window = 64\n[control.links.tenant.queues]\namqp_durable_queues = true')).control
        assert control is not None and control.supervision is not None
        spec = control.links[0].tenant
        assert spec is not None
        self.assertEqual((spec.namespace, spec.user, spec.group, spec.link_window), ("qrouter-1", "nobody", "nogroup", 64))
        self.assertEqual((spec.broker.exchange, spec.broker.hosts[0].port, spec.broker.queues.amqp_durable_queues), ("neutron", 5673, True))
        self.assertEqual(spec.table["transport_url"], "rabbit://t:secret@127.0.0.1:5673/v")
        self.assertNotIn("secret", repr(spec))
        self.assertEqual(control.supervision, SupervisionConfig(users=("nobody",), groups=("nogroup",)))

    def test_tls_and_certificate_login(self) -> None:
        """A tenant broker reached over TLS with the client certificate: read by the control half and by the spawner alike."""
        pki = make_pki(os.path.abspath(self.mktemp()))
        tls = f'login_method = "EXTERNAL"\n[control.links.tenant.tls]\nca_file = "{pki.ca}"\n'
        tls += f'cert_file = "{pki.cert("client")}"\nkey_file = "{pki.key("client")}"\n'
        control = parse(config(tenant=tls).replace("rabbit://t:secret@127.0.0.1:5673/v", "rabbit://127.0.0.1:5671/v?ssl=1")).control
        assert control is not None and control.supervision is not None
        spec = control.links[0].tenant
        assert spec is not None and spec.broker.tls is not None
        self.assertEqual((spec.broker.login_method, spec.broker.tls.cert_file), ("EXTERNAL", pki.cert("client")))
        again, half = supervised_tenant("r1", "/run/msgmux/r1.sock", spec.table, control.supervision, "admin request")
        self.assertEqual((again.broker, half.broker), (spec.broker, spec.broker))

    def test_certificate_login_needs_the_certificate(self) -> None:
        error = self.error(config(tenant='login_method = "EXTERNAL"'))
        self.assertIn("control.links[0].tenant.login_method", str(error))
        self.assertIn("set tls.cert_file and tls.key_file", str(error))

    def test_errors_name_the_key(self) -> None:
        cases = [
            (config(tenant='user2 = "x"'), "control.links[0].tenant.user2", "is not a known option"),
            (config().replace('namespace = "qrouter-1"', 'namespace = "../x"'), "control.links[0].tenant.namespace", "must be a network namespace name"),
            (config().replace('namespace = "qrouter-1"\n', ""), "control.links[0].tenant.namespace", "is required"),
            (config().replace('user = "nobody"', 'user = "daemon"'), "control.links[0].tenant.user", "'daemon' is not one of control.supervision.users"),
            (config().replace('group = "nogroup"', 'group = "root"'), "control.links[0].tenant.group", "must not be the root group"),
            (config(tenant="link_window = 0"), "control.links[0].tenant.link_window", "must be 1-65535"),
            (config().replace("transport_url = \"rabbit://t", "transport_url = \"amqp://t"), "control.links[0].tenant.transport_url", "must start with rabbit://"),
            (config().replace('users = ["nobody"]', 'users = ["root"]'), "control.supervision.users[0]", "must not be root"),
            (config().replace('users = ["nobody"]', 'users = ["msgmux-no-such-user"]'), "control.supervision.users[0]", "no user 'msgmux-no-such-user' on this host"),
            (config().replace('users = ["nobody"]', "users = []"), "control.supervision.users", "must list at least one user"),
            (config(supervision="restart_delay = 0"), "control.supervision.restart_delay", "must be greater than 0"),
            (config(supervision="restart_delay = 10.0\nmax_restart_delay = 5.0"), "control.supervision.max_restart_delay", "must not be less than restart_delay"),
            (config(supervision="stop_timeout = 1000"), "control.supervision.stop_timeout", "must be greater than 0 and at most 600 seconds"),
            (config(control='admin_socket = "/run/msgmux/admin.sock"'), "control.state_file", "is required with admin_socket"),
            (config(control='admin_socket = "/run/a.sock"\nstate_file = "rel.json"'), "control.state_file", "must be an absolute path"),
            (config(control='admin_group = "msgmux-no-such-group"'), "control.admin_group", "no group 'msgmux-no-such-group' on this host"),
        ]
        for text, key, problem in cases:
            error = self.error(text)
            self.assertEqual(error.key, key, str(error))
            self.assertTrue(error.problem.startswith(problem), str(error))

    def test_tenant_needs_supervision(self) -> None:
        text = config().replace('[control.supervision]\nusers = ["nobody"]\ngroups = ["nogroup"]\n', "")
        error = self.error(text)
        self.assertEqual((error.key, error.problem), ("control.links[0].tenant", "needs a [control.supervision] section (who tenant halves may run as)"))

    def test_links_optional_with_admin_socket(self) -> None:
        """A control half that gets all its links at run time needs none in the file."""
        text = '[control]\ntransport_url = "rabbit://h/"\nadmin_socket = "/run/msgmux/admin.sock"\nstate_file = "/var/lib/msgmux/links.json"\n'
        control = parse(text).control
        assert control is not None
        self.assertEqual((control.links, control.admin_socket, control.state_file), ((), "/run/msgmux/admin.sock", "/var/lib/msgmux/links.json"))
        error = self.error('[control]\ntransport_url = "rabbit://h/"\n')
        self.assertEqual(error.key, "control.links")

    def test_supervised_tenant(self) -> None:
        """The spawner's re-check builds the configuration the tenant half runs with."""
        table = {"namespace": "q", "transport_url": "rabbit://t:s@127.0.0.1/", "user": "nobody", "group": "nogroup", "link_window": 32}
        spec, tenant = supervised_tenant("r1", "/run/r1.sock", table, SupervisionConfig(users=("nobody",), groups=("nogroup",)), "spawner")
        self.assertEqual((tenant.link, tenant.socket, tenant.link_window, tenant.metrics), ("r1", "/run/r1.sock", 32, None))
        self.assertEqual(tenant.broker, spec.broker)
