# -*- test-case-name: tests.test_control_policy -*-
"""
What a relay asks its half: the interface between message flow and policy.

A L{msgmux.relay.Relay} moves messages between one link session and one
broker channel, at least once; it does not decide anything about them.  It
asks a L{RelayPolicy} what to consume, what to declare, and what each
message becomes on the other side.  The control half's policy
(L{msgmux.control.policy.ControlPolicy}) is the trust boundary; the tenant
half's (L{msgmux.tenant.TenantPolicy}) mirrors oslo.  A policy does no I/O,
so it is tested on its own, without a relay, a link or a broker.

Both ways, a policy refuses a message by raising L{Refusal}: the relay then
rejects the delivery (outbound) or sends REJECT (inbound), and counts and
logs the refusal, in one place.  A policy that returns L{None} consumes the
message: the relay settles it as done.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from msgmux.amqp.channel import Delivery
from msgmux.message import Message
from msgmux.oslo.topology import ExchangeSpec, QueueSpec
from msgmux.routing import Destination, Source

__all__ = ["Publication", "Refusal", "RelayPolicy", "REJECT_REASONS"]

#: The REJECT reasons of docs/protocol.md.  A peer's reason outside this set
#: is counted as "other", so that it cannot mint metric series at will.
REJECT_REASONS = frozenset(
    (
        "route",
        "method",
        "too-large",
        "too-complex",
        "malformed",
        "inflight",
        "unsolicited-reply",
        "late-reply",
        "poison",
        "internal",
    )
)


class Refusal(Exception):
    """A message the policy refuses for good, with the REJECT reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Copy(Exception):
    """
    A message that is a copy of one still on its way to the broker (its
    peer's broker redelivered it): it waits for that one and ends as it
    does (L{msgmux.copies}).

    @ivar identity: the L{Publication.identity} of the one it copies.
    """

    def __init__(self, identity: tuple[str, str]) -> None:
        super().__init__(identity)
        self.identity = identity


@attrs.frozen
class Publication:
    """
    What to publish for one inbound message.

    @ivar deadline: Unix time after which the message is dropped rather than
        published; its remaining time becomes the AMQP C{expiration}.
    @ivar retry_until: for a mandatory publish (a reply), Unix time until
        which a publish the broker returns is tried again, as oslo's server
        retries a reply whose queue is missing; after it, the message is
        dropped and counted as undeliverable.
    @ivar unique_id: the oslo C{_unique_id}, where the policy read it;
        handed back to L{RelayPolicy.published} once the broker confirmed.
    @ivar answers: for a call's final reply, the call's reply token; handed
        back likewise.
    """

    destination: Destination
    properties: dict[str, Any]
    body: bytes
    deadline: float | None = None
    retry_until: float | None = None
    unique_id: str | None = None
    answers: str | None = None

    #: What makes two publications the same message, where the policy
    #: knows it: the oslo C{_unique_id}, or the call a final reply answers.
    #: Computed once: the relay reads it twice per message.
    identity: tuple[str, str] | None = attrs.field(init=False, eq=False, repr=False)

    @identity.default
    def _identity(self) -> tuple[str, str] | None:
        if self.unique_id is not None:
            return ("unique_id", self.unique_id)
        if self.answers is not None:
            return ("answers", self.answers)
        return None


class RelayPolicy(Protocol):
    """
    One half's decisions for one link session.

    @ivar direction_out: the direction label of what this half sends on the
        link (C{"down"} for the control half, C{"up"} for the tenant half).
    @ivar direction_in: the label of what it receives.
    """

    direction_out: str
    direction_in: str

    def sources(self) -> list[Source]:
        """The queues this half consumes on its broker."""

    def publish_declarations(self) -> tuple[list[ExchangeSpec], list[QueueSpec]]:
        """The exchanges and queues this half declares before publishing."""

    def outbound(self, source: Source, delivery: Delivery) -> Message | None:
        """
        A delivery from one of L{sources}: what to send on the link.

        @return: the message, or L{None} when the delivery ends here.
        @raise Refusal: to reject it for good.
        """

    def inbound(self, message: Message) -> Publication | None:
        """
        A message from the peer: what to publish.

        @return: the publication, or L{None} when the message ends here.
        @raise Refusal: to refuse it for good.
        @raise Copy: when it copies a publication not yet confirmed.
        """

    def published(self, publication: Publication) -> None:
        """The broker confirmed C{publication}."""

    def publish_failed(self, publication: Publication) -> None:
        """C{publication} will not be published in this session (dropped or refused)."""
