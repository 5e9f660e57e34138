"""The pure swarm index: time is an argument, so expiry needs no sleeping."""

from __future__ import annotations

import ipaddress
import random

import pytest

from peerd.errors import TrackerError
from peerd.wire import FRAME_HEADER, MAX_BODY, FrameType, PeerEntry, Peers, encode_message
from peerd.wire._codec import decode_body
from tracker import _peers_frame
from tracker import index as index_module
from tracker._peer_table import PeerTable
from tracker.index import PeerInfo, SwarmIndex, SwarmStat

CID = bytes(range(32))
CID2 = bytes(range(1, 33))


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def bitmap(n: int, have: set[int]) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in have:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def avail_counts(avail: bytes) -> list[int]:
    return [int.from_bytes(avail[i : i + 2], "big") for i in range(0, len(avail), 2)]


def test_announce_returns_others_and_availability() -> None:
    idx = SwarmIndex(ttl=100, interval=30)
    peers, avail = idx.announce(
        CID, key(1), "10.0.0.1", 7001, "started", bitmap(10, {0, 1}), 10, 50, 0
    )
    assert peers == []
    assert avail_counts(avail) == [1, 1] + [0] * 8
    peers, avail = idx.announce(
        CID, key(2), "10.0.0.2", 7002, "started", bitmap(10, {1, 9}), 10, 50, 1
    )
    assert peers == [("10.0.0.1", 7001, key(1), bitmap(10, {0, 1}))]
    assert avail_counts(avail) == [1, 2] + [0] * 7 + [1]
    # progress replaces the bitmap: counts follow (subtract old, add new)
    _, avail = idx.announce(CID, key(1), "10.0.0.1", 7001, "progress", bitmap(10, {2}), 10, 50, 2)
    assert avail_counts(avail) == [0, 1, 1] + [0] * 6 + [1]
    assert len(idx) == 2 and idx.num_contents == 1


def test_never_returns_the_asker_and_respects_want() -> None:
    idx = SwarmIndex()
    for n in range(20):
        idx.announce(CID, key(n), "10.0.0.1", 7000 + n, "started", bitmap(16, {n % 16}), 16, 0, 0)
    peers, _ = idx.announce(CID, key(3), "10.0.0.1", 7003, "periodic", bitmap(16, {3}), 16, 5, 1)
    assert len(peers) == 5
    assert key(3) not in {p[2] for p in peers}
    peers, _ = idx.announce(CID, key(3), "10.0.0.1", 7003, "periodic", bitmap(16, {3}), 16, 50, 1)
    assert len(peers) == 19 and key(3) not in {p[2] for p in peers}
    peers, _ = idx.announce(CID, key(3), "10.0.0.1", 7003, "periodic", bitmap(16, {3}), 16, 0, 1)
    assert peers == []


def test_equal_peers_are_handed_out_in_rotation() -> None:
    # A flash crowd: ten identical seeders, newcomers with empty bitmaps. The
    # answers must not all name the same first peers.
    idx = SwarmIndex(ttl=1000, interval=30)
    full = bitmap(16, set(range(16)))
    for n in range(10):
        idx.announce(CID, key(n), "10.0.0.1", 7000 + n, "started", full, 16, 0, 0)
    firsts = set()
    for k in range(10):
        now = 10.0 * (k + 1)  # past the answer cache's lifetime each time
        peers, _ = idx.announce(
            CID, key(100 + k), "10.0.0.2", 8000 + k, "started", bitmap(16, set()), 16, 3, now
        )
        firsts.add(peers[0][2])
        idx.announce(CID, key(100 + k), "10.0.0.2", 8000 + k, "stopped", b"", 16, 0, now)
    assert len(firsts) >= 5


def test_rarest_holder_comes_first() -> None:
    idx = SwarmIndex()
    n = 8
    # ten peers hold the common chunks 1..5; one peer alone holds chunk 0
    for i in range(10):
        idx.announce(
            CID, key(100 + i), "10.0.0.2", 7000, "started", bitmap(n, {1, 2, 3, 4, 5}), n, 0, 0
        )
    idx.announce(CID, key(7), "10.0.0.3", 7007, "started", bitmap(n, {0}), n, 0, 0)
    # one peer holds nothing the asker lacks
    idx.announce(CID, key(8), "10.0.0.4", 7008, "started", bitmap(n, {6}), n, 0, 0)
    peers, avail = idx.announce(CID, key(9), "10.0.0.5", 7009, "started", bitmap(n, {6}), n, 3, 1)
    assert peers[0][2] == key(7)  # holds the rarest chunk, though fewer chunks
    assert {p[2] for p in peers[1:]} <= {key(100 + i) for i in range(10)}
    assert avail_counts(avail) == [1, 10, 10, 10, 10, 10, 2, 0]
    peers, _ = idx.announce(CID, key(9), "10.0.0.5", 7009, "periodic", bitmap(n, {6}), n, 50, 2)
    assert peers[-1][2] == key(8)  # useless to the asker: last


