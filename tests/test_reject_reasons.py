"""
The reasons msgmux refuses messages for, as the code gives them and as the
docs list them: docs/metrics.md (the C{reason} label operators alert on)
and docs/protocol.md (the REJECT codes a peer may send) must name every
reason the code uses, and no other.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from msgmux.policy import REJECT_REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A reason code given as a literal where a message is refused: raised as a
#: Refusal, or passed to the relay's and publisher's refusal and rejection
#: calls (the first string among their arguments).
REFUSED_WITH = re.compile(r'(?:\bRefusal|\b_refused?|stats\.reject)\((?:[^"()]|\([^()]*\))*"([a-z-]+)"')

#: Refused on the control half's side only: never sent in a REJECT frame.
LOCAL_ONLY = {"loop"}


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for directory, _, files in os.walk(os.path.join(ROOT, "msgmux")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    found.update(REFUSED_WITH.findall(f.read()))
    return found


def reasons_in_table(document: str, after: str, until: str) -> set[str]:
    """The first column of the Markdown table between two lines of C{document} in docs/."""
    with open(os.path.join(ROOT, "docs", document), encoding="utf-8") as f:
        text = f.read()
    start = text.index(after)
    table = text[start : text.index(until, start)]
    return set(re.findall(r"^\| `([a-z-]+)` \|", table, re.MULTILINE))


class RejectReasonsTests(SynchronousTestCase):
    def test_code_scan_finds_reasons(self) -> None:
        """The scan sees the refusals of the policy, the relay and the publisher (or it would prove nothing)."""
        self.assertTrue({"route", "too-complex", "poison", "internal", "loop"} <= reasons_in_code())

    def test_metrics_doc_lists_every_reason(self) -> None:
        """docs/metrics.md's table of the reason label names each reason the code refuses for, and no other."""
        self.assertEqual(
            reasons_in_table("metrics.md", "### Rejection reasons", "In `msgmux_messages_refused_by_peer_total`"),
            reasons_in_code(),
        )

    def test_protocol_doc_lists_the_reject_reasons(self) -> None:
        """docs/protocol.md's REJECT codes are those a half counts by name, and those the code sends."""
        documented = reasons_in_table("protocol.md", "REJECT refuses a message for good", "A receiver counts")
        self.assertEqual(documented, set(REJECT_REASONS))
        self.assertEqual(set(REJECT_REASONS), reasons_in_code() - LOCAL_ONLY)
