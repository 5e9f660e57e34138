"""Wire protocol tests: two connections talking through bytes, no sockets.

The helpers at the top are shared with test_wire_fuzz.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import msgpack
import pytest

from peerd import wire as w
from peerd.errors import LocalProtocolError, RemoteProtocolError

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))
CID = bytes(range(100, 132))
SIG = bytes(range(64))
NONCE = b"\x07" * 32
NONCE2 = b"\x09" * 32

#: The dialer's and the acceptor's HELLO in the helpers below.
HELLO_A = w.Hello(w.PROTOCOL_VERSION, KEY, 1, CID, NONCE)
HELLO_B = w.Hello(w.PROTOCOL_VERSION, KEY2, 2, CID, NONCE2)
PROOF = w.Proof(SIG)

PEER_EVENTS: list[w.Event] = [
    w.Hello(w.PROTOCOL_VERSION, KEY, 6881, CID, NONCE),
    w.Proof(SIG),
    w.Bitfield(b"\xf0\x0f\x80"),
    w.Bitfield(b""),
    w.Have((0, 5, 2**32 - 1)),
    w.Request(3, 16384, 16384),
    w.Cancel(3, 0, 1),
    w.Reject(9, 0, 65536, "busy"),
    w.ManifestRequest(),
    w.ManifestResponse(b"\x82signed manifest bytes"),
    w.KeepAlive(),
    w.Goodbye("done"),
]
CLIENT_EVENTS: list[w.Event] = [
    w.Auth(KEY, SIG),
    w.Announce(CID, 6881, "started", b"\x80", 50),
    w.Publish(b"manifest"),
    w.GetManifest(CID),
    w.Resolve("0123456789abcdef"),
    w.Scrape((CID, KEY)),
]

SERVER_EVENTS: list[w.Event] = [
    w.Challenge(w.PROTOCOL_VERSION, NONCE),
    w.Ok(),
    w.Peers(
        CID,
        300,
        (w.PeerEntry("127.0.0.1", 7000, KEY, b"\xff"), w.PeerEntry("::1", 0, SIG[:32], b"")),
        b"\x00\x01\xff\xff",
    ),
    w.TrackerManifest(b"manifest"),
    w.Resolved(CID),
    w.ScrapeResult((w.ScrapeStat(CID, 1, 2, 3),)),
    w.Error("not-found", "no such content"),
]


def raw_frame(ftype: int, body: Any, *, packed: bool = False) -> bytes:
    """A frame with an arbitrary (possibly invalid) msgpack body."""
    data = body if packed else msgpack.packb(body, use_bin_type=True)
    return struct.pack(">BI", ftype, len(data)) + data


def handshake(
    a_hello: w.Hello = HELLO_A, b_hello: w.Hello = HELLO_B
) -> tuple[w.PeerConnection, w.PeerConnection]:
    """A dialer ``a`` and an acceptor ``b`` through HELLO and PROOF, in the v2
    order (the dialer proves last); both still owe their BITFIELD."""
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    transfer(a, b, a_hello)
    a.receive_data(b.send(b_hello) + b.send(PROOF))
    assert drain(a) == [b_hello, PROOF]
    transfer(a, b, PROOF)
    assert a.our_state is a.their_state is w.PeerState.AWAIT_BITFIELD
    assert b.our_state is b.their_state is w.PeerState.AWAIT_BITFIELD
    return a, b


def peer_pair(
    a_bits: bytes = b"", b_bits: bytes = b""
) -> tuple[w.PeerConnection, w.PeerConnection]:
    """A dialer ``a`` and an acceptor ``b`` through the whole handshake and the
    BITFIELD exchange: both OPEN, either may REQUEST."""
    a, b = handshake()
    transfer(a, b, w.Bitfield(a_bits))
    transfer(b, a, w.Bitfield(b_bits))
    assert a.our_state is a.their_state is b.our_state is b.their_state is w.PeerState.OPEN
    return a, b


def ask(requester: w.PeerConnection, server: w.PeerConnection, *req: int) -> None:
    """``requester`` REQUESTs ``req`` (index, offset, length) and ``server`` gets it."""
    transfer(requester, server, w.Request(*req))


def tracker_pair() -> tuple[w.TrackerClientConnection, w.TrackerServerConnection]:
    """A client and tracker connection that completed CHALLENGE / AUTH / OK."""
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    client.receive_data(server.send(w.Challenge(w.PROTOCOL_VERSION, NONCE)))
    assert isinstance(client.next_event(), w.Challenge)
    server.receive_data(client.send(w.Auth(KEY, SIG)))
    assert isinstance(server.next_event(), w.Auth)
    client.receive_data(server.send(w.Ok()))
    assert client.next_event() == w.Ok()
    assert client.state is server.state is w.TrackerState.READY
    return client, server


def drain(conn: w.FrameConnection) -> list[w.Event]:
    """All events currently available (stops at NEED_DATA or Closed)."""
    out: list[w.Event] = []
    while True:
        event = conn.next_event()
        if event is w.NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, w.Closed):
            return out


def transfer(src: w.FrameConnection, dst: w.FrameConnection, event: w.Event) -> None:
    dst.receive_data(src.send(event))
    assert dst.next_event() == event
    assert dst.next_event() is w.NEED_DATA


#: A DATA frame as the sending side makes it: (index, offset, payload).
DataFrame = tuple[int, int, bytes]

#: Events that need the sender's BITFIELD first (the OPEN phase).
_OPEN_ONLY = (w.Have, w.Request, w.Cancel, w.Reject)


class Script:
    """A recorded conversation, seen from the acceptor.

    The dialer ``a`` sends its stream (``send``); an honest acceptor ``b``
    answers HELLO with HELLO + PROOF and PROOF with its BITFIELD, and sends
    whatever a message of ``a`` needs first (the REQUEST a DATA or REJECT
    answers, the MANIFEST_REQUEST a MANIFEST answers). ``a`` sends its own
    prerequisites too (BITFIELD before HAVE, the REQUEST a CANCEL cancels).
    ``replay`` plays a fresh acceptor against the recorded stream, sending
    what ``b`` sent after the same number of received events.
    """

    def __init__(self, b_bits: bytes = b"") -> None:
        self.a = w.PeerConnection(initiator=True)
        self.b = w.PeerConnection(initiator=False)
        self.b_bits = b_bits
        self.frames: list[bytes] = []
        self.expected: list[object] = []  # what b receives; a payload as bytes
        self.replies: dict[int, list[w.Event]] = {}
        self._seen = 0  # events b received, DataPayload pieces not counted
        self._b_asked_manifest = False
        self._a_asked: set[tuple[int, int, int]] = set()  # a's outstanding REQUESTs
        self._put(w.Hello(w.PROTOCOL_VERSION, KEY, 6881, CID, NONCE))
        self._put(PROOF)

    @property
    def stream(self) -> bytes:
        return b"".join(self.frames)

    def _b_sends(self, event: w.Event) -> None:
        self.a.receive_data(self.b.send(event))
        drain(self.a)
        self.replies.setdefault(self._seen, []).append(event)

    def _put(self, item: w.Event | DataFrame) -> None:
        if isinstance(item, tuple):
            frame = self.a.send_data(*item)
            self.expected += [w.DataHeader(item[0], item[1], len(item[2])), item[2]]
        else:
            frame = self.a.send(item)
            self.expected.append(item)
            if isinstance(item, w.Request | w.Cancel):
                req = (item.index, item.offset, item.length)
                (self._a_asked.add if isinstance(item, w.Request) else self._a_asked.discard)(req)
        self.frames.append(frame)
        self.b.receive_data(frame)
        for event in drain(self.b):
            if isinstance(event, w.DataPayload):
                continue
            self._seen += 1
            if isinstance(event, w.Hello):
                self._b_sends(HELLO_B)
                self._b_sends(PROOF)
            elif isinstance(event, w.Proof):
                self._b_sends(w.Bitfield(self.b_bits))

    def send(self, item: w.Event | DataFrame) -> bool:
        """Send ``item`` from ``a`` with its prerequisites; False (and nothing
        sent) if the conversation does not allow it at all."""
        a = self.a
        if a.our_state is w.PeerState.DONE:
            return False
        if isinstance(item, w.Bitfield) and a.our_state is not w.PeerState.AWAIT_BITFIELD:
            return False
        if isinstance(item, (tuple, *_OPEN_ONLY)) and a.our_state is w.PeerState.AWAIT_BITFIELD:
            self._put(w.Bitfield(b""))
        try:
            if isinstance(item, tuple):
                req = (item[0], item[1], len(item[2]))
                if not a.owes(*req):
                    self._b_sends(w.Request(*req))
            elif isinstance(item, w.Reject):
                if not a.owes(item.index, item.offset, item.length):
                    self._b_sends(w.Request(item.index, item.offset, item.length))
            elif isinstance(item, w.Cancel):
                req = (item.index, item.offset, item.length)
                if req not in self._a_asked:
                    self._put(w.Request(*req))
            elif isinstance(item, w.ManifestResponse) and not self._b_asked_manifest:
                self._b_sends(w.ManifestRequest())
                self._b_asked_manifest = True
            self._put(item)
        except LocalProtocolError:
            return False  # e.g. a second MANIFEST_REQUEST, a duplicate REQUEST
        return True

    def replay(self, pieces: list[bytes], *, eof: bool = True) -> list[w.Event]:
        """Feed ``pieces`` (then EOF) to a fresh acceptor that says what ``b`` said."""
        conn = w.PeerConnection(initiator=False)
        seen = 0
        events: list[w.Event] = []
        for piece in [*pieces, b""] if eof else pieces:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not w.NEED_DATA:
                events.append(event)
                if isinstance(event, w.Closed):
                    break
                if not isinstance(event, w.DataPayload):
                    seen += 1
                    for reply in self.replies.get(seen, []):
                        conn.send(reply)
        return events


def _prepare(src: w.PeerConnection, dst: w.PeerConnection, event: w.Event) -> None:
    """Make ``event`` one that ``src`` may send ``dst`` now."""
    if isinstance(event, w.Reject | w.DataHeader):
        ask(dst, src, event.index, event.offset, event.length)
    elif isinstance(event, w.Cancel):
        ask(src, dst, event.index, event.offset, event.length)
    elif isinstance(event, w.ManifestResponse):
        transfer(dst, src, w.ManifestRequest())


# --- round trips ---------------------------------------------------------------
@pytest.mark.parametrize("event", PEER_EVENTS[2:], ids=lambda e: type(e).__name__)
def test_peer_round_trip_both_ways(event: w.Event) -> None:
    # BITFIELD goes once, as the first message after the PROOFs.
    a, b = handshake() if isinstance(event, w.Bitfield) else peer_pair()
    _prepare(a, b, event)
    transfer(a, b, event)
    _prepare(b, a, event)
    transfer(b, a, event)


@pytest.mark.parametrize("event", CLIENT_EVENTS[1:], ids=lambda e: type(e).__name__)
def test_tracker_client_to_server(event: w.Event) -> None:
    client, server = tracker_pair()
    transfer(client, server, event)


@pytest.mark.parametrize("event", SERVER_EVENTS[1:], ids=lambda e: type(e).__name__)
def test_tracker_server_to_client(event: w.Event) -> None:
    client, server = tracker_pair()
    transfer(server, client, event)


def test_hello_and_challenge_round_trip() -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    transfer(a, b, PEER_EVENTS[0])
    transfer(b, a, HELLO_B)
    transfer(b, a, PEER_EVENTS[1])  # the acceptor proves first
    transfer(a, b, PEER_EVENTS[1])
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    transfer(server, client, SERVER_EVENTS[0])
    transfer(client, server, CLIENT_EVENTS[0])


def test_exact_bytes_of_request_and_data_header() -> None:
    a, b = peer_pair()
    frame = a.send(w.Request(1, 2, 3))
    assert frame[:5] == b"\x04" + struct.pack(">I", len(frame) - 5)
    assert msgpack.unpackb(frame[5:]) == {"idx": 1, "off": 2, "len": 3}
    ask(b, a, 7, 16, 100)
    assert a.send(w.DataHeader(7, 16, 100)) == b"\x05\x00\x00\x00\x6c" + struct.pack(">II", 7, 16)
    assert a.send(w.KeepAlive()) == b"\x0c\x00\x00\x00\x01\x80"  # an empty map


def _peer_stream() -> tuple[Script, list[w.Event]]:
    script = Script()
    events = [*PEER_EVENTS[2:3], *PEER_EVENTS[4:-1]]  # BITFIELD once
    events[events.index(w.Cancel(3, 0, 1))] = w.Cancel(3, 16384, 16384)  # the REQUEST before it
    for event in events:
        assert script.send(event), event
    assert script.send((4, 32, b"payload!"))
    assert script.send(w.Have((4,)))
    assert script.send(PEER_EVENTS[-1])
    expected = [e for e in script.expected if isinstance(e, w.Event)]
    assert w.DataHeader(4, 32, 8) in expected
    return script, expected


def _merge_payloads(events: list[w.Event]) -> tuple[list[w.Event], bytes]:
    payload = b"".join(e.data for e in events if isinstance(e, w.DataPayload))
    return [e for e in events if not isinstance(e, w.DataPayload)], payload


def test_byte_at_a_time() -> None:
    script, expected = _peer_stream()
    stream = script.stream
    events = script.replay([stream[i : i + 1] for i in range(len(stream))])
    others, payload = _merge_payloads(events)
    assert others == [*expected, w.Closed()]
    assert payload == b"payload!"
    assert all(len(e.data) == 1 for e in events if isinstance(e, w.DataPayload))


def test_many_frames_in_one_receive_data() -> None:
    script, expected = _peer_stream()
    others, payload = _merge_payloads(script.replay([script.stream]))
    assert others == [*expected, w.Closed()]
    assert payload == b"payload!"


def test_thousands_of_small_frames_and_big_buffers() -> None:
    # Crosses the compaction threshold many times; every frame must survive it.
    # (Each REQUEST is cancelled at once: at most MAX_OUTSTANDING may be open.)
    a, b = peer_pair()
    messages: list[w.Event] = []
    for i in range(5000):
        messages += [w.Request(i, i * 7, 1 + i % 1000), w.Cancel(i, i * 7, 1 + i % 1000)]
    blob = b"".join(a.send(m) for m in messages)
    assert len(blob) > 4 * 64 * 1024
    received: list[w.Event] = []
    for start in range(0, len(blob), 70001):
        b.receive_data(blob[start : start + 70001])
        received.extend(drain(b))
    assert received == messages


# --- DATA payload ----------------------------------------------------------------
def test_data_payload_as_events_never_past_the_end() -> None:
    a, b = peer_pair()
    payload = bytes(range(256)) * 40
    ask(b, a, 1, 0, len(payload))
    frame = a.send_data(1, 0, payload) + a.send(w.Have((1,)))
    b.receive_data(frame[:100])
    assert b.next_event() == w.DataHeader(1, 0, len(payload))
    assert b.payload_remaining == len(payload)
    first = b.next_event()
    assert isinstance(first, w.DataPayload) and first.data == payload[:87]
    assert b.next_event() is w.NEED_DATA
    b.receive_data(frame[100:])  # the rest of the payload and the HAVE together
    rest = b.next_event()
    assert isinstance(rest, w.DataPayload) and first.data + rest.data == payload
    assert b.payload_remaining == 0
    assert b.next_event() == w.Have((1,))


def test_data_payload_taken_into_buffer_and_socket() -> None:
    a, b = peer_pair()
    payload = bytes(range(256)) * 64
    ask(b, a, 2, 16384, len(payload))
    ask(a, b, 0, 0, 1)
    frame = a.send_data(2, 16384, payload) + a.send(w.Cancel(0, 0, 1))
    split = 13 + 1000  # the header and 1000 payload bytes arrive with the header
    b.receive_data(frame[:split])
    header = b.next_event()
    assert header == w.DataHeader(2, 16384, len(payload))
    dest = bytearray(len(payload))
    view = memoryview(dest)
    n = b.take_payload_into(view)
    assert n == 1000
    with pytest.raises(LocalProtocolError, match="only"):
        b.payload_consumed_externally(len(payload))
    # The caller "reads the socket" straight into the rest of the buffer.
    view[n:] = frame[split : 13 + len(payload)]
    b.payload_consumed_externally(len(payload) - n)
    assert dest == payload
    assert b.payload_remaining == 0
    b.receive_data(frame[13 + len(payload) :])
    assert b.next_event() == w.Cancel(0, 0, 1)


def test_take_payload_into_small_view_and_misuse() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="no DATA payload"):
        b.take_payload_into(bytearray(4))
    ask(b, a, 0, 0, 8)
    b.receive_data(a.send_data(0, 0, b"abcdefgh"))
    b.next_event()
    small = bytearray(3)
    assert b.take_payload_into(small) == 3 and small == b"abc"
    with pytest.raises(LocalProtocolError, match="still buffered"):
        b.payload_consumed_externally(1)
    with pytest.raises(LocalProtocolError):
        b.payload_consumed_externally(-1)
    rest = bytearray(10)
    assert b.take_payload_into(rest) == 5 and rest[:5] == b"defgh"
    assert b.payload_remaining == 0
    assert b.next_event() is w.NEED_DATA


def test_send_data_header_and_payload_event() -> None:
    a, b = peer_pair()
    ask(b, a, 5, 0, 3)
    out = a.send(w.DataHeader(5, 0, 3)) + a.send(w.DataPayload(b"xyz"))
    b.receive_data(out)
    assert drain(b) == [w.DataHeader(5, 0, 3), w.DataPayload(b"xyz")]
    with pytest.raises(LocalProtocolError):
        a.send_data(0, 0, b"")


def test_eof_in_payload_is_remote_error() -> None:
    a, b = peer_pair()
    ask(b, a, 0, 0, 6)
    b.receive_data(a.send_data(0, 0, b"abcdef")[:15])
    b.receive_data(b"")
    assert b.next_event() == w.DataHeader(0, 0, 6)
    assert b.next_event() == w.DataPayload(b"ab")
    with pytest.raises(RemoteProtocolError, match="DATA payload"):
        b.next_event()


# --- EOF and error discipline --------------------------------------------------------
def test_clean_eof_returns_closed_once() -> None:
    a, b = peer_pair()
    b.receive_data(a.send(w.Goodbye("bye")))
    b.receive_data(b"")
    assert b.next_event() == w.Goodbye("bye")
    assert b.next_event() == w.Closed()
    with pytest.raises(LocalProtocolError):
        b.next_event()
    with pytest.raises(LocalProtocolError, match="after EOF"):
        b.receive_data(b"more")


@pytest.mark.parametrize("cut", [1, 4, 5, 7])
def test_eof_mid_frame_is_remote_error(cut: int) -> None:
    a, b = peer_pair()
    b.receive_data(a.send(w.Request(1, 2, 3))[:cut])
    b.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle"):
        b.next_event()


def test_error_is_sticky() -> None:
    b = w.PeerConnection(initiator=False)
    b.receive_data(b"\xff\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="unknown frame type 255"):
        b.next_event()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        b.next_event()


# --- header limits ------------------------------------------------------------------
@pytest.mark.parametrize("ftype", sorted(w.MAX_BODY), ids=lambda t: w.FrameType(t).name)
def test_oversized_length_rejected_from_header_alone(ftype: int) -> None:
    conn: w.FrameConnection
    if ftype in w.TrackerClientConnection.RECEIVE_TYPES:
        conn = w.TrackerClientConnection()
    elif ftype in w.TrackerServerConnection.RECEIVE_TYPES:
        conn = w.TrackerServerConnection()
    else:
        conn = w.PeerConnection(initiator=False)
    conn.receive_data(struct.pack(">BI", ftype, w.MAX_BODY[ftype] + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.next_event()


def test_huge_length_prefix_rejected_without_body() -> None:
    b = w.PeerConnection(initiator=False)
    b.receive_data(b"\x09\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="MANIFEST frame body of 4294967295"):
        b.next_event()


@pytest.mark.parametrize("length", [0, 8])
def test_data_frame_without_payload_rejected(length: int) -> None:
    _, b = peer_pair()
    b.receive_data(struct.pack(">BI", 5, length) + b"\x00" * length)
    with pytest.raises(RemoteProtocolError, match="too short"):
        b.next_event()


def test_limits_are_the_documented_ones() -> None:
    KiB, MiB = 1024, 1024 * 1024
    f = w.FrameType
    assert w.MAX_BODY[f.HELLO] == 64 * KiB
    assert w.MAX_BODY[f.BITFIELD] == 128 * KiB + 64
    assert w.MAX_BODY[f.HAVE] == 64 * KiB
    assert w.MAX_BODY[f.MANIFEST] == w.MAX_BODY[f.PUBLISH] == 40 * MiB
    assert w.MAX_BODY[f.DATA] == 8 + 64 * MiB
    assert w.MAX_BODY[f.PEERS] == 16 * MiB
    assert w.MAX_BODY[f.ANNOUNCE] == 256 * KiB
    assert w.MAX_BODY[f.SCRAPE] == w.MAX_BODY[f.SCRAPE_RESULT] == 1 * MiB


def test_largest_have_and_bitfield_fit_their_limits() -> None:
    a, b = handshake()
    transfer(a, b, w.Bitfield(b"\xff" * (2**20 // 8)))
    transfer(a, b, w.Have(tuple(range(2**32 - 4096, 2**32))))


def test_peers_too_big_to_encode_is_local_error() -> None:
    _, server = tracker_pair()
    fat = w.PeerEntry("10.0.0.1", 1, KEY, b"\xff" * (2**20 // 8))
    with pytest.raises(LocalProtocolError, match="PEERS body"):
        server.send(w.Peers(CID, 60, (fat,) * 200, b""))
    assert server.state is w.TrackerState.READY  # nothing was sent


# --- strict body schema ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"idx": 1, "off": 2, "len": "3"}, "REQUEST: field 'len' must be int, got str"),
        ({"idx": 1, "off": 2, "len": True}, "field 'len' must be int, got bool"),
        ({"idx": 1, "off": 2, "len": 3.0}, "field 'len' must be int, got float"),
        ({"idx": 1, "off": 2}, "exactly the keys"),
        ({"idx": 1, "off": 2, "len": 3, "x": 4}, "malformed msgpack"),  # over max_map_len
        ({"idx": 1, "off": 2, "lenx": 3}, "exactly the keys"),
        ({"idx": -1, "off": 2, "len": 3}, r"REQUEST: Request.index must be in 0\.\.4294967295"),
        ({"idx": 1, "off": 2, "len": 0}, "Request.length must be in 1"),
        ({"idx": 1, "off": 2, "len": 2**26 + 1}, "Request.length"),
        ([], "body must be a msgpack map, got array"),
        ("hi", "body must be a msgpack map, got str"),
    ],
)
def test_request_schema(body: Any, match: str) -> None:
    _, b = peer_pair()
    b.receive_data(raw_frame(w.FrameType.REQUEST, body))
    with pytest.raises(RemoteProtocolError, match=match):
        b.next_event()


@pytest.mark.parametrize(
    ("ftype", "body", "match"),
    [
        (w.FrameType.REQUEST, msgpack.packb({"idx": 1, "off": 2, "len": 3}) + b"\x00", "Extra"),
        (w.FrameType.GOODBYE, b"\x81\xa6reason\xa2\xff\xfe", "malformed msgpack"),
        (w.FrameType.GOODBYE, b"\xc1", "malformed msgpack"),
        (w.FrameType.GOODBYE, b"", "malformed msgpack"),
        (w.FrameType.GOODBYE, b"\x81\x01\xa1x", "malformed msgpack"),  # int key
        (w.FrameType.HAVE, b"\x81\xa3idx\xd6\xff\x00\x00\x00\x01", "malformed msgpack"),  # ext
        (w.FrameType.HAVE, msgpack.packb({"idx": []}), "Have.indices must hold 1"),
        (w.FrameType.HAVE, msgpack.packb({"idx": list(range(4097))}), "malformed msgpack"),
        (w.FrameType.HAVE, msgpack.packb({"idx": [1, "2"]}), "item 1 must be int, got str"),
        (w.FrameType.BITFIELD, msgpack.packb({"bits": "str"}), "must be bin, got str"),
        (
            w.FrameType.REJECT,
            msgpack.packb({"idx": 1, "off": 0, "len": 1, "reason": "meh"}),
            "busy",
        ),
        (
            w.FrameType.HELLO,
            msgpack.packb({"v": 1, "key": b"k", "port": 1, "id": CID, "nonce": NONCE}),
            "32",
        ),
        (w.FrameType.HELLO, msgpack.packb({"v": 1, "key": KEY, "port": 70000, "id": CID}), "port"),
    ],
    ids=lambda v: w.FrameType(v).name if isinstance(v, w.FrameType) else None,
)
def test_peer_body_rejections(ftype: int, body: bytes, match: str) -> None:
    if ftype == w.FrameType.HELLO:
        b = w.PeerConnection(initiator=False)
    elif ftype == w.FrameType.BITFIELD:
        b = handshake()[1]  # (a second BITFIELD is refused from its header)
    else:
        b = peer_pair()[1]
    b.receive_data(raw_frame(ftype, body, packed=True))
    with pytest.raises(RemoteProtocolError, match=match):
        b.next_event()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            {"id": CID, "interval": 60, "peers": [["1.2.3.4", 1, KEY]], "avail": b""},
            r"\[str, int, bin, bin\]",
        ),
        ({"id": CID, "interval": 60, "peers": [["nope", 1, KEY, b""]], "avail": b""}, "not an IP"),
        ({"id": CID, "interval": 60, "peers": [], "avail": b"\x00"}, "even length"),
        ({"id": CID, "interval": 0, "peers": [], "avail": b""}, "interval"),
    ],
)
def test_peers_schema(body: Any, match: str) -> None:
    client, _ = tracker_pair()
    client.receive_data(raw_frame(w.FrameType.PEERS, body))
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


# --- event self-validation -------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: w.Hello(0, KEY, 1, CID, NONCE),
        lambda: w.Hello(1, KEY[:31], 1, CID, NONCE),
        lambda: w.Hello(1, KEY, -1, CID, NONCE),
        lambda: w.Hello(1, KEY, 1, CID, NONCE[:31]),
        lambda: w.Proof(SIG[:63]),
        lambda: w.Have(()),
        lambda: w.Have((True,)),
        lambda: w.Request(0, 0, 0),
        lambda: w.Reject(0, 0, 1, "because"),
        lambda: w.Goodbye("x" * 1025),
        lambda: w.Auth(KEY, SIG[:63]),
        lambda: w.Announce(CID, 1, "begun", b"", 1),
        lambda: w.Announce(CID, 1, "started", b"", 201),
        lambda: w.Resolve("0123456789ABCDEF"),
        lambda: w.Resolve("0123456789abcde"),
        lambda: w.Scrape(()),
        lambda: w.Scrape((b"short",)),
        lambda: w.Error("Not Found", "x"),
        lambda: w.Error("x" * 65, "x"),
        lambda: w.Peers(CID, 60, ("1.2.3.4",), b""),  # type: ignore[arg-type]
        lambda: w.DataPayload(b""),
    ],
)
def test_bad_events_are_local_errors(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_events_normalise_bytes_and_sequences() -> None:
    assert w.Bitfield(bytearray(b"\x80")) == w.Bitfield(b"\x80")  # type: ignore[arg-type]
    assert w.Have([1, 2]).indices == (1, 2)  # type: ignore[arg-type]
    assert hash(w.Have((1, 2))) == hash(w.Have((1, 2)))


# --- conversation rules -------------------------------------------------------------------
def test_peer_must_say_hello_first() -> None:
    a, b = w.PeerConnection(initiator=True), w.PeerConnection(initiator=False)
    with pytest.raises(LocalProtocolError, match="HELLO first"):
        a.send(w.Have((1,)))
    b.receive_data(raw_frame(w.FrameType.HAVE, {"idx": [1]}))
    with pytest.raises(RemoteProtocolError, match="HELLO first, not HAVE"):
        b.next_event()


def test_peer_hello_exactly_once_and_nothing_after_goodbye() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="exactly once"):
        a.send(PEER_EVENTS[0])
    b.receive_data(w.PeerConnection(initiator=True).send(PEER_EVENTS[0]))
    with pytest.raises(RemoteProtocolError, match="exactly once"):
        b.next_event()
    a.send(w.Goodbye(""))
    assert a.our_state is w.PeerState.DONE
    with pytest.raises(LocalProtocolError, match="GOODBYE"):
        a.send(w.Have((1,)))


def test_goodbye_then_more_from_remote_is_rejected() -> None:
    a, b = peer_pair()
    b.receive_data(a.send(w.Goodbye("bye")) + raw_frame(w.FrameType.HAVE, {"idx": [1]}))
    assert b.next_event() == w.Goodbye("bye")
    with pytest.raises(RemoteProtocolError, match="GOODBYE"):
        b.next_event()


def test_peer_cannot_send_tracker_messages() -> None:
    a, b = peer_pair()
    with pytest.raises(LocalProtocolError, match="cannot send ANNOUNCE"):
        a.send(CLIENT_EVENTS[1])
    with pytest.raises(LocalProtocolError, match="not a message"):
        a.send(w.Closed())
    b.receive_data(w.TrackerServerConnection().send(SERVER_EVENTS[0]))
    with pytest.raises(RemoteProtocolError, match="cannot receive CHALLENGE"):
        b.next_event()


def test_tracker_roles_are_enforced() -> None:
    client, server = tracker_pair()
    with pytest.raises(LocalProtocolError, match="cannot send PEERS"):
        client.send(SERVER_EVENTS[2])
    with pytest.raises(LocalProtocolError, match="cannot send ANNOUNCE"):
        server.send(CLIENT_EVENTS[1])
    server.receive_data(raw_frame(w.FrameType.PEERS, {}))
    with pytest.raises(RemoteProtocolError, match="TrackerServerConnection cannot receive PEERS"):
        server.next_event()


def test_tracker_handshake_order() -> None:
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    with pytest.raises(LocalProtocolError):
        client.send(CLIENT_EVENTS[0])  # AUTH before CHALLENGE
    with pytest.raises(LocalProtocolError):
        server.send(w.Ok())  # OK before CHALLENGE
    client.receive_data(server.send(SERVER_EVENTS[0]))
    client.next_event()
    with pytest.raises(LocalProtocolError, match="before AUTH"):
        client.send(CLIENT_EVENTS[1])
    with pytest.raises(LocalProtocolError):
        server.send(w.Peers(CID, 60, (), b""))  # replies only after OK
    # The tracker receives a request instead of AUTH.
    server.receive_data(raw_frame(w.FrameType.GET_MANIFEST, {"id": CID}))
    with pytest.raises(RemoteProtocolError, match="not authenticated"):
        server.next_event()


def test_tracker_only_one_auth() -> None:
    client, server = tracker_pair()
    with pytest.raises(LocalProtocolError, match="exactly once"):
        client.send(CLIENT_EVENTS[0])
    server.receive_data(raw_frame(w.FrameType.AUTH, {"key": KEY, "sig": SIG}))
    with pytest.raises(RemoteProtocolError, match="exactly once"):
        server.next_event()


def test_tracker_pipelined_requests_after_auth() -> None:
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    client.receive_data(server.send(SERVER_EVENTS[0]))
    client.next_event()
    out = client.send(CLIENT_EVENTS[0]) + client.send(w.GetManifest(CID))
    server.receive_data(out)
    assert drain(server) == [CLIENT_EVENTS[0], w.GetManifest(CID)]
    assert server.state is w.TrackerState.AUTH_SENT
    client.receive_data(server.send(w.Ok()) + server.send(w.TrackerManifest(b"m")))
    assert drain(client) == [w.Ok(), w.TrackerManifest(b"m")]
    assert server.state is client.state is w.TrackerState.READY


def test_tracker_refusal_ends_conversation() -> None:
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    client.receive_data(server.send(SERVER_EVENTS[0]))
    client.next_event()
    server.receive_data(client.send(CLIENT_EVENTS[0]))
    server.next_event()
    client.receive_data(server.send(w.Error("auth-failed", "bad signature")))
    client.receive_data(raw_frame(w.FrameType.OK, {}))
    assert client.next_event() == w.Error("auth-failed", "bad signature")
    assert client.state is w.TrackerState.CLOSED
    with pytest.raises(RemoteProtocolError, match="refused"):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send(w.GetManifest(CID))


def test_tracker_may_refuse_before_challenge() -> None:
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    client.receive_data(server.send(w.Error("too-many", "busy")))
    client.receive_data(b"")
    assert drain(client) == [w.Error("too-many", "busy"), w.Closed()]


def test_error_reply_after_auth_keeps_the_conversation() -> None:
    client, server = tracker_pair()
    transfer(server, client, w.Error("not-found", "no such content"))
    transfer(client, server, w.Resolve("ab" * 8))
    transfer(server, client, w.Resolved(CID))


# --- bitfields and availability ---------------------------------------------------------------
def test_bit_order_and_round_trip() -> None:
    assert w.bits_from_indices(10, [0, 9]) == b"\x80\x40"
    assert w.indices_from_bits(10, b"\x80\x40") == [0, 9]
    assert w.bits_from_indices(0, []) == b""
    assert w.has_bit(b"\x80\x40", 9) and not w.has_bit(b"\x80\x40", 8)
    assert not w.has_bit(b"\x80", 100) and not w.has_bit(b"\x80", -1)
    assert w.count_bits(b"\xff\x01") == 9
    indices = list(range(0, 1000, 3))
    assert w.indices_from_bits(1000, w.bits_from_indices(1000, indices)) == indices
    with pytest.raises(ValueError):
        w.bits_from_indices(10, [10])


def test_bitfield_validation() -> None:
    w.validate_bits(9, b"\xff\x80")
    with pytest.raises(RemoteProtocolError, match="pad bits"):
        w.validate_bits(9, b"\xff\xc0")
    with pytest.raises(RemoteProtocolError, match="must be 2 bytes"):
        w.indices_from_bits(9, b"\xff")


def test_availability_is_u16_be_saturating() -> None:
    data = w.encode_availability([0, 1, 258, 70000])
    assert data == b"\x00\x00\x00\x01\x01\x02\xff\xff"
    assert w.decode_availability(4, data) == [0, 1, 258, 65535]
    with pytest.raises(RemoteProtocolError):
        w.decode_availability(3, data)


# --- layering ------------------------------------------------------------------------------------
def test_wire_does_not_import_trio() -> None:
    code = "import peerd.wire, sys; assert 'trio' not in sys.modules, 'trio imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_api() -> None:
    for name in w.__all__:
        assert hasattr(w, name), name
    assert w.PROTOCOL_VERSION == 2
    assert repr(w.NEED_DATA) == "NEED_DATA"


def test_repeated_have_bodies_decode_alike_and_bad_ones_always_fail() -> None:
    # A chunk's HAVE comes from many neighbours in the same bytes: decoding
    # the same bytes again must give the same event, and bad ones always fail.
    from peerd.wire._codec import decode_body

    good = msgpack.packb({"idx": [7, 9]})
    first = decode_body(w.FrameType.HAVE, good)
    assert first == w.Have((7, 9))
    assert decode_body(w.FrameType.HAVE, memoryview(good)) == first
    for bad in (msgpack.packb({"idx": [-1]}), msgpack.packb({"idx": []}), b"\x81\xa3idx\xc0"):
        for _ in range(2):
            with pytest.raises(RemoteProtocolError, match="HAVE"):
                decode_body(w.FrameType.HAVE, bad)


def test_drained_means_next_event_needs_data() -> None:
    client, server = tracker_pair()
    assert server.drained
    frame = client.send(w.Announce(CID, 6881, "started", b"\x80", 50))
    for i in range(len(frame) - 1):  # a frame arriving a byte at a time
        server.receive_data(frame[i : i + 1])
        assert not server.drained  # part of a frame is buffered
        assert server.next_event() is w.NEED_DATA
    server.receive_data(frame[-1:] + frame)  # the rest, and a whole second one
    assert isinstance(server.next_event(), w.Announce)
    assert not server.drained
    assert isinstance(server.next_event(), w.Announce)
    assert server.drained
    assert server.next_event() is w.NEED_DATA
    server.receive_data(b"")  # EOF pending: the next event is Closed
    assert not server.drained
    assert isinstance(server.next_event(), w.Closed)
    bad, _ = tracker_pair()
    bad.receive_data(b"\xff\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError):
        bad.next_event()
    assert not bad.drained  # a failed connection keeps raising


def test_repeated_haves_are_the_same_bytes_and_still_checked() -> None:
    a, b = peer_pair()
    first = a.send(w.Have((3, 9)))
    assert a.send(w.Have((3, 9))) == first  # the same event, the same bytes
    assert first == raw_frame(w.FrameType.HAVE, {"idx": [3, 9]})
    b.receive_data(first + a.send(w.Have((3, 9))))
    assert drain(b) == [w.Have((3, 9)), w.Have((3, 9))]
    fresh = w.PeerConnection(initiator=True)  # before the handshake HAVE is not allowed
    with pytest.raises(LocalProtocolError):
        fresh.send(w.Have((3, 9)))
