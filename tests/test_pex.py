"""Peer exchange, sans-IO: the PEX message on the wire and the engine's rules
(docs/PROTOCOL.md, "Peer exchange"): what is told to whom and when, what a
receiver refuses, ignores, keeps and dials."""

from __future__ import annotations

import random

import msgpack
import pytest

from peerd import wire as w
from peerd.engine import pex
from peerd.engine.content_engine import Close, ContentEngine, Dial, Send
from peerd.errors import LocalProtocolError, RemoteProtocolError
from tests.test_wire import drain, handshake, peer_pair, raw_frame, transfer

CHUNK = 16 * 1024
ME = b"\x05" * 32
MY_PORT = 7000
F = w.FrameType


def key(n: int) -> bytes:
    return n.to_bytes(2, "big") * 16


def engine(*, complete: bool = False, max_peers: int = 50) -> ContentEngine:
    e = ContentEngine(
        size=8 * CHUNK,
        chunk_size=CHUNK,
        have=bytearray([1 if complete else 0]) * 8,
        my_key=ME,
        origin=False,
        now=0.0,
        rng=random.Random(1),
        max_peers=max_peers,
    )
    e.listen_port = MY_PORT
    return e


def join(
    e: ContentEngine,
    n: int,
    ip: str,
    port: int | None = 6000,
    *,
    now: float = 0.0,
    local: str = "10.0.0.1",
) -> str:
    """Attach connection ``pN`` from ``ip`` (listening at ``port``; None: not listening)."""
    peer = f"p{n}"
    verdict, _ = e.attach(
        peer,
        (key(n), ip),
        initiated=False,
        now=now,
        listen=None if port is None else (ip, port),
        local_ip=local,
    )
    assert verdict == "ok"
    e.on_bitfield(peer, w.bits_from_flags(bytearray(8)), now)  # a member of the swarm
    return peer


def told(actions: list[object]) -> dict[object, tuple[tuple[str, int], ...]]:
    """The PEX each connection is sent, by connection."""
    out: dict[object, tuple[tuple[str, int], ...]] = {}
    for a in actions:
        if isinstance(a, Send) and isinstance(a.message, w.Pex):
            assert a.peer not in out, "two PEX to one connection at once"
            out[a.peer] = a.message.added
    return out


def dials(actions: list[object]) -> list[tuple[str, int]]:
    return [(a.ip, a.port) for a in actions if isinstance(a, Dial)]


def closes(actions: list[object]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Close)]


# --- the message on the wire ---------------------------------------------------------
def test_pex_is_message_13_and_goes_both_ways_once_open() -> None:
    assert F.PEX == 13 and w.MAX_PEX == 50 and w.MAX_BODY[F.PEX] == 4096
    a, b = peer_pair()
    msg = w.Pex((("10.1.2.3", 6881), ("2001:db8::7", 1), ("127.0.0.1", 65535)))
    transfer(a, b, msg)
    transfer(b, a, msg)
    # The largest PEX (50 of the longest IPv6 text) fits its body limit.
    widest = "0000:0000:0000:0000:0000:ffff:255.255.255.255"
    assert len(widest) == 45
    transfer(a, b, w.Pex(tuple((widest, 65535) for _ in range(w.MAX_PEX))))


def test_pex_before_bitfield_is_refused_both_ways() -> None:
    a, b = handshake()
    msg = w.Pex((("10.1.2.3", 6881),))
    with pytest.raises(LocalProtocolError, match="BITFIELD before"):
        a.send(msg)
    b.receive_data(raw_frame(F.PEX, {"added": [["10.1.2.3", 6881]]}))
    with pytest.raises(RemoteProtocolError, match="BITFIELD before"):
        drain(b)


