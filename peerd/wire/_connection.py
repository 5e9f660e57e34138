"""Connections: bytes in, events out; events in, bytes out (h11 shape, no I/O).

Theory of operation
-------------------
Received bytes are appended to one ``bytearray``; ``_pos`` marks how far we
have parsed. Consumed bytes are dropped only when they are the larger part of
the buffer (or all of it), so feeding a byte at a time or many small frames in
one call stays linear. ``next_event`` looks at the 5-byte header first and
rejects an unknown type, an over-limit length, a type this role may not
receive, or a type the conversation state forbids -- before waiting for (or
buffering) the body.

DATA is the one frame we do not buffer whole: as soon as its 8-byte header is
in, ``next_event`` returns ``DataHeader`` and the connection enters payload
mode with ``payload_remaining`` bytes to go. The payload then leaves either as
``DataPayload`` events (whatever is buffered, never past the payload end) or
through ``take_payload_into`` + ``payload_consumed_externally`` when the
caller reads the rest of the payload from the socket straight into its
destination buffer. When the count reaches zero, framing resumes.

After the first ``RemoteProtocolError`` the connection is dead: every later
``next_event`` raises it again (the caller should close the socket).
"""

from __future__ import annotations

import enum
import hashlib
from typing import Final, Literal

from peerd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

from . import _events as ev
from ._codec import EVENT_TYPES, decode_body, encode_body
from ._frames import (
    _DATA,
    DATA_HEADER,
    DATA_HEADER_SIZE,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FrameType,
    check_header,
    encode_data_header,
    encode_frame,
    frame_name,
)
from ._state import (
    CLIENT_TYPES,
    PEER_TABLE,
    PEER_TYPES,
    SERVER_TYPES,
    TRACKER_TABLE,
    PeerState,
    Sender,
    TrackerState,
)

__all__ = [
    "MAX_CANCELLED",
    "MAX_OUTSTANDING",
    "NEED_DATA",
    "FrameConnection",
    "PeerConnection",
    "TrackerClientConnection",
    "TrackerServerConnection",
    "encode_message",
]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    ABSORBED = "ABSORBED"  # internal: a frame that changes nothing, not yielded

    def __repr__(self) -> str:
        return self.value

    def __str__(self) -> str:  # (not an alias: mypyc compiles this module)
        return self.value


#: Returned by ``next_event`` when more bytes are needed to make progress.
NEED_DATA: Final = _Sentinel.NEED_DATA

# Drop consumed bytes once at least this many are dead *and* they are the
# larger half of the buffer: amortised O(1) per byte, bounded waste.
_COMPACT_MIN = 64 * 1024

_HELLO = int(FrameType.HELLO)


def encode_message(event: ev.Event) -> bytes:
    """The frame of a control message, independent of any connection (for a
    frame many connections send: pass it to ``send_prepared``)."""
    ftype = EVENT_TYPES.get(type(event))
    if ftype is None or ftype == _DATA:
        raise LocalProtocolError(f"{type(event).__name__} cannot be prepared")
    return encode_frame(ftype, encode_body(ftype, event))


# What a prepared frame of a watched type stands for (only its type matters).
_MARKERS: dict[int, ev.Event] = {int(FrameType.MANIFEST): ev.ManifestResponse(b"\0")}


