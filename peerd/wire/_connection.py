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
from typing import Final, Literal

from peerd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

from . import _events as ev
from ._codec import EVENT_TYPES, MEMO_TYPES, decode_body, encode_body
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
    "NEED_DATA",
    "FrameConnection",
    "PeerConnection",
    "TrackerClientConnection",
    "TrackerServerConnection",
]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value

    def __str__(self) -> str:  # (not an alias: mypyc compiles this module)
        return self.value


#: Returned by ``next_event`` when more bytes are needed to make progress.
NEED_DATA: Final = _Sentinel.NEED_DATA

# Drop consumed bytes once at least this many are dead *and* they are the
# larger half of the buffer: amortised O(1) per byte, bounded waste.
_COMPACT_MIN = 64 * 1024

# Encoded frames of the frequent small peer messages: a HAVE of a few
# indices, REQUEST, CANCEL, REJECT (events are immutable and compare by value,
# so the bytes of one are the bytes of any equal one).
_HAVE = int(FrameType.HAVE)
_FRAMES: dict[ev.Event | tuple[int, ...], bytes] = {}  # HAVE: by its indices
_FRAMES_SIZE = 8192
_HAVE_MEMO_INDICES = 8


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
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    @property
    def drained(self) -> bool:
        """If True, ``next_event`` would return ``NEED_DATA``: nothing is
        buffered, no EOF is pending and nothing failed, so a caller may skip
        that call. (False does not promise an event: part of a frame may be in.)"""
        return not self._eof and self._error is None and self._pos == len(self._buf)

    def _next_event(self) -> ev.Event | Literal[_Sentinel.NEED_DATA]:
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
            self._consume(FRAME_HEADER_SIZE + length)
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
        if ftype == _DATA:
            data = encode_data_header(event.index, event.offset, event.length)  # type: ignore[attr-defined]
        elif ftype in MEMO_TYPES and (
            ftype != _HAVE or len(event.indices) <= _HAVE_MEMO_INDICES  # type: ignore[attr-defined]
        ):
            # A chunk's HAVE goes to every neighbour in the same bytes, and
            # the requests for a chunk are the same bytes on every connection.
            # (A HAVE is keyed by its indices: a tuple hashes in C.)
            key = event.indices if ftype == _HAVE else event  # type: ignore[attr-defined]
            memo = _FRAMES.get(key)
            if memo is None:
                memo = encode_frame(ftype, encode_body(ftype, event))
                if len(_FRAMES) >= _FRAMES_SIZE:
                    _FRAMES.clear()
                _FRAMES[key] = memo
            data = memo
        else:
            data = encode_frame(ftype, encode_body(ftype, event))
        self._enter(new_state, sending=True)
        return data

    def send_data(self, index: int, offset: int, payload: bytes | bytearray | memoryview) -> bytes:
        """Return a whole DATA frame: the 13 header bytes followed by ``payload``.

        Raises:
            LocalProtocolError: empty or over 64 MiB payload, bad fields, or DATA
                not allowed now.
        """
        header = self.send(ev.DataHeader(index, offset, len(payload)))
        return header + payload

    # --- conversation rules (subclasses) --------------------------------------
    def _transition(self, ftype: int, *, sending: bool) -> enum.Enum:
        """The state a frame of ``ftype`` leads to; raises if it is not allowed now."""
        raise NotImplementedError

    def _enter(self, state: enum.Enum, *, sending: bool) -> None:
        """Commit a state returned by ``_transition`` (after the frame was handled)."""
        raise NotImplementedError

    @staticmethod
    def _violation(sending: bool, message: str) -> ProtocolError:
        return LocalProtocolError(message) if sending else RemoteProtocolError(message)


class PeerConnection(FrameConnection):
    """One end of a peer <-> peer connection (both ends are the same role)."""

    SEND_TYPES = PEER_TYPES
    RECEIVE_TYPES = PEER_TYPES

    def __init__(self) -> None:
        super().__init__()
        self.our_state = PeerState.AWAIT_HELLO
        self.their_state = PeerState.AWAIT_HELLO

    def _transition(self, ftype: int, *, sending: bool) -> PeerState:
        state = self.our_state if sending else self.their_state
        new = PEER_TABLE.get((state, ftype))
        if new is None:
            who = "we" if sending else "the peer"
            name = frame_name(ftype)
            if state is PeerState.AWAIT_HELLO:
                msg = f"{who} must send HELLO first, not {name}"
            elif state is PeerState.AWAIT_PROOF:
                msg = f"{who} must send PROOF right after HELLO, not {name}"
            elif state is PeerState.DONE:
                msg = f"{who} sent GOODBYE; {name} cannot follow it"
            else:
                msg = f"{who} already sent {name}; HELLO and PROOF are sent exactly once"
            raise self._violation(sending, msg)
        return new

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
