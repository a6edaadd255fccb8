# -*- test-case-name: tests.test_link_protocol -*-
"""
The link protocol: frames over a Unix stream socket between the two halves.

L{LinkProtocol} does everything both halves share.  Its state is one
L{LinkState}, and what it does with a frame is one lookup in a table of
C{(state, frame type) -> handler}; a frame the table does not list for the
current state is a protocol violation.  Sequence numbers and credit are
counted by the sans-IO windows of L{msgmux.link.flow}; ACK and CREDIT
frames are batched to ride along with the next message.  The handshake is
the only thing that differs by role (L{msgmux.link.handshake}).  Once the session is up, messages and their outcomes go to a
L{SessionHandler} (the relay of that half).

A peer is held to bounds, so that a hostile one costs this half little:
frames that carry no work (heartbeats, empty ACKs and CREDITs) have a
budget (C{frame-flood} when it is exhausted), a peer that stops reading
what we send is disconnected once our unread output passes a bound
(C{slow-reader}), and no connection handles more than L{FRAMES_PER_TURN}
frames in one turn of the reactor before the others get theirs.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux._writethrough import Writer
from msgmux.link import codec
from msgmux.link.codec import Ack, Close, Credit, Frame, FrameError, Heartbeat, MessageFrame, Reject, UndecodedMessage
from msgmux.link.flow import ProtocolViolation, ReceiveWindow, SendWindow
from msgmux.link.interfaces import LinkConnection, MessageTooLarge, SessionHandler
from msgmux.message import Message
from msgmux.pacing import TokenBucket
from msgmux.timers import Timers

__all__ = ["LinkConnection", "LinkProtocol", "LinkState", "MessageTooLarge", "ProtocolViolation", "SessionHandler"]

#: Seconds a new connection may take to complete the handshake.
HANDSHAKE_TIMEOUT = 10.0

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

#: Characters of peer-supplied text (CLOSE details, HELLO software) logged.
LOGGED_TEXT = 200

#: Seconds a closing connection may take to deliver its CLOSE frame and
#: what is buffered before it is aborted.
CLOSE_GRACE = 5.0

#: Seconds a sent message may stay unacknowledged before the session is
#: closed (its broker then redelivers it, possibly to a competing consumer).
ACK_TIMEOUT = 300.0

#: Frames that carry no work (HEARTBEAT, and ACK or CREDIT for nothing) a
#: peer may send per second, and in a burst.  A real peer sends about one
#: heartbeat per interval.
IDLE_FRAME_RATE = 50.0
IDLE_FRAME_BURST = 500

#: Frames handled per connection in one turn of the reactor, and MSG head
#: bytes decoded (what a head costs to decode depends on what the peer put
#: in it: a few milliseconds for a largest head of the worst kind); the rest
#: wait for the next turn, with reading paused, so that one busy connection
#: cannot hold the reactor while others wait.
FRAMES_PER_TURN = 64
HEAD_BYTES_PER_TURN = codec.MAX_HEAD

#: A connection may also be given a budget of MSG head bytes per second
#: (L{LinkProtocol.head_budget}): a peer within its message rate could
#: still send only largest heads of the worst kind, each costing a
#: hundred times what an oslo message's head does.  Beyond the budget, the
#: next head waits (reading paused) until the budget allows it.

#: Body bytes we keep sent and unacknowledged at most, whatever credit the
#: peer grants: it bounds what a peer that never reads can make us buffer.
MAX_UNSETTLED_BYTES = 64 * 1024 * 1024

#: Bytes we may write to a peer that does not read them (its socket and our
#: buffer are full) before we give up on it: the unsettled messages above
#: plus room for the small frames that answer its own.
MAX_UNREAD_OUTPUT = MAX_UNSETTLED_BYTES + 4 * 1024 * 1024


class LinkState(enum.Enum):
    """Where a link connection is in its life."""

    HANDSHAKE = "handshake"  # connected; HELLO/WELCOME not yet exchanged
    OPEN = "open"  # the session is up
    CLOSING = "closing"  # CLOSE sent or received; the connection is going
    CLOSED = "closed"  # the connection is gone


class LinkProtocol(TwistedProtocol):
    """
    Shared machinery of both ends of a link.

    @ivar state: where the connection is (L{LinkState}).
    @ivar session_id: the session id from WELCOME, once established.
    @ivar close_code: why the link closed (or is closing), as a short code
        (a metric label); L{close_reason} has the words.
    @ivar peer_max_body: the largest body the peer accepts.
    @ivar max_unread_output: bytes of our output the peer may leave unread
        before we give up on it.
    """

    _log = Logger()
    max_unread_output = MAX_UNREAD_OUTPUT

    def __init__(self, clock: IReactorTime, heartbeat: float, max_body: int = codec.DEFAULT_MAX_BODY) -> None:
        self.clock = clock
        self.heartbeat = heartbeat
        self.state = LinkState.HANDSHAKE
        self.decoder = codec.FrameDecoder(0)  # no MSG before the handshake
        self._session_max_body = max_body
        self.peer_max_body = codec.DEFAULT_MAX_BODY
        self.handler: SessionHandler | None = None
        self.session_id: str | None = None
        self.link_name: str | None = None
        self.close_code: str | None = None
        self.close_reason: str | None = None
        self.violation_observers: list[Callable[[str, str], None]] = []
        self.ended_observers: list[Callable[[str], None]] = []
        self.sending = SendWindow(MAX_UNSETTLED_BYTES)
        self.receiving = ReceiveWindow()
        self._writer = Writer(clock)
        self._timers = Timers(clock)
        self._heartbeats: LoopingCall | None = None
        self._idle_frames = TokenBucket(IDLE_FRAME_RATE, IDLE_FRAME_BURST, clock)
        #: MSG head bytes the peer may send, or None for no limit.
        self.head_budget: TokenBucket | None = None
        self._pending_acks: list[int] = []
        self._pending_credit = (0, 0)
        self._backlog: list[Frame | UndecodedMessage] = []
        self._reading_paused = False
        self._unread_output: int | None = None  # counting while the peer does not read
        self._last_received = 0.0
        self._last_sent = 0.0
        self._table: dict[tuple[LinkState, type], Callable[[Any], None]] = {
            (LinkState.HANDSHAKE, Heartbeat): self._idle_frame,
            (LinkState.HANDSHAKE, Close): self._peer_closed,
            (LinkState.OPEN, MessageFrame): self._message,
            (LinkState.OPEN, Ack): self._ack,
            (LinkState.OPEN, Reject): self._reject,
            (LinkState.OPEN, Credit): self._credit,
            (LinkState.OPEN, Heartbeat): self._idle_frame,
            (LinkState.OPEN, Close): self._peer_closed,
        }

    # --- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        self._last_received = self._last_sent = self.clock.seconds()
        self._timers.start("handshake", HANDSHAKE_TIMEOUT, self.close, "handshake-timeout", f"no handshake within {HANDSHAKE_TIMEOUT:.0f}s")
        self.transport.registerProducer(self, True)

    def _open(self, handler: SessionHandler, session_id: str) -> None:
        """The handshake completed: the session is up."""
        self.state = LinkState.OPEN
        self.handler = handler
        self.session_id = session_id
        self.decoder.max_body = self._session_max_body
        self._timers.cancel("handshake")
        self._heartbeats = LoopingCall(self._check_heartbeat)
        self._heartbeats.clock = self.clock
        self._heartbeats.start(self.heartbeat, now=False)
        handler.session_started(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        was_open = self.session_id is not None and self.handler is not None
        if self.close_code is None:
            self.close_code = "connection-lost"
            self.close_reason = f"connection lost: {reason.getErrorMessage()}"
        self.state = LinkState.CLOSED
        self._timers.cancel_all()
        self._stop_heartbeats()
        self._backlog.clear()
        self.sending.clear()
        handler, self.handler = self.handler, None
        if was_open:
            self._log.info(
                "Link {link}: session {session} ended ({code}): {reason}",
                link=self.link_name or "?",
                session=self.session_id,
                code=self.close_code,
                reason=self.close_reason,
            )
            for observer in list(self.ended_observers):
                observer(self.close_code)
            assert handler is not None
            handler.session_ended(self.close_reason or self.close_code)

    @property
    def established(self) -> bool:
        """Whether the session is up and usable."""
        return self.state is LinkState.OPEN

    def close(self, code: str, detail: str) -> None:
        """
        Say why, then close.  Idempotent.

        @param code: a short machine-readable reason (see C{docs/protocol.md}).
        @param detail: words for the log of the other half.
        """
        if self.state in (LinkState.CLOSING, LinkState.CLOSED):
            return
        self._closing(code, f"{code}: {detail}")
        if self.transport is not None:
            self._flush()
            self._write(Close(code, detail[:500]))
            self._disconnect()

    def _closing(self, code: str, reason: str) -> None:
        self.state = LinkState.CLOSING
        self.close_code = code
        self.close_reason = reason
        self._stop_heartbeats()

    def _disconnect(self) -> None:
        """
        Close the connection once what is buffered is written, or abort it
        after L{CLOSE_GRACE} seconds if the peer does not read it.
        """
        self.transport.loseConnection()
        if not self._timers.pending("abort"):
            self._timers.start("abort", CLOSE_GRACE, self._abort, f"the peer did not take the close for {CLOSE_GRACE:.0f}s")

    def _abort(self, why: str) -> None:
        self._log.warn("Link {link}: {why}; aborting", link=self.link_name or "?", why=why)
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_heartbeats(self) -> None:
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
        self._heartbeats = None

    def _violation(self, code: str, detail: str) -> None:
        self._log.warn("Link {link}: protocol violation ({code}): {detail}; closing", link=self.link_name or "?", code=code, detail=detail)
        for observer in list(self.violation_observers):
            observer(code, detail)
        self.close(code, detail)

    # --- producer: the transport tells us when the peer stops reading -------

    def pauseProducing(self) -> None:
        """
        Our output is piling up: the peer is not reading.  Hold back the
        credit we owe it (so that it cannot make us answer more messages),
        count what we still write, and give it three heartbeat intervals to
        catch up.
        """
        if self._unread_output is None:
            self._unread_output = 0
            self._timers.start("unread", 3 * self.heartbeat, self._slow_reader, "read nothing for three heartbeat intervals")

    def resumeProducing(self) -> None:
        """The peer caught up: what waited goes out."""
        if self._unread_output is not None:
            self._unread_output = None
            self._timers.cancel("unread")
            if self._pending_credit != (0, 0) and self.state is LinkState.OPEN:
                self._timers.start_or_advance("flush", 0, self._flush)

    def stopProducing(self) -> None:
        """The connection is going; connectionLost does the rest."""

    def _wrote(self, size: int) -> None:
        if self._unread_output is None:
            return
        self._unread_output += size
        if self._unread_output > self.max_unread_output:
            self._slow_reader(f"left {self._unread_output} bytes unread")

    def _slow_reader(self, how: str) -> None:
        """The peer does not read what we send: give up on it, without a CLOSE it would not read either."""
        if self.state is LinkState.CLOSED:
            return
        self._closing("slow-reader", f"slow-reader: the peer {how}")
        self._abort(f"the peer {how}")

    # --- incoming -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        if self.state in (LinkState.CLOSING, LinkState.CLOSED):
            return
        try:
            frames = self.decoder.feed(data, heads=False)
        except codec.LegacyFrame:
            self._legacy_peer()
            return
        except FrameError as e:
            self._violation("bad-frame", str(e))
            return
        if self._backlog:
            self._backlog.extend(frames)
        else:
            self._backlog = frames
        self._handle_backlog()

    def _handle_backlog(self) -> None:
        """
        Handle up to L{FRAMES_PER_TURN} frames, with heads of up to
        L{HEAD_BYTES_PER_TURN} bytes to decode (and within the
        L{head_budget}); leave the rest for the next turn (or until the
        budget allows the next head), and read no more meanwhile.
        """
        backlog = self._backlog
        done = 0
        head_bytes = 0
        wait = 0.0
        budget = self.head_budget
        try:
            while done < len(backlog) and done < FRAMES_PER_TURN:
                if self.state not in (LinkState.HANDSHAKE, LinkState.OPEN):
                    backlog.clear()
                    return
                frame = backlog[done]
                if type(frame) is UndecodedMessage:
                    if self.state is not LinkState.OPEN:
                        # Neither decoded nor charged to the link's head
                        # budget: a connection still in its handshake must
                        # not spend what the link's session may use.
                        raise ProtocolViolation("unexpected-frame", f"MessageFrame in state {self.state.value}")
                    size = len(frame.head)
                    if head_bytes and head_bytes + size > HEAD_BYTES_PER_TURN:
                        break  # it goes first next turn
                    if budget is not None and not budget.take_all(size):
                        wait = budget.seconds_until(size)
                        break  # it goes first once the budget allows
                    head_bytes += size
                    frame = self.decoder.decode_head(frame)
                done += 1
                if type(frame) is MessageFrame and self.state is LinkState.OPEN:
                    self._message(frame)  # the common case, without the lookup
                    continue
                handler = self._table.get((self.state, type(frame)))
                if handler is None:
                    handler = self._handshake_handler(frame)
                handler(frame)
        except FrameError as e:
            backlog.clear()
            self._violation("bad-frame", str(e))
            return
        except ProtocolViolation as e:
            backlog.clear()
            self._violation(e.code, e.detail)
            return
        del backlog[:done]
        if backlog and self.state in (LinkState.HANDSHAKE, LinkState.OPEN):
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            self._timers.start("backlog", wait, self._handle_backlog)
        elif self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _handshake_handler(self, frame: Frame) -> Callable[[Any], None]:
        """
        @return: the role's handler for a handshake frame in the handshake.
        @raise ProtocolViolation: for any frame the state does not allow.
        """
        raise ProtocolViolation("unexpected-frame", f"{type(frame).__name__} in state {self.state.value}")

    def _legacy_peer(self) -> None:
        """A version 1 peer: tell it, in its own framing, to upgrade."""
        self._closing("version", "version: the peer speaks link protocol version 1")
        self.transport.write(codec.encode_v1_close("version", f"this half speaks link protocol version {codec.PROTOCOL_VERSION}; upgrade msgmux"))
        self._disconnect()

    def _idle_frame(self, frame: Frame) -> None:
        """A frame that carries no work: charge the budget for such frames."""
        if not self._idle_frames.take(1):
            raise ProtocolViolation("frame-flood", f"more than {IDLE_FRAME_RATE:.0f} frames per second that carry no work")

    def _peer_closed(self, frame: Close) -> None:
        code, detail = frame.code[:40], frame.detail[:LOGGED_TEXT]
        self._closing("peer-closed", f"peer closed: {code}: {detail}")
        self._log.info("Link {link}: peer closed ({code}): {detail}", link=self.link_name or "?", code=code, detail=detail)
        self._disconnect()

    def _message(self, frame: MessageFrame) -> None:
        message = frame.message
        self.receiving.received(frame.seq, len(message.body))
        self.handler.message_received(frame.seq, message)  # type: ignore[union-attr]

    def _ack(self, frame: Ack) -> None:
        if not frame.seqs:
            self._idle_frame(frame)
            return
        settled = self.sending.settled
        tokens = [settled(seq) for seq in frame.seqs]
        self.handler.messages_acknowledged(tokens)  # type: ignore[union-attr]

    def _reject(self, frame: Reject) -> None:
        self.handler.message_refused(self.sending.settled(frame.seq), frame.reason)  # type: ignore[union-attr]

    def _credit(self, frame: Credit) -> None:
        if not frame.messages and not frame.bytes:
            self._idle_frame(frame)
            return
        self.sending.granted(frame.messages, frame.bytes)
        self.handler.credit_received()  # type: ignore[union-attr]

    # --- outgoing -----------------------------------------------------------

    def _write(self, frame: Frame) -> None:
        """Write a control frame (sent with the next message, or next turn)."""
        data = codec.encode(frame)
        self._writer.lazy(self.transport, (data,))
        self._last_sent = self.clock.seconds()
        self._wrote(len(data))

    @property
    def unacknowledged(self) -> int:
        """Messages we sent that the peer has not settled yet."""
        return len(self.sending)

    def can_send(self, message: Message) -> bool:
        """Whether the peer's credit lets C{message} go now."""
        return self.state is LinkState.OPEN and self.sending.can_send(len(message.body))

    def send_message(self, message: Message, token: Any) -> None:
        """
        Send a message; requires credit (L{can_send}).

        @param token: what L{SessionHandler.messages_acknowledged} or
            L{SessionHandler.message_refused} hands back for it.
        @raise MessageTooLarge: when its body is larger than the peer
            accepts, or its head larger than a MSG allows (nothing is sent,
            no credit is used).
        @raise RuntimeError: without credit or session (a bug in the caller).
        """
        body_length = len(message.body)
        if body_length > self.peer_max_body:
            raise MessageTooLarge(f"{body_length} bytes, the peer accepts {self.peer_max_body}")
        if self.state is not LinkState.OPEN or not self.sending.can_send(body_length):
            raise RuntimeError("send_message without credit or session")
        now = self.clock.seconds()
        try:
            head, body = codec.encode_message(self.sending.next_seq, message)
        except ValueError as e:
            raise MessageTooLarge(str(e)) from None
        self.sending.sent(body_length, token, now)
        if self._pending_acks or self._pending_credit != (0, 0):
            # Settlements waiting for a ride: one write, one wakeup of the peer.
            parts = self._settlements() + [head, body]
        else:
            parts = [head, body]
        self._writer.urgent(self.transport, parts)
        self._last_sent = now
        self._wrote(len(head) + body_length)

    def acknowledge(self, seq: int) -> None:
        """
        The message C{seq} from the peer is safely published: ACK it.

        ACKs are batched: with the next MSG, at the end of this reactor
        turn once L{ACK_EAGER} are pending, and at the latest after
        L{SETTLE_DELAY}.
        """
        if self.state is not LinkState.OPEN:
            return
        pending = self._pending_acks
        pending.append(seq)
        if len(pending) >= ACK_BATCH:
            self._flush()
        else:
            self._timers.start_or_advance("flush", 0 if len(pending) >= ACK_EAGER else SETTLE_DELAY, self._flush)

    def refuse(self, seq: int, reason: str) -> None:
        """Refuse the peer's message C{seq} for good."""
        if self.state is LinkState.OPEN:
            self._write(Reject(seq, reason))

    def grant(self, messages: int, body_bytes: int) -> None:
        """
        Let the peer send C{messages} more messages with C{body_bytes} more
        body bytes (batched like ACKs, but sent at the end of the turn once
        the peer holds less credit than is waiting to be granted).
        """
        if self.state is not LinkState.OPEN or (messages <= 0 and body_bytes <= 0):
            return
        self.receiving.grant(messages, body_bytes)
        owed_messages, owed_bytes = self._pending_credit
        owed_messages += messages
        owed_bytes += body_bytes
        self._pending_credit = (owed_messages, owed_bytes)
        peer_has = self.receiving.messages - owed_messages
        self._timers.start_or_advance("flush", 0 if peer_has < owed_messages else SETTLE_DELAY, self._flush)

    def _settlements(self) -> list[bytes]:
        """
        @return: the pending ACK and CREDIT frames, encoded; they are no
            longer pending.  Credit waits while the peer does not read.
        """
        parts: list[bytes] = []
        while self._pending_acks:
            batch, self._pending_acks = self._pending_acks[:ACK_BATCH], self._pending_acks[ACK_BATCH:]
            parts.append(codec.encode(Ack(tuple(batch))))
        if self._pending_credit != (0, 0) and self._unread_output is None:
            messages, body_bytes = self._pending_credit
            self._pending_credit = (0, 0)
            parts.append(codec.encode(Credit(messages, body_bytes)))
        return parts

    def _flush(self) -> None:
        self._timers.cancel("flush")
        if self.transport is None or self.state is LinkState.CLOSED:
            return
        parts = self._settlements()
        if parts:
            self._writer.lazy(self.transport, parts)
            self._last_sent = self.clock.seconds()
            self._wrote(sum(len(part) for part in parts))

    def _check_heartbeat(self) -> None:
        now = self.clock.seconds()
        stuck = self.sending.oldest_unsettled(now)
        if now - self._last_received > 3 * self.heartbeat:
            self.close("heartbeat-timeout", f"nothing received for {now - self._last_received:.1f}s")
        elif stuck is not None and stuck[1] > ACK_TIMEOUT:
            self.close("ack-timeout", f"MSG {stuck[0]} unacknowledged for {stuck[1]:.0f}s")
        elif now - self._last_sent >= self.heartbeat * 0.9:
            self._write(Heartbeat())