def test_seeder_is_offered_leechers_first() -> None:
    idx = SwarmIndex()
    full = bitmap(8, set(range(8)))
    idx.announce(CID, key(1), "10.0.0.1", 1, "started", full, 8, 0, 0)
    idx.announce(CID, key(2), "10.0.0.2", 2, "started", bitmap(8, {0}), 8, 0, 0)
    peers, _ = idx.announce(CID, key(3), "10.0.0.3", 3, "started", full, 8, 1, 0)
    assert [p[2] for p in peers] == [key(2)]


def test_ttl_expiry_with_a_mocked_clock() -> None:
    idx = SwarmIndex(ttl=60, interval=20)
    idx.announce(CID, key(1), "10.0.0.1", 1, "started", bitmap(8, {0}), 8, 0, 0)
    idx.announce(CID, key(2), "10.0.0.2", 2, "started", bitmap(8, {1}), 8, 0, 30)
    # at t=59 both alive; key 1 is not returned after t=60 even before a sweep
    peers, _ = idx.announce(CID, key(3), "10.0.0.3", 3, "started", bitmap(8, set()), 8, 50, 59)
    assert {p[2] for p in peers} == {key(1), key(2)}
    peers, _ = idx.announce(CID, key(3), "10.0.0.3", 3, "periodic", bitmap(8, set()), 8, 50, 60.5)
    assert {p[2] for p in peers} == {key(2)}
    assert idx.expire(60.5) == 1
    assert len(idx) == 2
    _, avail = idx.announce(CID, key(3), "10.0.0.3", 3, "periodic", bitmap(8, set()), 8, 50, 61)
    assert avail_counts(avail) == [0, 1, 0, 0, 0, 0, 0, 0]
    # a periodic announce keeps an entry alive past its first TTL
    idx.announce(CID, key(2), "10.0.0.2", 2, "periodic", bitmap(8, {1}), 8, 0, 80)
    assert idx.expire(120.9) == 0
    assert idx.expire(121.0) == 1  # key 3 (last seen 61)
    assert len(idx) == 1
    assert idx.expire(140.1) == 1
    assert len(idx) == 0 and idx.num_contents == 0  # the content disappears too


def test_stop_removes_the_entry_and_scrape_counts() -> None:
    idx = SwarmIndex()
    full = bitmap(12, set(range(12)))
    idx.announce(CID, key(1), "10.0.0.1", 1, "started", full, 12, 0, 0)
    idx.announce(CID, key(2), "10.0.0.2", 2, "started", bitmap(12, {3}), 12, 0, 0)
    idx.announce(CID, key(3), "10.0.0.3", 3, "started", bitmap(12, {4}), 12, 0, 0)
    # an id without peers is left out (PROTOCOL.md, SCRAPE)
    assert idx.scrape([CID, CID2], 1) == [SwarmStat(CID, 1, 2, 0)]
    idx.announce(CID, key(2), "10.0.0.2", 2, "completed", full, 12, 0, 2)
    idx.announce(CID, key(2), "10.0.0.2", 2, "completed", full, 12, 0, 3)  # once per key
    assert idx.scrape([CID], 3) == [SwarmStat(CID, 2, 1, 1)]
    assert idx.announce(CID, key(1), "10.0.0.1", 1, "stopped", full, 12, 50, 4) == ([], b"")
    assert idx.scrape([CID], 4) == [SwarmStat(CID, 1, 1, 1)]
    peers, _ = idx.announce(CID, key(3), "10.0.0.3", 3, "periodic", bitmap(12, {4}), 12, 50, 5)
    assert [p[2] for p in peers] == [key(2)]
    # stopping an unknown key or content is harmless
    assert idx.announce(CID2, key(9), "10.0.0.9", 9, "stopped", b"", None, 50, 5) == ([], b"")


