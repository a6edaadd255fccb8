# -*- test-case-name: tests.test_codec,tests.test_wire -*-
"""
Hypothesis strategies for msgmux's wire formats: messages
(L{msgmux.message}), link frames (L{msgmux.link.codec}) and the AMQP values
L{msgmux.amqp.wire} carries.

Every value drawn here is valid for both codecs, so one strategy serves the
link round trip and the AMQP round trip: header integers stay in the signed
64-bit range, decimals have 0-255 places and a 32-bit mantissa, timestamps
are whole seconds in UTC from 1970 on, and short strings fit 255 UTF-8 bytes.

NaN is never drawn where a value is compared after a round trip, because
C{nan != nan} would make equal frames look different; NaN's own handling is
tested explicitly.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from typing import Any, Callable

import cbor2
from hypothesis import strategies as st

from msgmux import message
from msgmux.amqp import wire
from msgmux.link import codec

__all__ = [
    "addresses",
    "amqp_decimals",
    "basic_properties",
    "cbor_values",
    "field_tables",
    "frame_strategies",
    "frames",
    "header_values",
    "messages",
    "raw_frames",
    "shortstrs",
    "tagged",
    "utc_datetimes",
]

Draw = Callable[[st.SearchStrategy[Any]], Any]

_UINT64 = (1 << 64) - 1

#: Text that always fits an AMQP short string: 63 code points are at most
#: 252 UTF-8 bytes.
shortstrs = st.text(max_size=63)


@st.composite
def amqp_decimals(draw: Draw) -> decimal.Decimal:
    """
    @param draw: Hypothesis's draw function.
    @return: a decimal AMQP's C{D} type carries: 0-255 places, signed
        32-bit mantissa.
    """
    places = draw(st.integers(min_value=0, max_value=255))
    mantissa = draw(st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1))
    return decimal.Decimal(mantissa).scaleb(-places)


@st.composite
def utc_datetimes(draw: Draw) -> datetime.datetime:
    """
    @param draw: Hypothesis's draw function.
    @return: an aware UTC datetime in whole seconds that AMQP's C{T} type
        (unsigned seconds since the epoch) carries.
    """
    value = draw(
        st.datetimes(
            min_value=datetime.datetime(1970, 1, 1),
            max_value=datetime.datetime(9999, 12, 31, 23, 59, 59),
            timezones=st.just(datetime.timezone.utc),
        )
    )
    whole: datetime.datetime = value.replace(microsecond=0)
    return whole


_header_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=30),
    amqp_decimals(),
    utc_datetimes(),
)

#: One header value: a scalar, or lists and tables of them a few levels deep.
header_values = st.recursive(
    _header_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(shortstrs, children, max_size=4),
    max_leaves=12,
)

#: An AMQP field table (message headers).
field_tables = st.dictionaries(shortstrs, header_values, max_size=5)


@st.composite
def basic_properties(draw: Draw) -> dict[str, Any]:
    """
    @param draw: Hypothesis's draw function.
    @return: AMQP basic properties that are valid per
        L{message.PROPERTY_TYPES} and fit their AMQP wire types.
    """
    names = draw(st.sets(st.sampled_from(wire.PROPERTY_NAMES)))
    properties: dict[str, Any] = {}
    for name in sorted(names):
        if name == "headers":
            properties[name] = draw(field_tables)
        elif name in ("delivery_mode", "priority"):
            properties[name] = draw(st.integers(min_value=0, max_value=255))
        elif name == "timestamp":
            properties[name] = draw(st.integers(min_value=0, max_value=_UINT64))
        else:
            assert message.PROPERTY_TYPES[name] is str
            properties[name] = draw(shortstrs)
    return properties


_names = st.text(max_size=20)
_optional_names = st.none() | _names

addresses = st.one_of(
    st.builds(message.RpcAddress, _optional_names, _names, _optional_names, st.booleans()),
    st.builds(message.NotificationAddress, _optional_names, _names, _names),
    st.builds(message.ReplyAddress, _optional_names),
    st.just(message.CanaryAddress()),
)

_seqs = st.integers(min_value=1, max_value=_UINT64)

#: A relayed message (no sequence number: that belongs to the frame).
messages = st.builds(
    message.Message,
    address=addresses,
    properties=basic_properties(),
    body=st.binary(max_size=200),
    # Finite only: the round trip compares with ==.
    deadline=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)

_rpc_routes = st.fixed_dictionaries(
    {"topic": _names, "servers": st.lists(_names, max_size=3), "fanout": st.booleans(), "exchange": _optional_names}
)
_notification_routes = st.fixed_dictionaries(
    {"topic": _names, "priorities": st.lists(_names, max_size=3), "exchange": _optional_names}
)
_routes = st.fixed_dictionaries(
    {},
    optional={
        "down": st.lists(_rpc_routes, max_size=3),
        "up": st.lists(_rpc_routes, max_size=3),
        "notifications_down": st.lists(_notification_routes, max_size=3),
        "notifications_up": st.lists(_notification_routes, max_size=3),
    },
)

hellos = st.builds(
    codec.Hello,
    versions=st.lists(st.integers(min_value=0, max_value=0xFFFF), max_size=4).map(tuple),
    link=_optional_names,
    software=_names,
)

welcomes = st.builds(
    codec.Welcome,
    version=st.integers(min_value=0, max_value=0xFFFF),
    link=_names,
    session=_names,
    heartbeat=st.floats(min_value=0, exclude_min=True, allow_infinity=False),
    max_body=st.integers(min_value=0, max_value=(1 << 32) - 1),
    routes=_routes,
)

# The largest ACK frames: a full batch of the largest sequence numbers.
_full_ack_batches = st.lists(
    st.integers(min_value=_UINT64 - 1000, max_value=_UINT64), min_size=codec.ACK_BATCH, max_size=codec.ACK_BATCH
).map(tuple)

#: One strategy per frame type, by type name.
frame_strategies: dict[str, st.SearchStrategy[Any]] = {
    "Hello": hellos,
    "Welcome": welcomes,
    "MessageFrame": st.builds(codec.MessageFrame, _seqs, messages),
    "Ack": st.builds(codec.Ack, st.lists(_seqs, max_size=10).map(tuple) | _full_ack_batches),
    "Reject": st.builds(codec.Reject, _seqs, _names),
    "Credit": st.builds(codec.Credit, st.integers(min_value=0, max_value=(1 << 32) - 1), st.integers(0, _UINT64)),
    "Heartbeat": st.just(codec.Heartbeat()),
    "Close": st.builds(codec.Close, _names, _names),
}

#: Any link frame.
frames = st.one_of(*frame_strategies.values())

_cbor_scalars = st.one_of(
    st.none(),
    st.booleans(),
    # Wider than 64 bits, so cbor2 emits bignum tags too.
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.just(cbor2.undefined),
    st.sampled_from([0, 19, 32, 255]).map(cbor2.CBORSimpleValue),
)

#: Arbitrary CBOR data, including tags, non-text map keys and bignums.
cbor_values = st.recursive(
    _cbor_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=5) | st.integers(-5, 5) | st.binary(max_size=3), children, max_size=4),
        st.builds(cbor2.CBORTag, st.integers(min_value=0, max_value=_UINT64), children),
    ),
    max_leaves=15,
)


_MSG, _HEARTBEAT = 2, 6


@st.composite
def raw_frames(draw: Draw) -> bytes:
    """
    @param draw: Hypothesis's draw function.
    @return: one length-prefixed frame shaped like a version 2 frame (a
        frame type, then CBOR fields, or for MSG a head length, a CBOR head
        and a body) but with arbitrary CBOR, to reach the per-type field
        checks; the head length is sometimes off.
    """
    code: int = draw(st.integers(min_value=0, max_value=8) | st.integers(min_value=0, max_value=255))
    fields = cbor2.dumps(draw(st.lists(cbor_values, max_size=6)))
    payload: bytes
    if code == _MSG:
        body = draw(st.binary(max_size=20))
        head_length = len(fields) + draw(st.sampled_from([0, 0, 0, -1, 1, -len(fields), 1 << 20]))
        payload = struct.pack(">I", max(head_length, 0) & 0xFFFFFFFF) + fields + body
    elif code == _HEARTBEAT:
        payload = draw(st.just(b"") | st.binary(max_size=3))
    else:
        payload = fields
    return struct.pack(">IB", len(payload) + 1, code) + payload


def tagged(value: Any) -> Any:
    """
    Make a value comparable without Python's cross-type equalities
    (C{True == 1 == 1.0}, C{Decimal("1.0") == Decimal("1.00")}).

    @param value: a header value, possibly nested.
    @return: a structure equal to another's only when both values have the
        same types, decimal exponents, timezones and contents.
    """
    if type(value) is list:
        return ("list", [tagged(item) for item in value])
    if type(value) is dict:
        return ("dict", {key: tagged(item) for key, item in value.items()})
    if type(value) is decimal.Decimal:
        return ("Decimal", value.as_tuple())
    if type(value) is datetime.datetime:
        return ("datetime", value, value.utcoffset())
    return (type(value).__name__, value)
