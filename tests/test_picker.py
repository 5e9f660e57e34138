"""The chunk picker: rarest first, refusals, tail rescue, endgame, timeouts, invariants."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.engine.picker import (
    MAX_DEPTH,
    STREAM_INFLIGHT_BYTES,
    PiecePicker,
    stream_depth,
    swarm_counts,
)
from peerd.wire import bits_from_flags, flags_from_bits


@given(st.lists(st.integers(0, 1), max_size=300))
def test_flags_bits_round_trip(flags: list[int]) -> None:
    f = bytearray(flags)
    bits = bits_from_flags(f)
    assert len(bits) == (len(f) + 7) // 8
    assert flags_from_bits(bits, len(f)) == f


def test_bit_order_is_msb_first() -> None:
    assert bits_from_flags(bytearray([1, 0, 0, 0, 0, 0, 0, 0, 1])) == b"\x80\x80"


def test_rarest_chunk_first() -> None:
    p = PiecePicker(4, rng=random.Random(1))
    p.add_peer("a", bytearray([1, 1, 1, 1]))
    p.add_peer("b", bytearray([1, 1, 0, 1]))
    p.add_peer("c", bytearray([1, 0, 0, 1]))
    # chunk 2 is held by one peer only, chunk 1 by two
    assert p.pick("a", 2, now=0, timeout=10) == [2, 1]


def test_rarest_first_also_for_a_peer_holding_few_chunks() -> None:
    # A peer with few chunks is served by walking its own flags, not the
    # buckets: same answer (rarest first, random among equals, refusals kept).
    n = 64
    p = PiecePicker(n, rng=random.Random(3))
    p.add_peer("all", bytearray([1] * n))
    p.add_peer("half", bytearray([1] * 32 + [0] * 32))
    few = bytearray(n)
    for i in (5, 40, 41, 42):
        few[i] = 1
    p.add_peer("few", few)
    # 40-42 are held by two peers, 5 by three: the rarer ones first.
    p.refuse("few", 41, until=10.0)
    got = p.pick("few", 2, now=0, timeout=10)
    assert sorted(got) == [40, 42]
    assert p.pick("few", 2, now=1, timeout=10) == [5]  # 41 refused until 10
    assert p.pick("few", 2, now=10, timeout=10) == [41]
    seen = {p2.pick("few", 1, now=0, timeout=10)[0] for p2 in _pickers(few, 12)}
    assert seen == {40, 41, 42}  # random among equals


def _pickers(few: bytearray, k: int) -> list[PiecePicker]:
    out = []
    for seed in range(k):
        q = PiecePicker(len(few), rng=random.Random(seed))
        q.add_peer("all", bytearray([1] * len(few)))
        q.add_peer("half", bytearray([1] * 32 + [0] * 32))
        q.add_peer("few", few)
        out.append(q)
    return out


def test_never_picks_what_peer_lacks_or_we_have() -> None:
    p = PiecePicker(3, bytearray([1, 0, 0]), rng=random.Random(2))
    p.add_peer("a", bytearray([1, 1, 0]))
    assert p.pick("a", 5, now=0, timeout=10) == [1]
    assert p.pick("a", 5, now=0, timeout=10) == []  # 1 is in flight, a has nothing else


def test_endgame_duplicates_and_reports_losers() -> None:
    p = PiecePicker(1, rng=random.Random(3))
    p.add_peer("a", bytearray([1]))
    p.add_peer("b", bytearray([1]))
    assert p.pick("a", 1, now=0, timeout=10) == [0]
    assert p.endgame
    assert p.pick("b", 1, now=0, timeout=10) == [0]  # duplicate request
    assert p.chunk_received("b", 0) == ["a"]
    assert p.complete


def test_timeout_returns_chunk_to_pool() -> None:
    p = PiecePicker(2, rng=random.Random(4))
    p.add_peer("slow", bytearray([1, 1]))
    p.add_peer("fast", bytearray([1, 1]))
    assert sorted(p.pick("slow", 2, now=0, timeout=5)) == [0, 1]
    assert p.expired(4.9) == []
    expired = p.expired(5.0)
    assert sorted(i for _, i in expired) == [0, 1]
    for peer, i in expired:
        p.cancel(peer, i)
    assert sorted(p.pick("fast", 2, now=5, timeout=5)) == [0, 1]


def test_peer_leaving_releases_its_requests() -> None:
    p = PiecePicker(3, rng=random.Random(5))
    p.add_peer("a", bytearray([1, 1, 1]))
    p.add_peer("b", bytearray([1, 1, 1]))
    got = p.pick("a", 3, now=0, timeout=10)
    assert sorted(got) == [0, 1, 2]
    assert sorted(p.remove_peer("a")) == [0, 1, 2]
    assert sorted(p.pick("b", 3, now=0, timeout=10)) == [0, 1, 2]


def test_have_updates_availability() -> None:
    p = PiecePicker(2, rng=random.Random(6))
    p.add_peer("a", bytearray([0, 0]))
    assert p.pick("a", 2, now=0, timeout=10) == []
    p.peer_has("a", 1)
    assert p.pick("a", 2, now=0, timeout=10) == [1]


@given(st.integers(1, 64), st.integers(0, 2**32), st.integers(1, 5))
def test_every_chunk_is_eventually_delivered(n: int, seed: int, npeers: int) -> None:
    rng = random.Random(seed)
    p = PiecePicker(n, rng=rng)
    peers = [f"p{k}" for k in range(npeers)]
    holders = {peer: bytearray(rng.randint(0, 1) for _ in range(n)) for peer in peers}
    holders[peers[0]] = bytearray(b"\x01" * n)  # one seeder: everything is available
    for peer, flags in holders.items():
        p.add_peer(peer, flags)
    steps = 0
    while not p.complete:
        steps += 1
        assert steps < 10 * n + 10
        for peer in peers:
            for i in p.pick(peer, 3, now=0, timeout=10):
                assert holders[peer][i]
                assert not p.have[i]
                p.chunk_received(peer, i)
    assert p.missing == 0


def test_refused_chunk_is_not_asked_of_that_peer_again_until_its_time() -> None:
    p = PiecePicker(2, rng=random.Random(7))
    p.add_peer("seed", bytearray([1, 1]))
    p.add_peer("other", bytearray([1, 0]))
    first = p.pick("seed", 1, now=0, timeout=10)
    p.refuse("seed", first[0], until=5.0)
    assert not p.is_requested("seed", first[0])
    # The seed is asked for the other chunk; the refused one stays open for others.
    assert p.pick("seed", 2, now=1, timeout=10) == [1 - first[0]]
    if first[0] == 0:
        assert p.pick("other", 1, now=1, timeout=10) == [0]
    else:
        assert p.pick("seed", 1, now=5, timeout=10) == [1]  # its time has come


def test_a_refusal_also_holds_in_endgame_and_in_the_tail_rescue() -> None:
    # Endgame: chunk 0 is in flight at a; b refused it, so b gets no copy.
    p = PiecePicker(1, rng=random.Random(1))
    p.add_peer("a", bytearray([1]))
    p.add_peer("b", bytearray([1]))
    assert p.pick("b", 1, now=0, timeout=10) == [0]
    p.refuse("b", 0, until=5.0)
    assert p.pick("a", 1, now=0, timeout=10) == [0]
    assert p.endgame
    assert p.pick("b", 1, now=4.9, timeout=10) == []
    assert p.pick("b", 1, now=5.0, timeout=10) == [0]  # the back-off is over
    # Tail rescue: fast refused chunk 0, so it may not rescue it from slow.
    q = _tail_picker(2.0)
    q.set_rate("slow", 10_000)
    q.set_rate("fast", 1_000_000)
    q.refuse("fast", 0, until=5.0)
    assert q.pick("fast", 2, now=1, timeout=10) == []
    assert q.pick("fast", 2, now=5, timeout=10) == [0]


def test_refusals_are_forgotten_once_the_chunk_is_stored_or_the_back_off_is_over() -> None:
    # What a long download's refusals leave behind stays bounded by the
    # chunks still missing: each busy REJECT must not cost memory for good.
    p = PiecePicker(64, rng=random.Random(3))
    p.add_peer("x", bytearray([1] * 64))
    p.add_peer("y", bytearray([1] * 64))
    refused = p._peers["x"].refused
    for t in range(40):
        (got,) = p.pick("x", 1, now=float(t), timeout=10)
        p.refuse("x", got, until=t + 5.0)
        assert got in refused
        assert p.chunk_received("y", got) == []  # stored: refusal moot
        assert got not in refused
    assert not refused
    a, b = [i for i in range(64) if not p.have[i]][:2]
    p.refuse("x", a, until=50.0)  # not in flight at x: still noted
    assert a not in p.pick("x", 64, now=49.0, timeout=10)
    assert refused == {a: 50.0}
    p.cancel("x", b)
    assert sorted(p.pick("x", 2, now=50.0, timeout=10)) == [a, b]  # over: forgotten
    assert not refused


def test_peer_lacks_follows_bitfield_and_have() -> None:
    p = PiecePicker(3)
    p.add_peer("a", bytearray([1, 0, 0]))
    assert not p.peer_lacks("a", 0)
    assert p.peer_lacks("a", 1)
    p.peer_has("a", 1)
    assert not p.peer_lacks("a", 1)
    assert p.peer_lacks("unknown", 0)
    p.add_peer("b", bytearray([0, 1, 0]))
    assert p.lacking(["a", "b", "unknown"], 0) == ["b", "unknown"]  # in the given order
    assert p.lacking(["b", "a"], 1) == []
    assert p.lacking(["b", "a"], 2) == ["b", "a"]
    assert p.holding(["b", "a", "unknown"], 1) == ["b", "a"]
    assert p.holding(["a", "b"], 0) == ["a"]
    assert p.holding(["a", "b", "unknown"], 2) == []


def test_expired_returns_each_request_once_its_deadline_passed() -> None:
    p = PiecePicker(3, rng=random.Random(9))
    p.add_peer("a", bytearray([1, 1, 1]))
    p.pick("a", 1, now=0, timeout=5)
    p.pick("a", 1, now=3, timeout=5)
    assert p.expired(4.0) == []
    (first,) = p.expired(5.0)
    p.cancel(*first)
    assert p.expired(6.0) == []
    assert len(p.expired(8.0)) == 1


def test_expired_renews_a_request_only_its_peer_can_serve() -> None:
    p = PiecePicker(2, rng=random.Random(9))
    p.add_peer("seeder", bytearray([1, 1]))
    p.add_peer("b", bytearray([0, 1]))
    assert sorted(p.pick("seeder", 2, now=0, timeout=5)) == [0, 1]
    # Chunk 1 can come from b too: it expires. Chunk 0 has no other holder:
    # renewed for another 5 s instead of being cancelled and asked again.
    assert p.expired(5.0, renew=5.0) == [("seeder", 1)]
    assert p.is_requested("seeder", 0)
    assert p.expired(9.9, renew=5.0) == [("seeder", 1)]
    p.peer_has("b", 0)  # now someone else has it: it times out as usual
    assert sorted(p.expired(10.0, renew=5.0)) == [("seeder", 0), ("seeder", 1)]
    # Without renew every late request is returned.
    q = PiecePicker(1, rng=random.Random(9))
    q.add_peer("seeder", bytearray([1]))
    q.pick("seeder", 1, now=0, timeout=5)
    assert q.expired(5.0) == [("seeder", 0)]


def test_endgame_duplicates_chunk_stuck_at_slow_holder_first() -> None:
    p = PiecePicker(2, rng=random.Random(5))
    for name in ("slow", "fast", "helper"):
        p.add_peer(name, bytearray([1, 1]))
    assert len(p.pick("slow", 1, now=0, timeout=10)) == 1
    # Whatever slow got, fast takes the other one: everything is in flight.
    slow_chunk = next(i for i in (0, 1) if p.is_requested("slow", i))
    fast_chunk = 1 - slow_chunk
    assert p.pick("fast", 1, now=0, timeout=10) == [fast_chunk]
    assert p.endgame
    p.set_rate("slow", 10_000)
    p.set_rate("fast", 1_000_000)
    p.set_rate("helper", 1_000_000)
    assert p.pick("helper", 1, now=0, timeout=10) == [slow_chunk]


def test_fast_peer_adds_copy_beyond_endgame_limit_only_with_rates() -> None:
    p = PiecePicker(1, rng=random.Random(6))
    for name in ("s1", "s2", "fast"):
        p.add_peer(name, bytearray([1]))
    assert p.pick("s1", 1, now=0, timeout=10) == [0]
    assert p.pick("s2", 1, now=0, timeout=10) == [0]
    assert p.pick("fast", 1, now=0, timeout=10) == []  # two copies already
    p.set_rate("s1", 10_000)
    p.set_rate("s2", 10_000)
    p.set_rate("fast", 1_000_000)
    assert p.pick("fast", 1, now=0, timeout=10) == [0]
    assert sorted(p.chunk_received("fast", 0)) == ["s1", "s2"]


def _tail_picker(rescue_factor: float) -> PiecePicker:
    # Chunk 4 is held by nobody, so this is not endgame; chunks 0-3 are in
    # flight at a slow peer, and the fast peer holds chunk 0 only.
    p = PiecePicker(5, rng=random.Random(7), rescue_factor=rescue_factor)
    p.add_peer("slow", bytearray([1, 1, 1, 1, 0]))
    assert sorted(p.pick("slow", 4, now=0, timeout=10)) == [0, 1, 2, 3]
    p.add_peer("fast", bytearray([1, 0, 0, 0, 0]))
    assert not p.endgame
    return p


def test_tail_rescue_from_slow_peer_before_endgame() -> None:
    p = _tail_picker(2.0)
    assert p.pick("fast", 2, now=1, timeout=10) == []  # rates unknown: no guessing
    p.set_rate("slow", 10_000)
    p.set_rate("fast", 1_000_000)
    assert p.pick("fast", 2, now=1, timeout=10) == [0]
    assert p.chunk_received("fast", 0) == ["slow"]


def test_tail_rescue_needs_a_clear_speed_difference() -> None:
    p = PiecePicker(2, rng=random.Random(8))
    p.add_peer("a", bytearray([1, 0]))
    p.add_peer("b", bytearray([1, 0]))
    assert p.pick("a", 1, now=0, timeout=10) == [0]  # chunk 1: nobody has it yet
    p.set_rate("a", 1_000_000)
    p.set_rate("b", 1_000_000)
    assert p.pick("b", 1, now=1, timeout=10) == []  # a owes one chunk at the same speed
    p.set_rate("a", 400_000)
    assert p.pick("b", 1, now=1, timeout=10) == [0]  # 1 / 0.4 > 2 * 1 / 1


def test_tail_rescue_off() -> None:
    p = _tail_picker(0.0)
    p.set_rate("slow", 10_000)
    p.set_rate("fast", 1_000_000)
    assert p.pick("fast", 1, now=1, timeout=10) == []


def test_picker_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PiecePicker(3, rescue_factor=-1)
    with pytest.raises(ValueError):
        PiecePicker(3, endgame_copies=0)


def test_pipeline_depth_covers_a_quarter_second_plus_one() -> None:
    from peerd.engine.picker import MAX_DEPTH, pipeline_depth

    chunk = 256 * 1024
    assert pipeline_depth(0.0, chunk) == 1  # nothing measured yet: one request
    assert pipeline_depth(50_000.0, chunk) == 2
    assert pipeline_depth(4 * chunk * 4, chunk) == 5  # 4 chunks per quarter second
    assert pipeline_depth(1e12, chunk) == MAX_DEPTH


@given(st.binary(max_size=64))
def test_swarm_counts_reads_two_byte_big_endian_counts(avail: bytes) -> None:
    expected = [int.from_bytes(avail[k : k + 2], "big") for k in range(0, len(avail), 2)]
    assert list(swarm_counts(avail)) == expected


def test_swarm_availability_breaks_ties_before_peers_connect_and_follows_changes() -> None:
    picker = PiecePicker(16, rng=random.Random(1))
    picker.add_peer("seed", bytearray([1] * 16))
    counts = [9] * 16
    for rare in (11, 5, 13):
        counts[rare] = 1
        picker.set_swarm_availability(swarm_counts(b"".join(c.to_bytes(2, "big") for c in counts)))
        picker.set_swarm_availability(counts)  # the same counts again: no change
        assert picker.pick("seed", 1, 0.0, 10.0) == [rare]  # fewest holders swarm-wide
        counts[rare] = 9


# --- invariants under any sequence of events ----------------------------------
_N = 6
_PEERS = ("a", "b", "c")

_event = st.one_of(
    st.tuples(
        st.just("add"), st.sampled_from(_PEERS), st.lists(st.booleans(), min_size=_N, max_size=_N)
    ),
    st.tuples(st.just("have"), st.sampled_from(_PEERS), st.integers(0, _N - 1)),
    st.tuples(st.just("pick"), st.sampled_from(_PEERS), st.integers(1, 4)),
    st.tuples(st.just("refuse"), st.sampled_from(_PEERS), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.sampled_from(_PEERS), st.integers(0, _N - 1)),
    st.tuples(st.just("receive"), st.sampled_from(_PEERS), st.integers(0, _N - 1)),
    st.tuples(st.just("rate"), st.sampled_from(_PEERS), st.sampled_from([0, 1_000, 1_000_000])),
    st.tuples(st.just("leave"), st.sampled_from(_PEERS), st.just(0)),
    st.tuples(st.just("tick"), st.just(""), st.integers(1, 4)),
)


@given(
    st.lists(_event, max_size=80),
    st.integers(0, 2**16),
    st.lists(st.booleans(), min_size=_N, max_size=_N),
)
def test_pick_never_returns_what_it_must_not(
    events: list[tuple[str, str, object]], seed: int, have: list[bool]
) -> None:
    """Whatever happens: a pick is only of chunks the peer holds, we lack, it
    has not refused within its back-off and is not already fetching; no chunk
    has more than one copy beyond endgame_copies in flight; and the picker's
    own books (open chunks, useful counts, availability) add up."""
    p = PiecePicker(_N, bytearray(have), rng=random.Random(seed))
    held: dict[str, bytearray] = {}
    refused: dict[tuple[str, int], float] = {}
    now = 0.0
    for kind, peer, arg in events:
        if kind == "add":
            assert isinstance(arg, list)
            held[peer] = bytearray(arg)
            p.add_peer(peer, held[peer])
            refused = {k: v for k, v in refused.items() if k[0] != peer}
        elif kind == "have" and peer in held:
            assert isinstance(arg, int)
            held[peer][arg] = 1
            p.peer_has(peer, arg)
        elif kind == "pick":
            assert isinstance(arg, int)
            before = {i for i in range(_N) if p.is_requested(peer, i)}
            got = p.pick(peer, arg, now, timeout=3.0)
            assert len(got) <= arg and len(set(got)) == len(got)
            for i in got:
                assert peer in held and held[peer][i], "the peer lacks it"
                assert not p.have[i], "we hold it"
                assert refused.get((peer, i), now) <= now, "refused until later"
                assert i not in before, "already asked of it"
                assert p.is_requested(peer, i)
        elif kind == "refuse":
            assert isinstance(arg, int)
            mine = [i for i in range(_N) if p.is_requested(peer, i)]
            if mine:
                i = mine[0]
                p.refuse(peer, i, now + arg)
                refused[(peer, i)] = now + arg
                assert not p.is_requested(peer, i)
        elif kind == "cancel":
            assert isinstance(arg, int)
            p.cancel(peer, arg)
            assert not p.is_requested(peer, arg)
        elif kind == "receive":
            assert isinstance(arg, int)
            if p.is_requested(peer, arg):
                others = p.chunk_received(peer, arg)
                assert peer not in others and p.have[arg]
        elif kind == "rate":
            assert isinstance(arg, int)
            p.set_rate(peer, arg)
        elif kind == "leave":
            released = p.remove_peer(peer)
            assert all(not p.is_requested(peer, i) for i in released)
            held.pop(peer, None)
            refused = {k: v for k, v in refused.items() if k[0] != peer}
        elif kind == "tick":
            assert isinstance(arg, int)
            now += arg
            for q, i in p.expired(now):
                p.cancel(q, i)
        _check_books(p, held)


def _check_books(p: PiecePicker, held: dict[str, bytearray]) -> None:
    inflight = {i: [q for q in held if p.is_requested(q, i)] for i in range(_N)}
    open_chunks = {i for i in range(_N) if not p.have[i] and not inflight[i]}
    assert sorted(i for b in p._buckets.values() for i in b) == sorted(open_chunks)
    assert p.missing == p.have.count(0)
    assert p.endgame == (not open_chunks and p.missing > 0)
    for i in range(_N):
        assert p.avail[i] == sum(f[i] for f in held.values())
        assert len(inflight[i]) <= p.endgame_copies + 1
        assert not (p.have[i] and inflight[i])
    for q, f in held.items():
        assert p._peers[q].useful == sum(1 for i in open_chunks if f[i])


def test_a_peer_that_owes_part_of_the_read_ahead_window_is_asked_for_nothing_else() -> None:
    # Its uploader serves fresh chunks first, not in our order: a far chunk
    # asked beside the window would go out first and the reader would wait.
    n = 64
    p = PiecePicker(n, rng=random.Random(5))
    p.add_peer("a", bytearray([1] * n))
    p.add_peer("few", bytearray([0] * 32 + [1] * 32))  # none of the window
    p.priority = range(0, 4)
    assert p.pick("a", 10, now=0, timeout=10) == [0, 1, 2, 3]  # the window only
    assert p.pick("a", 10, now=0, timeout=10) == []  # still owes it: nothing else
    # A peer that holds none of the window is asked rarest first, as ever.
    assert len(p.pick("few", 3, now=0, timeout=10)) == 3
    for i in (0, 1, 2):  # its window chunks come in: it owes 3 still
        p.chunk_received("a", i)
    assert p.pick("a", 10, now=0, timeout=10) == []
    p.chunk_received("a", 3)  # owes nothing of the window: anything again
    got = p.pick("a", 5, now=0, timeout=10)
    assert len(got) == 5 and all(i >= 4 for i in got)


def test_a_peer_owes_at_most_priority_depth_window_chunks_at_a_time() -> None:
    # The reader's next chunk waits behind what the peer's uploader has
    # queued (fresh first, not in our order): while a window is set, one peer
    # is asked for at most priority_depth chunks at a time.
    n = 64
    p = PiecePicker(n, rng=random.Random(7))
    p.add_peer("a", bytearray([1] * n))
    p.add_peer("b", bytearray([1] * n))
    p.priority = range(0, 20)
    p.priority_depth = 3
    assert p.pick("a", 10, now=0, timeout=10) == [0, 1, 2]
    assert p.pick("a", 10, now=0, timeout=10) == []  # owes 3 already
    assert p.pick("b", 10, now=0, timeout=10) == [3, 4, 5]  # the next ones, from b
    p.chunk_received("a", 0)
    assert p.pick("a", 10, now=0, timeout=10) == [6]  # one place freed: one more
    # A peer that holds none of the window is not held to the cap: rarest
    # first, as many as the caller asks.
    p.add_peer("far", bytearray([0] * 32 + [1] * 32))
    assert len(p.pick("far", 10, now=0, timeout=10)) == 10
    p.priority = range(0)  # no window: the depth the caller asks for
    assert len(p.pick("a", 10, now=0, timeout=10)) == 10


def test_stream_depth_is_bytes_in_chunks_within_bounds() -> None:
    assert stream_depth(1 << 20) == STREAM_INFLIGHT_BYTES >> 20
    assert stream_depth(64 << 20) == 2  # at least two: one arriving, one queued
    assert stream_depth(16 << 10) == MAX_DEPTH
