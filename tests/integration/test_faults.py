"""
Nothing lost: a small run of the C{make faults} scenarios that can run
against the shared lab (the full table, with a restart of a private control
broker too, is C{make faults}).
Under steady load in both directions a fault is injected; afterwards the
halves' logs must show it happened, every cast, call and notification the
oslo clients sent must have reached an oslo service, and no call may have
failed.
"""

from __future__ import annotations

from lab.faults import run_faults
from tests.integration.support import LabTestCase


class FaultTests(LabTestCase):
    timeout = 300

    async def _check(self, fault: str) -> None:
        results = await run_faults(self.lab, [fault], scale=0.2)
        self.assertEqual(len(results), 4)
        for row, _ in results:
            self.assertTrue(row.fault_seen, row)  # the fault really happened
            self.assertGreater(row.sent, 0, row)
            self.assertEqual(row.lost, 0, row)
            self.assertEqual(row.delivered, row.sent, row)
            # Calls too: none failed (timed out) across the fault.
            self.assertEqual(row.failed_sends, 0, row)

    async def test_kill_tenant_half(self) -> None:
        """kill -9 of the tenant half under load loses nothing."""
        await self._check("kill -9 tenant half")

    async def test_kill_control_half(self) -> None:
        """kill -9 of the control half under load loses nothing (and calls survive: shared reply key)."""
        await self._check("kill -9 control half")

    async def test_cut_socket(self) -> None:
        """Cutting the link socket under load loses nothing."""
        await self._check("cut the socket")

    async def test_restart_tenant_broker(self) -> None:
        """Restarting the tenant broker under load loses nothing.  (The control broker here is the machine's own; its restart is in C{make faults}, which starts a private one.)"""
        await self._check("restart tenant broker")

    async def test_drop_broker_connections(self) -> None:
        """Both brokers dropping every connection under load loses nothing."""
        await self._check("drop broker connections")
