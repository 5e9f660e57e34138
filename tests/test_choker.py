"""The pure upload-slot policy: fair share, fresh-first, tit-for-tat slots."""

from __future__ import annotations

import random

import pytest

from peerd.engine.upload_queue import Choker, neediest


def _drain(ch: Choker, now: float = 0.0) -> list[tuple[object, int]]:
    out = []
    while (nxt := ch.next_request(now)) is not None:
        peer, req = nxt
        out.append((peer, req[0]))
    return out


def test_fair_share_is_round_robin_across_peers() -> None:
    ch = Choker(fresh_first=False)
    for p in "ab":
        ch.add_peer(p)
    for i in range(3):
        assert ch.on_request("a", (i, 0, 10))
    assert ch.on_request("b", (10, 0, 10))
    assert ch.on_request("b", (11, 0, 10))
    assert _drain(ch) == [("a", 0), ("b", 10), ("a", 1), ("b", 11), ("a", 2)]


def test_fresh_first_prefers_the_chunk_uploaded_least() -> None:
    ch = Choker()
    for p in "abc":
        ch.add_peer(p)
    ch.on_request("a", (5, 0, 10))
    ch.on_request("b", (5, 0, 10))  # same chunk: two leechers picked it
    ch.on_request("c", (7, 0, 10))
    first = ch.next_request(0.0)
    assert first == ("a", (5, 0, 10))
    # Chunk 5 went out once; c's fresh chunk 7 jumps ahead of b's duplicate.
    assert ch.next_request(0.0) == ("c", (7, 0, 10))
    assert ch.next_request(0.0) == ("b", (5, 0, 10))
    assert ch.times_sent(5) == 2 and ch.times_sent(7) == 1
    assert ch.next_request(0.0) is None


def test_queue_limit_cancel_and_remove() -> None:
    ch = Choker(max_queued=2)
    ch.add_peer("a")
    assert ch.on_request("a", (1, 0, 10))
    assert ch.on_request("a", (2, 0, 10))
    assert not ch.on_request("a", (3, 0, 10))  # full: the caller rejects "busy"
    assert ch.queued("a") == 2
    assert ch.on_cancel("a", (1, 0, 10))
    assert not ch.on_cancel("a", (1, 0, 10))
    assert not ch.on_cancel("zz", (1, 0, 10))
    assert ch.remove_peer("a") == [(2, 0, 10)]
    assert ch.queued("a") == 0
    assert ch.next_request(0.0) is None
    with pytest.raises(KeyError):
        ch.on_request("a", (1, 0, 10))


def test_cancelling_the_last_request_takes_the_peer_out_of_turn() -> None:
    ch = Choker(fresh_first=False)
    ch.add_peer("a")
    ch.add_peer("b")
    ch.on_request("a", (1, 0, 10))
    ch.on_request("b", (2, 0, 10))
    ch.on_cancel("a", (1, 0, 10))
    assert _drain(ch) == [("b", 2)]


def test_slots_serve_reciprocating_peers_and_one_optimistic() -> None:
    ch = Choker(slots=2, rng=random.Random(3), fresh_first=False)
    for p in "abc":
        ch.add_peer(p)
        for i in range(4):
            ch.on_request(p, (i, 0, 10))
    ch.update(0.0, {"a": 1000.0, "b": 10.0, "c": 0.0})
    assert ch.is_unchoked("a")
    unchoked = [p for p in "abc" if ch.is_unchoked(p)]
    assert len(unchoked) == 2  # one regular (best rate) + one optimistic
    (choked,) = (p for p in "abc" if p not in unchoked)
    order = [p for p, _ in _drain(ch, 1.0)]
    assert set(order[:8]) == set(unchoked)
    # Work conserving: once the unchoked peers have nothing queued, the
    # choked peer is served rather than leaving the link idle.
    assert order[8:] == [choked] * 4


