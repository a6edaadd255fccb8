"""
Tests for L{msgmux.config} and L{msgmux._toml}: a valid file becomes frozen
values, and every problem is a L{ConfigError} naming the file and the dotted
key.
"""

from __future__ import annotations

import os
import pwd

import attrs
from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import (
    BrokerConfig,
    BrokerHost,
    Config,
    ConfigError,
    ControlConfig,
    Limits,
    LinkConfig,
    NotificationRule,
    QueueOptions,
    RpcRule,
    TenantConfig,
    TlsConfig,
    load,
    parse,
    parse_transport_url,
    transport_url_ssl,
)
from tests.doubles import control_config

FULL = """
[control]
transport_url = "rabbit://admin:s%40cret@c1:5671,c2/ctl"
exchange = "nova"
heartbeat = 10
prefetch = 32
reply_key_file = "{key}"
link_heartbeat = 2.5
link_window = 128
metrics = "tcp:9100"
[control.queues]
amqp_durable_queues = true
rabbit_quorum_queue = true
rabbit_quorum_delivery_limit = 5
[control.limits]
max_rate = 100
burst = 50
[[control.links]]
name = "tenant-a"
socket = "/run/msgmux/tenant-a.sock"
socket_mode = "0600"
down = [ {{ topic = "l3_agent", servers = ["agent-1", "agent-2"], fanout = true }} ]
up = [ {{ topic = "q-reports", methods = ["report_state"], exchange = "neutron" }} ]
notifications_up = [ {{ topic = "notifications", priorities = ["info", "error"] }} ]
notifications_down = [ {{ topic = "versioned", priorities = ["audit"], exchange = "nova" }} ]
[control.links.limits]
burst = 7
max_inflight_calls = 3
[[control.links]]
name = "tenant-b"
socket = "/run/msgmux/tenant-b.sock"
[tenant]
transport_url = "rabbit://t:pw@[::1]:5673"
socket = "/run/msgmux/tenant-a.sock"
link = "tenant-a"
link_window = 64
[tenant.queues]
rabbit_transient_quorum_queue = true
rabbit_stream_fanout = true
rabbit_transient_queues_ttl = 60
"""

TENANT = """
[tenant]
transport_url = "rabbit://u:p@h/"
socket = "/run/a.sock"
"""


def link(extra: str = "", name: str = "a", socket: str = "/run/a.sock") -> str:
    """A control config whose (only) link has C{extra} lines."""
    return f"""
[control]
transport_url = "rabbit://u:p@h/"
[[control.links]]
name = "{name}"
socket = "{socket}"
{extra}
"""


CONTROL = link()