def test_bitmap_size_is_checked() -> None:
    idx = SwarmIndex()
    with pytest.raises(TrackerError) as info:
        idx.announce(CID, key(1), "10.0.0.1", 1, "started", b"\x00\x00\x00", 10, 0, 0)
    assert info.value.code == "bad-request"
    with pytest.raises(TrackerError, match="beyond the last chunk"):
        idx.announce(CID, key(1), "10.0.0.1", 1, "started", b"\x00\x01", 10, 0, 0)
    assert idx.num_contents == 0  # a refused first announce leaves nothing behind
    # no manifest known: the first bitmap fixes the size, later ones must match
    idx.announce(CID, key(1), "10.0.0.1", 1, "started", b"\xff", None, 0, 0)
    assert idx.num_chunks(CID) == 8
    with pytest.raises(TrackerError):
        idx.announce(CID, key(2), "10.0.0.2", 1, "started", b"\xff\xff", None, 0, 0)
    # the manifest arrives: a differently sized swarm is rebuilt from announces
    idx.announce(CID, key(2), "10.0.0.2", 1, "started", b"\xe0", 3, 0, 1)
    assert idx.num_chunks(CID) == 3 and len(idx) == 1
    with pytest.raises(TrackerError):
        idx.announce(CID, key(2), "10.0.0.2", 1, "bogus", b"\xe0", 3, 0, 1)


