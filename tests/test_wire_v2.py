"""Protocol version 2 on the wire: the handshake order and transcript, and the
conversation rules PeerConnection enforces (docs/PROTOCOL.md, "Conversation").

Each rule is tested both ways: sending what it forbids is ``LocalProtocolError``
(nothing is sent, nothing changes), receiving it is ``RemoteProtocolError`` --
and where the rule can be judged from a frame's header, from the header alone,
before any of the body is buffered.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peerd import wire as w
from peerd.errors import LocalProtocolError, RemoteProtocolError
from tests.test_wire import (
    CID,
    HELLO_A,
    HELLO_B,
    NONCE,
    NONCE2,
    PROOF,
    SIG,
    ask,
    drain,
    handshake,
    peer_pair,
    raw_frame,
    transfer,
)

F = w.FrameType
MiB = 1024 * 1024


def header(ftype: int, length: int) -> bytes:
    """A frame's 5-byte header alone."""
    return struct.pack(">BI", ftype, length)


def data_head(index: int, offset: int, length: int) -> bytes:
    """The 13 bytes before a DATA payload of ``length`` bytes."""
    return struct.pack(">BIII", F.DATA, 8 + length, index, offset)


def refused(conn: w.PeerConnection, data: bytes, match: str | None = None) -> None:
    """``data`` (and nothing after it) makes ``conn`` raise RemoteProtocolError."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        drain(conn)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()


def sample(ftype: int) -> w.Event:
    """An event of each peer type (DATA as its header)."""
    return {
        F.HELLO: HELLO_A,
        F.PROOF: PROOF,
        F.BITFIELD: w.Bitfield(b"\x80"),
        F.HAVE: w.Have((0,)),
        F.REQUEST: w.Request(0, 0, 16),
        F.DATA: w.DataHeader(0, 0, 16),
        F.CANCEL: w.Cancel(0, 0, 16),
        F.REJECT: w.Reject(0, 0, 16, "busy"),
        F.MANIFEST_REQUEST: w.ManifestRequest(),
        F.MANIFEST: w.ManifestResponse(b"m"),
        F.KEEPALIVE: w.KeepAlive(),
        F.GOODBYE: w.Goodbye("bye"),
    }[F(ftype)]


NOT_HANDSHAKE = [
    F.BITFIELD,
    F.HAVE,
    F.REQUEST,
    F.DATA,
    F.CANCEL,
    F.REJECT,
    F.MANIFEST_REQUEST,
    F.MANIFEST,
    F.KEEPALIVE,
]
NOT_BEFORE_BITFIELD = [F.HAVE, F.REQUEST, F.DATA, F.CANCEL, F.REJECT]
ids = lambda t: F(t).name  # noqa: E731


# --- the handshake ---------------------------------------------------------------
def test_version_and_keepalive_frame() -> None:
    assert w.PROTOCOL_VERSION == 2
    assert F.KEEPALIVE == 12
    assert w.encode_message(w.KeepAlive()) == b"\x0c\x00\x00\x00\x01\x80"


def test_transcript_is_both_hello_frames_dialer_first() -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    a_frame = a.send(HELLO_A)
    b.receive_data(a_frame)
    assert b.next_event() == HELLO_A
    b_frame = b.send(HELLO_B)
    a.receive_data(b_frame)
    assert a.next_event() == HELLO_B
    digest = hashlib.sha256(b"peer-transcript-v2\x00" + a_frame + b_frame).digest()
    assert a_frame[:5] == header(F.HELLO, len(a_frame) - 5)  # whole frames, headers too
    assert a.transcript_hash() == b.transcript_hash() == digest
    dialer = b"peer-proof-v2\x00" + b"D" + digest
    acceptor = b"peer-proof-v2\x00" + b"A" + digest
    assert a.proof_message(ours=True) == b.proof_message(ours=False) == dialer
    assert b.proof_message(ours=True) == a.proof_message(ours=False) == acceptor


def test_transcript_needs_both_hellos() -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    with pytest.raises(LocalProtocolError, match="both HELLOs"):
        a.transcript_hash()
    b.receive_data(a.send(HELLO_A))
    assert b.next_event() == HELLO_A
    for conn in (a, b):  # each has one HELLO: its own, or the other's
        with pytest.raises(LocalProtocolError, match="both HELLOs"):
            conn.proof_message(ours=True)


def test_dialer_may_not_send_proof_first() -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    b.receive_data(a.send(HELLO_A))
    with pytest.raises(LocalProtocolError, match="before the other's HELLO"):
        a.send(PROOF)
    b.next_event()
    a.receive_data(b.send(HELLO_B))
    assert a.next_event() == HELLO_B
    with pytest.raises(LocalProtocolError, match="before the accepting side's"):
        a.send(PROOF)  # the v1 order: PROOF right after the HELLOs
    assert a.our_state is w.PeerState.AWAIT_PROOF  # nothing changed
    a.receive_data(b.send(PROOF))
    assert a.next_event() == PROOF
    b.receive_data(a.send(PROOF))
    assert b.next_event() == PROOF


def test_acceptor_proves_only_after_the_dialers_hello() -> None:
    b = w.PeerConnection(initiator=False)
    b.send(HELLO_B)  # (its HELLO may go first; its PROOF signs both)
    with pytest.raises(LocalProtocolError, match="before the other's HELLO"):
        b.send(PROOF)
    b.receive_data(w.PeerConnection(initiator=True).send(HELLO_A))
    assert b.next_event() == HELLO_A
    b.send(PROOF)


@pytest.mark.parametrize("acceptor_said_hello", [False, True])
def test_v1_order_dialer_proof_before_the_acceptors_is_refused(acceptor_said_hello: bool) -> None:
    # A v1 dialer sends HELLO and PROOF at once; if its PROOF is read before
    # the acceptor proved, the acceptor refuses it.
    v1_hello = w.Hello(1, HELLO_A.key, 1, CID, NONCE)
    b = w.PeerConnection(initiator=False)
    b.receive_data(
        raw_frame(F.HELLO, {"v": 1, "key": v1_hello.key, "port": 1, "id": CID, "nonce": NONCE})
    )
    assert b.next_event() == v1_hello
    if acceptor_said_hello:
        b.send(HELLO_B)
        refused(b, raw_frame(F.PROOF, {"sig": SIG}), "before the accepting side's")
    else:
        refused(b, raw_frame(F.PROOF, {"sig": SIG}), "before the other's HELLO")


def test_v1_order_seen_by_the_dialer_is_refused() -> None:
    # The dialer receives the acceptor's HELLO and then something other than
    # PROOF (e.g. BITFIELD: a v1 acceptor that waits for the dialer's PROOF
    # would send nothing; one that skips it is refused).
    a = w.PeerConnection(initiator=True)
    a.send(HELLO_A)
    a.receive_data(w.PeerConnection(initiator=False).send(HELLO_B))
    assert a.next_event() == HELLO_B
    refused(a, raw_frame(F.BITFIELD, {"bits": b""}), "PROOF right after HELLO")


@pytest.mark.parametrize("ftype", NOT_HANDSHAKE, ids=ids)
def test_nothing_but_handshake_before_the_others_proof(ftype: int) -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    b.receive_data(a.send(HELLO_A))
    drain(b)
    a.receive_data(b.send(HELLO_B) + b.send(PROOF))
    assert drain(a) == [HELLO_B, PROOF]
    # The acceptor proved but has not the dialer's PROOF: only GOODBYE may go.
    assert b.our_state is w.PeerState.AWAIT_BITFIELD
    with pytest.raises(LocalProtocolError):
        b.send(sample(ftype))
    # The dialer, which has not proved yet, refuses it from the header alone.
    refused(a, header(ftype, w.MAX_BODY[ftype]))
    # And the dialer itself may send nothing but PROOF or GOODBYE yet.
    with pytest.raises(LocalProtocolError):
        a.send(sample(ftype))


@pytest.mark.parametrize("ftype", NOT_HANDSHAKE, ids=ids)
def test_nothing_but_proof_after_hello(ftype: int) -> None:
    b = w.PeerConnection(initiator=False)
    b.receive_data(w.PeerConnection(initiator=True).send(HELLO_A))
    drain(b)
    b.send(HELLO_B)
    b.send(PROOF)
    refused(b, header(ftype, 100), "PROOF right after HELLO")


@pytest.mark.parametrize("dialer_leaves", [True, False])
def test_goodbye_may_replace_proof(dialer_leaves: bool) -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    b.receive_data(a.send(HELLO_A))
    drain(b)
    if dialer_leaves:
        transfer(a, b, w.Goodbye("changed my mind"))
        assert b.their_state is w.PeerState.DONE
    else:  # e.g. GOODBYE "unsupported-version" to a v1 dialer
        a.receive_data(b.send(HELLO_B) + b.send(w.Goodbye("unsupported-version")))
        assert drain(a) == [HELLO_B, w.Goodbye("unsupported-version")]
        assert a.their_state is w.PeerState.DONE


def test_proof_exactly_once() -> None:
    a, b = handshake()
    with pytest.raises(LocalProtocolError):
        a.send(PROOF)
    refused(b, header(F.PROOF, 70))
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="exactly once"):
        b.send(PROOF)
    refused(a, header(F.PROOF, 70), "exactly once")


# --- the transcript binds the proof (Ed25519) ---------------------------------------------
def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


V = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)  # the victim, dialing
H = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)  # the honest acceptor
M = Ed25519PrivateKey.from_private_bytes(b"\x03" * 32)  # in the middle


def _hello_fields(key: Ed25519PrivateKey, nonce: bytes, port: int = 1) -> dict[str, Any]:
    return {"v": w.PROTOCOL_VERSION, "key": _pub(key), "port": port, "id": CID, "nonce": nonce}


def _acceptor_proof(dialer_hello_frame: bytes) -> bytes:
    """What H signs after reading ``dialer_hello_frame`` and sending its HELLO."""
    h = w.PeerConnection(initiator=False)
    h.receive_data(dialer_hello_frame)
    assert isinstance(h.next_event(), w.Hello)
    h.send(w.Hello(2, _pub(H), 2, CID, NONCE2))
    return H.sign(h.proof_message(ours=True))


def _victim() -> tuple[w.PeerConnection, bytes]:
    """V dials and reads H's HELLO: V's connection and the HELLO frame it sent."""
    v = w.PeerConnection(initiator=True)
    frame = v.send(w.Hello(2, _pub(V), 1, CID, NONCE))
    v.receive_data(w.PeerConnection(initiator=False).send(w.Hello(2, _pub(H), 2, CID, NONCE2)))
    assert isinstance(v.next_event(), w.Hello)
    return v, frame


def test_honest_proofs_verify_both_ways() -> None:
    v, frame = _victim()
    assert _verifies(_pub(H), _acceptor_proof(frame), v.proof_message(ours=False))
    # And the dialer's proof, checked by the acceptor.
    h = w.PeerConnection(initiator=False)
    h.receive_data(frame)
    drain(h)
    h.send(w.Hello(2, _pub(H), 2, CID, NONCE2))
    assert h.transcript_hash() == v.transcript_hash()
    assert _verifies(_pub(V), V.sign(v.proof_message(ours=True)), h.proof_message(ours=False))


@pytest.mark.parametrize(
    "relayed",
    [
        pytest.param(_hello_fields(V, b"\x55" * 32), id="different-nonce"),
        pytest.param(_hello_fields(M, NONCE), id="different-key"),
        pytest.param(_hello_fields(V, NONCE, port=9), id="different-port"),
    ],
)
def test_a_proof_for_another_transcript_does_not_verify(relayed: dict[str, Any]) -> None:
    # M dials H with a HELLO of its own making and relays H's PROOF to V.
    v, _ = _victim()
    stolen = _acceptor_proof(raw_frame(F.HELLO, relayed))
    assert not _verifies(_pub(H), stolen, v.proof_message(ours=False))


def test_a_proof_binds_the_hello_bytes_not_only_their_fields() -> None:
    # The same fields in another msgpack key order are another HELLO frame
    # (decoders accept any order), hence another transcript.
    v, frame = _victim()
    fields = _hello_fields(V, NONCE)
    reordered = raw_frame(F.HELLO, dict(reversed(fields.items())))
    assert reordered != frame and reordered[5:] != frame[5:]
    assert _acceptor_proof(frame) != _acceptor_proof(reordered)
    assert _verifies(_pub(H), _acceptor_proof(frame), v.proof_message(ours=False))
    assert not _verifies(_pub(H), _acceptor_proof(reordered), v.proof_message(ours=False))


def test_a_proof_binds_the_signers_role() -> None:
    # A signature over the transcript as dialer is not one as acceptor (no
    # reflecting a PROOF back to its signer, no swapping the HELLO order).
    v, frame = _victim()
    as_dialer = V.sign(v.proof_message(ours=True))
    assert _verifies(_pub(V), as_dialer, v.proof_message(ours=True))
    assert not _verifies(_pub(V), as_dialer, v.proof_message(ours=False))
    h = w.PeerConnection(initiator=True)  # the same two HELLOs, roles swapped
    h.send(w.Hello(2, _pub(H), 2, CID, NONCE2))
    h.receive_data(frame)
    drain(h)
    assert h.transcript_hash() != v.transcript_hash()
    assert not _verifies(_pub(H), H.sign(h.proof_message(ours=True)), v.proof_message(ours=False))


def test_a_v1_proof_does_not_verify_as_v2() -> None:
    v, _ = _victim()
    v1 = H.sign(b"peer-hello-v1\x00" + NONCE + CID)  # v1: the other's nonce and the id
    assert not _verifies(_pub(H), v1, v.proof_message(ours=False))


def test_a_verbatim_relay_is_not_what_the_proof_stops() -> None:
    # Documented limit (PROTOCOL.md): M forwarding both HELLOs untouched gives
    # V and H one transcript -- a transparent proxy. Bans are per route.
    v, frame = _victim()
    assert _verifies(_pub(H), _acceptor_proof(frame), v.proof_message(ours=False))


# --- phases: BITFIELD once and first -------------------------------------------------------
@pytest.mark.parametrize("ftype", NOT_BEFORE_BITFIELD, ids=ids)
def test_only_some_messages_before_bitfield(ftype: int) -> None:
    a, b = handshake()
    with pytest.raises(LocalProtocolError, match="BITFIELD before"):
        a.send(sample(ftype))
    refused(b, header(ftype, 13), "BITFIELD before")


def test_what_may_come_before_bitfield_both_ways() -> None:
    a, b = handshake()
    for src, dst in ((a, b), (b, a)):
        transfer(src, dst, w.KeepAlive())
        transfer(src, dst, w.ManifestRequest())
    for src, dst in ((a, b), (b, a)):
        transfer(src, dst, w.ManifestResponse(b"signed manifest"))
        transfer(src, dst, w.KeepAlive())
    for src, dst in ((a, b), (b, a)):
        transfer(src, dst, w.Bitfield(b"\x80"))
        transfer(src, dst, w.KeepAlive())
    assert a.our_state is a.their_state is w.PeerState.OPEN


def test_goodbye_before_bitfield() -> None:
    a, b = handshake()
    transfer(a, b, w.Goodbye("nothing in common"))
    assert a.our_state is b.their_state is w.PeerState.DONE


def test_a_second_bitfield_is_refused_from_its_header() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="already sent BITFIELD"):
        a.send(w.Bitfield(b""))
    with pytest.raises(LocalProtocolError, match="already sent BITFIELD"):
        b.send(w.Bitfield(b""))
    refused(b, header(F.BITFIELD, w.MAX_BODY[F.BITFIELD]), "already sent BITFIELD")
    refused(a, raw_frame(F.BITFIELD, {"bits": b""}), "already sent BITFIELD")


def test_keepalive_before_and_after_bitfield() -> None:
    a, b = handshake()
    transfer(a, b, w.KeepAlive())
    transfer(b, a, w.KeepAlive())
    transfer(a, b, w.Bitfield(b""))
    transfer(a, b, w.KeepAlive())  # a is OPEN, b still before its BITFIELD
    transfer(b, a, w.KeepAlive())
    transfer(b, a, w.Bitfield(b""))
    transfer(a, b, w.KeepAlive())
    transfer(b, a, w.KeepAlive())
    transfer(a, b, w.Goodbye(""))
    with pytest.raises(LocalProtocolError, match="GOODBYE"):
        a.send(w.KeepAlive())
    refused(b, w.encode_message(w.KeepAlive()), "GOODBYE")


# --- REQUEST ------------------------------------------------------------------------------------
def test_request_only_after_receiving_the_others_bitfield() -> None:
    a, b = handshake()
    transfer(a, b, w.Bitfield(b"\xff"))  # a is OPEN but has not b's BITFIELD
    with pytest.raises(LocalProtocolError, match="before receiving BITFIELD"):
        a.send(w.Request(0, 0, 16))
    # b has a's BITFIELD but never sent its own: a REQUEST to it is refused.
    refused(b, raw_frame(F.REQUEST, {"idx": 0, "off": 0, "len": 16}), "before receiving BITFIELD")


def test_no_request_to_a_side_that_left_without_bitfield() -> None:
    a, b = handshake()
    transfer(a, b, w.Bitfield(b"\xff"))
    transfer(b, a, w.Goodbye("leaving"))  # b never sent its BITFIELD
    fails_local = fails_remote = False
    try:
        a.send(w.Request(0, 0, 16))
    except LocalProtocolError:
        fails_local = True
    b.receive_data(raw_frame(F.REQUEST, {"idx": 0, "off": 0, "len": 16}))
    try:
        b.next_event()
    except RemoteProtocolError:
        fails_remote = True
    assert fails_local and fails_remote


def test_duplicate_of_an_outstanding_request_is_not_sent() -> None:
    a, b = peer_pair()
    ask(a, b, 1, 0, 16)
    with pytest.raises(LocalProtocolError, match="identical to an outstanding"):
        a.send(w.Request(1, 0, 16))
    ask(a, b, 1, 16, 16)  # another range of the chunk is another request


def test_duplicate_of_an_outstanding_request_is_absorbed() -> None:
    a, b = peer_pair()
    ask(a, b, 1, 0, 16)
    with pytest.raises(LocalProtocolError, match="identical"):
        a.send(w.Request(1, 0, 16))
    # Received twice (a peer that repeats itself): owed once, not yielded
    # again (an application must not answer it twice), answered once.
    b.receive_data(raw_frame(F.REQUEST, {"idx": 1, "off": 0, "len": 16}))
    assert drain(b) == []
    b.send_data(1, 0, bytes(16))
    assert not b.owes(1, 0, 16)


def test_a_request_may_be_repeated_once_answered() -> None:
    a, b = peer_pair()
    for _ in range(3):
        ask(a, b, 1, 0, 4)
        a.receive_data(b.send_data(1, 0, b"abcd"))
        assert drain(a) == [w.DataHeader(1, 0, 4), w.DataPayload(b"abcd")]
    ask(a, b, 1, 0, 4)
    transfer(b, a, w.Reject(1, 0, 4, "busy"))
    ask(a, b, 1, 0, 4)
    assert a.outstanding_requests == 1


def test_at_most_max_outstanding_requests() -> None:
    a, b = peer_pair()
    frames = b"".join(a.send(w.Request(i, 0, 16)) for i in range(w.MAX_OUTSTANDING))
    b.receive_data(frames)
    assert len(drain(b)) == w.MAX_OUTSTANDING
    assert a.outstanding_requests == w.MAX_OUTSTANDING
    with pytest.raises(LocalProtocolError, match="1024 requests outstanding"):
        a.send(w.Request(w.MAX_OUTSTANDING, 0, 16))
    # An answer (or a CANCEL) makes room for one more.
    a.receive_data(b.send_data(0, 0, bytes(16)))
    drain(a)
    transfer(a, b, w.Cancel(1, 0, 16))
    assert a.outstanding_requests == w.MAX_OUTSTANDING - 2
    ask(a, b, w.MAX_OUTSTANDING, 0, 16)
    ask(a, b, w.MAX_OUTSTANDING + 1, 0, 16)
    refused(b, raw_frame(F.REQUEST, {"idx": 99999, "off": 0, "len": 16}), "1024 requests")


# --- DATA and REJECT ---------------------------------------------------------------------------
ASKED = (5, 16384, 16384)


@pytest.mark.parametrize(
    "req",
    [(6, 16384, 16384), (5, 0, 16384), (5, 16384, 16383), (5, 16384, 16385), (5, 16384, 64 * MiB)],
    ids=["other-chunk", "wrong-offset", "short", "long", "64MiB"],
)
def test_data_for_what_was_not_requested_is_refused_from_13_bytes(
    req: tuple[int, int, int],
) -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    with pytest.raises(LocalProtocolError, match="not requested"):
        a.send(w.DataHeader(*req))
    assert a.owes(*ASKED)  # nothing changed
    head = data_head(*req)
    b.receive_data(head[:12])
    assert b.next_event() is w.NEED_DATA  # the header is not in yet
    refused(b, head[12:], "DATA for chunk")  # no payload byte fed


def test_data_for_the_request_is_accepted_once() -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    assert a.owes(*ASKED) and b.outstanding_requests == 1
    head = a.send(w.DataHeader(*ASKED))
    assert not a.owes(*ASKED)
    with pytest.raises(LocalProtocolError, match="not requested"):
        a.send(w.DataHeader(*ASKED))
    b.receive_data(head)
    assert b.next_event() == w.DataHeader(*ASKED)
    assert b.outstanding_requests == 0 and b.payload_remaining == ASKED[2]
    b.receive_data(bytes(ASKED[2]))
    assert drain(b) == [w.DataPayload(bytes(ASKED[2]))]
    refused(b, data_head(*ASKED), "not requested")


@pytest.mark.parametrize(
    "req", [(6, 16384, 16384), (5, 0, 16384), (5, 16384, 1)], ids=["other", "offset", "length"]
)
def test_reject_for_what_was_not_requested_is_refused(req: tuple[int, int, int]) -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    with pytest.raises(LocalProtocolError, match="REJECT for chunk"):
        a.send(w.Reject(*req, "busy"))
    refused(b, w.encode_message(w.Reject(*req, "busy")), "REJECT for chunk")


def test_reject_answers_the_request_once() -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    transfer(a, b, w.Reject(*ASKED, "missing"))
    assert not a.owes(*ASKED) and b.outstanding_requests == 0
    with pytest.raises(LocalProtocolError):
        a.send(w.Reject(*ASKED, "missing"))
    with pytest.raises(LocalProtocolError):
        a.send(w.DataHeader(*ASKED))
    refused(b, w.encode_message(w.Reject(*ASKED, "busy")), "not requested")


def _cancel_many(a: w.PeerConnection, b: w.PeerConnection, n: int, base: int = 1000) -> None:
    """``a`` requests and cancels ``n`` other chunks; ``b`` receives it all."""
    out = b"".join(
        a.send(w.Request(base + i, 0, 16)) + a.send(w.Cancel(base + i, 0, 16)) for i in range(n)
    )
    b.receive_data(out)
    assert len(drain(b)) == 2 * n


@pytest.mark.parametrize("answer", ["data", "reject"])
def test_a_cancelled_requests_late_answer_is_accepted_once(answer: str) -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    b.send(w.Cancel(*ASKED))  # crosses a's answer: a has not read it
    assert b.outstanding_requests == 0
    if answer == "data":
        b.receive_data(a.send_data(*ASKED[:2], bytes(ASKED[2])))
        assert drain(b)[0] == w.DataHeader(*ASKED)
    else:
        transfer(a, b, w.Reject(*ASKED, "busy"))
    refused(b, data_head(*ASKED), "not requested")  # but only one answer


def test_a_received_cancel_leaves_the_answer_allowed() -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    transfer(b, a, w.Cancel(*ASKED))
    assert a.owes(*ASKED)  # its answer may still go (it may be on its way)
    a.send(w.DataHeader(*ASKED))
    assert not a.owes(*ASKED)


def test_late_answers_only_for_the_last_max_cancelled() -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    transfer(b, a, w.Cancel(*ASKED))
    _cancel_many(b, a, w.MAX_CANCELLED - 1)
    assert a.owes(*ASKED)  # among the last 1024 cancelled
    _cancel_many(b, a, 1, base=5000)
    assert not a.owes(*ASKED)  # 1024 newer cancels
    with pytest.raises(LocalProtocolError, match="not requested"):
        a.send(w.DataHeader(*ASKED))


@pytest.mark.parametrize("newer", [w.MAX_CANCELLED - 1, w.MAX_CANCELLED])
def test_late_data_after_newer_cancels(newer: int) -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    b.send(w.Cancel(*ASKED))
    for i in range(newer):
        b.send(w.Request(1000 + i, 0, 16))
        b.send(w.Cancel(1000 + i, 0, 16))
    head = data_head(*ASKED)
    if newer < w.MAX_CANCELLED:
        b.receive_data(head)
        assert b.next_event() == w.DataHeader(*ASKED)
    else:
        refused(b, head, "not requested")


def test_rerequest_after_cancel_accepts_both_crossing_answers() -> None:
    a, b = peer_pair()
    # b asks, changes its mind, asks again; a answered the first before the
    # CANCEL arrived (ignored: nothing outstanding), then answers the second.
    first = b.send(w.Request(*ASKED))
    a.receive_data(first)
    drain(a)
    answer1 = a.send_data(*ASKED[:2], bytes(ASKED[2]))
    later = b.send(w.Cancel(*ASKED)) + b.send(w.Request(*ASKED))
    a.receive_data(later)
    assert drain(a) == [w.Cancel(*ASKED), w.Request(*ASKED)]
    answer2 = a.send_data(*ASKED[:2], bytes(ASKED[2]))  # a's book: it is owed
    b.receive_data(answer1 + answer2)
    events = drain(b)  # honest answers both: no error
    assert events.count(w.DataHeader(*ASKED)) == 2


def test_rerequest_after_a_crossed_answer_is_not_a_duplicate() -> None:
    a, b = peer_pair()
    ask(b, a, *ASKED)
    answer1 = a.send_data(*ASKED[:2], bytes(ASKED[2]))  # crosses b's CANCEL
    a.receive_data(b.send(w.Cancel(*ASKED)) + b.send(w.Request(*ASKED)))
    assert drain(a) == [w.Cancel(*ASKED), w.Request(*ASKED)]  # outstanding again at a
    b.receive_data(answer1)
    assert drain(b)[0] == w.DataHeader(*ASKED)  # b takes it for the answer to its second
    assert b.outstanding_requests == 0
    a.receive_data(b.send(w.Request(*ASKED)))  # so b may ask again (its book allows it)
    assert drain(a) == []  # a still owes it: the repeat is absorbed, not refused
    a.send(w.DataHeader(*ASKED))  # and a answers it once
    assert not a.owes(*ASKED)


def test_the_window_counts_from_the_latest_cancel() -> None:
    _, b = peer_pair()
    for _ in range(2):
        b.send(w.Request(*ASKED))
        b.send(w.Cancel(*ASKED))
    for i in range(w.MAX_CANCELLED - 1):  # the latest cancel stays among the last 1024
        b.send(w.Request(1000 + i, 0, 16))
        b.send(w.Cancel(1000 + i, 0, 16))
    b.receive_data(data_head(*ASKED))
    assert b.next_event() == w.DataHeader(*ASKED)


# --- CANCEL -------------------------------------------------------------------------------------
def test_cancel_sent_must_match_an_outstanding_request() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        a.send(w.Cancel(*ASKED))
    ask(a, b, *ASKED)
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        a.send(w.Cancel(5, 16384, 1))  # not the exact range
    transfer(a, b, w.Cancel(*ASKED))
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        a.send(w.Cancel(*ASKED))  # once
    ask(a, b, *ASKED)
    a.receive_data(b.send_data(*ASKED[:2], bytes(ASKED[2])))
    drain(a)
    with pytest.raises(LocalProtocolError, match="not outstanding"):
        a.send(w.Cancel(*ASKED))  # answered


def test_received_cancel_matching_nothing_is_yielded_and_ignored() -> None:
    a, b = peer_pair()
    ask(b, a, 1, 0, 16)
    cancels = [w.Cancel(*ASKED), w.Cancel(1, 0, 17), w.Cancel(1, 0, 16), w.Cancel(1, 0, 16)]
    a.receive_data(b"".join(w.encode_message(c) for c in cancels))
    assert drain(a) == cancels
    assert not a.owes(*ASKED) and a.owes(1, 0, 16)
    a.send(w.DataHeader(1, 0, 16))  # the late answer to the cancelled one
    transfer(a, b, w.KeepAlive())  # still in good standing


def test_outstanding_requests_counts_ours() -> None:
    a, b = peer_pair()
    assert a.outstanding_requests == 0
    for i in range(4):
        ask(a, b, i, 0, 8)
    transfer(a, b, w.Cancel(0, 0, 8))
    transfer(b, a, w.Reject(1, 0, 8, "busy"))
    a.receive_data(b.send_data(2, 0, bytes(8)))
    drain(a)
    assert a.outstanding_requests == 1
    assert b.outstanding_requests == 0
    assert b.owes(0, 0, 8) and b.owes(3, 0, 8) and not b.owes(1, 0, 8) and not b.owes(2, 0, 8)


# --- MANIFEST_REQUEST and MANIFEST -------------------------------------------------------------
def test_manifest_request_once_per_direction() -> None:
    a, b = peer_pair()
    transfer(a, b, w.ManifestRequest())
    transfer(b, a, w.ManifestRequest())
    with pytest.raises(LocalProtocolError, match="once only"):
        a.send(w.ManifestRequest())
    refused(b, w.encode_message(w.ManifestRequest()), "once only")


def test_unsolicited_manifest_is_refused_from_its_header() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="not asked for"):
        a.send(w.ManifestResponse(b"unasked"))
    # Only the 5-byte header of a 40 MiB MANIFEST: refused, no body awaited.
    refused(b, header(F.MANIFEST, w.MAX_BODY[F.MANIFEST]), "not asked for")
    # The same header after a MANIFEST_REQUEST waits for its body.
    c, d = peer_pair()
    transfer(d, c, w.ManifestRequest())
    d.receive_data(header(F.MANIFEST, w.MAX_BODY[F.MANIFEST]))
    assert d.next_event() is w.NEED_DATA


def test_unsolicited_manifest_refused_before_the_handshake_ends() -> None:
    a, b = handshake()
    refused(b, header(F.MANIFEST, w.MAX_BODY[F.MANIFEST]), "not asked for")
    with pytest.raises(LocalProtocolError, match="not asked for"):
        a.send(w.ManifestResponse(b"m"))


def test_manifest_answers_once() -> None:
    a, b = peer_pair()
    transfer(b, a, w.ManifestRequest())
    transfer(a, b, w.ManifestResponse(b"the manifest"))
    with pytest.raises(LocalProtocolError, match="not asked for"):
        a.send(w.ManifestResponse(b"the manifest"))
    refused(b, header(F.MANIFEST, 10 * MiB), "not asked for")


def test_prepared_manifest_frame_shared_by_connections() -> None:
    frame = w.encode_message(w.ManifestResponse(b"one encoded manifest"))
    pairs = [peer_pair() for _ in range(3)]
    with pytest.raises(LocalProtocolError, match="not asked for"):
        pairs[0][0].send_prepared(frame)
    for a, b in pairs:
        transfer(b, a, w.ManifestRequest())
        assert a.send_prepared(frame) is frame
        b.receive_data(frame)
        assert drain(b) == [w.ManifestResponse(b"one encoded manifest")]
        with pytest.raises(LocalProtocolError, match="not asked for"):
            a.send_prepared(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x09\x00\x00",
        w.encode_message(w.ManifestResponse(b"m"))[:-1],
        data_head(0, 0, 1) + b"x",
        w.encode_message(HELLO_A),
        w.encode_message(w.Request(0, 0, 16)),  # watched: its obligations need the event
    ],
    ids=["short", "cut", "data", "hello", "request"],
)
def test_send_prepared_refuses_what_it_cannot_account(frame: bytes) -> None:
    a, b = peer_pair()
    transfer(b, a, w.ManifestRequest())
    with pytest.raises(LocalProtocolError):
        a.send_prepared(frame)
    assert a.send_prepared(w.encode_message(w.KeepAlive()))  # unwatched ones go
    a.send(w.ManifestResponse(b"m"))  # the refusals changed nothing


def test_encode_message_refuses_data() -> None:
    with pytest.raises(LocalProtocolError, match="cannot be prepared"):
        w.encode_message(w.DataHeader(0, 0, 1))


# --- error discipline ----------------------------------------------------------------------------
def test_receive_buffer_is_freed_after_a_remote_error() -> None:
    _, b = peer_pair()
    haves = b"".join(w.encode_message(w.Have((i,))) for i in range(5000))
    b.receive_data(haves + header(F.MANIFEST, 1 * MiB) + bytes(1 * MiB))
    with pytest.raises(RemoteProtocolError, match="not asked for"):
        drain(b)
    assert len(b._buf) == 0
    assert not b.drained
    with pytest.raises(RemoteProtocolError, match="already failed"):
        b.next_event()


# --- properties ----------------------------------------------------------------------------------
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A small universe, so requests, answers and cancels meet often.
reqs = st.tuples(st.integers(0, 2), st.sampled_from([0, 16]), st.sampled_from([1, 16]))
any_peer_event = st.one_of(
    st.sampled_from([HELLO_A, HELLO_B, PROOF, w.KeepAlive(), w.ManifestRequest(), w.Goodbye("x")]),
    st.builds(w.Bitfield, st.sampled_from([b"", b"\xe0"])),
    st.builds(w.Have, st.lists(st.integers(0, 2), min_size=1, max_size=2).map(tuple)),
    st.builds(w.ManifestResponse, st.sampled_from([b"m", b"manifest"])),
    reqs.map(lambda r: w.Request(*r)),
    reqs.map(lambda r: w.Cancel(*r)),
    reqs.map(lambda r: w.Reject(*r, "busy")),
    reqs.map(lambda r: w.DataHeader(*r)),
)
# (who acts, the event, whether the peer sends it even if its own rules forbid it)
actions = st.lists(
    st.tuples(st.sampled_from(["us", "peer"]), any_peer_event, st.booleans()), max_size=40
)


def _frame(conn: w.PeerConnection | None, event: w.Event) -> bytes:
    """The bytes of ``event``: through ``conn``'s checks, or raw with ``conn=None``."""
    if isinstance(event, w.DataHeader):
        payload = bytes(range(event.length))
        if conn is None:
            return data_head(event.index, event.offset, event.length) + payload
        return conn.send_data(event.index, event.offset, payload)
    return w.encode_message(event) if conn is None else conn.send(event)