# (description, TOML, the dotted key the error must name)
BAD = [
    ("control not a table", "control = 1", "control"),
    ("unknown top-level key", "contrl = 1\n" + CONTROL, "contrl"),
    ("missing transport_url", "[control]\n[[control.links]]\nname='a'\nsocket='/a'", "control.transport_url"),
    ("tenant missing transport_url", "[tenant]\nsocket = '/a'", "tenant.transport_url"),
    ("tenant missing socket", "[tenant]\ntransport_url = 'rabbit://h/'", "tenant.socket"),
    ("link missing name", "[control]\ntransport_url='rabbit://h/'\n[[control.links]]\nsocket='/a'", "control.links[0].name"),
    ("link missing socket", "[control]\ntransport_url='rabbit://h/'\n[[control.links]]\nname='a'", "control.links[0].socket"),
    ("down rule without topic", link("down = [ { servers = [] } ]"), "control.links[0].down[0].topic"),
    ("up rule without methods", link("up = [ { topic = 't' } ]"), "control.links[0].up[0].methods"),
    ("up rule with no methods", link("up = [ { topic = 't', methods = [] } ]"), "control.links[0].up[0].methods"),
    ("notification without priorities", link("notifications_up = [ { topic = 'n' } ]"), "control.links[0].notifications_up[0].priorities"),
    ("empty priorities", link("notifications_down = [ { topic = 'n', priorities = [] } ]"), "control.links[0].notifications_down[0].priorities"),
    ("transport_url not a string", "[control]\ntransport_url = 5", "control.transport_url"),
    ("links empty", "[control]\ntransport_url='rabbit://h/'\nlinks = []", "control.links"),
    ("links absent", "[control]\ntransport_url='rabbit://h/'", "control.links"),
    ("links not an array", "[control]\ntransport_url='rabbit://h/'\nlinks = 1", "control.links"),
    ("link not a table", "[control]\ntransport_url='rabbit://h/'\nlinks = [1]", "control.links[0]"),
    ("down not an array", link("down = 'x'"), "control.links[0].down"),
    ("down item not a table", link("down = [ { topic = 't' }, 'x' ]"), "control.links[0].down[1]"),
    ("fanout not a bool", link("down = [ { topic = 't', fanout = 'yes' } ]"), "control.links[0].down[0].fanout"),
    ("servers not an array", link("down = [ { topic = 't', servers = 's' } ]"), "control.links[0].down[0].servers"),
    ("server not a string", link("down = [ { topic = 't', servers = ['s', 3] } ]"), "control.links[0].down[0].servers[1]"),
    ("bad server name", link("down = [ { topic = 't', servers = ['.x'] } ]"), "control.links[0].down[0].servers[0]"),
    ("bad topic in second rule", link("down = [ { topic = 't' }, { topic = 'bad topic' } ]"), "control.links[0].down[1].topic"),
    ("topic too long", link("down = [ { topic = '%s' } ]" % ("t" * 161)), "control.links[0].down[0].topic"),
    ("bad rule exchange", link("up = [ { topic = 't', methods = ['*'], exchange = '' } ]"), "control.links[0].up[0].exchange"),
    ("bad method entry", link("up = [ { topic = 't', methods = [1] } ]"), "control.links[0].up[0].methods[0]"),
    (
        "unknown priority",
        link("notifications_up = [ { topic = 'n', priorities = ['info', 'loud'] } ]"),
        "control.links[0].notifications_up[0].priorities[1]",
    ),
    ("bad control exchange", CONTROL.replace("[[", "exchange = 'a b'\n[[", 1), "control.exchange"),
    ("bad link name", link(name="-a"), "control.links[0].name"),
    ("link name too long", link(name="a" * 64), "control.links[0].name"),
    ("bad tenant link name", TENANT + "link = '.x'", "tenant.link"),
    ("relative socket", link(socket="run/a.sock"), "control.links[0].socket"),
    ("socket too long", link(socket="/" + "s" * 107), "control.links[0].socket"),
    ("socket_mode not octal", link("socket_mode = '0999'"), "control.links[0].socket_mode"),
    ("socket_mode as integer", link("socket_mode = 0o660"), "control.links[0].socket_mode"),
    ("socket_mode for others", link("socket_mode = '0666'"), "control.links[0].socket_mode"),
    ("socket_mode others execute", link("socket_mode = '0661'"), "control.links[0].socket_mode"),
    (
        "inflight bytes below message size",
        link("[control.links.limits]\nmax_message_size = 4096\nmax_inflight_bytes = 2048"),
        "control.links[0].limits.max_inflight_bytes",
    ),
    ("zero byte rate", CONTROL + "[control.limits]\nmax_byte_rate = 0", "control.limits.max_byte_rate"),
    ("infinite byte rate", CONTROL + "[control.limits]\nmax_byte_rate = inf", "control.limits.max_byte_rate"),
    ("no json containers", CONTROL + "[control.limits]\nmax_json_containers = 0", "control.limits.max_json_containers"),
    (
        "loop: topic up and down",
        link("down = [ { topic = 't' } ]\nup = [ { topic = 'u', methods = ['*'] }, { topic = 't', methods = ['*'] } ]"),
        "control.links[0].up[1].topic",
    ),
    (
        "loop: notification up and down",
        link(
            "notifications_down = [ { topic = 'n', priorities = ['error'] } ]\n"
            "notifications_up = [ { topic = 'n', priorities = ['info', 'error'] } ]"
        ),
        "control.links[0].notifications_up[0].topic",
    ),
    ("quorum with ha", CONTROL + "[control.queues]\nrabbit_quorum_queue = true\nrabbit_ha_queues = true", "control.queues.rabbit_quorum_queue"),
    (
        "transient quorum with ha",
        TENANT + "[tenant.queues]\nrabbit_transient_quorum_queue = true\nrabbit_ha_queues = true",
        "tenant.queues.rabbit_transient_quorum_queue",
    ),
    ("stream without transient quorum", TENANT + "[tenant.queues]\nrabbit_stream_fanout = true", "tenant.queues.rabbit_stream_fanout"),
    ("negative ttl", CONTROL + "[control.queues]\nrabbit_transient_queues_ttl = -1", "control.queues.rabbit_transient_queues_ttl"),
    ("bool for int ttl", CONTROL + "[control.queues]\nrabbit_transient_queues_ttl = true", "control.queues.rabbit_transient_queues_ttl"),
    ("int for bool option", CONTROL + "[control.queues]\namqp_durable_queues = 1", "control.queues.amqp_durable_queues"),
    ("queues not a table", TENANT + "queues = 1", "tenant.queues"),
    ("unknown control key", CONTROL.replace("[[", "bogus = 1\n[[", 1), "control.bogus"),
    ("unknown tenant key", TENANT + "bogus = 1", "tenant.bogus"),
    ("unknown queue option", TENANT + "[tenant.queues]\nbogus = 1", "tenant.queues.bogus"),
    ("unknown control limit", CONTROL + "[control.limits]\nbogus = 1", "control.limits.bogus"),
    ("unknown link key", link("bogus = 1"), "control.links[0].bogus"),
    ("unknown link limit", link("[control.links.limits]\nbogus = 1"), "control.links[0].limits.bogus"),
    ("unknown down rule key", link("down = [ { topic = 't' }, { topic = 'u', method = ['x'] } ]"), "control.links[0].down[1].method"),
    ("unknown up rule key", link("up = [ { topic = 't', methods = ['*'], bogus = 1 } ]"), "control.links[0].up[0].bogus"),
    ("bool for int heartbeat", CONTROL.replace("[[", "heartbeat = true\n[[", 1), "control.heartbeat"),
    ("heartbeat out of range", CONTROL.replace("[[", "heartbeat = 601\n[[", 1), "control.heartbeat"),
    ("float prefetch", CONTROL.replace("[[", "prefetch = 1.5\n[[", 1), "control.prefetch"),
    ("bool link_window", CONTROL.replace("[[", "link_window = true\n[[", 1), "control.link_window"),
    ("link_window too big", CONTROL.replace("[[", "link_window = 65536\n[[", 1), "control.link_window"),
    ("tenant bool link_window", TENANT + "link_window = false", "tenant.link_window"),
    ("string link_heartbeat", CONTROL.replace("[[", "link_heartbeat = '5'\n[[", 1), "control.link_heartbeat"),
    ("zero link_heartbeat", CONTROL.replace("[[", "link_heartbeat = 0\n[[", 1), "control.link_heartbeat"),
    ("bool for int burst", CONTROL + "[control.limits]\nburst = true", "control.limits.burst"),
    ("bool for float max_rate", CONTROL + "[control.limits]\nmax_rate = true", "control.limits.max_rate"),
    ("zero max_rate", CONTROL + "[control.limits]\nmax_rate = 0", "control.limits.max_rate"),
    ("infinite max_rate", CONTROL + "[control.limits]\nmax_rate = inf", "control.limits.max_rate"),
    ("nan max_rate", CONTROL + "[control.limits]\nmax_rate = nan", "control.limits.max_rate"),
    ("infinite link_heartbeat", CONTROL.replace("[[", "link_heartbeat = inf\n[[", 1), "control.link_heartbeat"),
    ("huge canary_interval", CONTROL.replace("[[", "canary_interval = 1e308\n[[", 1), "control.canary_interval"),
    ("infinite max_call_timeout", CONTROL + "[control.limits]\nmax_call_timeout = inf", "control.limits.max_call_timeout"),
    ("huge burst", CONTROL + "[control.limits]\nburst = 10000000000", "control.limits.burst"),
    ("negative inflight", CONTROL + "[control.limits]\nmax_inflight_calls = -1", "control.limits.max_inflight_calls"),
    ("message size too small", link("[control.links.limits]\nmax_message_size = 1023"), "control.links[0].limits.max_message_size"),
    ("bad transport_url scheme", CONTROL.replace("rabbit://", "amqp://"), "control.transport_url"),
    ("transport_url query", TENANT.replace("h/", "h/?heartbeat=5"), "tenant.transport_url"),
    ("transport_url ssl not a boolean", TENANT.replace("h/", "h/?ssl=maybe"), "tenant.transport_url"),
    ("tls keys with TLS off", TENANT + "[tenant.tls]\nverify = false", "tenant.tls.verify"),
    ("tls enabled contradicts url", TENANT.replace("h/", "h/?ssl=0") + "[tenant.tls]\nenabled = true", "tenant.tls.enabled"),
    ("tls relative ca_file", TENANT.replace("h/", "h/?ssl=1") + "[tenant.tls]\nca_file = 'ca.pem'", "tenant.tls.ca_file"),
    ("tls old minimum_version", TENANT.replace("h/", "h/?ssl=1") + "[tenant.tls]\nminimum_version = 'TLSv1'", "tenant.tls.minimum_version"),
    ("tls unknown key", TENANT.replace("h/", "h/?ssl=1") + "[tenant.tls]\ncafile = '/x'", "tenant.tls.cafile"),
    ("bad login_method", TENANT + "login_method = 'GSSAPI'", "tenant.login_method"),
    ("EXTERNAL without TLS", TENANT + "login_method = 'EXTERNAL'", "tenant.login_method"),
    ("EXTERNAL without certificate", TENANT.replace("h/", "h/?ssl=1") + "login_method = 'EXTERNAL'", "tenant.login_method"),
    ("transport_url bad port", TENANT.replace("@h/", "@h:99999/"), "tenant.transport_url"),
    ("transport_url no host", TENANT.replace("u:p@h/", "/"), "tenant.transport_url"),
    ("transport_url broken IPv6", TENANT.replace("@h/", "@[::1/"), "tenant.transport_url"),
    ("reply_key_file not a string", CONTROL.replace("[[", "reply_key_file = 1\n[[", 1), "control.reply_key_file"),
    ("duplicate link name", CONTROL + "[[control.links]]\nname = 'a'\nsocket = '/run/b.sock'", "control.links[1].name"),
    ("duplicate link socket", CONTROL + "[[control.links]]\nname = 'b'\nsocket = '/run/a.sock'", "control.links[1].socket"),
    ("reply_key_file missing", CONTROL.replace("[[", "reply_key_file = '/nonexistent/msgmux.key'\n[[", 1), "control.reply_key_file"),
]