def test_limits_bound_growth() -> None:
    idx = SwarmIndex(max_contents=3, max_contents_per_peer=2, max_peers_per_content=3)
    for n in range(3):
        idx.announce(CID, key(n), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    with pytest.raises(TrackerError) as info:
        idx.announce(CID, key(9), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    assert info.value.code == "too-many"
    idx.announce(CID2, key(0), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    idx.announce(b"\x01" * 32, key(5), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    with pytest.raises(TrackerError, match="too many contents"):
        idx.announce(bytes(32), key(5), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    idx.announce(CID2, key(0), "10.0.0.1", 1, "stopped", b"\x00", 8, 0, 0)
    idx.announce(bytes(32), key(0), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    with pytest.raises(TrackerError, match="at most 2 contents"):
        idx.announce(b"\x01" * 32, key(0), "10.0.0.1", 1, "started", b"\x00", 8, 0, 0)
    with pytest.raises(ValueError):
        SwarmIndex(max_peers_per_content=70_000)


def test_ipv6_and_address_updates() -> None:
    idx = SwarmIndex()
    idx.announce(CID, key(1), "::1", 5, "started", b"\x80", 1, 0, 0)
    idx.announce(CID, key(1), "::ffff:10.1.2.3", 6, "periodic", b"\x80", 1, 0, 1)
    peers, _ = idx.announce(CID, key(2), "127.0.0.1", 7, "started", b"\x00", 1, 5, 2)
    assert peers == [("10.1.2.3", 6, key(1), b"\x80")]
    with pytest.raises(TrackerError):
        idx.announce(CID, key(3), "not-an-ip", 7, "started", b"\x00", 1, 5, 2)


def test_random_workload_keeps_counts_consistent() -> None:
    rng = random.Random(7)
    idx = SwarmIndex(ttl=50)
    n = 37
    live: dict[bytes, tuple[float, set[int]]] = {}
    now = 0.0
    for _ in range(2000):
        now += rng.random()
        k = key(rng.randrange(40))
        if rng.random() < 0.1:
            idx.announce(CID, k, "10.0.0.1", 1, "stopped", b"", n, 0, now)
            live.pop(k, None)
            continue
        have = {i for i in range(n) if rng.random() < 0.3}
        peers, avail = idx.announce(CID, k, "10.0.0.1", 1, "progress", bitmap(n, have), n, 10, now)
        live[k] = (now + 50, have)
        live = {kk: v for kk, v in live.items() if v[0] > now}
        expect = [sum(1 for _, h in live.values() if i in h) for i in range(n)]
        if rng.random() < 0.05:
            idx.expire(now)
        # lazily expired entries may still be counted until a sweep; after one, exact
        idx.expire(now)
        _, avail = idx.announce(CID, k, "10.0.0.1", 1, "periodic", bitmap(n, have), n, 10, now)
        assert avail_counts(avail) == expect
        assert k not in {p[2] for p in peers}
        assert len(peers) == min(10, len(live) - 1)


def _slow_frame(cid: bytes, interval: int, peers: list, avail: bytes) -> bytes:
    """The PEERS frame the wire's validated event path gives for ``announce``'s answer."""
    return encode_message(Peers(cid, interval, tuple(PeerEntry(*p) for p in peers), avail))


@pytest.mark.parametrize("budget", ["default", "tiny"])
def test_encoded_answers_match_the_event_path(budget: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if budget == "tiny":  # caches evicted all the time
        monkeypatch.setattr(index_module, "_ANSWER_BYTES", 2000)
        monkeypatch.setattr(index_module, "_HEAD_MEMO", 4)
        monkeypatch.setattr(index_module, "_ANSWER_ENTRIES", 3)
    # Two indexes see the same workload; one answers with tuples (encoded here
    # through validated events), the other with cached encoded bodies. Small
    # sample and ttl so window rotation, cache reuse and expiry all happen.
    # Both answer from the same rankings and cache: this checks that the two
    # APIs and the encoding agree, not that the answers are right (the
    # oracle test below does that).
    rng = random.Random(11)
    plain = SwarmIndex(ttl=6, sample=8)
    fast = SwarmIndex(ttl=6, sample=8)
    n = 21
    palette = [bitmap(n, {i for i in range(n) if rng.random() < 0.5}) for _ in range(4)]
    palette.append(bitmap(n, set(range(n))))
    now = 0.0
    hits = 0
    built = [0]  # PEERS entries encoded by `fast` (a cached answer encodes none)
    real_entry = PeerTable.entry

    def counting_entry(self: PeerTable, slot: int) -> bytes:
        built[0] += 1
        return real_entry(self, slot)

    monkeypatch.setattr(PeerTable, "entry", counting_entry)
    for step in range(3000):
        now += rng.random() * 0.05
        cid = rng.choice((CID, CID2))
        k = key(rng.randrange(30))
        ip = rng.choice(("10.0.0.1", "::1", "192.168.7.9"))
        roll = rng.random()
        event = "stopped" if roll < 0.03 else "progress" if roll < 0.1 else "periodic"
        bits = rng.choice(palette)
        want = rng.choice((0, 3, 50))
        peers, avail = plain.announce(cid, k, ip, 7000, event, bits, n, want, now)
        frame = fast.announce_frame(cid, k, ip, 7000, event, bits, n, want, now, 30)
        if event == "stopped":
            assert frame is None and peers == [] and avail == b""
            continue
        assert frame == _slow_frame(cid, 30, peers, avail), step
        listed = [p[2] for p in peers]
        assert k not in listed and len(set(listed)) == len(listed) <= want, step
        if step % 500 == 0:
            plain.expire(now)
            fast.expire(now)
        # the same question twice more: the second is answered from the cache
        repeat = []
        for _ in range(2):
            before = built[0]
            repeat.append(fast.announce_frame(cid, k, ip, 7000, "periodic", bits, n, want, now, 30))
        hits += built[0] == before and want > 0
        for _ in range(2):
            plain.announce(cid, k, ip, 7000, "periodic", bits, n, want, now)
        assert repeat[0] == repeat[1]
    if budget == "default":
        assert hits > 1000  # the cache does answer repeated questions


def test_cached_answer_never_lists_an_expired_peer() -> None:
    idx = SwarmIndex(ttl=10)
    idx.announce(CID, key(1), "10.0.0.1", 1, "started", b"\x80", 8, 0, 0)
    idx.announce(CID, key(2), "10.0.0.2", 2, "started", b"\x40", 8, 0, 1.5)
    first = idx.announce_frame(CID, key(3), "10.0.0.3", 3, "started", b"\x00", 8, 5, 1.6, 60)
    again = idx.announce_frame(CID, key(3), "10.0.0.3", 3, "periodic", b"\x00", 8, 5, 1.7, 60)
    third = idx.announce_frame(CID, key(3), "10.0.0.3", 3, "periodic", b"\x00", 8, 5, 1.8, 60)
    assert first == again
    assert third == again
    # key(1) expires at 10.0 while the ranking is still fresh (made at 9.9)
    idx.announce_frame(CID, key(3), "10.0.0.3", 3, "periodic", b"\x00", 8, 5, 9.9, 60)
    later = idx.announce_frame(CID, key(3), "10.0.0.3", 3, "periodic", b"\x00", 8, 5, 10.5, 60)
    peers, avail = idx.announce(CID, key(3), "10.0.0.3", 3, "periodic", b"\x00", 8, 5, 10.5)
    assert [p[2] for p in peers] == [key(2)]
    assert later == _slow_frame(CID, 60, peers, avail)


def test_huge_bitmaps_are_trimmed_to_one_peers_body() -> None:
    n = 2**20  # the largest content: 128 KiB bitmaps, 130 of them exceed 16 MiB
    idx = SwarmIndex()
    empty = bytes(n // 8)
    for i in range(131):
        idx.announce(CID, key(i), "10.0.0.1", 1, "started", empty, n, 0, 0)
    frame = idx.announce_frame(CID, key(0), "10.0.0.1", 1, "periodic", empty, n, 200, 1, 60)
    assert frame is not None
    body = frame[5:]
    assert frame[:5] == FRAME_HEADER.pack(FrameType.PEERS, len(body))
    assert len(body) <= MAX_BODY[FrameType.PEERS]
    event = decode_body(FrameType.PEERS, body)
    assert isinstance(event, Peers) and 100 < len(event.peers) < 130


def _joined_frame(cid: bytes, interval: int, peers: list, avail: bytes, split: int) -> bytes:
    """A PEERS frame from ``_peers_frame``'s pieces, each entry cut at ``split``."""
    pf = _peers_frame
    entries = [
        pf.entry_head(ip, port) + pf.KEY_HEADER + k + pf.bin_header(len(bits)) + bits
        for ip, port, k, bits in peers
    ]
    pieces = [piece for e in entries for piece in (e[:split], e[split:])]
    head, tail = pf.body_head(cid, interval, len(peers)), pf.avail_field(avail)
    size = len(head) + sum(map(len, pieces)) + len(tail)
    return b"".join((pf.frame_header(size), head, *pieces, tail))


@pytest.mark.parametrize("avail_len", [0, 2, 254, 256, 65534, 65536, 2 * 2**20])
@pytest.mark.parametrize("count", [0, 1, 15, 16, 200])
def test_joined_peers_frames_are_byte_identical_to_the_wire(avail_len: int, count: int) -> None:
    rng = random.Random(avail_len * 1000 + count)
    ips = ("10.0.0.1", "::1", "fe80::1:2:3:4", "255.255.255.255", "1:2:3:4:5:6:7:8")
    peers = [
        (rng.choice(ips), rng.choice((0, 1, 127, 128, 255, 256, 65535)), key(i), b"\xf0")
        for i in range(count)
    ]
    peers[:3] = [
        (ip, port, k, rng.randbytes(rng.choice((0, 3, 300, 70_000))))
        for ip, port, k, _ in peers[:3]
    ]
    avail = bytes(range(256)) * (avail_len // 256) + bytes(avail_len % 256)
    for interval in (1, 60, 127, 128, 65536, 86400):
        expect = _slow_frame(CID, interval, peers, avail)
        assert _joined_frame(CID, interval, peers, avail, rng.randrange(40)) == expect
    with pytest.raises(ValueError):
        _peers_frame.body_head(CID[:31], 60, 0)


def test_full_answer_reused_for_2s_but_never_lists_a_departed_peer() -> None:
    idx = SwarmIndex(ttl=100)
    n = 8
    for i in range(1, 6):
        idx.announce(CID, key(i), f"10.0.0.{i}", i, "started", bitmap(n, {i}), n, 0, 0.0)
    first, _ = idx.announce(CID, key(9), "10.0.0.9", 9, "started", bitmap(n, set()), n, 2, 0.1)
    assert len(first) == 2
    listed = [p[2] for p in first]
    # A listed peer moves on (new bits): within 2 s the same full answer is
    # reused, so the swarm's churn does not cost a ranking per asker.
    moved = next(i for i in range(1, 6) if key(i) == listed[0])
    idx.announce(
        CID, key(moved), f"10.0.0.{moved}", moved, "progress", bitmap(n, {moved, 7}), n, 0, 0.2
    )
    again, _ = idx.announce(CID, key(9), "10.0.0.9", 9, "periodic", bitmap(n, set()), n, 2, 0.3)
    assert [p[2] for p in again] == listed
    # A listed peer leaves: the next answer does not name it.
    gone = next(i for i in range(1, 6) if key(i) == listed[1])
    idx.announce(CID, key(gone), f"10.0.0.{gone}", gone, "stopped", bitmap(n, {gone}), n, 0, 0.4)
    after, _ = idx.announce(CID, key(9), "10.0.0.9", 9, "periodic", bitmap(n, set()), n, 2, 0.5)
    assert key(gone) not in [p[2] for p in after] and len(after) == 2
    # After 2 s the ranking is rebuilt from the current state.
    later, _ = idx.announce(CID, key(9), "10.0.0.9", 9, "periodic", bitmap(n, set()), n, 2, 2.6)
    assert all(p[2] != key(gone) for p in later)
    bits_of = {p[2]: p[3] for p in later}
    if key(moved) in bits_of:
        assert bits_of[key(moved)] == bitmap(n, {moved, 7})


def test_rankings_made_together_are_not_all_rescored_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rankings live 1.5-2 s, spread, so a burst of them does not come due at once.
    idx = SwarmIndex(ttl=60)
    cids = [bytes([i]) * 32 for i in range(60)]
    for c in cids:
        idx.announce(c, key(1), "10.0.0.1", 1, "started", b"\xff", 8, 0, 0.0)
    for c in cids:
        idx.announce(c, key(2), "10.0.0.2", 2, "started", b"\x00", 8, 5, 0.0)
    ranked = [0]
    real_rank = SwarmIndex._rank

    def counting_rank(self: SwarmIndex, *args: object) -> list[int]:
        ranked[0] += 1
        return real_rank(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SwarmIndex, "_rank", counting_rank)
    due = []
    for t in (1.49, 1.75, 2.0):
        ranked[0] = 0
        for c in cids:
            idx.announce(c, key(2), "10.0.0.2", 2, "periodic", b"\x00", 8, 5, t)
        due.append(ranked[0])
    # none before 1.5 s; by 1.75 s some but not all; every one by 2 s (those
    # rescored at 1.75 s are fresh again).
    assert due[0] == 0
    assert 0 < due[1] < len(cids)
    assert due[1] + due[2] == len(cids)


def test_memory_budget_charges_swarms_and_entries_per_address() -> None:
    from tracker._budget import Budget
    from tracker._peer_table import entry_cost, table_cost

    n = 8 * 1024  # chunks: a 1 KiB bitmap
    per_entry, per_swarm = entry_cost(n // 8), table_cost(n)
    memory = Budget(per_swarm + 20 * per_entry, per_swarm + 10 * per_entry)
    idx = SwarmIndex(memory=memory)
    empty = bytes(n // 8)
    for i in range(10):
        idx.announce(CID, key(i), "10.0.0.1", 1, "started", empty, n, 0, 0)
    with pytest.raises(TrackerError) as info:  # that address has used its share
        idx.announce(CID, key(10), "10.0.0.1", 1, "started", empty, n, 0, 0)
    assert info.value.code == "limit"
    for i in range(10, 20):  # another address has its own
        idx.announce(CID, key(i), "10.0.0.2", 1, "started", empty, n, 0, 0)
    with pytest.raises(TrackerError) as info:  # and now the whole budget is used
        idx.announce(CID2, key(30), "10.0.0.3", 1, "started", empty, n, 0, 0)
    assert info.value.code == "limit"
    assert memory.used == per_swarm + 20 * per_entry
    # Leaving and expiring give it all back.
    idx.announce(CID, key(0), "10.0.0.1", 1, "stopped", empty, n, 0, 1)
    assert memory.used == per_swarm + 19 * per_entry
    idx.expire(1e9)
    assert memory.used == 0 and memory.by_owner == {}


# -- an independent oracle for the answers -----------------------------------
# What an ANNOUNCE's answer must be, computed from the announces alone: a plain
# dict of entries per content, availability counted bit by bit, the ranking
# rule checked as the properties docs/PROTOCOL.md (PEERS) and the index's doc
# state. Nothing here goes through SwarmIndex's rankings, answer cache or
# encoded entries, so the same mistake cannot be made on both sides.

_STALE = 2.0  # PROTOCOL.md: a listed peer's bits may lag its announces by 2 s


class _Entry:
    def __init__(self, ip: str, port: int, bits: int, expiry: float) -> None:
        self.snap = (ip, port, bits)
        self.expiry = expiry
        self.replaced: list[tuple[float, tuple[str, int, int]]] = []  # (when, old snap)


def _canonical(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class _Oracle:
    """The swarms as a list of announces leaves them (lazy expiry included)."""

    def __init__(self, n: int, ttl: float) -> None:
        self.n, self.ttl = n, ttl
        self.full = (1 << n) - 1  # chunk i is bit n-1-i, as in the bitmap bytes
        self.swarms: dict[bytes, dict[bytes, _Entry]] = {}

    def bits_int(self, bits: bytes) -> int:
        return int.from_bytes(bits, "big") >> (8 * len(bits) - self.n)

    def announce(
        self, cid: bytes, k: bytes, ip: str, port: int, event: str, bits: bytes, now: float
    ) -> None:
        swarm = self.swarms.setdefault(cid, {})
        if event == "stopped":
            swarm.pop(k, None)
            if not swarm:
                del self.swarms[cid]
            return
        snap = (_canonical(ip), port, self.bits_int(bits))
        old = swarm.get(k)
        if old is None or old.expiry <= now:  # new, or expired: starts afresh
            swarm[k] = _Entry(*snap, now + self.ttl)
            return
        if old.snap != snap:
            old.replaced.append((now, old.snap))
            old.snap = snap
        old.expiry = now + self.ttl

    def sweep(self, now: float) -> None:
        for cid, swarm in list(self.swarms.items()):
            for k in [k for k, e in swarm.items() if e.expiry <= now]:
                del swarm[k]
            if not swarm:
                del self.swarms[cid]

    def counts(self, cid: bytes) -> list[int]:
        # Entries expired but not yet swept still count (the index's expiry is
        # lazy); PROTOCOL.md: a count saturates at 65 535.
        swarm = self.swarms.get(cid, {})
        return [
            min(65_535, sum(1 for e in swarm.values() if e.snap[2] >> (self.n - 1 - i) & 1))
            for i in range(self.n)
        ]

    def avail(self, cid: bytes) -> bytes:
        return b"".join(c.to_bytes(2, "big") for c in self.counts(cid))

    def live_others(
        self, cid: bytes, asker: bytes, now: float, asker_ip: str = "127.0.0.1"
    ) -> dict[bytes, _Entry]:
        """The live entries an asker from ``asker_ip`` may be handed: not its
        own, and none on loopback unless it is on loopback too."""
        swarm = self.swarms.get(cid, {})
        local = ipaddress.ip_address(_canonical(asker_ip)).is_loopback
        return {
            k: e
            for k, e in swarm.items()
            if k != asker
            and e.expiry > now
            and (local or not ipaddress.ip_address(e.snap[0]).is_loopback)
        }

    def rare(self, cid: bytes) -> int:
        """The rarest chunks: those whose count is in the lowest quarter of the
        range of counts of the chunks somebody has (the index's doc)."""
        counts = self.counts(cid)
        present = [min(c, 255) for c in counts if c]
        if not present:
            return 0
        lo, hi = min(present), max(present)
        top = lo + (hi - lo) // 4
        return sum(1 << (self.n - 1 - i) for i, c in enumerate(counts) if 0 < min(c, 255) <= top)

    def check(
        self,
        cid: bytes,
        asker: bytes,
        asker_bits: bytes,
        want: int,
        now: float,
        listed: list[PeerInfo],
        avail: bytes,
        *,
        settled: bool,
        asker_ip: str,
    ) -> None:
        """Check one answer. ``settled``: nothing changed in the swarm for more than
        2 s, so any ranking it was answered from was made on the present state;
        the ranking rule is then checked too."""
        assert avail == self.avail(cid)  # "avail is always current"
        others = self.live_others(cid, asker, now, asker_ip)
        keys = [p[2] for p in listed]
        assert len(set(keys)) == len(keys) and asker not in keys
        assert len(listed) == min(want, len(others))  # sample >= swarm: all are candidates
        for ip, port, k, bits in listed:
            assert k in others, k  # never a departed or expired peer
            entry = others[k]
            snap = (ip, port, self.bits_int(bits))
            recent = [old for when, old in entry.replaced if when >= now - _STALE]
            if settled:
                assert snap == entry.snap
            else:
                assert snap == entry.snap or snap in recent
        if not settled:
            return
        lacks = self.full & ~self.bits_int(asker_bits)
        mine = self.full & ~lacks
        rare = self.rare(cid)
        bits_of = {k: e.snap[2] for k, e in others.items()}
        omitted = set(others) - set(keys)
        full_answer = len(listed) == want

        def useful(k: bytes) -> bool:  # holds a chunk the asker lacks
            return bool(bits_of[k] & lacks)

        # Peers holding chunks the asker lacks first.
        flags = [useful(k) for k in keys]
        assert flags == sorted(flags, reverse=True), flags
        if any(useful(k) for k in omitted):
            assert all(flags)
        # Holders of the rarest chunks (that the asker lacks) first among them:
        # a peer placed before one holding such a chunk holds a rarest chunk
        # too, and if one holding such a chunk was left out, every listed peer
        # holds a rarest chunk. (Whether the asker lacks those is not required:
        # an asker is answered from the ranking for an empty bitmap when every
        # peer in it is useful to the asker, see "Choosing peers".)
        for i, k in enumerate(keys):
            if bits_of[k] & rare & lacks:
                assert all(bits_of[j] & rare for j in keys[:i]), (i, keys)
        if full_answer and any(bits_of[k] & rare & lacks for k in omitted):
            assert all(bits_of[k] & rare for k in keys)
        # A seeder has everything the asker lacks: only a peer that has all of
        # that too may come before it, or be listed while it is left out.
        if lacks:
            for i, k in enumerate(keys):
                if bits_of[k] == self.full:
                    assert all(bits_of[j] & lacks == lacks for j in keys[:i])
            if full_answer and any(bits_of[k] == self.full for k in omitted):
                assert all(bits_of[k] & lacks == lacks for k in keys)
        # Among peers with nothing for the asker, those that lack something it
        # has come first (they will want to download from it).
        wanting = [bool(mine & ~bits_of[k]) for k in keys if not useful(k)]
        assert wanting == sorted(wanting, reverse=True), wanting
        if full_answer and not all(flags):
            if any(not useful(k) and mine & ~bits_of[k] for k in omitted):
                assert all(wanting)


def _ask(
    idx: SwarmIndex,
    frame_api: bool,
    cid: bytes,
    k: bytes,
    ip: str,
    port: int,
    event: str,
    bits: bytes,
    n: int,
    want: int,
    now: float,
) -> tuple[list[PeerInfo], bytes]:
    """One announce through either API, the answer decoded by the wire codec."""
    if not frame_api:
        return idx.announce(cid, k, ip, port, event, bits, n, want, now)
    frame = idx.announce_frame(cid, k, ip, port, event, bits, n, want, now, 30)
    if frame is None:
        return [], b""
    body = frame[5:]
    assert frame[:5] == FRAME_HEADER.pack(FrameType.PEERS, len(body))
    answer = decode_body(FrameType.PEERS, body)
    assert isinstance(answer, Peers) and answer.content_id == cid and answer.interval == 30
    return [(p.ip, p.port, p.key, p.bits) for p in answer.peers], answer.availability


def run_oracle_workload(seed: int, rounds: int = 12, steps: int = 150) -> int:
    """A random workload checked against ``_Oracle``; returns the settled answers checked."""
    rng = random.Random(seed)
    n, ttl = 21, 6.0
    idx = SwarmIndex(ttl=ttl)  # sample 300 > 60 peers: every peer is a candidate
    oracle = _Oracle(n, ttl)
    palette = [bitmap(n, set()), bitmap(n, set(range(n)))]
    palette += [bitmap(n, {i for i in range(n) if rng.random() < 0.5}) for _ in range(3)]
    palette += [bitmap(n, {i for i in range(n) if rng.random() < 0.1}) for _ in range(3)]
    addrs = [("10.0.0.1", 7000), ("::1", 7001), ("192.168.7.9", 7000), ("::ffff:10.9.8.7", 7002)]
    current: dict[tuple[bytes, bytes], tuple[str, int, bytes]] = {}
    now = 0.0
    settled_checked = 0
    for _ in range(rounds):
        # Churn: joins, leaves, new bitmaps and addresses, expiry, sweeps.
        for step in range(steps):
            now += rng.random() * 0.05
            cid, k = rng.choice((CID, CID2)), key(rng.randrange(30))
            ip, port, bits = current.get((cid, k), (*rng.choice(addrs), rng.choice(palette)))
            roll = rng.random()
            event = "periodic"
            if roll < 0.04:
                event = "stopped"
            elif roll < 0.10:
                ip, port = rng.choice(addrs)
            elif roll < 0.35:
                event, bits = "progress", rng.choice(palette)
            elif roll < 0.38:
                event, bits = "completed", palette[1]
            want = rng.choice((0, 1, 3, 8, 50))
            for _ in range(rng.choice((1, 2, 3))):  # repeats are answered from the cache
                peers, avail = _ask(
                    idx, rng.random() < 0.5, cid, k, ip, port, event, bits, n, want, now
                )
                oracle.announce(cid, k, ip, port, event, bits, now)
                if event == "stopped":
                    assert peers == [] and avail == b""
                    current.pop((cid, k), None)
                    break
                current[(cid, k)] = (ip, port, bits)
                oracle.check(cid, k, bits, want, now, peers, avail, settled=False, asker_ip=ip)
                event = "periodic"
            if step % 50 == 49:
                idx.expire(now)
                oracle.sweep(now)
        # Settled: more than 2 s after the last change, live peers ask again
        # with what they announced before (which changes nothing).
        now += _STALE + 0.05
        live = [
            (cid, k)
            for cid, swarm in oracle.swarms.items()
            for k, e in swarm.items()
            if e.expiry > now
        ]
        for cid, k in rng.sample(live, min(len(live), 25)):
            ip, port, bits = current[(cid, k)]
            want = rng.choice((1, 2, 3, 5, 8, 50))
            for _ in range(3):
                peers, avail = _ask(
                    idx, rng.random() < 0.5, cid, k, ip, port, "periodic", bits, n, want, now
                )
                oracle.announce(cid, k, ip, port, "periodic", bits, now)
                oracle.check(cid, k, bits, want, now, peers, avail, settled=True, asker_ip=ip)
                settled_checked += 1
    return settled_checked


@pytest.mark.parametrize(("seed", "budget"), [(1, "default"), (2, "default"), (3, "tiny")])
def test_answers_match_an_independent_oracle(
    seed: int, budget: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if budget == "tiny":  # caches evicted all the time
        monkeypatch.setattr(index_module, "_ANSWER_BYTES", 2000)
        monkeypatch.setattr(index_module, "_HEAD_MEMO", 4)
        monkeypatch.setattr(index_module, "_ANSWER_ENTRIES", 3)
    assert run_oracle_workload(seed) > 500
