# -*- test-case-name: tests.test_mismatch -*-
"""
What RabbitMQ means when it refuses a declaration, and what the operator
must do about it.

RabbitMQ refuses to declare a queue or an exchange again with other
properties: it closes the channel with 406 PRECONDITION_FAILED and a text
such as C{inequivalent arg 'x-expires' for queue 'reply_msgmux_a' in vhost
'/': received '3600000' but current is '1800000'}.  L{Inequivalent} reads
that text.  For msgmux's own queues the answer is to move them
(L{msgmux.amqp.migrate}); for what msgmux shares with oslo services, only
the operator can act, together with those services, and L{advice} says
how, naming the oslo options behind the property that differs.
"""

from __future__ import annotations

import re
from typing import Union

import attrs

from msgmux.oslo.topology import ExchangeSpec, QueueSpec, shaping_options

__all__ = ["DeclarationRefused", "Inequivalent", "advice", "broker_refusal", "inequivalent"]

Declared = Union[QueueSpec, ExchangeSpec]

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r" in vhost '(?P<vhost>[^']*)': received (?P<received>.+?) but current is (?P<current>.+)$",
    re.DOTALL,
)
# RabbitMQ shows a value as 'v', as "the value 'v' of type 't'", or as "none".
_VALUE = re.compile(r"^(?:the value )?'(?P<value>.*?)'(?: of type '[^']*')?$", re.DOTALL)


def _value(shown: str) -> str:
    match = _VALUE.match(shown.strip())
    return match.group("value") if match else shown.strip()


def broker_refusal(error: BaseException) -> tuple[int, str] | None:
    """
    @param error: what a synchronous AMQP method raised.
    @return: the reply code and text of the C{channel.close} or
        C{connection.close} the broker answered it with, or L{None} when it
        failed otherwise (the connection went, say).
    """
    # txAMQP raises ChannelClosed/ConnectionClosed with the closing method
    # (a txAMQP Message, whose fields are attributes) as the argument.
    reason = error.args[0] if error.args else None
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if isinstance(code, int) and isinstance(text, (str, bytes)):
        return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return None


@attrs.frozen
class Inequivalent:
    """
    RabbitMQ refused a declaration because one property differs from what
    it holds.

    @ivar argument: the property, as RabbitMQ names it (C{durable},
        C{x-queue-type}...).
    @ivar declared: its value in the refused declaration (C{none} when absent).
    @ivar current: its value on the broker (C{none} when absent).
    @ivar text: the broker's whole reply text.
    """

    kind: str
    name: str
    vhost: str
    argument: str
    declared: str
    current: str
    text: str

    @classmethod
    def parse(cls, text: str) -> Inequivalent | None:
        """@return: the mismatch a 406 reply text describes, or L{None} for any other text."""
        match = _INEQUIVALENT.search(text)
        if match is None:
            return None
        return cls(
            kind=match.group("kind"),
            name=match.group("name"),
            vhost=match.group("vhost"),
            argument=match.group("argument"),
            declared=_value(match.group("received")),
            current=_value(match.group("current")),
            text=text,
        )

    def describe(self) -> str:
        """@return: e.g. C{x-expires 1800000 on the broker, 3600000 declared}."""
        return f"{self.argument} {self.current} on the broker, {self.declared} declared"


def inequivalent(error: BaseException) -> Inequivalent | None:
    """@return: the mismatch behind a refused declaration, or L{None} if C{error} is something else."""
    refusal = broker_refusal(error)
    if refusal is None or refusal[0] != 406:
        return None
    return Inequivalent.parse(refusal[1])


class DeclarationRefused(Exception):
    """
    The broker refused a declaration msgmux cannot fix by itself; the
    message is the operator's advice (L{advice}).
    """


def advice(mismatch: Inequivalent, declared: Declared, broker: str, held: bool = False) -> str:
    """
    The log text for a declaration of something oslo services share that
    the broker refused.

    @param declared: what msgmux declared.
    @param broker: C{"control"} or C{"tenant"}: the half's broker, which
        names its C{[<broker>.queues]} section.
    @param held: for an auto-delete exchange: msgmux unbound its own queues
        from it, and other queues still keep it.
    @return: which property differs, the oslo options behind it, and what to
        do, ending with RabbitMQ's own text.
    """
    section = f"[{broker}.queues]"
    options = shaping_options(mismatch.argument, declared)
    source = f" (set by {', '.join(options)} in {section})" if options else ""
    kind, name, vhost = mismatch.kind, mismatch.name, mismatch.vhost
    head = (
        f"{kind} '{name}' differs on the {broker} broker: {mismatch.argument} is {mismatch.current} there,"
        f" msgmux declares {mismatch.declared}{source}. oslo services share this {kind}, so msgmux cannot replace it."
        f" If {section} is wrong, make it equal to the [oslo_messaging_rabbit] options of the services on this broker"
        " and restart msgmux. If those options changed, "
    )
    if isinstance(declared, ExchangeSpec) and declared.auto_delete:
        ours = "msgmux has unbound its own queues, " if held else ""
        action = (
            f"this auto-delete exchange goes once no queue is bound to it; {ours}the queues still bound belong to oslo"
            f" services running with the old options (rabbitmqctl list_bindings --vhost '{vhost}' source_name"
            " destination_name): restart them with the new options, and delete with rabbitmqctl delete_queue the queues"
            " of any that did not stop cleanly"
        )
    elif kind == "queue":
        action = (
            "the services and msgmux must change together: stop the services that use it and this half, delete it"
            f" once empty (rabbitmqctl delete_queue --vhost '{vhost}' '{name}' --if-empty), then start them all with"
            " the new options"
        )
    else:
        action = (
            "the services and msgmux must change together: stop the services that use it and this half, delete it"
            f" (rabbitmqadmin --vhost='{vhost}' delete exchange name='{name}'), then start them all with the new options"
        )
    return f"{head}{action} (docs/operations.md, Changing queue options). RabbitMQ: {mismatch.text}"