def _read(conn: w.PeerConnection, data: bytes) -> list[w.Event]:
    conn.receive_data(data)
    return drain(conn)


@FAST
@given(initiator=st.booleans(), steps=actions)
def test_hostile_conversations_raise_only_protocol_errors(
    initiator: bool, steps: list[tuple[str, w.Event, bool]]
) -> None:
    # ``conn`` talks to ``peer``, a model of the other side that follows the
    # rules unless told to force a message; delivery is immediate, so both
    # books agree: whatever ``peer`` may send, ``conn`` accepts, and whatever
    # ``peer`` may not send (a CANCEL apart), ``conn`` refuses.
    conn = w.PeerConnection(initiator=initiator)
    peer = w.PeerConnection(initiator=not initiator)
    for who, message, force in steps:
        if who == "us":
            try:
                data = _frame(conn, message)
            except LocalProtocolError:
                continue
            _read(peer, data)  # an honest send is accepted (raises otherwise)
            continue
        try:
            data, allowed, why = _frame(peer, message), True, ""
        except LocalProtocolError as exc:
            if not force:
                continue
            data, allowed, why = _frame(None, message), False, str(exc)
        try:
            got = _read(conn, data)
        except RemoteProtocolError:
            assert not allowed, f"{message} was refused though the rules allow it"
            event(f"refused {type(message).__name__}")
            with pytest.raises(RemoteProtocolError):
                conn.next_event()
            return
        # (An unmatched CANCEL is ignored by design; a duplicate REQUEST may
        # be absorbed, see test_rerequest_after_a_crossed_answer_is_not_a_duplicate.)
        assert allowed or isinstance(message, w.Cancel) or "identical" in why, message
        assert got and got[0] == message


