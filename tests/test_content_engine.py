"""The content engine on its own: events in, actions out, time passed in (no I/O)."""

from __future__ import annotations

import random

import pytest

from peerd.engine import content_engine as ce
from peerd.engine.content_engine import Close, ContentEngine, Dial, Send, SendHave
from peerd.wire import Bitfield, Cancel, PeerEntry, Peers, Reject, Request, bits_from_flags

CHUNK = 16 * 1024
ME = b"\x05" * 32


def key(n: int) -> bytes:
    return bytes([n]) * 32


def leecher(chunks: int = 8, size: int | None = None, **kw: object) -> ContentEngine:
    size = chunks * CHUNK if size is None else size
    n = -(-size // CHUNK)
    return ContentEngine(
        size=size,
        chunk_size=CHUNK,
        have=bytearray(n),
        my_key=ME,
        origin=False,
        now=0.0,
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )


def seeder(chunks: int = 8, *, origin: bool = True) -> ContentEngine:
    return ContentEngine(
        size=chunks * CHUNK,
        chunk_size=CHUNK,
        have=bytearray([1]) * chunks,
        my_key=ME,
        origin=origin,
        now=0.0,
        rng=random.Random(1),
    )


def requests(actions: list, peer: object = None) -> list[tuple[int, int, int]]:  # type: ignore[type-arg]
    return [
        (a.message.index, a.message.offset, a.message.length)
        for a in actions
        if isinstance(a, Send)
        and isinstance(a.message, Request)
        and (peer is None or a.peer == peer)
    ]


def attach(engine: ContentEngine, peer: str, n: int, *, now: float = 0.0, initiated: bool = True):  # type: ignore[no-untyped-def]
    verdict, actions = engine.attach(peer, (key(n), f"10.0.0.{n}"), initiated=initiated, now=now)
    return verdict, actions


def test_attach_sends_our_bitfield_and_a_full_bitfield_gets_requests() -> None:
    e = leecher(8)
    verdict, actions = attach(e, "p", 1)
    assert verdict == "ok"
    assert actions == [Send("p", Bitfield(bits_from_flags(bytearray(8))))]
    out = e.on_bitfield("p", bits_from_flags(bytearray([1]) * 8), now=0.1)
    # Nothing measured yet: one request in flight (pipeline_depth at rate 0).
    assert len(requests(out)) == 1


def test_short_last_chunk_is_requested_at_its_length() -> None:
    e = leecher(size=2 * CHUNK + 100)
    attach(e, "p", 1)
    flags = bytearray([0, 0, 1])  # the peer has only the last chunk
    out = e.on_bitfield("p", bits_from_flags(flags), now=0.0)
    assert requests(out) == [(2, 0, 100)]


def test_ourselves_and_banned_routes_are_refused_and_pad_bits_are_a_protocol_error() -> None:
    e = leecher(3)
    assert e.attach("me", (ME, "10.0.0.9"), initiated=True, now=0.0) == ("refused", [])
    e.banned.add((key(2), "10.0.0.2"))
    assert attach(e, "b", 2)[0] == "refused"
    attach(e, "p", 1)
    out = e.on_bitfield("p", bytes([0b11110000]), now=0.0)  # 3 chunks: pad bits set
    assert len(out) == 1 and isinstance(out[0], Close)
    assert out[0].reason.startswith("protocol-error:")


def test_duplicate_connection_keeps_the_one_opened_by_the_smaller_key() -> None:
    # We (ME = 0x05..) dialled key(9) and key(9) dialled us: ours wins (smaller opener).
    e = leecher()
    assert attach(e, "theirs", 9, initiated=False)[0] == "ok"
    verdict, actions = attach(e, "ours", 9, initiated=True)
    assert verdict == "ok"
    assert Close("theirs", "duplicate: a newer connection replaces this one") in actions
    # key(1) is smaller than ours: its connection wins over the one we open.
    assert attach(e, "theirs1", 1, initiated=False)[0] == "ok"
    assert attach(e, "ours1", 1, initiated=True)[0] == "refused"


def test_a_full_content_evicts_an_idle_session_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ce, "MAX_SESSIONS", 2)
    e = leecher()
    attach(e, "a", 1, now=0.0)
    attach(e, "b", 2, now=5.0)
    verdict, actions = attach(e, "c", 3, now=6.0)
    assert verdict == "full" and actions == [
        Close("c", "too-many: this content has all the peers it can take")
    ]
    verdict, actions = attach(e, "d", 4, now=ce.EVICTABLE_AFTER + 1)
    assert verdict == "ok"
    assert Close("a", "too-many: evicted for a newcomer") in actions  # idle longest


