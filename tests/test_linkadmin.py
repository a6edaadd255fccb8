"""
Tests for links added at run time: L{msgmux.linkadmin.LinkAdmin} against a
recording control half (L{tests.doubles.RecordingControlHalf}), and the
state file (L{msgmux.linkstore.LinkStore}).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from msgmux._toml import ConfigError
from msgmux.config import parse
from msgmux.linkadmin import AdminError, LinkAdmin
from msgmux.linkstore import LinkStore
from tests.doubles import RecordingControlHalf, control_config

CONTROL = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"
admin_socket = "{directory}/admin.sock"
state_file = "{directory}/links.json"

[control.limits]
max_rate = 10.0

[control.supervision]
users = ["nobody"]
groups = ["nogroup"]

[[control.links]]
name = "static"
socket = "{directory}/static.sock"
"""


def r1(**changes: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"name": "r1", "socket": "/run/msgmux/r1.sock", "down": [{"topic": "l3_agent"}]}
    table.update(changes)
    return {k: v for k, v in table.items() if v is not None}


class LinkAdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        config = parse(CONTROL.format(directory=self.directory)).control
        assert config is not None
        self.config = config
        self.control = RecordingControlHalf(config)
        self.store = LinkStore(os.path.join(self.directory, "links.json"))
        self.admin = self.make_admin([])

    def make_admin(self, stored: list[Any]) -> LinkAdmin:
        return LinkAdmin(
            self.control, self.store, None, stored, defer.DeferredLock().run, lambda f, *a: defer.maybeDeferred(f, *a)
        )

    def stored(self) -> list[dict[str, Any]]:
        with open(self.store.path) as f:
            links: list[dict[str, Any]] = json.load(f)["links"]
        return links

    def refused(self, deferred: defer.Deferred[Any]) -> str:
        return str(self.failureResultOf(deferred, AdminError).value)

    def test_add(self) -> None:
        """An added link is served, stored, and takes the control half's default limits."""
        description = self.successResultOf(self.admin.add(r1(), "r1.toml"))
        self.assertEqual((description["link"], description["origin"]), ("r1", "runtime"))
        self.assertEqual(self.control.calls, [("add", "r1")])
        self.assertEqual(self.stored(), [r1()])
        self.assertEqual(self.control.links["r1"].config.limits.max_rate, 10.0)
        self.assertEqual(os.stat(self.store.path).st_mode & 0o777, 0o600)

    def test_errors_are_the_config_files(self) -> None:
        """A bad link is refused with the configuration file's message, naming the key, and changes nothing."""
        cases = [
            (r1(down=[{"topic": ""}]), "r1.toml: down[0].topic: must be 1-160 characters"),
            (r1(name="bad name"), "r1.toml: name: must be 1-63 letters"),
            (r1(socket="relative"), "r1.toml: socket: must be an absolute path"),
            (r1(extra=1), "r1.toml: extra: is not a known option"),
            (r1(up=[{"topic": "l3_agent", "methods": ["x"]}]), "r1.toml: up[0].topic: 'l3_agent' is also routed down; it would loop"),
            (r1(tenant={"namespace": "q", "transport_url": "rabbit://h/", "user": "root", "group": "nogroup"}), "r1.toml: tenant.user: must not be root"),
            (r1(name="static"), "r1.toml: name: 'static' is used by another link"),
            (r1(socket=f"{self.directory}/static.sock"), f"r1.toml: socket: '{self.directory}/static.sock' is used by another link"),
            ("not a table", "r1.toml: the link must be a table"),
        ]
        for table, message in cases:
            self.assertTrue(self.refused(self.admin.add(table, "r1.toml")).startswith(message), message)
        self.assertEqual(self.control.calls, [])
        self.assertFalse(os.path.exists(self.store.path))
        # The same problem text as the configuration file gives.
        file_error = self.assertRaises(
            ConfigError, parse, CONTROL.format(directory=self.directory) + '[[control.links]]\nname = "x"\nsocket = "/x.sock"\ndown = [{topic = ""}]\n'
        )
        self.assertEqual(file_error.problem, str(self.refused(self.admin.add(r1(down=[{"topic": ""}]), "f"))).split(": ", 2)[2])

    def test_duplicate(self) -> None:
        self.successResultOf(self.admin.add(r1(), "a"))
        self.assertEqual(self.refused(self.admin.add(r1(), "b")), "b: name: 'r1' is used by another link")

    def test_bind_failure_changes_nothing(self) -> None:
        self.control.refuse_bind = True
        self.assertIn("socket: cannot listen on /run/msgmux/r1.sock", self.refused(self.admin.add(r1(), "r1.toml")))
        self.assertFalse(os.path.exists(self.store.path))
        self.assertEqual(self.admin.dynamic, {})

    def test_store_failure_undoes_the_add(self) -> None:
        """When the state file cannot be written, the link is taken down again."""
        os.chmod(self.directory, 0o500)
        self.addCleanup(os.chmod, self.directory, 0o700)
        if os.geteuid() == 0:
            self.store.path = "/proc/msgmux-cannot-write/links.json"
        message = self.refused(self.admin.add(r1(), "r1.toml"))
        self.assertIn("link not added", message)
        self.assertEqual(self.control.calls, [("add", "r1"), ("remove", "r1")])
        self.assertNotIn("r1", self.control.links)

    def test_remove(self) -> None:
        """Removing drains the link on the control half and drops it from the state file."""
        self.successResultOf(self.admin.add(r1(), "a"))
        self.successResultOf(self.admin.add(r1(name="r2", socket="/run/msgmux/r2.sock"), "a"))
        self.assertEqual(self.successResultOf(self.admin.remove("r1")), {"link": "r1", "removed": True})
        self.assertEqual(self.control.calls[-1], ("remove", "r1"))
        self.assertEqual([table["name"] for table in self.stored()], ["r2"])

    def test_remove_refused(self) -> None:
        """Links of the configuration file and unknown links cannot be removed."""
        self.assertEqual(
            self.refused(self.admin.remove("static")), "link 'static' is in the configuration file; remove it there and reload"
        )
        self.assertEqual(self.refused(self.admin.remove("nope")), "no link 'nope'")
        self.assertEqual(self.refused(self.admin.remove(["x"])), "no link ['x']")
        self.assertEqual(self.control.calls, [])

    def test_list_and_show(self) -> None:
        self.successResultOf(self.admin.add(r1(tenant=None), "a"))
        self.assertEqual([(d["link"], d["origin"]) for d in self.admin.list()], [("static", "config"), ("r1", "runtime")])
        self.assertEqual(self.admin.show("r1")["settings"], r1())
        self.assertEqual(self.admin.show("static")["settings"]["socket_mode"], "0660")
        self.assertRaises(AdminError, self.admin.show, "nope")

    def test_show_hides_passwords(self) -> None:
        tenant = {"namespace": "q1", "transport_url": "rabbit://u:secret@127.0.0.1:5672,v:other@h2/vh", "user": "nobody", "group": "nogroup"}
        self.successResultOf(self.admin.add(r1(tenant=tenant), "a"))
        shown = self.admin.show("r1")["settings"]["tenant"]["transport_url"]
        self.assertEqual(shown, "rabbit://u:***@127.0.0.1:5672,v:***@h2/vh")

    def test_restored(self) -> None:
        """Stored links come back through the state file, validated again."""
        self.successResultOf(self.admin.add(r1(), "a"))
        control = RecordingControlHalf(self.config)
        self.control = control
        restored = self.make_admin(self.store.load(self.config))
        restored.start()
        self.assertEqual(control.calls, [("add", "r1")])
        self.assertEqual(restored.describe("r1")["origin"], "runtime")

    def test_clash_with_reloaded_file(self) -> None:
        self.successResultOf(self.admin.add(r1(), "a"))
        clashing = parse(CONTROL.format(directory=self.directory) + '[[control.links]]\nname = "r1"\nsocket = "/x.sock"\n').control
        assert clashing is not None
        self.assertIn("clashes with link 'r1' added at run time", self.admin.clash(clashing) or "")
        self.assertIsNone(self.admin.clash(self.config))


class LinkStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="msgmux-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.config = control_config(CONTROL.format(directory=self.directory))
        self.store = LinkStore(os.path.join(self.directory, "links.json"))

    def write(self, text: str) -> None:
        with open(self.store.path, "w") as f:
            f.write(text)

    def test_missing_file_is_empty(self) -> None:
        self.assertEqual(self.store.load(self.config), [])

    def test_round_trip_and_atomic(self) -> None:
        """save replaces the file in one rename and leaves no temporary file behind."""
        self.store.save([r1()])
        self.store.save([r1(), r1(name="r2", socket="/run/msgmux/r2.sock")])
        self.assertEqual([link.name for _, link in self.store.load(self.config)], ["r1", "r2"])
        self.assertEqual(sorted(os.listdir(self.directory)), ["links.json"])

    def test_errors_name_the_state_file_and_key(self) -> None:
        for text, key in (
            ("{", ""),
            ('{"version": 2, "links": []}', "version"),
            ('{"version": 1, "links": {}}', "links"),
            ('{"version": 1, "links": [1]}', "links[0]"),
            ('{"version": 1, "links": [{"name": "r1", "socket": "/r1.sock", "down": [{"topic": 5}]}]}', "links[0].down[0].topic"),
        ):
            self.write(text)
            error = self.assertRaises(ConfigError, self.store.load, self.config)
            self.assertEqual((error.path, error.key), (self.store.path, key))

    def test_file_wins_on_clash(self) -> None:
        """A stored link with the name of a configured one is left out."""
        self.store.save([r1(name="static"), r1()])
        self.assertEqual([link.name for _, link in self.store.load(self.config)], ["r1"])