class _Side:
    """An honest side's own knowledge of the conversation (not the wire's books)."""

    def __init__(self, conn: w.PeerConnection, hello: w.Hello) -> None:
        self.conn = conn
        self.hello = hello
        self.out = bytearray()  # sent, not yet delivered
        self.got_proof = self.sent_bitfield = self.got_bitfield = False
        self.left = self.other_left = False
        self.asked: set[tuple[int, int, int]] = set()  # our REQUESTs not answered or cancelled
        self.owed: list[tuple[int, int, int]] = []  # their REQUESTs we will answer
        self.late: set[tuple[int, int, int]] = set()  # theirs cancelled; we may still answer
        self.asked_manifest = self.manifest_owed = False

    def send(self, event: w.Event) -> None:
        self.out += _frame(self.conn, event)
        if isinstance(event, w.Goodbye):
            self.left = True

    def on(self, event: w.Event) -> None:
        if isinstance(event, w.Hello) and not self.conn.initiator:
            self.send(self.hello)
            self.send(PROOF)
        elif isinstance(event, w.Proof):
            self.got_proof = True
            if self.conn.initiator:
                self.send(PROOF)
        elif isinstance(event, w.Bitfield):
            self.got_bitfield = True
        elif isinstance(event, w.Request):
            if (req := (event.index, event.offset, event.length)) not in self.owed:
                self.owed.append(req)
        elif isinstance(event, w.Cancel):
            req = (event.index, event.offset, event.length)
            if req in self.owed:
                self.owed.remove(req)
                self.late.add(req)
        elif isinstance(event, w.DataHeader | w.Reject):
            self.asked.discard((event.index, event.offset, event.length))
        elif isinstance(event, w.ManifestRequest):
            self.manifest_owed = True
        elif isinstance(event, w.Goodbye):
            self.other_left = True

    def choices(self) -> list[w.Event]:
        """What this side may send now, as far as it knows."""
        if self.left or not self.got_proof:
            return []
        if self.other_left:
            return [w.Goodbye("you left")]
        out: list[w.Event] = [w.KeepAlive()]
        if not self.asked_manifest:
            out.append(w.ManifestRequest())
        if self.manifest_owed:
            out.append(w.ManifestResponse(b"manifest"))
        if not self.sent_bitfield:
            return [*out, w.Bitfield(b"\xe0")]
        out.append(w.Have((1,)))
        for req in self.owed:
            out += [w.DataHeader(*req), w.Reject(*req, "busy")]
        out += [w.DataHeader(*req) for req in sorted(self.late)]
        out += [w.Cancel(*req) for req in sorted(self.asked)]
        if self.got_bitfield:
            # (a request it cancelled may be asked again: answers may cross)
            for i in range(3):
                for off in (0, 16):
                    req = (i, off, 16)
                    if req not in self.asked:
                        out.append(w.Request(*req))
        return out

    def act(self, event: w.Event) -> None:
        self.send(event)
        if isinstance(event, w.Bitfield):
            self.sent_bitfield = True
        elif isinstance(event, w.ManifestRequest):
            self.asked_manifest = True
        elif isinstance(event, w.ManifestResponse):
            self.manifest_owed = False
        elif isinstance(event, w.Request | w.Cancel | w.DataHeader | w.Reject):
            req = (event.index, event.offset, event.length)
            if isinstance(event, w.Request):
                self.asked.add(req)
            elif isinstance(event, w.Cancel):
                self.asked.discard(req)
            elif req in self.owed:
                self.owed.remove(req)
            else:
                self.late.discard(req)