def test_busy_reject_asks_another_holder_and_not_this_peer_for_a_while() -> None:
    e = leecher(3)
    full = bits_from_flags(bytearray([1, 1, 1]))
    attach(e, "a", 1)
    attach(e, "b", 2)
    (x,) = requests(e.on_bitfield("a", full, now=0.0))
    (y,) = requests(e.on_bitfield("b", full, now=0.0))
    assert x != y
    out = e.on_reject("a", x, "busy", now=1.0)
    again = requests(out, "a")
    assert again and x not in again  # a is asked for something else
    # A reject for something we did not ask is ignored.
    assert e.on_reject("a", x, "busy", now=1.0) == []
    # Once b's chunk arrives, b is asked for the refused one (a is backed off).
    e.on_data_header("b", y)
    e.on_payload("b", y, now=1.5)
    e.have[y[0]] = 1
    assert x in requests(e.chunk_stored("b", y[0], CHUNK, now=1.6), "b")


def test_missing_reject_stops_asking_that_peer_for_that_chunk() -> None:
    e = leecher(2)
    attach(e, "a", 1)
    (req,) = requests(e.on_bitfield("a", bits_from_flags(bytearray([1, 1])), now=0.0))
    out = e.on_reject("a", req, "missing", now=0.5)
    assert req not in requests(out)
    assert e.picker is not None and e.picker.peer_flags("a")[req[0]] == 0


def test_a_stored_chunk_is_announced_to_peers_lacking_it_and_completes() -> None:
    e = leecher(1)
    attach(e, "seed", 1)
    attach(e, "other", 2)
    (req,) = requests(e.on_bitfield("seed", bits_from_flags(bytearray([1])), now=0.0))
    e.on_bitfield("other", bits_from_flags(bytearray([0])), now=0.0)
    e.on_data_header("seed", req)
    assert e.on_payload("seed", req, now=0.2) is True
    e.have[0] = 1
    out = e.chunk_stored("seed", 0, CHUNK, now=0.3)
    assert out == [SendHave("other", 0)]  # not to the seeder, which holds it
    assert e.complete and e.downloaded == CHUNK
    assert e.announce_due(0.3) == "started"  # never announced yet
    e.announced("started", 0.3, None)
    assert e.announce_due(0.3) == "completed"


def test_a_payload_we_no_longer_want_is_not_stored() -> None:
    e = leecher(1)
    attach(e, "a", 1)
    (req,) = requests(e.on_bitfield("a", bits_from_flags(bytearray([1])), now=0.0))
    e.on_data_header("a", (0, 0, 5))
    assert e.on_payload("a", (0, 0, 5), now=0.1) is False  # not what we asked
    e.on_data_header("a", req)
    assert e.on_payload("a", req, now=0.1) is True
    assert e.on_payload("a", req, now=0.1) is False  # answered already


def test_corrupt_chunk_bans_the_route_and_closes() -> None:
    e = leecher(1)
    full = bits_from_flags(bytearray([1]))
    attach(e, "a", 1)
    (req,) = requests(e.on_bitfield("a", full, now=0.0))
    e.on_data_header("a", req)
    e.on_payload("a", req, now=0.1)
    out = e.chunk_corrupt("a", (key(1), "10.0.0.1"), req[0], now=0.2)
    assert out == [Close("a", f"bad-data: chunk {req[0]} failed its hash")]
    assert (key(1), "10.0.0.1") in e.banned and e.hash_failures == 1
    e.detach("a", now=0.3)
    # The chunk is back in the pool for someone else; the route stays banned.
    attach(e, "b", 2)
    assert requests(e.on_bitfield("b", full, now=0.4)) == [req]
    assert attach(e, "a2", 1)[0] == "refused"


def test_tick_times_out_requests_and_drops_a_stalled_peer() -> None:
    e = leecher(2)
    attach(e, "a", 1)
    attach(e, "b", 2)
    full = bits_from_flags(bytearray([1, 1]))
    (req,) = requests(e.on_bitfield("a", full, now=0.0))
    e.on_bitfield("b", full, now=0.0)
    assert e.tick(ce.REQUEST_TIMEOUT - 1) == []
    out = e.tick(ce.REQUEST_TIMEOUT + 0.5)
    assert Send("a", Cancel(*req)) in out
    assert e.peers["a"].timeouts == 1
    later = e.tick(ce.STALL_TIMEOUT + 1)
    closes = [a for a in later if isinstance(a, Close)]
    assert closes and all(c.abort for c in closes)