class ConfigTestCase(SynchronousTestCase):
    """Helpers: write a config file and expect an error for it."""

    def write(self, content: str | bytes) -> str:
        """Write C{content} to a fresh file and return its path."""
        path = os.path.abspath(self.mktemp())
        data = content.encode("utf-8") if isinstance(content, str) else content
        with open(path, "wb") as f:
            f.write(data)
        return path

    def key_problem(self, content: str, key: str) -> str | None:
        """Load C{content}; describe how the outcome differs from an error naming C{key}."""
        path = self.write(content)
        try:
            load(path)
        except ConfigError as e:
            if e.path != path or e.key != key or not str(e).startswith(f"{path}: {key}: ") or not e.problem:
                return f"got {str(e)!r}"
            return None
        return "no error"

    def file_error(self, path: str) -> ConfigError:
        """Load C{path}, expecting an error about the whole file."""
        error: ConfigError = self.assertRaises(ConfigError, load, path)
        self.assertEqual(error.key, "")
        self.assertTrue(str(error).startswith(path + ": "), str(error))
        return error


class ValidConfigTests(ConfigTestCase):
    """A valid configuration parses into frozen values."""

    def test_every_key_lands_in_its_field(self) -> None:
        """Every key of a config with both halves lands in the expected field."""
        key_path = self.write(b"0123456789abcdef-secret\n")
        path = self.write(FULL.format(key=key_path))
        config = load(path)
        limits_b = Limits(max_rate=100.0, burst=50)
        expected = Config(
            path=path,
            control=ControlConfig(
                broker=BrokerConfig(
                    hosts=(BrokerHost("c1", 5671, "admin", "s@cret"), BrokerHost("c2", 5672, "admin", "s@cret")),
                    virtual_host="ctl",
                    exchange="nova",
                    queues=QueueOptions(amqp_durable_queues=True, rabbit_quorum_queue=True, rabbit_quorum_delivery_limit=5),
                    heartbeat=10,
                    prefetch=32,
                ),
                links=(
                    LinkConfig(
                        name="tenant-a",
                        socket="/run/msgmux/tenant-a.sock",
                        socket_mode=0o600,
                        down=(RpcRule("l3_agent", ("agent-1", "agent-2"), True, ("*",), None),),
                        up=(RpcRule("q-reports", (), False, ("report_state",), "neutron"),),
                        notifications_down=(NotificationRule("versioned", ("audit",), "nova"),),
                        notifications_up=(NotificationRule("notifications", ("info", "error"), None),),
                        limits=attrs.evolve(limits_b, burst=7, max_inflight_calls=3),
                    ),
                    LinkConfig(name="tenant-b", socket="/run/msgmux/tenant-b.sock", socket_mode=0o660, limits=limits_b),
                ),
                reply_key=b"0123456789abcdef-secret",
                link_heartbeat=2.5,
                link_window=128,
                metrics="tcp:9100",
                default_limits=limits_b,
            ),
            tenant=TenantConfig(
                broker=BrokerConfig(
                    hosts=(BrokerHost("::1", 5673, "t", "pw"),),
                    virtual_host="/",
                    exchange="openstack",
                    queues=QueueOptions(
                        rabbit_transient_quorum_queue=True, rabbit_stream_fanout=True, rabbit_transient_queues_ttl=60
                    ),
                    heartbeat=30,
                    prefetch=64,
                ),
                socket="/run/msgmux/tenant-a.sock",
                link="tenant-a",
                link_window=64,
            ),
        )
        self.assertEqual(config, expected)
        assert config.control is not None
        self.assertEqual(config.control.broker.hosts[1].password, "s@cret")
        self.assertIsInstance(config.control.links[0].limits.max_rate, float)
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "path", "x")
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config.control, "links", ())

    def test_minimal_config_gets_defaults(self) -> None:
        """A minimal control config gets oslo's and msgmux's defaults."""
        config = parse(CONTROL)
        self.assertEqual(config.path, "<string>")
        self.assertIsNone(config.tenant)
        control = config.control
        assert control is not None
        self.assertEqual(control.broker, BrokerConfig((BrokerHost("h", 5672, "u", "p"),), "/", "openstack", QueueOptions(), 30, 64))
        self.assertEqual(
            control.broker.queues,
            QueueOptions(False, False, False, False, False, 1800, 0, 0, 0, False),
        )
        self.assertEqual((control.reply_key, control.link_heartbeat, control.link_window, control.metrics), (None, 5.0, 256, None))
        self.assertEqual(control.links, (LinkConfig("a", "/run/a.sock", 0o660, (), (), (), (), Limits()),))
        self.assertEqual(Limits(), Limits(8 * 1024 * 1024, 2000.0, 500, 200, 3600.0))
        tenant = parse(TENANT)
        self.assertIsNone(tenant.control)
        self.assertEqual(tenant.tenant, TenantConfig(control.broker, "/run/a.sock", None, 256))

    def test_rule_defaults(self) -> None:
        """A down rule allows every method, no servers, no fanout, the broker's exchange."""
        rule = control_config(link("down = [ { topic = 't' } ]")).links[0].down[0]
        self.assertEqual(rule, RpcRule("t", (), False, ("*",), None))
        self.assertTrue(rule.allows_method("anything"))
        listed = RpcRule("t", methods=("a", "b"))
        self.assertEqual([listed.allows_method(m) for m in ("a", "b", "c", "*")], [True, True, False, False])

    def test_limits_inheritance(self) -> None:
        """[control.limits] sets every link's defaults; [control.links.limits] overrides per link."""
        text = CONTROL + (
            "[control.limits]\nmax_rate = 10\nburst = 5\nmax_call_timeout = 30\n"
            "[control.links.limits]\nburst = 7\nmax_message_size = 2048\n"
            "[[control.links]]\nname = 'b'\nsocket = '/run/b.sock'\n"
        )
        links = control_config(text).links
        self.assertEqual(links[0].limits, Limits(2048, 10.0, 7, 200, 30.0))
        self.assertEqual(links[1].limits, Limits(8 * 1024 * 1024, 10.0, 5, 200, 30.0))

    def test_byte_window_follows_the_message_size(self) -> None:
        """Without max_inflight_bytes, a link's byte window is at least twice its largest message."""
        limits = control_config(link("[control.links.limits]\nmax_message_size = 33554432")).links[0].limits
        self.assertEqual(limits.max_inflight_bytes, 2 * 33554432)
        limits = control_config(link("[control.links.limits]\nmax_message_size = 4096\nmax_inflight_bytes = 4096")).links[0].limits
        self.assertEqual(limits.max_inflight_bytes, 4096)

    def test_different_topics_up_and_down(self) -> None:
        """Different topics, or the same topic on different exchanges, are no loop."""
        config = control_config(
            link(
                "down = [ { topic = 't' } ]\nup = [ { topic = 'u', methods = ['*'] }, "
                "{ topic = 't', methods = ['*'], exchange = 'other' } ]\n"
                "notifications_down = [ { topic = 'n', priorities = ['info'] } ]\n"
                "notifications_up = [ { topic = 'n', priorities = ['error'] } ]"
            )
        )
        self.assertEqual(len(config.links[0].up), 2)

    def test_socket_boundaries(self) -> None:
        """A 107-byte socket path and a mode without its leading zero are accepted."""
        socket = "/" + "s" * 106
        link_config = control_config(link("socket_mode = '640'", socket=socket)).links[0]
        self.assertEqual((link_config.socket, link_config.socket_mode), (socket, 0o640))

    def test_reply_key_exactly_16(self) -> None:
        """A reply key of exactly 16 bytes (after stripping whitespace) is accepted."""
        key_path = self.write(b"  0123456789abcdef \n")
        config = parse(CONTROL.replace("[[", f"reply_key_file = '{key_path}'\n[[", 1))
        assert config.control is not None
        self.assertEqual(config.control.reply_key, b"0123456789abcdef")