def _deliver(src: _Side, dst: _Side, n: int) -> None:
    if not n:
        return  # (b"" would mean EOF)
    data, src.out[:n] = bytes(src.out[:n]), b""
    dst.conn.receive_data(data)
    for got in drain(dst.conn):
        if not isinstance(got, w.DataPayload):
            if isinstance(got, w.DataHeader | w.Reject):
                req = (got.index, got.offset, got.length)
                event("late answer" if req not in dst.asked else "answer")
            dst.on(got)


# (which side, deliver its bytes or act, a number that picks how much / what)
moves = st.lists(
    st.tuples(st.booleans(), st.booleans(), st.integers(0, 2**16)), min_size=40, max_size=200
)


@FAST
@given(steps=moves)
def test_honest_random_conversations_never_raise(steps: list[tuple[bool, bool, int]]) -> None:
    # Two honest sides, bytes in flight both ways and delivered in random
    # pieces, so CANCELs cross answers and MANIFEST_REQUESTs cross BITFIELDs.
    a = _Side(w.PeerConnection(initiator=True), HELLO_A)
    b = _Side(w.PeerConnection(initiator=False), HELLO_B)
    a.send(HELLO_A)
    for is_a, deliver, k in steps:
        side, other = (a, b) if is_a else (b, a)
        if deliver or not side.choices():
            n = len(side.out) if k % 2 == 0 else 1 + k % max(1, len(side.out))
            _deliver(side, other, min(n, len(side.out)))
        elif k % 64 == 63:
            side.act(w.Goodbye("done"))
        else:
            options = side.choices()
            side.act(options[k % len(options)])
    while a.out or b.out:  # the rest arrives
        _deliver(a, b, len(a.out))
        _deliver(b, a, len(b.out))
    for side in (a, b):
        assert side.conn.outstanding_requests == len(side.asked)
        assert all(side.conn.owes(*req) for req in side.owed)
