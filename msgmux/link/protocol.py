# -*- test-case-name: tests.test_link_protocol -*-
"""
The link protocol: frames over a Unix stream socket between the two halves.

L{LinkProtocol} does everything both halves share: decoding with
L{msgmux.link.codec.FrameDecoder}, heartbeats, sequence numbers, credit
accounting and ACK/CREDIT batching, and closing with a reason.  The
handshake differs by role: L{ControlLinkProtocol} waits for HELLO and answers
WELCOME; L{TenantLinkProtocol} says HELLO and waits for WELCOME.  Once the
session is up, messages and their outcomes go to a L{SessionHandler} (the
relay of that half).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import uuid
from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux import __version__
from msgmux._writethrough import Writer
from msgmux.link import codec
from msgmux.link.codec import (
    Ack,
    Close,
    Credit,
    Frame,
    FrameError,
    Heartbeat,
    Hello,
    Message,
    Reject,
    Welcome,
)

#: Seconds a new connection may take to complete the handshake.
HANDSHAKE_TIMEOUT = 10.0

_LENGTH = struct.Struct(">I")

#: Sequence numbers acknowledged per ACK frame at most.
ACK_BATCH = 256

#: Seconds a few ACKs and a little CREDIT may wait to travel with the next
#: MSG in the same write.  At low rates (a call at a time) this saves the
#: peer one wakeup per message, which on a busy host costs more than the
#: message itself; the wait never delays a message, only its settlement.
SETTLE_DELAY = 0.005

#: Pending ACKs that are sent at the end of the reactor turn instead of
#: waiting: enough that the sender's broker prefetch never runs dry.
ACK_EAGER = 8

#: Largest frame the control half accepts before the handshake completes:
#: HELLO is small, and a peer that has not said who it is gets no room to
#: make the control half buffer megabytes.
HANDSHAKE_MAX_FRAME = 16 * 1024

#: Characters of peer-supplied text (CLOSE details, HELLO software) logged.
LOGGED_TEXT = 200

#: Seconds a closing connection may take to deliver its CLOSE frame and
#: what is buffered before it is aborted.  Without this a peer that stops
#: reading would keep the connection, and the session with its unsettled
#: deliveries, for as long as it likes.
CLOSE_GRACE = 5.0

#: Seconds a sent message may stay unacknowledged before the session is
#: closed (its broker then redelivers it, possibly to a competing consumer).
#: A half whose broker blocks publishing holds messages legitimately, but not
#: for minutes; one that holds them forever starves the other consumers of
#: a shared queue.
ACK_TIMEOUT = 300.0


class SessionHandler(Protocol):
    """What a half does with an established link session."""

    def session_started(self, link: LinkProtocol) -> None:
        """The handshake completed; C{link} can carry messages."""

    def message_received(self, message: Message) -> None:
        """
        The peer sent a message; answer later with L{LinkProtocol.acknowledge}
        or L{LinkProtocol.refuse}.
        """

    def messages_acknowledged(self, tokens: list[Any]) -> None:
        """The peer's broker confirmed messages we sent (their send tokens)."""

    def message_refused(self, token: Any, reason: str) -> None:
        """The peer refused a message we sent, for good."""

    def credit_received(self) -> None:
        """The peer allowed more messages; L{LinkProtocol.send_credit} grew."""

    def session_ended(self, reason: str) -> None:
        """The session is over (the socket closed); in-flight state is void."""


class MessageTooLarge(Exception):
    """A message does not fit the largest frame the peer accepts."""