@pytest.mark.parametrize(
    ("added", "says"),
    [
        ([], "must hold 1..50"),
        ([["10.0.0.1", 1]] * 51, "exceeds max_array_len"),
        ([["peer.example", 80]], "not an IP address"),
        ([["10.0.0.1:80", 80]], "not an IP address"),
        ([["fe80::1%eth0", 80]], "not an IP address"),
        ([["10.0.0.1", 0]], "port must be in 1..65535"),
        ([["10.0.0.1", 65536]], "port must be in 1..65535"),
        ([["10.0.0.1", -1]], "port must be in 1..65535"),
        ([["10.0.0.1"]], r"must be \[str, int\]"),
        ([[80, "10.0.0.1"]], r"must be \[str, int\]"),
        ([["10.0.0.1", 80, 1]], r"must be \[str, int\]"),
        ([[b"\x0a\x00\x00\x01", 80]], r"must be \[str, int\]"),
        ([["10.0.0.1", True]], r"must be \[str, int\]"),
        (["10.0.0.1"], r"must be \[str, int\]"),
    ],
)
def test_a_malformed_pex_is_a_protocol_error(added: list[object], says: str) -> None:
    _, b = peer_pair()
    b.receive_data(raw_frame(F.PEX, {"added": added}))
    with pytest.raises(RemoteProtocolError, match=says):
        drain(b)


def test_an_oversized_pex_is_refused_from_its_header() -> None:
    _, b = peer_pair()
    b.receive_data(b"\x0d" + (4097).to_bytes(4, "big"))  # no body sent at all
    with pytest.raises(RemoteProtocolError, match="PEX frame body of 4097 bytes exceeds"):
        drain(b)
    _, b = peer_pair()
    body = msgpack.packb({"added": [["10.0.0.1", 1]], "dropped": []})
    b.receive_data(raw_frame(F.PEX, body, packed=True))
    with pytest.raises(RemoteProtocolError, match="max_map_len"):
        drain(b)
    _, b = peer_pair()
    b.receive_data(raw_frame(F.PEX, {"add": [["10.0.0.1", 1]]}))
    with pytest.raises(RemoteProtocolError, match="exactly the keys"):
        drain(b)


def test_we_cannot_build_a_pex_outside_its_limits() -> None:
    for bad in ((), (("10.0.0.1", 1),) * 51, (("x", 1),), (("10.0.0.1", 0),)):
        with pytest.raises(LocalProtocolError):
            w.Pex(bad)  # type: ignore[arg-type]


# --- what we tell ----------------------------------------------------------------------
def test_each_connection_is_told_the_others_listen_addresses_once() -> None:
    e = engine()
    a = join(e, 1, "10.0.0.11", 6001)
    b = join(e, 2, "10.0.0.12", 6002)
    c = join(e, 3, "10.0.0.13", None)  # inbound, HELLO port 0: not listening
    assert told(e.tick(pex.PEX_FIRST_DELAY - 0.5)) == {}  # not yet
    first = told(e.tick(pex.PEX_FIRST_DELAY))
    assert first == {
        a: (("10.0.0.12", 6002),),
        b: (("10.0.0.11", 6001),),
        c: (("10.0.0.11", 6001), ("10.0.0.12", 6002)),
    }
    assert told(e.tick(pex.PEX_FIRST_DELAY + 1)) == {}  # nothing new
    d = join(e, 4, "10.0.0.14", 6004, now=10.0)
    # The newcomer is told at its own first turn; the others not before their interval.
    assert told(e.tick(10.0 + pex.PEX_FIRST_DELAY)) == {
        d: (("10.0.0.11", 6001), ("10.0.0.12", 6002))
    }
    assert told(e.tick(pex.PEX_FIRST_DELAY + pex.PEX_INTERVAL - 0.5)) == {}
    later = told(e.tick(pex.PEX_FIRST_DELAY + pex.PEX_INTERVAL))
    assert later == {a: (("10.0.0.14", 6004),), b: (("10.0.0.14", 6004),), c: later[a]}
    assert d not in later


