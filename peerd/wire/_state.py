"""The conversation rules of both protocols, as tables.

Rules (docs/PROTOCOL.md, "Conversation"):

Peer connection -- each direction is independent and symmetric:
  * the first message a side sends is HELLO, and it sends HELLO exactly once;
  * the second is PROOF (its signature over the other side's nonce), once;
  * after PROOF any peer message may follow, in any order;
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
    }
)

PEER_TABLE: dict[tuple[PeerState, int], PeerState] = {
    (PeerState.AWAIT_HELLO, F.HELLO): PeerState.AWAIT_PROOF,
    (PeerState.AWAIT_PROOF, F.PROOF): PeerState.OPEN,
    (PeerState.AWAIT_PROOF, F.GOODBYE): PeerState.DONE,
    **{(PeerState.OPEN, t): PeerState.OPEN for t in PEER_TYPES - {F.HELLO, F.PROOF, F.GOODBYE}},
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