def test_optimistic_slot_rotates() -> None:
    ch = Choker(slots=2, rechoke_every=1.0, optimistic_every=5.0, rng=random.Random(0))
    peers = [f"p{i}" for i in range(8)]
    for p in peers:
        ch.add_peer(p)
        ch.on_request(p, (0, 0, 10))
    seen = set()
    for t in range(0, 200, 5):
        ch.update(float(t), {"p0": 100.0})
        assert ch.is_unchoked("p0")
        seen |= {p for p in peers[1:] if ch.is_unchoked(p)}
    assert len(seen) > 1


def test_fair_share_unchokes_everyone() -> None:
    ch = Choker()
    ch.add_peer("a")
    ch.update(0.0, {"a": 5.0})
    assert ch.is_unchoked("a")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slots": 1},
        {"slots": -1},
        {"max_queued": 0},
        {"rechoke_every": 0},
        {"optimistic_every": -1},
        {"super_seed": -1},
        {"max_backlog": -1},
        {"max_wait": -0.5},
    ],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Choker(**kwargs)  # type: ignore[arg-type]


def test_super_seed_serves_every_chunk_once_before_any_twice() -> None:
    ch = Choker(super_seed=3)
    for p in "abc":
        ch.add_peer(p)
    assert ch.on_request("a", (0, 0, 10))
    assert not ch.on_request("b", (0, 0, 10))  # queued for a: b gets it elsewhere
    assert ch.on_request("b", (1, 0, 10))
    assert ch.next_request(0.0) == ("a", (0, 0, 10))
    assert not ch.on_request("c", (0, 0, 10))  # sent once already, chunk 2 never
    assert ch.super_seeding
    assert ch.on_request("a", (2, 0, 10))  # every chunk sent or queued now
    assert not ch.super_seeding
    assert ch.on_request("c", (0, 0, 10))
    # A fresh chunk that is cancelled before it is sent is fresh again.
    assert ch.on_cancel("a", (2, 0, 10))
    assert ch.super_seeding


def test_super_seed_refuses_a_peer_once_per_chunk() -> None:
    # The copy went to a peer that left: the asker has nobody else for it.
    ch = Choker(super_seed=4)
    for p in "ab":
        ch.add_peer(p)
    assert ch.on_request("a", (0, 0, 10))
    assert ch.next_request(0.0) == ("a", (0, 0, 10))
    ch.remove_peer("a")
    assert not ch.on_request("b", (0, 0, 10))
    assert ch.super_seeding
    assert ch.on_request("b", (0, 0, 10))  # asked again after its back-off: served
    assert ch.next_request_for("b") == (0, 0, 10)
    assert ch.times_sent(0) == 2


def test_next_request_for_takes_the_freshest_of_that_peer() -> None:
    ch = Choker()
    for p in "ab":
        ch.add_peer(p)
    ch.on_request("a", (5, 0, 10))
    assert ch.next_request_for("a") == (5, 0, 10)
    ch.on_request("a", (5, 0, 10))
    ch.on_request("a", (6, 0, 10))
    ch.on_request("b", (7, 0, 10))
    assert ch.next_request_for("a") == (6, 0, 10)  # never sent beats sent once
    assert ch.next_request_for("a") == (5, 0, 10)
    assert ch.next_request_for("a") is None
    assert ch.queued("b") == 1 and ch.next_request(0.0) == ("b", (7, 0, 10))


def test_backlog_bounds_requests_across_peers() -> None:
    ch = Choker(max_backlog=2)
    for p in "abc":
        ch.add_peer(p)
    assert ch.on_request("a", (0, 0, 10))
    assert ch.on_request("b", (1, 0, 10))
    assert not ch.on_request("c", (2, 0, 10))
    ch.next_request(0.0)
    assert ch.on_request("c", (2, 0, 10))
    assert ch.remove_peer("b") == [(1, 0, 10)]
    assert ch.on_request("a", (3, 0, 10))