def test_a_connection_that_sent_no_bitfield_is_neither_told_nor_told_about() -> None:
    e = engine()
    a = join(e, 1, "10.0.0.11", 6001)
    b = join(e, 2, "10.0.0.12", 6002)
    # A getter fetching the manifest: its node may not serve the content yet.
    e.attach("m", (key(3), "10.0.0.13"), initiated=False, now=0.0, listen=("10.0.0.13", 6003))
    got = told(e.tick(pex.PEX_FIRST_DELAY))
    assert got == {a: (("10.0.0.12", 6002),), b: (("10.0.0.11", 6001),)}
    e.on_bitfield("m", w.bits_from_flags(bytearray(8)), 4.0)  # it downloads: now it is
    assert told(e.tick(4.0)) == {"m": (("10.0.0.11", 6001), ("10.0.0.12", 6002))}
    assert told(e.tick(pex.PEX_FIRST_DELAY + pex.PEX_INTERVAL)) == {
        a: (("10.0.0.13", 6003),),
        b: (("10.0.0.13", 6003),),
    }


def test_only_what_the_receiver_could_use_is_told() -> None:
    e = engine()
    v4 = join(e, 1, "10.0.0.11", 6001)
    v6 = join(e, 2, "2001:db8::12", 6002)
    lo = join(e, 3, "127.0.0.1", 6003, local="127.0.0.1")
    mapped = join(e, 4, "::ffff:10.0.0.14", 6004)  # an IPv4 peer on a dual-stack socket
    got = told(e.tick(pex.PEX_FIRST_DELAY))
    assert got[v4] == (("10.0.0.14", 6004),)  # not the IPv6 one, not loopback
    assert v6 not in got  # no other IPv6 peer
    assert set(got[lo]) == {("10.0.0.11", 6001), ("10.0.0.14", 6004)}
    assert got[mapped] == (("10.0.0.11", 6001),)


def test_more_than_fifty_addresses_go_fifty_per_interval() -> None:
    e = engine(max_peers=200)
    for n in range(1, 62):
        join(e, n, f"10.0.1.{n}", 6000 + n)
    newest = join(e, 99, "10.0.2.1", 7001)
    first = told(e.tick(pex.PEX_FIRST_DELAY))[newest]
    assert len(first) == w.MAX_PEX
    assert told(e.tick(pex.PEX_FIRST_DELAY + pex.PEX_INTERVAL - 1)).get(newest) is None
    rest = told(e.tick(pex.PEX_FIRST_DELAY + pex.PEX_INTERVAL))[newest]
    assert len(rest) == 11 and not set(first) & set(rest)


# --- what we are told ------------------------------------------------------------------
def test_a_pex_sooner_than_half_the_interval_is_ignored_not_fatal() -> None:
    # An honest sender's PEX may wait behind a long DATA and arrive with its
    # next one: the early one is dropped unread, the connection stays.
    e = engine(max_peers=1)  # no dials: what is kept stays a candidate
    p = join(e, 1, "10.0.0.11")
    assert closes(e.on_pex(p, [("10.0.0.50", 1)], now=5.0)) == []
    assert closes(e.on_pex(p, [("10.0.0.51", 1)], now=5.0 + pex.PEX_INTERVAL / 2)) == []
    assert e.on_pex(p, [("10.0.0.52", 1)], now=5.0 + pex.PEX_INTERVAL - 1) == []
    assert ("10.0.0.52", 1) not in e.pex_candidates and e.pex_ignored == 1
    assert ("10.0.0.51", 1) in e.pex_candidates
    # Half an interval after the last one taken, the next is taken again.
    assert e.on_pex(p, [("10.0.0.53", 1)], now=5.0 + pex.PEX_INTERVAL) == []
    assert ("10.0.0.53", 1) in e.pex_candidates


def test_a_seeder_dials_nobody_it_is_told_of_but_still_checks_the_rate() -> None:
    e = engine(complete=True)
    p = join(e, 1, "10.0.0.11")
    assert e.on_pex(p, [("10.0.0.50", 1)], now=1.0) == []
    assert len(e.pex_candidates) == 0
    assert e.on_pex(p, [("10.0.0.50", 1)], now=2.0) == [] and e.pex_ignored == 1