def test_upload_queue_rejects_invalid_missing_and_overflowing_requests() -> None:
    s = ContentEngine(
        size=2 * CHUNK,
        chunk_size=CHUNK,
        have=bytearray([1, 0]),
        my_key=ME,
        origin=False,
        now=0.0,
    )
    attach(s, "p", 1)
    assert s.on_request("p", (5, 0, 10), now=0.0) == (
        False,
        [Send("p", Reject(5, 0, 10, "invalid"))],
    )
    assert s.on_request("p", (0, 0, CHUNK + 1), now=0.0)[1][0].message.reason == "invalid"
    assert s.on_request("p", (1, 0, 10), now=0.0)[1][0].message.reason == "missing"
    for k in range(ce.MAX_QUEUED_UPLOADS):
        assert s.on_request("p", (0, k, 1), now=0.0) == (True, [])
    queued, out = s.on_request("p", (0, 999, 1), now=0.0)
    assert not queued and out[0].message.reason == "busy"
    assert s.next_upload("p") == (0, 0, 1)
    s.on_uploaded("p", (0, 0, 1), now=0.1)
    assert s.uploaded == 1 and s.remote_share("p") == 0.5


def test_origin_super_seeds_every_chunk_once_before_any_twice() -> None:
    s = seeder(4)
    attach(s, "a", 1)
    attach(s, "b", 2)
    assert s.on_request("a", (0, 0, CHUNK), now=0.0)[0]
    queued, out = s.on_request("b", (0, 0, CHUNK), now=0.0)
    assert not queued and out[0].message.reason == "busy"
    assert s.on_request("b", (1, 0, CHUNK), now=0.0)[0]


def test_origin_serves_a_late_getter_what_only_departed_peers_got() -> None:
    # Getters one after another against fresh origin seeders (issue 19's
    # 5 s cliff): what went to a getter that has left is held by nobody
    # here, so the next getter is served at once, not refused "busy" (which
    # costs it BUSY_BACKOFF per chunk that every seeder had sent before).
    s = seeder(4)
    attach(s, "a", 1)
    for i in range(3):
        assert s.on_request("a", (i, 0, CHUNK), now=0.0)[0]
        assert s.next_upload("a") == (i, 0, CHUNK)
        s.on_uploaded("a", (i, 0, CHUNK), now=0.1)
    s.detach("a", now=1.0)
    attach(s, "b", 2, now=2.0)
    for i in range(4):
        queued, out = s.on_request("b", (i, 0, CHUNK), now=2.0)
        assert queued and out == [], (i, out)


def test_announce_timing_progress_lonely_retry_and_restart() -> None:
    e = leecher(2)
    assert e.announce_due(0.0) == "started"
    answer = Peers(b"\0" * 32, 30, (PeerEntry("10.0.0.1", 7000, key(1), b""),), b"")
    out = e.announced("started", 0.0, answer)
    assert out == [Dial((key(1), "10.0.0.1"), "10.0.0.1", 7000)]
    assert e.announce_due(0.5) is None
    # Under-connected: the next periodic announce comes soon.
    assert e.announce_wake(0.5) == pytest.approx(2.0)
    # The dial failed: alone, retry after 1 s, then back off.
    e.dial_ended((key(1), "10.0.0.1"), now=0.6)
    assert e.announce_sooner
    assert e.announce_wake(0.6) == pytest.approx(1.0)
    assert e.announce_due(1.0) == "periodic"
    e.announced("periodic", 1.0, None)
    assert e.announce_wake(1.0) == pytest.approx(3.0)  # lonely retry doubled to 2 s
    e.tracker_changed()
    assert e.announce_due(1.1) == "started"


def test_dial_room_counts_connected_routes_once() -> None:
    e = leecher(2, max_peers=3)
    entries = tuple(PeerEntry(f"10.0.0.{n}", 7000, key(n), b"") for n in range(1, 6))
    dials = [
        a
        for a in e.announced("started", 0.0, Peers(b"\0" * 32, 30, entries, b""))
        if isinstance(a, Dial)
    ]
    assert len(dials) == 3
    for d in dials:  # each dial connects: it counts once, as a session
        e.attach(d.route, d.route, initiated=True, now=0.1)
    assert len(e.connecting) == 0 and len(e.by_route) == 3
    assert e.announce_want() == ce.tracker_want(1)