class ProtocolViolation(Exception):
    """The peer broke the protocol; the link closes with C{code}."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class LinkProtocol(TwistedProtocol):
    """
    Shared machinery of both ends of a link.

    @ivar send_credit: messages we may still send before the peer grants more.
    @ivar receive_credit: messages the peer may still send us.
    @ivar session: the session id from WELCOME, once established.
    @ivar close_reason: why the link closed (or is closing), for logs and tests.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, heartbeat: float, max_frame: int = codec.DEFAULT_MAX_FRAME) -> None:
        self.clock = clock
        self.heartbeat = heartbeat
        self.decoder = codec.FrameDecoder(max_frame)
        self._writer = Writer(clock)
        self.peer_max_frame = codec.DEFAULT_MAX_FRAME
        self.handler: SessionHandler | None = None
        self.session: str | None = None
        self.link_name: str | None = None
        self.send_credit = 0
        self.receive_credit = 0
        self.close_reason: str | None = None
        self.violation_observers: list[Callable[[str, str], None]] = []
        self._next_seq = 1
        self._expected_seq = 1
        self._unacked: dict[int, Any] = {}
        # (seq, when sent) for at most one message per second, oldest first:
        # enough to tell the age of the oldest unacknowledged message to
        # within a second, in bounded memory.
        self._send_times: collections.deque[tuple[int, float]] = collections.deque()
        self._pending_acks: list[int] = []
        self._pending_credit = 0
        self._flush_call: Any = None
        self._last_received = 0.0
        self._last_sent = 0.0
        self._heartbeat_loop: LoopingCall | None = None
        self._handshake_timer: Any = None
        self._abort_timer: Any = None

    # --- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        now = self.clock.seconds()
        self._last_received = self._last_sent = now
        self._handshake_timer = self.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self.close("handshake-timeout", f"no handshake within {HANDSHAKE_TIMEOUT:.0f}s")

    def _session_started(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        loop = LoopingCall(self._check_heartbeat)
        loop.clock = self.clock
        loop.start(self.heartbeat, now=False)
        self._heartbeat_loop = loop
        assert self.handler is not None
        self.handler.session_started(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        if self._heartbeat_loop is not None and self._heartbeat_loop.running:
            self._heartbeat_loop.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.close_reason is None:
            self.close_reason = f"connection lost: {reason.getErrorMessage()}"
        handler, self.handler = self.handler, None
        self._unacked.clear()
        self._send_times.clear()
        if handler is not None and self.session is not None:
            handler.session_ended(self.close_reason)

    @property
    def established(self) -> bool:
        """Whether the session is up and usable."""
        return self.handler is not None and self.session is not None and self.close_reason is None

    def close(self, code: str, detail: str) -> None:
        """
        Say why, then close.  Idempotent.

        @param code: a short machine-readable reason (see C{docs/protocol.md}).
        @param detail: words for the log of the other half.
        """
        if self.close_reason is not None:
            return
        self.close_reason = f"{code}: {detail}"
        if self.transport is not None:
            self._flush()
            self._write(Close(code, detail[:500]))
            self._disconnect()

    def _disconnect(self) -> None:
        """
        Close the connection once what is buffered is written, or abort it
        after L{CLOSE_GRACE} seconds if the peer does not read it.
        """
        if self._heartbeat_loop is not None and self._heartbeat_loop.running:
            self._heartbeat_loop.stop()
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        self._log.warn(
            "Link {link}: the peer did not take the close for {grace:.0f}s; aborting", link=self.link_name or "?", grace=CLOSE_GRACE
        )
        self.transport.abortConnection()

    def _violation(self, code: str, detail: str) -> None:
        self._log.warn(
            "Link {link}: protocol violation ({code}): {detail}; closing",
            link=self.link_name or "?",
            code=code,
            detail=detail,
        )
        for observer in list(self.violation_observers):
            observer(code, detail)
        self.close(code, detail)

    # --- incoming -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        if self.close_reason is not None:
            return
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            self._violation("bad-frame", str(e))
            return
        try:
            for frame in frames:
                if self.close_reason is not None:
                    return
                if type(frame) is Message and self.handler is not None and self.session is not None:
                    self._message(frame)  # the common case, without the dispatch below
                else:
                    self.frame_received(frame)
        except ProtocolViolation as e:
            self._violation(e.code, e.detail)

    def _message(self, frame: Message) -> None:
        if frame.seq != self._expected_seq:
            raise ProtocolViolation("bad-sequence", f"expected MSG {self._expected_seq}, got {frame.seq}")
        if self.receive_credit <= 0:
            raise ProtocolViolation("flow-control", f"MSG {frame.seq} sent without credit")
        self._expected_seq += 1
        self.receive_credit -= 1
        self.handler.message_received(frame)  # type: ignore[union-attr]

    def frame_received(self, frame: Frame) -> None:
        """Dispatch one frame of an established session (handshake frames are the subclasses')."""
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, Close):
            code, detail = frame.code[:40], frame.detail[:LOGGED_TEXT]
            self.close_reason = f"peer closed: {code}: {detail}"
            self._log.info("Link {link}: peer closed ({code}): {detail}", link=self.link_name or "?", code=code, detail=detail)
            self._disconnect()
            return
        if not self.established:
            raise ProtocolViolation("unexpected-frame", f"{type(frame).__name__} before the handshake completed")
        assert self.handler is not None
        if isinstance(frame, Message):
            self._message(frame)
        elif isinstance(frame, Ack):
            tokens = []
            for seq in frame.seqs:
                if seq not in self._unacked:
                    raise ProtocolViolation("bad-ack", f"ACK for {seq}, which is not outstanding")
                tokens.append(self._unacked.pop(seq))
            self.handler.messages_acknowledged(tokens)
        elif isinstance(frame, Reject):
            if frame.seq not in self._unacked:
                raise ProtocolViolation("bad-ack", f"REJECT for {frame.seq}, which is not outstanding")
            self.handler.message_refused(self._unacked.pop(frame.seq), frame.reason)
        elif isinstance(frame, Credit):
            if self.send_credit + frame.increment > 1 << 20:
                raise ProtocolViolation("flow-control", "credit beyond 2**20 messages")
            self.send_credit += frame.increment
            if frame.increment:
                self.handler.credit_received()
        else:
            raise ProtocolViolation("unexpected-frame", f"{type(frame).__name__} after the handshake")

    # --- outgoing -----------------------------------------------------------

    def _write(self, frame: Frame) -> None:
        """Write a control frame (sent with the next message, or next turn)."""
        payload = codec.encode_payload(frame)
        self._writer.lazy(self.transport, (_LENGTH.pack(len(payload)), payload))
        self._last_sent = self.clock.seconds()

    def send_message(self, message: Message, token: Any) -> None:
        """
        Send a message; requires credit.

        @param message: with any C{seq}; the link numbers it.
        @param token: what L{SessionHandler.messages_acknowledged} or
            L{SessionHandler.message_refused} hands back for it.
        @raise MessageTooLarge: when the frame would exceed what the peer
            accepts (nothing is sent, no credit is used).
        @raise RuntimeError: without credit or session (a bug in the caller).
        """
        if self.send_credit <= 0 or not self.established:
            raise RuntimeError("send_message without credit or session")
        seq = self._next_seq
        payload = codec.encode_message(seq, message)
        if len(payload) > self.peer_max_frame:
            raise MessageTooLarge(f"{len(payload)} bytes, the peer accepts {self.peer_max_frame}")
        self._next_seq += 1
        self.send_credit -= 1
        self._unacked[seq] = token
        if self._pending_acks or self._pending_credit:
            # Settlements waiting for a ride: one write, one wakeup of the peer.
            parts = self._settlements()
            parts += (_LENGTH.pack(len(payload)), payload)
            self._writer.urgent(self.transport, parts)
        else:
            self._writer.urgent(self.transport, (_LENGTH.pack(len(payload)), payload))
        self._last_sent = now = self.clock.seconds()
        times = self._send_times
        if not times or now - times[-1][1] >= 1.0:
            times.append((seq, now))

    @property
    def unacknowledged(self) -> int:
        """Messages we sent that the peer has not acknowledged yet."""
        return len(self._unacked)

    def acknowledge(self, seq: int) -> None:
        """
        The message C{seq} from the peer is safely published: ACK it.

        ACKs are batched: with the next MSG, at the end of this reactor
        turn once L{ACK_EAGER} are pending, and at the latest after
        L{SETTLE_DELAY}.
        """
        if self.close_reason is not None:
            return
        pending = self._pending_acks
        pending.append(seq)
        if len(pending) >= ACK_BATCH:
            self._flush()
        else:
            self._schedule_flush(0 if len(pending) >= ACK_EAGER else SETTLE_DELAY)

    def refuse(self, seq: int, reason: str) -> None:
        """Refuse the peer's message C{seq} for good."""
        if self.close_reason is None:
            self._write(Reject(seq, reason))

    def grant(self, increment: int) -> None:
        """
        Allow the peer C{increment} more messages (batched like ACKs, but
        sent at the end of the turn once the peer holds less credit than is
        waiting to be granted).
        """
        if self.close_reason is not None or increment <= 0:
            return
        self.receive_credit += increment
        self._pending_credit += increment
        peer_has = self.receive_credit - self._pending_credit
        self._schedule_flush(0 if peer_has < self._pending_credit else SETTLE_DELAY)

    def _schedule_flush(self, delay: float) -> None:
        call = self._flush_call
        if call is not None and call.active():
            if call.getTime() - self.clock.seconds() > delay:
                call.reset(delay)
            return
        self._flush_call = self.clock.callLater(delay, self._flush)

    def _settlements(self) -> list[bytes]:
        """
        @return: the pending ACK and CREDIT frames, encoded with their
            lengths; they are no longer pending.
        """
        parts: list[bytes] = []
        while self._pending_acks:
            batch, self._pending_acks = self._pending_acks[:ACK_BATCH], self._pending_acks[ACK_BATCH:]
            payload = codec.encode_payload(Ack(tuple(batch)))
            parts += (_LENGTH.pack(len(payload)), payload)
        if self._pending_credit:
            increment, self._pending_credit = self._pending_credit, 0
            payload = codec.encode_payload(Credit(increment))
            parts += (_LENGTH.pack(len(payload)), payload)
        return parts

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.transport is None or self.close_reason is not None and not self._pending_acks:
            return
        parts = self._settlements()
        if parts:
            self._writer.lazy(self.transport, parts)
            self._last_sent = self.clock.seconds()

    def _oldest_unacknowledged(self) -> tuple[int, float] | None:
        """
        @return: the oldest unacknowledged message and (to within a second,
            never less) how long ago it was sent, or L{None}.
        """
        # Dicts keep insertion order, and sequence numbers are inserted in
        # increasing order: the first key is the oldest outstanding one.
        oldest = next(iter(self._unacked), None)
        times = self._send_times
        if oldest is None:
            return None
        while len(times) > 1 and times[1][0] <= oldest:
            times.popleft()
        if not times or times[0][0] > oldest:
            return None
        return oldest, self.clock.seconds() - times[0][1]

    def _check_heartbeat(self) -> None:
        now = self.clock.seconds()
        stuck = self._oldest_unacknowledged()
        if now - self._last_received > 3 * self.heartbeat:
            self.close("heartbeat-timeout", f"nothing received for {now - self._last_received:.1f}s")
        elif stuck is not None and stuck[1] > ACK_TIMEOUT:
            self.close("ack-timeout", f"MSG {stuck[0]} unacknowledged for {stuck[1]:.0f}s")
        elif now - self._last_sent >= self.heartbeat * 0.9:
            self._write(Heartbeat())


def peer_credentials(transport: Any) -> tuple[int, int, int] | None:
    """
    @param transport: a connected Unix socket transport.
    @return: the peer's (pid, uid, gid) from C{SO_PEERCRED}, or L{None}
        where the platform or transport cannot tell.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = get_handle().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class ControlLinkProtocol(LinkProtocol):
    """
    The control half's end: waits for HELLO, checks it, answers WELCOME with
    the routes the tenant half must serve.
    """

    def __init__(
        self,
        clock: IReactorTime,
        heartbeat: float,
        max_frame: int,
        link_name: str,
        routes: Callable[[], dict[str, Any]],
        attach: Callable[[ControlLinkProtocol], SessionHandler | str],
    ) -> None:
        super().__init__(clock, heartbeat, min(max_frame, HANDSHAKE_MAX_FRAME))
        self.link_name = link_name
        self._routes = routes
        self._attach = attach
        self._session_max_frame = max_frame
        self.peer: tuple[int, int, int] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peer_credentials(self.transport)
        pid, uid, gid = self.peer or (-1, -1, -1)
        self._log.info(
            "Link {link}: tenant half connected (pid {pid}, uid {uid}, gid {gid})", link=self.link_name, pid=pid, uid=uid, gid=gid
        )

    def frame_received(self, frame: Frame) -> None:
        if self.session is None and isinstance(frame, Hello):
            self._hello(frame)
        elif isinstance(frame, (Hello, Welcome)):
            raise ProtocolViolation("unexpected-frame", f"{type(frame).__name__} on an established link")
        else:
            super().frame_received(frame)

    def _hello(self, hello: Hello) -> None:
        if codec.PROTOCOL_VERSION not in hello.versions:
            self.close("version", f"this control half speaks version {codec.PROTOCOL_VERSION}, not {list(hello.versions)}")
            return
        if hello.link is not None and hello.link != self.link_name:
            self.close("wrong-link", f"this socket serves link {self.link_name!r}, not {hello.link!r}")
            return
        handler = self._attach(self)
        if isinstance(handler, str):
            self.close("busy", handler)
            return
        self.handler = handler
        self.session = uuid.uuid4().hex
        self.decoder.max_frame = self._session_max_frame
        self._write(
            Welcome(
                version=codec.PROTOCOL_VERSION,
                link=self.link_name,
                session=self.session,
                heartbeat=self.heartbeat,
                max_frame=self._session_max_frame,
                routes=self._routes(),  # as they are now, not when the connection came
            )
        )
        self._log.info(
            "Link {link}: session {session} up with {software}",
            link=self.link_name,
            session=self.session,
            software=hello.software[:LOGGED_TEXT],
        )
        self._session_started()


class TenantLinkProtocol(LinkProtocol):
    """
    The tenant half's end: says HELLO, takes its routes from WELCOME.

    @ivar welcome: the WELCOME frame, once received.
    """

    def __init__(
        self,
        clock: IReactorTime,
        expected_link: str | None,
        handler_for: Callable[[Welcome], SessionHandler],
    ) -> None:
        # The control half decides the heartbeat; until WELCOME only the
        # handshake timeout applies.
        super().__init__(clock, heartbeat=HANDSHAKE_TIMEOUT)
        self._expected_link = expected_link
        self._handler_for = handler_for
        self.welcome: Welcome | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._write(
            Hello(
                versions=(codec.PROTOCOL_VERSION,),
                link=self._expected_link,
                software=f"msgmux/{__version__} pid {os.getpid()}",
            )
        )

    def frame_received(self, frame: Frame) -> None:
        if self.session is None and isinstance(frame, Welcome):
            self._welcome(frame)
        elif isinstance(frame, (Hello, Welcome)):
            raise ProtocolViolation("unexpected-frame", f"{type(frame).__name__} on an established link")
        else:
            super().frame_received(frame)

    def _welcome(self, welcome: Welcome) -> None:
        if welcome.version != codec.PROTOCOL_VERSION:
            self.close("version", f"control half chose version {welcome.version}")
            return
        self.welcome = welcome
        self.link_name = welcome.link
        self.heartbeat = welcome.heartbeat
        self.peer_max_frame = welcome.max_frame
        try:
            self.handler = self._handler_for(welcome)
        except ValueError as e:
            self.close("bad-welcome", str(e))
            return
        self.session = welcome.session
        self._log.info("Link {link}: session {session} up", link=welcome.link, session=welcome.session)
        self._session_started()