class FrameConnection:
    """Framing, DATA payload handling and error discipline shared by every role.

    Subclasses say which frame types they may send and receive, and implement
    the conversation rules in ``_transition``.
    """

    #: Frame types this role may send / receive.
    SEND_TYPES: frozenset[int] = frozenset()
    RECEIVE_TYPES: frozenset[int] = frozenset()

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._closed_returned = False
        self._payload_remaining = 0
        self._error: RemoteProtocolError | None = None

    # --- receiving ----------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the socket; ``b""`` means EOF.

        Raises:
            LocalProtocolError: data fed after EOF was already signalled.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        if self._error is not None:
            return  # nothing more will be parsed: do not buffer it
        if len(data) == 0:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> ev.Event | Literal[_Sentinel.NEED_DATA]:
        """Return the next complete event, or ``NEED_DATA``.

        Returns ``Closed()`` once, after a clean EOF at a frame boundary.

        Raises:
            RemoteProtocolError: the remote sent something invalid, or closed in
                the middle of a frame; the connection is unusable afterwards.
            LocalProtocolError: called again after ``Closed`` was returned.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}")
        if self._closed_returned:
            raise LocalProtocolError("next_event() called after Closed was returned")
        try:
            event = self._next_event()
            while event is _Sentinel.ABSORBED:
                event = self._next_event()
            return event
        except RemoteProtocolError as exc:
            self._error = exc
            self._buf = bytearray()  # nothing more will be parsed: free it now
            self._pos = 0
            raise

    @property
    def drained(self) -> bool:
        """If True, ``next_event`` would return ``NEED_DATA``: nothing is
        buffered, no EOF is pending and nothing failed, so a caller may skip
        that call. (False does not promise an event: part of a frame may be in.)"""
        return not self._eof and self._error is None and self._pos == len(self._buf)

    def _next_event(self) -> ev.Event | _Sentinel:
        buffered = len(self._buf) - self._pos
        if self._payload_remaining:
            if buffered == 0:
                return self._need_data(
                    f"in the middle of a DATA payload ({self._payload_remaining} bytes missing)"
                )
            n = min(buffered, self._payload_remaining)
            with memoryview(self._buf) as view:
                data = bytes(view[self._pos : self._pos + n])
            self._consume(n)
            self._payload_remaining -= n
            return ev.DataPayload(data)

        if buffered < FRAME_HEADER_SIZE:
            if buffered == 0 and self._eof:
                self._closed_returned = True
                return ev.Closed()
            return self._need_data("in the middle of a frame header")
        ftype, length = FRAME_HEADER.unpack_from(self._buf, self._pos)
        # Everything we can judge from the header, before waiting for the body.
        check_header(ftype, length)
        if ftype not in self.RECEIVE_TYPES:
            raise RemoteProtocolError(
                f"{type(self).__name__} cannot receive {frame_name(ftype)}: "
                f"the other side never sends it"
            )
        new_state = self._transition(ftype, sending=False)

        if ftype == _DATA:
            if buffered < FRAME_HEADER_SIZE + DATA_HEADER_SIZE:
                return self._need_data("in the middle of a DATA header")
            index, offset = DATA_HEADER.unpack_from(self._buf, self._pos + FRAME_HEADER_SIZE)
            event: ev.Event = ev.DataHeader(index, offset, length - DATA_HEADER_SIZE)
            self._obligations(event, sending=False, frame=b"")
            self._consume(FRAME_HEADER_SIZE + DATA_HEADER_SIZE)
            self._payload_remaining = length - DATA_HEADER_SIZE
        else:
            if buffered < FRAME_HEADER_SIZE + length:
                return self._need_data(f"in the middle of a {frame_name(ftype)} frame")
            start = self._pos + FRAME_HEADER_SIZE
            # Decode straight from the buffer; the slice is released before we
            # shrink the bytearray (a live export would forbid resizing).
            with memoryview(self._buf)[start : start + length] as body:
                event = decode_body(ftype, body)
            absorbed = False
            if ftype in self.WATCHED_TYPES:
                frame = b""
                if ftype == _HELLO:  # the handshake transcript covers it byte for byte
                    frame = bytes(self._buf[self._pos : start + length])
                absorbed = self._obligations(event, sending=False, frame=frame)
            self._consume(FRAME_HEADER_SIZE + length)
            if absorbed:
                self._enter(new_state, sending=False)
                return _Sentinel.ABSORBED
        self._enter(new_state, sending=False)
        return event

    def _need_data(self, where: str) -> Literal[_Sentinel.NEED_DATA]:
        if self._eof:
            raise RemoteProtocolError(f"connection closed {where}")
        return NEED_DATA

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_MIN and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    # --- DATA payload, zero-copy path ------------------------------------
    @property
    def payload_remaining(self) -> int:
        """Bytes of the current DATA payload not yet delivered (0 outside a payload)."""
        return self._payload_remaining

    def take_payload_into(self, view: memoryview | bytearray) -> int:
        """Copy already-buffered payload bytes into ``view``; return how many.

        Copies at most ``len(view)`` and at most ``payload_remaining`` bytes.
        The caller reads the rest of the payload from the socket and then
        reports it with ``payload_consumed_externally``.

        Raises:
            LocalProtocolError: no DATA payload is pending.
        """
        if not self._payload_remaining:
            raise LocalProtocolError("take_payload_into() called with no DATA payload pending")
        with memoryview(view) as dst:
            n = min(dst.nbytes, self._payload_remaining, len(self._buf) - self._pos)
            if n:
                with memoryview(self._buf) as src, dst.cast("B") as flat:
                    flat[:n] = src[self._pos : self._pos + n]
        self._consume(n)
        self._payload_remaining -= n
        return n

    def payload_consumed_externally(self, n: int) -> None:
        """Record that the caller read ``n`` payload bytes directly off the socket.

        Raises:
            LocalProtocolError: ``n`` is negative or exceeds ``payload_remaining``,
                or payload bytes are still buffered here (take them first,
                they come before anything on the socket).
        """
        if not isinstance(n, int) or n < 0:
            raise LocalProtocolError(f"payload_consumed_externally() needs n >= 0, got {n!r}")
        if n > self._payload_remaining:
            raise LocalProtocolError(
                f"payload_consumed_externally({n}) but only {self._payload_remaining} "
                f"payload bytes remain"
            )
        if n and len(self._buf) > self._pos:
            raise LocalProtocolError(
                "payload bytes are still buffered; call take_payload_into() first"
            )
        self._payload_remaining -= n

    # --- sending ------------------------------------------------------------
    def send(self, event: ev.Event) -> bytes:
        """Return the bytes that put ``event`` on the wire.

        ``DataHeader`` gives the 13 header bytes: the caller then sends exactly
        ``length`` payload bytes itself (e.g. with sendfile). ``DataPayload``
        gives its raw bytes, for callers that stream the payload as events.

        Raises:
            LocalProtocolError: this role may not send the event, or not now.
        """
        ftype = EVENT_TYPES.get(type(event))
        if ftype is None:
            if isinstance(event, ev.DataPayload) and _DATA in self.SEND_TYPES:
                return event.data
            raise LocalProtocolError(f"{type(event).__name__} is not a message and cannot be sent")
        if ftype not in self.SEND_TYPES:
            raise LocalProtocolError(f"{type(self).__name__} cannot send {frame_name(ftype)}")
        new_state = self._transition(ftype, sending=True)
        if ftype in self.WATCHED_TYPES:
            self._obligations(event, sending=True, frame=b"")
        if ftype == _DATA:
            data = encode_data_header(event.index, event.offset, event.length)  # type: ignore[attr-defined]
        else:
            data = encode_frame(ftype, encode_body(ftype, event))
        if ftype == _HELLO:
            self._sent_frame(data)
        self._enter(new_state, sending=True)
        return data

    def send_prepared(self, frame: bytes) -> bytes:
        """Check and account a frame made by ``encode_message`` (shared by many
        connections, e.g. one content's MANIFEST) and return it unchanged.

        Raises:
            LocalProtocolError: not a whole frame, or not allowed now.
        """
        if len(frame) < FRAME_HEADER_SIZE:
            raise LocalProtocolError("a prepared frame needs its 5-byte header")
        ftype, length = FRAME_HEADER.unpack_from(frame)
        if length != len(frame) - FRAME_HEADER_SIZE or ftype == _DATA:
            raise LocalProtocolError("a prepared frame is one whole control frame")
        if ftype not in self.SEND_TYPES:
            raise LocalProtocolError(f"{type(self).__name__} cannot send {frame_name(ftype)}")
        new_state = self._transition(ftype, sending=True)
        if ftype in self.WATCHED_TYPES:
            marker = _MARKERS.get(ftype)
            if marker is None:
                raise LocalProtocolError(f"{frame_name(ftype)} cannot be sent prepared")
            self._obligations(marker, sending=True, frame=b"")
        self._enter(new_state, sending=True)
        return frame

    def send_data(self, index: int, offset: int, payload: bytes | bytearray | memoryview) -> bytes:
        """Return a whole DATA frame: the 13 header bytes followed by ``payload``.

        Raises:
            LocalProtocolError: empty or over 64 MiB payload, bad fields, or DATA
                not allowed now.
        """
        header = self.send(ev.DataHeader(index, offset, len(payload)))
        return header + payload

    # --- conversation rules (subclasses) --------------------------------------
    #: Frame types whose events pass through ``_obligations`` (both ways).
    WATCHED_TYPES: frozenset[int] = frozenset()

    def _obligations(self, event: ev.Event, *, sending: bool, frame: bytes) -> bool:
        """Check (and record) what a message owes or answers; raise if it may
        not be sent or received now. ``frame`` is the raw received HELLO frame.
        True: a received message that changes nothing and is not yielded."""
        return False

    def _sent_frame(self, data: bytes) -> None:
        """Record a sent HELLO frame (the handshake transcript)."""

    def _transition(self, ftype: int, *, sending: bool) -> enum.Enum:
        """The state a frame of ``ftype`` leads to; raises if it is not allowed now."""
        raise NotImplementedError

    def _enter(self, state: enum.Enum, *, sending: bool) -> None:
        """Commit a state returned by ``_transition`` (after the frame was handled)."""
        raise NotImplementedError

    @staticmethod
    def _violation(sending: bool, message: str) -> ProtocolError:
        return LocalProtocolError(message) if sending else RemoteProtocolError(message)


#: What PROOF signs (docs/PROTOCOL.md, "Handshake"): this context, the
#: signer's role, and SHA-256 of both HELLO frames (the dialer's first).
PROOF_CONTEXT = b"peer-proof-v2\x00"
ROLE_DIALER = b"D"
ROLE_ACCEPTOR = b"A"
TRANSCRIPT_CONTEXT = b"peer-transcript-v2\x00"
#: Cancelled requests whose answer (DATA or REJECT) may still arrive, per
#: direction; an answer to an older one is a protocol error.
MAX_CANCELLED = 1024
#: Requests one side may have outstanding with the other (sent, not yet
#: answered by DATA or REJECT, not cancelled). A server answers the excess
#: over its queue with REJECT ``busy`` at once, so only a peer that ignores
#: those answers (or never reads them) can reach this.
MAX_OUTSTANDING = 1024

_REQ = tuple[int, int, int]
_PROOF = int(FrameType.PROOF)
_BITFIELD = int(FrameType.BITFIELD)
_REQUEST = int(FrameType.REQUEST)
_CANCEL = int(FrameType.CANCEL)
_REJECT = int(FrameType.REJECT)
_MANIFEST_REQUEST = int(FrameType.MANIFEST_REQUEST)
_MANIFEST = int(FrameType.MANIFEST)
_GOODBYE = int(FrameType.GOODBYE)
_HANDSHAKE = frozenset({int(FrameType.HELLO), _PROOF, _GOODBYE})


class _Requests:
    """One direction's requests: outstanding, and recently cancelled ones
    whose answer may still cross the CANCEL (counted: a range asked again
    after its CANCEL may be answered once for each time it was asked)."""

    __slots__ = ("cancelled", "outstanding")

    def __init__(self) -> None:
        self.outstanding: set[_REQ] = set()
        # answers still allowed per cancelled range, the oldest cancel first
        self.cancelled: dict[_REQ, int] = {}

    def cancel(self, req: _REQ) -> bool:
        if req not in self.outstanding:
            return False
        self.outstanding.discard(req)
        self.cancelled[req] = self.cancelled.pop(req, 0) + 1  # now the newest
        if len(self.cancelled) > MAX_CANCELLED:
            del self.cancelled[next(iter(self.cancelled))]
        return True

    def answerable(self, req: _REQ) -> bool:
        return req in self.outstanding or req in self.cancelled

    def answer(self, req: _REQ) -> None:
        if req in self.outstanding:
            self.outstanding.discard(req)
        elif (n := self.cancelled[req]) > 1:
            self.cancelled[req] = n - 1  # (keeps its place)
        else:
            del self.cancelled[req]


class PeerConnection(FrameConnection):
    """One end of a peer <-> peer connection (both ends are the same role).

    ``initiator`` says whether we dialed: the handshake transcript orders the
    two HELLOs dialer first, and only the accepting side may send its PROOF
    before it has the other's.

    Beyond each direction's phase (``our_state`` / ``their_state``), the
    connection holds the obligations of the conversation, so that a message
    that may not come now is refused from its header, before its body:

    * nothing but HELLO, PROOF and GOODBYE goes before the other's PROOF;
    * REQUEST only once the requester has the other's BITFIELD, never a
      duplicate of an outstanding one, at most ``MAX_OUTSTANDING`` outstanding;
    * DATA and REJECT only for an outstanding REQUEST (or one cancelled among
      the last ``MAX_CANCELLED``) with exactly its index, offset and length;
    * CANCEL only for an outstanding REQUEST (a received CANCEL that crossed
      the answer is yielded and changes nothing);
    * MANIFEST_REQUEST once per direction; MANIFEST only in answer to it, once.
    """

    SEND_TYPES = PEER_TYPES
    RECEIVE_TYPES = PEER_TYPES
    WATCHED_TYPES = frozenset(
        {_HELLO, _PROOF, _BITFIELD, _REQUEST, _DATA, _CANCEL, _REJECT, _MANIFEST_REQUEST, _MANIFEST}
    )

    def __init__(self, *, initiator: bool) -> None:
        super().__init__()
        self.initiator = initiator
        self.our_state = PeerState.AWAIT_HELLO
        self.their_state = PeerState.AWAIT_HELLO
        self._our_hello = b""
        self._their_hello = b""
        self._proof_sent = False
        self._proof_received = False
        self._asked = _Requests()  # our REQUESTs
        self._owed = _Requests()  # their REQUESTs
        self._bitfield = [False, False]  # [sent, received]
        self._manifest_asked = [False, False]  # [by us, by them]
        self._manifest_answered = [False, False]  # [to us, by us]

    # --- the handshake -----------------------------------------------------------
    def transcript_hash(self) -> bytes:
        """SHA-256 over the context and both HELLO frames, dialer's first.

        Raises:
            LocalProtocolError: a HELLO has not been sent or received yet.
        """
        if not self._our_hello or not self._their_hello:
            raise LocalProtocolError("the transcript needs both HELLOs")
        first, second = self._our_hello, self._their_hello
        if not self.initiator:
            first, second = second, first
        return hashlib.sha256(TRANSCRIPT_CONTEXT + first + second).digest()

    def proof_message(self, *, ours: bool) -> bytes:
        """The bytes our PROOF signs (``ours=True``) or the other's must sign."""
        dialer = self.initiator == ours
        role = ROLE_DIALER if dialer else ROLE_ACCEPTOR
        return PROOF_CONTEXT + role + self.transcript_hash()

    def owes(self, index: int, offset: int, length: int) -> bool:
        """True if the remote asked for this range and we have not answered it
        (a cancelled one included: its answer may still go)."""
        return self._owed.answerable((index, offset, length))

    @property
    def outstanding_requests(self) -> int:
        """REQUESTs of ours not yet answered or cancelled."""
        return len(self._asked.outstanding)

    def _sent_frame(self, data: bytes) -> None:
        self._our_hello = data

    # --- the rules -------------------------------------------------------------------
    def _transition(self, ftype: int, *, sending: bool) -> PeerState:
        state = self.our_state if sending else self.their_state
        new = PEER_TABLE.get((state, ftype))
        who = "we" if sending else "the peer"
        name = frame_name(ftype)
        if new is None:
            if state is PeerState.AWAIT_HELLO:
                msg = f"{who} must send HELLO first, not {name}"
            elif state is PeerState.AWAIT_PROOF:
                msg = f"{who} must send PROOF right after HELLO, not {name}"
            elif state is PeerState.AWAIT_BITFIELD and ftype in (_PROOF, _HELLO):
                msg = f"{who} already sent {name}; HELLO and PROOF are sent exactly once"
            elif state is PeerState.AWAIT_BITFIELD:
                msg = f"{who} must send BITFIELD before {name}"
            elif state is PeerState.DONE:
                msg = f"{who} sent GOODBYE; {name} cannot follow it"
            elif ftype == _BITFIELD:
                msg = f"{who} already sent BITFIELD (it is sent once; HAVE follows)"
            else:
                msg = f"{who} already sent {name}; HELLO and PROOF are sent exactly once"
            raise self._violation(sending, msg)
        # What the sender may send depends on what it has received.
        if ftype not in _HANDSHAKE:
            # The sender has the other's PROOF (it was sent before anything else).
            other_proof = self._proof_received if sending else self._proof_sent
            if not other_proof:
                raise self._violation(
                    sending, f"{who} sent {name} before the other side's PROOF arrived"
                )
        if ftype == _PROOF:
            their_hello = self._their_hello if sending else self._our_hello
            if not their_hello:
                raise self._violation(sending, f"{who} sent PROOF before the other's HELLO")
            dialer = self.initiator == sending
            first = self._proof_received if sending else self._proof_sent
            if dialer and not first:
                raise self._violation(
                    sending, f"{who} (the dialing side) sent PROOF before the accepting side's"
                )
        elif ftype == _REQUEST:
            # The requester must know what the other holds.
            if not self._bitfield[1 if sending else 0]:
                raise self._violation(sending, f"{who} sent REQUEST before receiving BITFIELD")
        elif ftype == _MANIFEST_REQUEST:
            if self._manifest_asked[0 if sending else 1]:
                raise self._violation(sending, f"{who} already sent MANIFEST_REQUEST (once only)")
        elif ftype == _MANIFEST:
            k = 1 if sending else 0  # sending answers their request; receiving answers ours
            if not self._manifest_asked[k] or self._manifest_answered[k]:
                raise self._violation(
                    sending, f"{who} sent MANIFEST that was not asked for (MANIFEST_REQUEST)"
                )
        return new

    def _obligations(self, event: ev.Event, *, sending: bool, frame: bytes) -> bool:
        t = type(event)
        who = "we" if sending else "the peer"
        if t is ev.DataHeader or t is ev.Reject:
            req = (event.index, event.offset, event.length)  # type: ignore[attr-defined]
            book = self._owed if sending else self._asked
            if not book.answerable(req):
                name = "DATA" if t is ev.DataHeader else "REJECT"
                raise self._violation(
                    sending,
                    f"{who} sent {name} for chunk {req[0]} [{req[1]}+{req[2]}] "
                    f"that was not requested",
                )
            book.answer(req)
        elif t is ev.Request:
            req = (event.index, event.offset, event.length)  # type: ignore[attr-defined]
            book = self._asked if sending else self._owed
            if req in book.outstanding:
                if sending:
                    raise LocalProtocolError("a REQUEST identical to an outstanding one")
                return True  # a received duplicate is owed once: not yielded
            if len(book.outstanding) >= MAX_OUTSTANDING:
                raise self._violation(
                    sending, f"{who} have more than {MAX_OUTSTANDING} requests outstanding"
                )
            book.outstanding.add(req)
        elif t is ev.Cancel:
            req = (event.index, event.offset, event.length)  # type: ignore[attr-defined]
            if sending:
                if not self._asked.cancel(req):
                    raise LocalProtocolError("CANCEL for a request that is not outstanding")
            else:
                self._owed.cancel(req)  # crossed with our answer: nothing to do
        elif t is ev.Hello:
            if not sending:
                self._their_hello = frame
        elif t is ev.Proof:
            if sending:
                self._proof_sent = True
            else:
                self._proof_received = True
        elif t is ev.Bitfield:
            self._bitfield[0 if sending else 1] = True
        elif t is ev.ManifestRequest:
            self._manifest_asked[0 if sending else 1] = True
        elif t is ev.ManifestResponse:
            self._manifest_answered[1 if sending else 0] = True
        return False

    def _enter(self, state: enum.Enum, *, sending: bool) -> None:
        assert isinstance(state, PeerState)
        if sending:
            self.our_state = state
        else:
            self.their_state = state


class _TrackerConnection(FrameConnection):
    _ME: Sender

    def __init__(self) -> None:
        super().__init__()
        self.state = TrackerState.GREETING

    def _transition(self, ftype: int, *, sending: bool) -> TrackerState:
        other = Sender.CLIENT if self._ME is Sender.TRACKER else Sender.TRACKER
        sender = self._ME if sending else other
        new = TRACKER_TABLE.get((self.state, sender, ftype))
        if new is None:
            name = frame_name(ftype)
            if ftype == FrameType.AUTH:
                msg = "AUTH is sent exactly once, after CHALLENGE"
            elif sender is Sender.CLIENT and self.state is TrackerState.CHALLENGED:
                msg = f"client sent {name} before AUTH (not authenticated)"
            elif self.state is TrackerState.CLOSED:
                msg = f"{sender.value} sent {name} after the tracker refused the client"
            else:
                msg = f"{sender.value} may not send {name} in state {self.state.value}"
            raise self._violation(sending, msg)
        return new

    def _enter(self, state: enum.Enum, *, sending: bool) -> None:
        assert isinstance(state, TrackerState)
        self.state = state


class TrackerClientConnection(_TrackerConnection):
    """The peer's end of a connection to the tracker."""

    _ME = Sender.CLIENT
    SEND_TYPES = CLIENT_TYPES
    RECEIVE_TYPES = SERVER_TYPES


class TrackerServerConnection(_TrackerConnection):
    """The tracker's end of a client connection."""

    _ME = Sender.TRACKER
    SEND_TYPES = SERVER_TYPES
    RECEIVE_TYPES = CLIENT_TYPES
