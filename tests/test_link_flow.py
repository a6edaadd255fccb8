"""
Tests for L{msgmux.link.flow}: sequence numbers and credit of a link
session, as a sender and as a receiver, without I/O.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from msgmux.link.flow import MAX_CREDIT_MESSAGES, ProtocolViolation, ReceiveWindow, SendWindow


class SendWindowTests(SynchronousTestCase):
    def test_credit_in_messages_and_bytes(self) -> None:
        """A message goes only with a message credit and as much byte credit as its body."""
        window = SendWindow(max_unsettled_bytes=1000)
        self.assertFalse(window.can_send(0))
        window.granted(2, 10)
        self.assertTrue(window.can_send(10))
        self.assertFalse(window.can_send(11))
        self.assertEqual(window.sent(6, "a", 0.0), 1)
        self.assertEqual(window.sent(4, "b", 0.0), 2)
        self.assertFalse(window.can_send(0))
        self.assertEqual((window.messages, window.body_bytes, len(window)), (0, 0, 2))

    def test_own_bound_on_unsettled_bytes(self) -> None:
        """However much the peer grants, no more than the bound stays unsettled; one message always may go."""
        window = SendWindow(max_unsettled_bytes=100)
        window.granted(100, 10**9)
        self.assertTrue(window.can_send(500))  # nothing unsettled: any single message may go
        window.sent(500, "big", 0.0)
        self.assertFalse(window.can_send(1))
        window.settled(1)
        self.assertTrue(window.can_send(60))
        window.sent(60, "a", 0.0)
        self.assertFalse(window.can_send(41))
        self.assertTrue(window.can_send(40))

    def test_settling(self) -> None:
        """Settling hands back the token; settling what is not outstanding is bad-ack."""
        window = SendWindow(1000)
        window.granted(1, 1)
        window.sent(1, "token", 0.0)
        self.assertEqual(window.settled(1), "token")
        violation = self.assertRaises(ProtocolViolation, window.settled, 1)
        self.assertEqual(violation.code, "bad-ack")

    def test_too_much_credit(self) -> None:
        """Credit beyond any need is a flow-control violation."""
        window = SendWindow(1000)
        window.granted(MAX_CREDIT_MESSAGES, 1)
        self.assertEqual(self.assertRaises(ProtocolViolation, window.granted, 1, 0).code, "flow-control")

    def test_age_of_the_oldest_unsettled(self) -> None:
        """The oldest unsettled message's age is known to within a second, in bounded memory."""
        window = SendWindow(10**9)
        window.granted(1000, 10**9)
        for second in range(100):
            for _ in range(10):
                window.sent(1, None, float(second))
        for seq in range(1, 501):
            window.settled(seq)
        oldest = window.oldest_unsettled(100.0)
        assert oldest is not None
        self.assertEqual(oldest[0], 501)
        self.assertEqual(oldest[1], 50.0)
        self.assertLessEqual(len(window._send_times), 100)


class ReceiveWindowTests(SynchronousTestCase):
    def test_in_order_with_credit(self) -> None:
        """Messages must come in sequence, each within the credit granted."""
        window = ReceiveWindow()
        window.grant(2, 10)
        window.received(1, 4)
        self.assertEqual(self.assertRaises(ProtocolViolation, window.received, 3, 0).code, "bad-sequence")
        self.assertEqual(self.assertRaises(ProtocolViolation, window.received, 2, 7).code, "flow-control")
        window.received(2, 6)
        self.assertEqual(self.assertRaises(ProtocolViolation, window.received, 3, 0).code, "flow-control")