@pytest.mark.parametrize(
    ("conn_ip", "address"),
    [
        ("10.0.0.11", ("2001:db8::1", 6000)),  # another family
        ("2001:db8::11", ("10.0.0.1", 6000)),
        ("10.0.0.11", ("0.0.0.0", 6000)),  # unspecified
        ("2001:db8::11", ("::", 6000)),
        ("10.0.0.11", ("224.0.0.1", 6000)),  # multicast
        ("2001:db8::11", ("ff02::1", 6000)),
        ("10.0.0.11", ("255.255.255.255", 6000)),  # broadcast
        ("10.0.0.11", ("169.254.1.1", 6000)),  # link-local
        ("2001:db8::11", ("fe80::1", 6000)),
        ("10.0.0.11", ("240.0.0.1", 6000)),  # reserved
        ("10.0.0.11", ("127.0.0.1", 6000)),  # loopback over a remote connection
        ("10.0.0.11", ("127.1.2.3", 6000)),
        ("2001:db8::11", ("::1", 6000)),
        ("10.0.0.11", ("::ffff:127.0.0.1", 6000)),  # the same, IPv4-mapped
        ("10.0.0.11", ("10.0.0.1", MY_PORT)),  # our own listen address
        ("127.0.0.1", ("127.0.0.1", MY_PORT)),
        ("10.0.0.11", ("10.0.0.11", 6000)),  # a peer we are connected to
        ("10.0.0.11", ("10.0.0.99", 6099)),  # a banned peer's address
    ],
)
def test_an_address_we_would_not_dial_is_ignored(conn_ip: str, address: tuple[str, int]) -> None:
    e = engine()
    local = "127.0.0.1" if conn_ip.startswith("127.") else "10.0.0.1"
    banned = join(e, 9, "10.0.0.99", 6099, local=local)
    e.chunk_corrupt(banned, (key(9), "10.0.0.99"), 0, now=0.0)
    e.detach(banned, now=0.0)
    p = join(e, 1, conn_ip, 6000, local=local)
    out = e.on_pex(p, [address], now=1.0)
    assert closes(out) == []  # ignored, not an error: the sender may not know
    assert dials(out) == [] and len(e.pex_candidates) == 0


@pytest.mark.parametrize(
    ("conn_ip", "address", "dialled"),
    [
        ("10.0.0.11", ("10.0.0.50", 6000), ("10.0.0.50", 6000)),
        ("10.0.0.11", ("10.0.0.1", MY_PORT + 1), ("10.0.0.1", MY_PORT + 1)),  # our IP, not our port
        ("127.0.0.1", ("127.0.0.1", 6001), ("127.0.0.1", 6001)),  # loopback over loopback
        ("10.0.0.11", ("::ffff:10.0.0.50", 6000), ("10.0.0.50", 6000)),  # written as IPv4
        ("2001:db8::11", ("2001:DB8:0::50", 6000), ("2001:db8::50", 6000)),
    ],
)
def test_a_good_address_is_dialled_at_its_normal_form(
    conn_ip: str, address: tuple[str, int], dialled: tuple[str, int]
) -> None:
    e = engine()
    local = "127.0.0.1" if conn_ip.startswith("127.") else "10.0.0.1"
    p = join(e, 1, conn_ip, 6000, local=local)
    out = e.on_pex(p, [address], now=1.0)
    assert dials(out) == [dialled]
    (dial,) = [a for a in out if isinstance(a, Dial)]
    assert dial.route in e.connecting


def test_one_dial_per_address_and_none_while_it_runs() -> None:
    e = engine()
    a = join(e, 1, "10.0.0.11")
    b = join(e, 2, "10.0.0.12")
    assert dials(e.on_pex(a, [("10.0.0.50", 6000), ("10.0.0.50", 6000)], now=1.0)) == [
        ("10.0.0.50", 6000)
    ]
    assert dials(e.on_pex(b, [("10.0.0.50", 6000)], now=1.0)) == []  # being dialled
    assert dials(e.tick(2.0)) == []
    # Once connected there, told of it again: nothing to dial.
    route = next(iter(e.connecting))
    join(e, 3, "10.0.0.50", 6000, now=3.0)
    e.dial_ended(route, 3.0)
    assert dials(e.on_pex(a, [("10.0.0.50", 6000)], now=100.0)) == []