class ReplyKeyTests(ConfigTestCase):
    """reply_key_file signs; reply_verify_key_files only verify (key rotation)."""

    def keys(self, signing: str | None, verifying: list[str] | str) -> str:
        """A control config with these key settings (TOML values, already quoted)."""
        lines = f"reply_key_file = {signing}\n" if signing else ""
        lines += f"reply_verify_key_files = {verifying}\n"
        return CONTROL.replace("[[", lines + "[[", 1)

    def test_verify_keys(self) -> None:
        """Each verification key file is read, stripped, and kept in the order given."""
        signing = self.write(b"new-key-0123456789\n")
        old = self.write(b"  old-key-0123456789 \n")
        older = self.write(b"older-key-0123456789")
        control = parse(self.keys(f"'{signing}'", f"['{old}', '{older}']")).control
        assert control is not None
        self.assertEqual(control.reply_key, b"new-key-0123456789")
        self.assertEqual(control.reply_verify_keys, (b"old-key-0123456789", b"older-key-0123456789"))
        self.assertNotIn("key-0123456789", repr(control))
        self.assertEqual(control_config(CONTROL).reply_verify_keys, ())

    def test_verify_key_errors(self) -> None:
        """Each problem names reply_verify_key_files, or the entry whose file is at fault."""
        good = self.write(b"0123456789abcdef")
        short = self.write(b"0123456789abcde\n")
        cases = [
            ("not a list", self.keys(f"'{good}'", f"'{good}'"), "control.reply_verify_key_files"),
            ("not strings", self.keys(f"'{good}'", "[1]"), "control.reply_verify_key_files[0]"),
            ("no signing key", self.keys(None, f"['{good}']"), "control.reply_verify_key_files"),
            ("too many", self.keys(f"'{good}'", repr([good] * 4)), "control.reply_verify_key_files"),
            ("missing file", self.keys(f"'{good}'", f"['{good}', '/nonexistent/old.key']"), "control.reply_verify_key_files[1]"),
            ("short key", self.keys(f"'{good}'", f"['{short}']"), "control.reply_verify_key_files[0]"),
        ]
        problems = [f"{description}: {problem}" for description, text, key in cases if (problem := self.key_problem(text, key))]
        self.assertEqual(problems, [])
        error = self.assertRaises(ConfigError, parse, self.keys(f"'{good}'", "['/nonexistent/old.key']"))
        self.assertIn("/nonexistent/old.key", str(error))
        # Three are allowed.
        self.assertEqual(len(control_config(self.keys(f"'{good}'", repr([good] * 3))).reply_verify_keys), 3)


