"""Property tests for the wire: round trips under any split, and the fuzz invariant.

Invariant (as in h11's fuzz harness): whatever bytes arrive, a connection
yields valid events or raises RemoteProtocolError -- never anything else,
never a hang.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd import wire as w
from peerd.errors import LocalProtocolError, RemoteProtocolError
from tests.test_wire import (
    CID,
    HELLO_A,
    HELLO_B,
    KEY,
    NONCE,
    PROOF,
    SIG,
    DataFrame,
    Script,
    ask,
    drain,
    peer_pair,
    raw_frame,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u32 = st.integers(0, 2**32 - 1)
length = st.integers(1, w.MAX_PAYLOAD)
b32 = st.binary(min_size=32, max_size=32)
text = st.text(max_size=40)

# A DATA frame is not an event on the sending side: (index, offset, payload).
data_frames = st.tuples(u32, u32, st.binary(min_size=1, max_size=300))

peer_events = st.one_of(
    st.builds(w.Bitfield, st.binary(max_size=64)),
    st.builds(w.Have, st.lists(u32, min_size=1, max_size=20).map(tuple)),
    st.builds(w.Request, u32, u32, length),
    st.builds(w.Cancel, u32, u32, length),
    st.builds(w.Reject, u32, u32, length, st.sampled_from(sorted(w.REJECT_REASONS))),
    st.just(w.ManifestRequest()),
    st.builds(w.ManifestResponse, st.binary(min_size=1, max_size=100)),
    st.just(w.KeepAlive()),
    st.builds(
        w.Pex,
        st.lists(
            st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), min_size=1, max_size=5
        ).map(tuple),
    ),
)
client_events = st.one_of(
    st.builds(
        w.Announce,
        b32,
        st.integers(0, 65535),
        st.sampled_from(sorted(w.ANNOUNCE_EVENTS)),
        st.binary(max_size=64),
        st.integers(0, 200),
    ),
    st.builds(w.Publish, st.binary(min_size=1, max_size=100)),
    st.builds(w.GetManifest, b32),
    st.builds(w.Resolve, st.from_regex(r"[0-9a-f]{16,64}", fullmatch=True)),
    st.builds(w.Scrape, st.lists(b32, min_size=1, max_size=5).map(tuple)),
)
peer_entries = st.builds(
    w.PeerEntry,
    st.ip_addresses().map(str),
    st.integers(0, 65535),
    b32,
    st.binary(max_size=16),
)
server_events = st.one_of(
    st.builds(
        w.Peers,
        b32,
        st.integers(1, 86400),
        st.lists(peer_entries, max_size=5).map(tuple),
        st.binary(max_size=32).map(lambda b: b[: len(b) // 2 * 2]),
    ),
    st.builds(w.TrackerManifest, st.binary(min_size=1, max_size=100)),
    st.builds(w.Resolved, b32),
    st.builds(
        w.ScrapeResult,
        st.lists(st.builds(w.ScrapeStat, b32, u32, u32, u32), max_size=5).map(tuple),
    ),
    st.just(w.Ok()),
    st.builds(w.Error, st.from_regex(r"[a-z0-9][a-z0-9-]{0,63}", fullmatch=True), text),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _merge(events: list[w.Event]) -> list[object]:
    """Join consecutive DataPayload pieces so splits do not matter."""
    out: list[object] = []
    for event in events:
        if isinstance(event, w.DataPayload) and out and isinstance(out[-1], bytes):
            out[-1] += event.data
        elif isinstance(event, w.DataPayload):
            out.append(event.data)
        else:
            out.append(event)
    return out


# --- round trips under arbitrary splits -----------------------------------------------------
@SETTINGS
@given(
    items=st.lists(st.one_of(peer_events, data_frames), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    goodbye=st.one_of(st.none(), text),
)
def test_peer_stream_round_trip(
    items: list[w.Event | DataFrame], cuts: list[int], goodbye: str | None
) -> None:
    # The dialer's stream, each item with what it needs first (the REQUEST a
    # DATA answers, ...; one the conversation never allows is left out),
    # replayed into a fresh acceptor under arbitrary splits.
    script = Script()
    for item in items:
        script.send(item)
    if goodbye is not None:
        assert script.send(w.Goodbye(goodbye))
    events = script.replay(_split(script.stream, cuts))
    assert _merge(events) == [*script.expected, w.Closed()]


@SETTINGS
@given(
    requests=st.lists(client_events, max_size=8),
    replies=st.lists(server_events, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_tracker_round_trip(
    requests: list[w.Event], replies: list[w.Event], cuts: list[int]
) -> None:
    client, server = w.TrackerClientConnection(), w.TrackerServerConnection()
    challenge, auth = w.Challenge(1, NONCE), w.Auth(KEY, SIG)
    for piece in _split(server.send(challenge), cuts):
        client.receive_data(piece)
    assert drain(client) == [challenge]
    upstream = client.send(auth) + b"".join(client.send(e) for e in requests)
    got_up: list[w.Event] = []
    for piece in _split(upstream, cuts):
        server.receive_data(piece)
        got_up += drain(server)
    downstream = server.send(w.Ok()) + b"".join(server.send(e) for e in replies)
    got_down: list[w.Event] = []
    for piece in _split(downstream, cuts):
        client.receive_data(piece)
        got_down += drain(client)
    assert got_up == [auth, *requests]
    assert got_down == [w.Ok(), *replies]


# --- the fuzz invariant ------------------------------------------------------------------
def _fresh_peer() -> w.FrameConnection:
    return w.PeerConnection(initiator=False)  # an acceptor, before any HELLO


def _dialing_peer() -> w.FrameConnection:
    conn = w.PeerConnection(initiator=True)  # a dialer that sent its HELLO
    conn.send(HELLO_A)
    return conn


def _primed_pair() -> tuple[w.PeerConnection, w.PeerConnection]:
    """Through the handshake and BITFIELDs; ``conn`` (the first) asked the
    other for a chunk and for the manifest, so DATA, REJECT and MANIFEST may come."""
    conn, other = peer_pair()
    ask(conn, other, 1, 2, 7)
    ask(conn, other, 3, 0, 100)
    conn.send(w.ManifestRequest())
    return conn, other


def _primed_peer() -> w.FrameConnection:
    return _primed_pair()[0]


def _fresh_client() -> w.FrameConnection:
    return w.TrackerClientConnection()


def _primed_client() -> w.FrameConnection:
    conn = w.TrackerClientConnection()
    conn.receive_data(raw_frame(w.FrameType.CHALLENGE, {"v": 1, "nonce": NONCE}))
    conn.next_event()
    conn.send(w.Auth(KEY, SIG))
    return conn


def _fresh_server() -> w.FrameConnection:
    conn = w.TrackerServerConnection()
    conn.send(w.Challenge(1, NONCE))
    return conn


def _primed_server() -> w.FrameConnection:
    conn = _fresh_server()
    conn.receive_data(raw_frame(w.FrameType.AUTH, {"key": KEY, "sig": SIG}))
    conn.next_event()
    conn.send(w.Ok())
    return conn


FACTORIES: list[Callable[[], w.FrameConnection]] = [
    _fresh_peer,
    _dialing_peer,
    _primed_peer,
    _fresh_client,
    _primed_client,
    _fresh_server,
    _primed_server,
]
factories = st.sampled_from(FACTORIES)


def _feed_hostile(conn: w.FrameConnection, pieces: list[bytes]) -> None:
    """Feed bytes then EOF; only events or RemoteProtocolError may come out."""
    try:
        for piece in filter(None, pieces):  # b"" would mean EOF
            conn.receive_data(piece)
            for event in drain(conn):
                assert isinstance(event, w.Event)
        conn.receive_data(b"")
        events = drain(conn)
        # After EOF the connection must reach a verdict: Closed or an error.
        assert events and isinstance(events[-1], w.Closed)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(factory=factories, data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400)))
def test_random_bytes_into_every_role(
    factory: Callable[[], w.FrameConnection], data: bytes, cuts: list[int]
) -> None:
    _feed_hostile(factory(), _split(data, cuts))


# A plausible header followed by random bytes reaches the body decoders far more
# often than pure noise does.
@SETTINGS
@given(
    factory=factories,
    ftype=st.sampled_from(sorted(w.MAX_BODY)),
    body=st.binary(max_size=200),
)
def test_random_bodies_into_every_role(
    factory: Callable[[], w.FrameConnection], ftype: int, body: bytes
) -> None:
    _feed_hostile(factory(), [raw_frame(ftype, body, packed=True)])


def _send_what_fits(sender: w.FrameConnection, events: list[w.Event]) -> bytes:
    out = b""
    for event in events:
        try:
            out += sender.send(event)
        except LocalProtocolError:
            pass  # not a message this sender may send; skip it
    return out


def _valid_stream(factory: Callable[[], w.FrameConnection], events: list[w.Event]) -> bytes:
    """Bytes the other side could legitimately send to a connection from ``factory``."""
    if factory is _fresh_peer:  # the dialer's HELLO; it proves only after the acceptor
        peer = w.PeerConnection(initiator=True)
        return peer.send(HELLO_A) + _send_what_fits(peer, events)
    if factory is _dialing_peer:  # the acceptor's HELLO and PROOF
        peer = w.PeerConnection(initiator=False)
        peer.receive_data(w.PeerConnection(initiator=True).send(HELLO_A))
        drain(peer)
        head = peer.send(HELLO_B) + peer.send(PROOF)
        return head + _send_what_fits(peer, events)
    if factory is _primed_peer:
        _, peer = _primed_pair()
        body = _send_what_fits(peer, events)
        # An outstanding REQUEST makes a REJECT valid; unmatched ones are refused.
        return body + peer.send(w.Reject(3, 0, 100, "busy")) + peer.send_data(1, 2, b"payload")
    if factory is _fresh_client:
        return w.TrackerServerConnection().send(w.Challenge(1, NONCE))
    if factory is _primed_client:
        server = _fresh_server()
        server.receive_data(raw_frame(w.FrameType.AUTH, {"key": KEY, "sig": SIG}))
        server.next_event()
        return server.send(w.Ok()) + _send_what_fits(server, events)
    client = w.TrackerClientConnection()
    client.receive_data(w.TrackerServerConnection().send(w.Challenge(1, NONCE)))
    client.next_event()
    auth = client.send(w.Auth(KEY, SIG))
    head = auth if factory is _fresh_server else b""
    return head + _send_what_fits(client, events) + client.send(w.GetManifest(CID))


@SETTINGS
@given(
    factory=factories,
    events=st.lists(st.one_of(peer_events, client_events, server_events), max_size=6),
)
def test_valid_streams_are_valid(
    factory: Callable[[], w.FrameConnection], events: list[w.Event]
) -> None:
    # What the mutation test starts from is accepted whole, to the last byte.
    conn = factory()
    conn.receive_data(_valid_stream(factory, events))
    drain(conn)
    assert conn.drained


@SETTINGS
@given(
    factory=factories,
    events=st.lists(st.one_of(peer_events, client_events, server_events), max_size=6),
    position=st.integers(0, 10_000),
    xor=st.integers(1, 255),
    truncate=st.booleans(),
)
def test_mutated_valid_streams(
    factory: Callable[[], w.FrameConnection],
    events: list[w.Event],
    position: int,
    xor: int,
    truncate: bool,
) -> None:
    stream = bytearray(_valid_stream(factory, events))
    position %= len(stream)
    if truncate:
        del stream[position:]
    else:
        stream[position] ^= xor
    _feed_hostile(factory(), [bytes(stream)])


# Values at and around every ANNOUNCE limit, of the right and the wrong types.
_announce_values = st.one_of(
    st.integers(-2, 2),
    st.integers(65534, 65537),
    st.integers(199, 201),
    st.booleans(),
    st.none(),
    st.binary(min_size=31, max_size=33),
    st.binary(max_size=3),
    st.sampled_from([*sorted(w.ANNOUNCE_EVENTS), "", "Started", "x" * 65]),
    st.sampled_from(["10.0.0.1", "::1", "1.2.3", "host.example", "f" * 46, "::ffff:1.2.3.4"]),
    st.floats(allow_nan=False, max_value=10, min_value=-10),
)


@settings(max_examples=400, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(("id", "port", "event", "bits", "want", "ip")),
        _announce_values,
        max_size=2,
    )
)
def test_announce_decode_agrees_with_the_checked_constructor(changes: dict) -> None:
    # Around every ANNOUNCE limit, the decoder must accept exactly what the
    # event's own checks accept, and build the same event.
    import msgpack

    from peerd.wire._codec import decode_body

    fields = {"id": CID, "port": 7000, "event": "started", "bits": b"\x80", "want": 50}
    fields.update(changes)
    body = msgpack.packb(fields, use_bin_type=True)
    try:
        expected: w.Announce | None = w.Announce(
            fields["id"],
            fields["port"],
            fields["event"],
            fields["bits"],
            fields["want"],
            fields.get("ip", ""),
        )
    except LocalProtocolError:
        expected = None
    if type(fields["bits"]) is not bytes or type(fields["id"]) is not bytes:
        expected = None  # the constructor converts other buffers; the wire never has them
    if any(type(fields[k]) is bool for k in ("port", "want")):
        expected = None
    try:
        got: w.Announce | None = decode_body(w.FrameType.ANNOUNCE, body)
    except RemoteProtocolError:
        got = None
    assert got == expected