def test_candidates_are_capped_oldest_first_and_dialled_as_room_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pex, "MAX_CANDIDATES", 120)
    e = engine(max_peers=2)
    tellers = [join(e, n, f"10.0.0.{n}", 6000 + n) for n in (1, 2)]  # full: no room
    sent = [(f"10.9.{k // 250}.{k % 250 + 1}", 5000) for k in range(300)]
    now = 1.0
    for k in range(0, 300, 50):
        teller = tellers[(k // 50) % 2]
        assert dials(e.on_pex(teller, sent[k : k + 50], now=now)) == []
        now += pex.min_gap() / 2 + 0.01
    assert len(e.pex_candidates) == 120
    assert sent[179] not in e.pex_candidates and sent[180] in e.pex_candidates
    # A connection ends: its room goes to the oldest candidate still kept.
    assert dials(e.detach(tellers[0], now)) == [sent[180]]
    assert len(e.pex_candidates) == 119


def test_a_hostile_peer_cannot_make_us_dial_more_than_our_cap() -> None:
    e = engine(max_peers=10)
    p = join(e, 1, "10.0.0.11")
    out: list[object] = []
    for k in range(50):  # a long-lived liar, within the rate
        addresses = [(f"10.{k}.{j}.1", 1000 + j) for j in range(w.MAX_PEX)]
        out += e.on_pex(p, addresses, now=1.0 + k * pex.PEX_INTERVAL)
        out += e.tick(1.0 + k * pex.PEX_INTERVAL)
    assert not closes(out)
    assert len(dials(out)) == 9  # max_peers, one connection taken by the liar itself
    assert len(e.pex_candidates) <= pex.MAX_CANDIDATES


def test_a_banned_route_is_refused_even_when_pex_leads_back_to_it() -> None:
    e = engine()
    bad = join(e, 9, "10.0.0.99", 6099)
    e.chunk_corrupt(bad, (key(9), "10.0.0.99"), 0, now=0.0)
    e.detach(bad, 0.0)
    # Told of it at another port: dialled (the key is unknown until the
    # handshake), and the handshake's route is refused.
    p = join(e, 1, "10.0.0.11")
    assert dials(e.on_pex(p, [("10.0.0.99", 7099)], now=1.0)) == [("10.0.0.99", 7099)]
    verdict, _ = e.attach("again", (key(9), "10.0.0.99"), initiated=True, now=2.0)
    assert verdict == "refused"


def test_what_a_connection_was_told_is_bounded_by_the_swarm_not_its_history() -> None:
    e = engine(max_peers=200)
    p = join(e, 1, "10.0.0.11")
    now = pex.PEX_FIRST_DELAY
    for k in range(12):  # 12 waves of 50 peers that come, are told of, and go
        wave = [join(e, 100 + 50 * k + j, f"10.1.{k}.{j + 1}", 6000, now=now) for j in range(50)]
        assert len(told(e.tick(now))[p]) == 50
        for peer in wave:
            e.detach(peer, now)
        now += pex.PEX_INTERVAL
    assert len(e.peers[p].pex_sent) <= 2 * 200 + 50


def test_a_dial_by_address_counts_once_when_connected() -> None:
    # A dial to an address (x=, --peer, PEX) stands in `connecting` until its
    # connection is up; connected, it counts as a session only, so the room
    # for PEX dials is max_peers minus the sessions.
    e = engine(max_peers=3)
    assert dials(e.dial_direct("10.0.0.20", 6000)) == [("10.0.0.20", 6000)]
    verdict, _ = e.attach(
        "p1", (key(1), "10.0.0.20"), initiated=True, now=0.0, listen=("10.0.0.20", 6000)
    )
    assert verdict == "ok" and not e.connecting
    p2 = join(e, 2, "10.0.0.21")
    out = e.on_pex(p2, [("10.0.0.30", 6000), ("10.0.0.31", 6000)], now=5.0)
    assert dials(out) == [("10.0.0.30", 6000)]  # 3 - 2 sessions = room for one