class TransportUrlTests(SynchronousTestCase):
    """L{parse_transport_url} follows oslo's syntax."""

    def test_several_hosts_inherit_credentials(self) -> None:
        """A host without credentials uses the previous host's; later credentials replace them."""
        hosts, vhost = parse_transport_url("rabbit://u:p@h1:5673,h2,v:w@h3,h4:1/vh")
        self.assertEqual(
            [(h.host, h.port, h.username, h.password) for h in hosts],
            [("h1", 5673, "u", "p"), ("h2", 5672, "u", "p"), ("h3", 5672, "v", "w"), ("h4", 1, "v", "w")],
        )
        self.assertEqual(vhost, "vh")

    def test_no_credentials(self) -> None:
        """Without any credentials oslo's guest/guest applies."""
        hosts, _ = parse_transport_url("rabbit://h1,h2:65535")
        self.assertEqual([(h.username, h.password, h.port) for h in hosts], [("guest", "guest", 5672), ("guest", "guest", 65535)])

    def test_percent_escapes(self) -> None:
        """User, password and vhost are percent-decoded after splitting."""
        hosts, vhost = parse_transport_url("rabbit://us%3Aer:p%40ss%2Cw%3A@h/v%2Fhost")
        self.assertEqual((hosts[0].username, hosts[0].password, vhost), ("us:er", "p@ss,w:", "v/host"))

    def test_empty_path(self) -> None:
        """No path, C{/} and C{/%2F} all mean the C{/} vhost."""
        for url in ("rabbit://h", "rabbit://h/", "rabbit://h/%2F"):
            self.assertEqual(parse_transport_url(url)[1], "/", url)

    def test_bracketed_ipv6_hosts(self) -> None:
        """Bracketed IPv6 literals, with and without a port."""
        hosts, _ = parse_transport_url("rabbit://u:p@[::1]:5673,[fe80::2]/")
        self.assertEqual([(h.host, h.port, h.username) for h in hosts], [("::1", 5673, "u"), ("fe80::2", 5672, "u")])

    def test_password_hidden_from_repr(self) -> None:
        """The password never appears in a repr (logs)."""
        hosts, _ = parse_transport_url("rabbit://u:hunter2@h/")
        self.assertNotIn("hunter2", repr(hosts))

    def test_malformed_urls_refused(self) -> None:
        """Wrong scheme, query options, fragments, bad ports and missing hosts are ValueErrors."""
        cases = {
            "amqp://h/": "rabbit://",
            "h:5672": "rabbit://",
            "rabbit://h/?ssl=1&heartbeat=5": "other than ssl are not supported: heartbeat",
            "rabbit://h/?ssl=2": "ssl must be",
            "rabbit://h/#x": "fragment",
            "rabbit://h:0/": "bad port",
            "rabbit://h:65536/": "bad port",
            "rabbit://h:-1/": "bad port",
            "rabbit://h:x/": "bad port",
            "rabbit://a,h:5672:1/": "bad port",
            "rabbit://[::1]:99999/": "bad port",
            "rabbit:///vh": "no broker host",
            "rabbit://,/": "no broker host",
            "rabbit://u:p@/": "host missing",
            "rabbit://u:p@:5672/": "host missing",
            "rabbit://h,u:p@/": "host missing",
        }
        for url, words in cases.items():
            error = self.assertRaises(ValueError, parse_transport_url, url)
            self.assertIn(words, str(error), url)


