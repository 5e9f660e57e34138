"""The conversation rules of both protocols, as tables.

Rules (docs/PROTOCOL.md, "Conversation"):

Peer connection (version 2) -- each direction has a phase, and some messages
depend on what the other direction did (PeerConnection checks those):
  * the first message a side sends is HELLO, exactly once;
  * the second is PROOF (its signature over both HELLOs), exactly once; the
    accepting side sends it right after its HELLO, the dialing side only once
    it has the accepting side's PROOF; GOODBYE may replace PROOF;
  * then BITFIELD, exactly once; before it only MANIFEST_REQUEST, MANIFEST
    (an answer) and KEEPALIVE may go;
  * then HAVE, REQUEST, DATA, CANCEL, REJECT, MANIFEST_REQUEST, MANIFEST,
    KEEPALIVE, PEX, each under its own obligation (see PeerConnection);
  * GOODBYE is the last message a side sends.

Tracker connection -- one conversation, shared by both directions:
  * the tracker speaks first: CHALLENGE (or ERROR, e.g. "too-many", then close);
  * the client's first message is AUTH, sent exactly once;
  * the tracker answers AUTH with OK (authenticated) or ERROR (then close);
  * the client may pipeline requests right after AUTH; the tracker answers
    them only after its OK;
  * once authenticated, requests and replies flow freely (ERROR is then an
    ordinary reply and does not end the conversation).

A (state, [sender,] frame type) key missing from a table is a violation: the
connection raises ``LocalProtocolError`` when we would send it and
``RemoteProtocolError`` when the other side did.
"""

from __future__ import annotations

import enum

from ._frames import FrameType as F

__all__ = [
    "CLIENT_TYPES",
    "PEER_TABLE",
    "PEER_TYPES",
    "SERVER_TYPES",
    "TRACKER_TABLE",
    "PeerState",
    "Sender",
    "TrackerState",
]


class PeerState(enum.StrEnum):
    """Where one direction of a peer connection is."""

    AWAIT_HELLO = "await-hello"
    AWAIT_PROOF = "await-proof"
    AWAIT_BITFIELD = "await-bitfield"  # PROOF sent, BITFIELD not yet
    OPEN = "open"
    DONE = "done"  # GOODBYE was sent


PEER_TYPES = frozenset(
    {
        F.HELLO,
        F.BITFIELD,
        F.HAVE,
        F.REQUEST,
        F.DATA,
        F.CANCEL,
        F.REJECT,
        F.MANIFEST_REQUEST,
        F.MANIFEST,
        F.GOODBYE,
        F.PROOF,
        F.KEEPALIVE,
        F.PEX,
    }
)

#: Messages a side may send between its PROOF and its BITFIELD.
_BEFORE_BITFIELD = frozenset({F.MANIFEST_REQUEST, F.MANIFEST, F.KEEPALIVE})
#: Messages a side may send once it has sent its BITFIELD (GOODBYE apart).
_OPEN = frozenset(
    {
        F.HAVE,
        F.REQUEST,
        F.DATA,
        F.CANCEL,
        F.REJECT,
        F.MANIFEST_REQUEST,
        F.MANIFEST,
        F.KEEPALIVE,
        F.PEX,
    }
)

PEER_TABLE: dict[tuple[PeerState, int], PeerState] = {
    (PeerState.AWAIT_HELLO, F.HELLO): PeerState.AWAIT_PROOF,
    (PeerState.AWAIT_PROOF, F.PROOF): PeerState.AWAIT_BITFIELD,
    (PeerState.AWAIT_PROOF, F.GOODBYE): PeerState.DONE,
    (PeerState.AWAIT_BITFIELD, F.BITFIELD): PeerState.OPEN,
    **{(PeerState.AWAIT_BITFIELD, t): PeerState.AWAIT_BITFIELD for t in _BEFORE_BITFIELD},
    (PeerState.AWAIT_BITFIELD, F.GOODBYE): PeerState.DONE,
    **{(PeerState.OPEN, t): PeerState.OPEN for t in _OPEN},
    (PeerState.OPEN, F.GOODBYE): PeerState.DONE,
}


class TrackerState(enum.StrEnum):
    """Where a client <-> tracker conversation is (both ends track the same state)."""

    GREETING = "greeting"  # tracker has not spoken yet
    CHALLENGED = "challenged"  # waiting for the client's AUTH
    AUTH_SENT = "auth-sent"  # waiting for the tracker's verdict
    READY = "ready"  # authenticated
    CLOSED = "closed"  # the tracker refused; nothing more either way


class Sender(enum.StrEnum):
    """Who sent a tracker-protocol message."""

    CLIENT = "client"
    TRACKER = "tracker"


#: Requests a client may send once it has sent AUTH.
CLIENT_REQUESTS = frozenset({F.ANNOUNCE, F.PUBLISH, F.GET_MANIFEST, F.RESOLVE, F.SCRAPE})
#: Replies the tracker may send once it has accepted AUTH.
TRACKER_REPLIES = frozenset(
    {F.PEERS, F.TRACKER_MANIFEST, F.RESOLVED, F.SCRAPE_RESULT, F.OK, F.ERROR}
)
CLIENT_TYPES = CLIENT_REQUESTS | {F.AUTH}
SERVER_TYPES = TRACKER_REPLIES | {F.CHALLENGE}

_S = TrackerState
TRACKER_TABLE: dict[tuple[TrackerState, Sender, int], TrackerState] = {
    (_S.GREETING, Sender.TRACKER, F.CHALLENGE): _S.CHALLENGED,
    (_S.GREETING, Sender.TRACKER, F.ERROR): _S.CLOSED,
    (_S.CHALLENGED, Sender.CLIENT, F.AUTH): _S.AUTH_SENT,
    (_S.CHALLENGED, Sender.TRACKER, F.ERROR): _S.CLOSED,
    (_S.AUTH_SENT, Sender.TRACKER, F.OK): _S.READY,
    (_S.AUTH_SENT, Sender.TRACKER, F.ERROR): _S.CLOSED,
    **{(_S.AUTH_SENT, Sender.CLIENT, t): _S.AUTH_SENT for t in CLIENT_REQUESTS},
    **{(_S.READY, Sender.CLIENT, t): _S.READY for t in CLIENT_REQUESTS},
    **{(_S.READY, Sender.TRACKER, t): _S.READY for t in TRACKER_REPLIES},
}
