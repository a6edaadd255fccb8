"""
Tests for reply key rotation in a running control half: a reload (SIGHUP)
re-reads C{reply_key_file} and C{reply_verify_key_files} and the signer uses
them from then on, without a broker (the end-to-end version with oslo calls
in flight is in C{tests/integration/test_key_rotation.py}).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from msgmux.config import load
from msgmux.oslo.tokens import TokenError, TokenSigner
from msgmux.service import MsgmuxService

OLD, NEW = b"old-secret-0123456789", b"new-secret-0123456789"

CONFIG = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/"
{keys}

[[control.links]]
name = "tenant-a"
socket = "{directory}/tenant-a.sock"
"""


class KeyReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="msgmux-test-")  # short enough for Unix socket paths
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "msgmux.toml")
        self.write_key("signing.key", OLD)
        self.configure('reply_key_file = "{directory}/signing.key"')
        self.service = MsgmuxService(load(self.path), MemoryReactorClock())
        self.service.running = True  # as after startService, without listening or connecting
        assert self.service.control is not None
        self.signer = self.service.control.signer

    def write_key(self, name: str, key: bytes) -> None:
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(key + b"\n")

    def configure(self, keys: str) -> None:
        with open(self.path, "w") as f:
            f.write(CONFIG.format(keys=keys.format(directory=self.directory), directory=self.directory))

    def reload(self) -> None:
        self.successResultOf(self.service.reload())

    def token(self, signer: TokenSigner) -> str:
        return signer.issue("tenant-a", "down", "m", "reply_q", 1e9)

    def verifies(self, token: str) -> bool:
        try:
            self.signer.verify("tenant-a", "down", token)
        except TokenError:
            return False
        return True

    def test_rotation(self) -> None:
        """The three steps, each applied by a reload: tokens of the previous step keep verifying until the old key is dropped."""
        before = self.token(self.signer)
        # 1. The new key verifies.
        self.write_key("next.key", NEW)
        self.configure('reply_key_file = "{directory}/signing.key"\nreply_verify_key_files = ["{directory}/next.key"]')
        self.reload()
        self.assertTrue(self.verifies(before))
        self.assertTrue(self.verifies(self.token(TokenSigner(NEW))))
        during = self.token(self.signer)
        self.assertTrue(TokenSigner(OLD).verify("tenant-a", "down", during))  # still signed with the old key
        # 2. The new key signs; the old one still verifies.
        self.write_key("signing.key", NEW)
        self.write_key("previous.key", OLD)
        self.configure('reply_key_file = "{directory}/signing.key"\nreply_verify_key_files = ["{directory}/previous.key"]')
        self.reload()
        after = self.token(self.signer)
        self.assertTrue(TokenSigner(NEW).verify("tenant-a", "down", after))
        self.assertTrue(all(self.verifies(token) for token in (before, during, after)))
        # 3. The old key is dropped: what it signed is refused.
        self.configure('reply_key_file = "{directory}/signing.key"')
        self.reload()
        self.assertEqual([self.verifies(token) for token in (before, during, after)], [False, False, True])
        assert self.service.control is not None
        self.assertEqual(self.service.control.config.reply_verify_keys, ())

    def test_refused_reload_keeps_keys(self) -> None:
        """A key file that became unreadable or too short makes the reload fail; the running keys stay."""
        before = self.token(self.signer)
        self.write_key("signing.key", b"short")
        self.reload()
        self.assertTrue(self.verifies(before))
        self.assertTrue(TokenSigner(OLD).verify("tenant-a", "down", self.token(self.signer)))

    def test_key_file_removed_keeps_key(self) -> None:
        """A configuration without reply_key_file any more keeps the key in use (a random one would fail every call)."""
        before = self.token(self.signer)
        self.configure("")
        self.reload()
        self.assertTrue(self.verifies(before))
        assert self.service.control is not None
        self.assertEqual(self.service.control.config.reply_key, OLD)
