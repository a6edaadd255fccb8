"""
Reply key rotation with real oslo calls in flight, in both directions: the
operator edits the key files and sends SIGHUP, following the documented
steps, and no call fails.  A direct swap of the signing key, without the
verification step, fails the calls in flight: the reload really applies the
keys, and the steps are what saves the calls.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task

from lab.lab import HalfProcess
from lab.peer import OsloPeer
from msgmux.oslo.tokens import key_id
from tests.integration.support import LabTestCase, control_config

ROUTES = """
down = [ { topic = "l3_agent" } ]
up = [ { topic = "q-reports", methods = ["sleep"] } ]
"""

OLD, NEW = "old-reply-key-0123456789abcdef", "new-reply-key-0123456789abcdef"

#: How long each call's server works: long enough that calls made before a
#: step are still in flight after it (checked, not assumed).
SLEEP = 10


class KeyRotationTests(LabTestCase):
    timeout = 180

    def key_file(self, name: str, key: str) -> str:
        return self.lab.write(f"{name}-{self.tag}.key", key + "\n")

    def write_config(self, signing: str, verifying: list[str]) -> str:
        extra = f'reply_key_file = "{signing}"\nreply_verify_key_files = {json.dumps(verifying)}'
        return control_config(self.lab, self.control_vhost, self.socket_path("tenant-a"), "tenant-a", ROUTES, extra=extra)

    async def start(self) -> tuple[HalfProcess, OsloPeer, OsloPeer]:
        signing = self.key_file("signing", OLD)
        control_half, _ = await self.start_link(ROUTES, extra=f'reply_key_file = "{signing}"')
        control, tenant = await self.peers()
        await tenant.request("server", name="agent", topic="l3_agent", server="agent")
        await control.request("server", name="q", topic="q-reports", server="q")
        await task.deferLater(self.lab.reactor, 0.5, lambda: None)
        return control_half, control, tenant

    async def served(self, peer: OsloPeer, name: str, count: int) -> None:
        """Wait until server C{name} has started C{count} calls: they were relayed, so their tokens signed."""
        for _ in range(300):
            if len(await peer.request("received", name=name)) >= count:
                return
            await task.deferLater(self.lab.reactor, 0.1, lambda: None)
        raise AssertionError(f"{name} never received {count} calls")

    async def wave(self, control: OsloPeer, tenant: OsloPeer, done: int, calls: int = 3) -> list[defer.Deferred[Any]]:
        """C{calls} calls down and as many up, each sleeping L{SLEEP}; returns once all are being served."""
        waves = [
            peer.request("call", topic=topic, method="sleep", kwargs={"seconds": SLEEP}, timeout=60)
            for peer, topic in ((control, "l3_agent"), (tenant, "q-reports"))
            for _ in range(calls)
        ]
        await self.served(tenant, "agent", done + calls)
        await self.served(control, "q", done + calls)
        return waves

    async def reload(self, control_half: HalfProcess, count: int) -> None:
        control_half.signal("HUP")
        await self.lab.wait_for_log(control_half, "Reloaded", count=count)

    def assert_in_flight(self, calls: list[defer.Deferred[Any]], when: str) -> None:
        """A precondition: the test shows nothing unless these calls are still waiting for their replies."""
        self.assertEqual([call.called for call in calls], [False] * len(calls), f"calls finished before {when}; raise SLEEP")

    async def test_rotation_with_calls_in_flight(self) -> None:
        """
        Add the new key as a verification key, make it the signing key
        (the old one verifying), then drop the old one once its calls are
        done: calls relayed under each key, in flight across each step, all
        return.
        """
        control_half, control, tenant = await self.start()
        signing = self.lab.path(f"signing-{self.tag}.key")
        first = await self.wave(control, tenant, 0)

        # 1. Every control half learns the new key, for verifying only.
        self.write_config(signing, [self.key_file("next", NEW)])
        await self.reload(control_half, 1)
        self.assert_in_flight(first, "step 1")
        self.assertIn(f"Reply keys: signing with {key_id(OLD.encode())}, also verifying ['{key_id(NEW.encode())}']", control_half.log())
        second = await self.wave(control, tenant, 3)

        # 2. The new key signs; the old one verifies the calls it signed.
        self.key_file("signing", NEW)
        self.write_config(signing, [self.key_file("previous", OLD)])
        await self.reload(control_half, 2)
        self.assert_in_flight(first + second, "step 2")
        self.assertIn(f"Reply keys: signing with {key_id(NEW.encode())}, also verifying ['{key_id(OLD.encode())}']", control_half.log())
        third = await self.wave(control, tenant, 6)
        results = await defer.gatherResults(first + second)
        self.assertEqual(results, [SLEEP] * 12)

        # 3. The calls signed with the old key are done: drop it.
        self.write_config(signing, [])
        await self.reload(control_half, 3)
        self.assert_in_flight(third, "step 3")
        self.assertEqual(await defer.gatherResults(third), [SLEEP] * 6)
        self.assertNotIn("rejected", control_half.log())

    async def test_swap_without_steps_fails_calls_in_flight(self) -> None:
        """Replacing the signing key at once (what the steps avoid) fails the calls in flight: their replies are refused."""
        control_half, control, tenant = await self.start()
        signing = self.lab.path(f"signing-{self.tag}.key")
        call = control.request("call", topic="l3_agent", method="sleep", kwargs={"seconds": 3}, timeout=12)
        await self.served(tenant, "agent", 1)
        self.key_file("signing", NEW)
        self.write_config(signing, [])
        await self.reload(control_half, 1)
        self.assert_in_flight([call], "the swap")
        failure = await self.assertFailure(call, Exception)
        self.assertEqual(failure.error, "MessagingTimeout")
        self.assertIn("(unsolicited-reply)", control_half.log())