class ConfigErrorTests(ConfigTestCase):
    """Every problem names the file and the dotted key."""

    def test_bad_configs(self) -> None:
        """Each bad config in the table is refused, naming its file and exact key."""
        problems = [f"{description}: {problem}" for description, text, key in BAD if (problem := self.key_problem(text, key))]
        self.assertEqual(problems, [])

    def test_short_reply_key(self) -> None:
        """A reply_key_file holding fewer than 16 bytes (after stripping) is refused."""
        key_path = self.write(b"  0123456789abcde\n")
        text = CONTROL.replace("[[", f"reply_key_file = '{key_path}'\n[[", 1)
        self.assertIsNone(self.key_problem(text, "control.reply_key_file"))

    def test_parse_names_given_path(self) -> None:
        """L{parse} names the path it is given."""
        error = self.assertRaises(ConfigError, parse, "[tenant]\n", "/etc/msgmux.toml")
        self.assertEqual(str(error), "/etc/msgmux.toml: tenant.transport_url: is required")

    def test_invalid_toml(self) -> None:
        """Text that is not TOML is refused, naming the file."""
        error = self.file_error(self.write("[control\ntransport_url = 1"))
        self.assertIn("TOML", str(error))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused, naming the file."""
        error = self.file_error(self.write(b"[tenant]\nsocket = '\xff\xfe'\n"))
        self.assertIn("UTF-8", str(error))

    def test_missing_file(self) -> None:
        """A file that does not exist, or a directory, is refused, naming it."""
        self.assertIn("cannot read", str(self.file_error(self.mktemp())))
        path = self.mktemp()
        os.mkdir(path)
        self.assertIn("cannot read", str(self.file_error(path)))

    def test_unreadable_file(self) -> None:
        """A file without read permission is refused, naming it."""
        path = self.write(CONTROL)
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o600)
        if os.geteuid() != 0:
            self.assertIn("cannot read", str(self.file_error(path)))
            return
        # Root reads files whatever their mode: read as nobody instead.
        os.seteuid(pwd.getpwnam("nobody").pw_uid)
        try:
            error = self.file_error(path)
        finally:
            os.seteuid(0)
        self.assertIn("cannot read", str(error))

    def test_neither_section(self) -> None:
        """A file with neither [control] nor [tenant] is refused."""
        for text in ("", "# nothing\n"):
            error = self.file_error(self.write(text))
            self.assertIn("[control]", str(error))


class TlsConfigTests(ConfigTestCase):
    """
    C{[tenant.tls]} / C{[control.tls]}: TLS per broker, its files read and
    checked at load time, each problem naming its key.
    """

    def setUp(self) -> None:
        from lab.pki import make_pki

        self.pki = make_pki(os.path.abspath(self.mktemp()))

    def tenant(self, tls: str, url: str = "rabbit://u:p@h/?ssl=1", extra: str = "") -> str:
        return f"[tenant]\ntransport_url = '{url}'\nsocket = '/run/a.sock'\n{extra}\n[tenant.tls]\n{tls}\n"

    def files(self, ca: str | None = None, cert: str = "client", key: str | None = None) -> str:
        pki = self.pki
        return (
            f"ca_file = '{ca or pki.ca}'\ncert_file = '{pki.cert(cert)}'\nkey_file = '{key or pki.key(cert)}'\n"
        )

    def test_url_ssl_and_files(self) -> None:
        """?ssl=1 turns TLS on; the table's files and options are kept, EXTERNAL login is allowed."""
        config = load(self.write(self.tenant(self.files() + "minimum_version = 'TLSv1_3'", extra="login_method = 'EXTERNAL'")))
        assert config.tenant is not None
        broker = config.tenant.broker
        self.assertEqual(
            broker.tls,
            TlsConfig(
                ca_file=self.pki.ca,
                cert_file=self.pki.cert("client"),
                key_file=self.pki.key("client"),
                verify=True,
                minimum_version="TLSv1_3",
            ),
        )
        self.assertEqual(broker.login_method, "EXTERNAL")

    def test_spellings(self) -> None:
        """oslo's ssl=true and tls.enabled turn TLS on with the defaults; without either it is off."""
        for url, tls in (("rabbit://h/?ssl=true", ""), ("rabbit://h/?ssl=True", ""), ("rabbit://h/", "enabled = true")):
            config = load(self.write(self.tenant(tls, url=url)))
            assert config.tenant is not None
            self.assertEqual(config.tenant.broker.tls, TlsConfig(), url)
        for url in ("rabbit://h/", "rabbit://h/?ssl=0", "rabbit://h/?ssl=false"):
            config = load(self.write(self.tenant("", url=url)))
            assert config.tenant is not None
            self.assertIsNone(config.tenant.broker.tls, url)
            self.assertEqual(config.tenant.broker.login_method, "PLAIN")
        self.assertEqual(
            [transport_url_ssl(u) for u in ("rabbit://h/", "rabbit://h/?ssl=1", "rabbit://h/?ssl=off")], [None, True, False]
        )

    def test_file_problems(self) -> None:
        """Missing files, files that are not PEM, and a key of another certificate name their key."""
        pki = self.pki
        garbage = self.write("not a certificate\n")
        broken = self.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        cases = [
            (self.files(ca="/nonexistent/ca.pem"), "tenant.tls.ca_file", "cannot read /nonexistent/ca.pem"),
            (self.files(ca=garbage), "tenant.tls.ca_file", "holds no PEM certificate"),
            (self.files(ca=broken), "tenant.tls.ca_file", "does not parse"),
            (self.files(key="/nonexistent/client.key"), "tenant.tls.key_file", "cannot read"),
            (self.files(key=pki.key("client-expired")), "tenant.tls.key_file", "is not the private key of"),
            (self.files(key=garbage), "tenant.tls.key_file", "is not an unencrypted PEM private key"),
            (self.files(key=pki.cert("client")), "tenant.tls.key_file", "is not an unencrypted PEM private key"),
            (f"cert_file = '{pki.cert('client')}'", "tenant.tls.key_file", "is required with cert_file"),
            (f"key_file = '{pki.key('client')}'", "tenant.tls.cert_file", "is required with key_file"),
        ]
        for tls, key, words in cases:
            path = self.write(self.tenant(tls))
            error = self.assertRaises(ConfigError, load, path)
            self.assertEqual((error.path, error.key), (path, key), str(error))
            self.assertIn(words, error.problem, str(error))

    def test_control_side(self) -> None:
        """The control half's broker takes the same table, as [control.tls]."""
        text = CONTROL.replace("rabbit://u:p@h/", "rabbit://u:p@h/?ssl=1").replace(
            "[[control.links]]", "[control.tls]\n" + self.files(ca="/nonexistent") + "\n[[control.links]]"
        )
        self.assertIsNone(self.key_problem(text, "control.tls.ca_file"))
        config = load(self.write(text.replace("/nonexistent", self.pki.ca)))
        assert config.control is not None
        self.assertEqual(config.control.broker.tls, TlsConfig(self.pki.ca, self.pki.cert("client"), self.pki.key("client")))