def test_overdue_takes_requests_that_waited_max_wait_off_the_queue() -> None:
    ch = Choker(max_wait=4.0)
    for p in "ab":
        ch.add_peer(p)
    assert ch.on_request("a", (0, 0, 10))
    assert ch.on_request("b", (1, 0, 10))
    assert ch.overdue(0.0) == []  # first seen now
    assert ch.on_request("a", (2, 0, 10))
    assert ch.overdue(2.0) == []  # (2, ...) first seen at 2.0
    assert ch.next_request(2.0) == ("a", (0, 0, 10))  # served in time: forgotten
    assert ch.overdue(4.0) == [("b", (1, 0, 10))]
    assert ch.queued("b") == 0 and ch.queued("a") == 1
    assert ch.overdue(5.9) == []
    assert ch.overdue(6.0) == [("a", (2, 0, 10))]
    assert ch.next_request(6.0) is None
    # A re-sent request waits afresh; without max_wait nothing is ever overdue.
    assert ch.on_request("b", (1, 0, 10))
    assert ch.overdue(7.0) == []
    plain = Choker()
    plain.add_peer("a")
    plain.on_request("a", (0, 0, 10))
    assert plain.overdue(0.0) == plain.overdue(100.0) == []


def test_overdue_counts_each_stay_in_the_queue_and_returns_the_oldest_first() -> None:
    ch = Choker(max_wait=4.0)
    for p in "abc":
        ch.add_peer(p)
    assert ch.on_request("c", (5, 0, 10))
    assert ch.overdue(0.0) == []
    assert ch.on_request("a", (1, 0, 10))
    assert ch.on_request("b", (2, 0, 10))
    assert ch.overdue(1.0) == []
    # Served, then asked again before the next call: it waits afresh.
    assert ch.on_cancel("a", (1, 0, 10))
    assert ch.on_request("a", (1, 0, 10))
    assert ch.overdue(2.0) == []
    assert ch.overdue(5.0) == [("c", (5, 0, 10)), ("b", (2, 0, 10))]
    assert ch.overdue(5.5) == []
    assert ch.overdue(6.0) == [("a", (1, 0, 10))]
    assert ch.remove_peer("a") == []  # nothing left queued
    assert ch.on_request("b", (3, 0, 10))
    ch.remove_peer("b")  # gone before it was ever seen: nothing to refuse
    assert ch.overdue(20.0) == [] and ch.overdue(30.0) == []


def test_neediest_keeps_the_peers_near_the_least_progress_in_order() -> None:
    progress = {"a": 0.5, "b": 0.1, "c": 0.15, "d": 0.2, "e": 0.0}
    assert neediest("abcd", progress.__getitem__, 0.0625) == ["b", "c"]
    assert neediest("dcba", progress.__getitem__, 0.1) == ["d", "c", "b"]  # order kept
    assert neediest("ae", progress.__getitem__, 0.0625) == ["e"]
    assert neediest([], progress.__getitem__, 0.5) == []


def test_needy_window_serves_the_furthest_behind_first_but_never_idles() -> None:
    progress = {"a": 0.9, "b": 0.2, "c": 0.25}  # c is within the window of b
    ch = Choker(fresh_first=False, needy_window=1 / 16, progress=progress.__getitem__)
    for p in "abc":
        ch.add_peer(p)
    ch.on_request("a", (1, 0, 10))
    ch.on_request("b", (2, 0, 10))
    ch.on_request("c", (3, 0, 10))
    ch.on_request("c", (4, 0, 10))
    assert _drain(ch) == [("b", 2), ("c", 3), ("c", 4), ("a", 1)]
    progress["a"] = 0.0  # asked when the turn is decided, not cached
    ch.on_request("c", (5, 0, 10))
    ch.on_request("a", (6, 0, 10))
    assert _drain(ch) == [("a", 6), ("c", 5)]
    plain = Choker(fresh_first=False, needy_window=0.5)  # no progress known: all equal
    for p in "xy":
        plain.add_peer(p)
    for peer, index in (("x", 1), ("x", 2), ("y", 3)):
        plain.on_request(peer, (index, 0, 10))
    assert _drain(plain) == [("x", 1), ("y", 3), ("x", 2)]
    with pytest.raises(ValueError, match="needy_window"):
        Choker(needy_window=1.5)