def test_endgame_copy_is_cancelled_when_the_first_arrives() -> None:
    e = leecher(1)
    full = bits_from_flags(bytearray([1]))
    attach(e, "a", 1)
    attach(e, "b", 2)
    (req,) = requests(e.on_bitfield("a", full, now=0.0))
    # Endgame: every missing chunk is in flight, so b asks for a copy.
    assert requests(e.on_bitfield("b", full, now=0.0)) == [req]
    e.on_data_header("a", req)
    e.on_payload("a", req, now=1.5)
    e.have[0] = 1
    out = e.chunk_stored("a", 0, CHUNK, now=1.6)
    assert Send("b", Cancel(*req)) in out
    assert e.complete


def test_messages_from_a_closing_or_unknown_connection_are_ignored() -> None:
    e = leecher(2)
    attach(e, "a", 1)
    e.on_bitfield("a", bytes([0b11000001]), now=0.0)  # pad bit: protocol error, closing
    full = bits_from_flags(bytearray([1, 1]))
    assert e.on_bitfield("a", full, now=0.1) == []
    assert e.on_have("a", (0,), now=0.1) == []
    assert e.on_request("a", (0, 0, 1), now=0.1) == (False, [])
    for ghost in ("never-attached",):
        assert e.on_have(ghost, (0,), now=0.1) == []
        assert e.on_reject(ghost, (0, 0, CHUNK), "busy", now=0.1) == []
        assert e.on_payload(ghost, (0, 0, CHUNK), now=0.1) is False
        assert e.detach(ghost, now=0.1) == []


def test_a_request_whose_data_is_arriving_is_never_cancelled() -> None:
    # The DATA header is in; its payload is still on the wire. A timeout or
    # an endgame copy arriving elsewhere must not CANCEL it (the wire would
    # refuse a CANCEL for a request it no longer counts as outstanding).
    full = bits_from_flags(bytearray([1]))
    for timeout_first in (True, False):
        e = leecher(1)
        attach(e, "a", 1)
        attach(e, "b", 2)
        (req,) = requests(e.on_bitfield("a", full, now=0.0))
        assert requests(e.on_bitfield("b", full, now=0.0)) == [req]  # endgame copy
        e.on_data_header("a", req)
        if timeout_first:
            assert Send("a", Cancel(*req)) not in e.tick(ce.REQUEST_TIMEOUT + 1)
            continue
        e.on_data_header("b", req)
        assert e.on_payload("b", req, now=1.0)
        e.have[0] = 1
        assert Send("a", Cancel(*req)) not in e.chunk_stored("b", 0, CHUNK, now=1.1)
        assert e.on_payload("a", req, now=1.2) is False  # the copy arrives: dropped


def test_read_ahead_asks_for_the_window_first_in_order() -> None:
    e = leecher(40)
    attach(e, "a", 1)
    e.read_ahead(10, 4, now=0.0)
    full = bits_from_flags(bytearray([1]) * 40)
    first = requests(e.on_bitfield("a", full, now=0.0))
    assert first == [(10, 0, CHUNK)]  # depth 1 at rate 0: the window's first
    e.on_data_header("a", first[0])
    e.on_payload("a", first[0], now=0.1)
    e.have[10] = 1
    assert requests(e.chunk_stored("a", 10, CHUNK, now=0.1)) == [(11, 0, CHUNK)]
    # Past the window (or with it off), rarest first again: anywhere.
    e.read_ahead(0, 0, now=0.2)
    assert e.picker is not None and not e.picker.priority


def test_a_remote_tracker_cannot_make_us_dial_this_machine() -> None:
    entries = tuple(
        PeerEntry(ip, 7000, key(n), b"")
        for n, ip in enumerate(["127.0.0.1", "::1", "0.0.0.0", "::ffff:127.0.0.2", "10.0.0.9"], 10)
    )
    answer = Peers(b"\0" * 32, 30, entries, b"")
    remote = leecher(2)
    remote.tracker_local = False  # the tracker is on another machine
    dials = [a.ip for a in remote.announced("started", 0.0, answer) if isinstance(a, Dial)]
    assert dials == ["10.0.0.9"]
    local = leecher(2)  # a tracker on this machine may name local peers
    dials = [a.ip for a in local.announced("started", 0.0, answer) if isinstance(a, Dial)]
    assert sorted(dials) == sorted(["127.0.0.1", "::1", "::ffff:127.0.0.2", "10.0.0.9"])
