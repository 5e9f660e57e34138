"""The upload queue: per-peer bounds, fresh first, super-seeding, queue wait."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.engine.upload_queue import UploadQueue, neediest


def _drain(q: UploadQueue, peer: str) -> list[int]:
    out = []
    while (req := q.next_request_for(peer)) is not None:
        out.append(req[0])
    return out


def test_without_fresh_first_a_peer_is_served_in_arrival_order() -> None:
    q = UploadQueue(fresh_first=False)
    q.add_peer("a")
    for i in (3, 1, 2):
        assert q.on_request("a", (i, 0, 10))
    q.next_request_for("a")
    assert q.on_request("a", (3, 0, 10))  # sent once already: still in its place
    assert _drain(q, "a") == [1, 2, 3]


def test_fresh_first_prefers_the_chunk_uploaded_least_on_any_connection() -> None:
    q = UploadQueue()
    for p in "ab":
        q.add_peer(p)
    q.on_request("a", (5, 0, 10))
    assert q.next_request_for("a") == (5, 0, 10)
    q.on_request("a", (5, 0, 10))
    q.on_request("a", (6, 0, 10))
    q.on_request("b", (6, 0, 10))
    q.on_request("b", (5, 0, 10))
    assert q.next_request_for("a") == (6, 0, 10)  # never sent beats sent once
    # b's 6 went out once (to a), 5 twice: 6 first, then the oldest of equals.
    assert q.next_request_for("b") == (6, 0, 10)
    assert q.next_request_for("a") == (5, 0, 10)
    assert q.next_request_for("a") is None
    assert q.queued("b") == 1 and q.next_request_for("b") == (5, 0, 10)
    assert q.times_sent(5) == 3 and q.times_sent(6) == 2 and q.times_sent(7) == 0


def test_queue_limit_cancel_and_remove() -> None:
    q = UploadQueue(max_queued=2)
    q.add_peer("a")
    q.add_peer("a")  # idempotent: the queue survives
    assert q.on_request("a", (1, 0, 10))
    assert q.on_request("a", (2, 0, 10))
    assert not q.on_request("a", (3, 0, 10))  # full: the caller rejects "busy"
    assert q.queued("a") == 2
    assert q.on_cancel("a", (1, 0, 10))
    assert not q.on_cancel("a", (1, 0, 10))
    assert not q.on_cancel("zz", (1, 0, 10))
    assert q.on_request("a", (3, 0, 10))  # room again after the cancel
    assert q.remove_peer("a") == [(2, 0, 10), (3, 0, 10)]
    assert q.remove_peer("a") == []
    assert q.queued("a") == 0
    assert q.next_request_for("a") is None
    with pytest.raises(KeyError):
        q.on_request("a", (1, 0, 10))


def test_the_queue_bound_is_per_peer() -> None:
    q = UploadQueue(max_queued=1)
    for p in "abc":
        q.add_peer(p)
        assert q.on_request(p, (0, 0, 10))
    assert not q.on_request("a", (1, 0, 10))
    assert [q.queued(p) for p in "abc"] == [1, 1, 1]


@pytest.mark.parametrize("kwargs", [{"max_queued": 0}, {"super_seed": -1}, {"max_wait": -0.5}])
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        UploadQueue(**kwargs)  # type: ignore[arg-type]


def test_super_seed_serves_every_chunk_once_before_any_twice() -> None:
    q = UploadQueue(super_seed=3)
    for p in "abc":
        q.add_peer(p)
    assert q.on_request("a", (0, 0, 10))
    assert not q.on_request("b", (0, 0, 10))  # queued for a: b gets it elsewhere
    assert q.on_request("b", (1, 0, 10))
    assert q.next_request_for("a") == (0, 0, 10)
    assert not q.on_request("c", (0, 0, 10))  # sent once already, chunk 2 never
    assert q.super_seeding
    assert q.on_request("a", (2, 0, 10))  # every chunk sent or queued now
    assert not q.super_seeding
    assert q.on_request("c", (0, 0, 10))
    # A fresh chunk that is cancelled before it is sent is fresh again.
    assert q.on_cancel("a", (2, 0, 10))
    assert q.super_seeding
    # So is one whose requester left before it was sent.
    assert q.on_request("a", (2, 0, 10))
    assert not q.super_seeding
    assert q.remove_peer("a") == [(2, 0, 10)]
    assert q.super_seeding


def test_super_seed_refuses_a_peer_once_per_chunk() -> None:
    # a holds chunk 0 and stays: b is refused once, then served (it may not
    # be connected to a, and came back after its back-off).
    q = UploadQueue(super_seed=4)
    for p in "ab":
        q.add_peer(p)
    assert q.on_request("a", (0, 0, 10))
    assert q.next_request_for("a") == (0, 0, 10)
    assert not q.on_request("b", (0, 0, 10))
    assert q.super_seeding
    assert q.on_request("b", (0, 0, 10))  # asked again after its back-off: served
    assert q.next_request_for("b") == (0, 0, 10)
    assert q.times_sent(0) == 2


def test_super_seed_a_copy_that_left_is_no_copy() -> None:
    # Getters one after another against an origin (issue 19's cliff): what
    # went to a peer that has left is fresh again and served at once; only
    # a copy held by a connected peer makes a refusal.
    q = UploadQueue(super_seed=3)
    for p in "ab":
        q.add_peer(p)
    for i in range(2):
        assert q.on_request("a", (i, 0, 10))
        assert q.next_request_for("a") == (i, 0, 10)
    assert q.super_seeding  # chunk 2 never sent
    q.remove_peer("a")
    assert q.on_request("b", (0, 0, 10))  # its only copy left with a
    assert q.next_request_for("b") == (0, 0, 10)
    q.add_peer("c")
    assert not q.on_request("c", (0, 0, 10))  # b, still here, holds it
    assert q.on_request("c", (1, 0, 10))
    assert q.times_sent(0) == 2


def test_without_super_seed_nothing_is_refused_for_being_sent() -> None:
    q = UploadQueue()
    for p in "ab":
        q.add_peer(p)
    assert q.on_request("a", (0, 0, 10))
    assert q.on_request("b", (0, 0, 10))
    assert not q.super_seeding


def test_overdue_takes_requests_that_waited_max_wait_off_the_queue() -> None:
    q = UploadQueue(max_wait=4.0)
    for p in "ab":
        q.add_peer(p)
    assert q.on_request("a", (0, 0, 10))
    assert q.on_request("b", (1, 0, 10))
    assert q.overdue(0.0) == []  # first seen now
    assert q.on_request("a", (2, 0, 10))
    assert q.overdue(2.0) == []  # (2, ...) first seen at 2.0
    assert q.next_request_for("a") == (0, 0, 10)  # served in time: forgotten
    assert q.overdue(4.0) == [("b", (1, 0, 10))]
    assert q.queued("b") == 0 and q.queued("a") == 1
    assert q.overdue(5.9) == []
    assert q.overdue(6.0) == [("a", (2, 0, 10))]
    assert q.next_request_for("a") is None
    # A re-sent request waits afresh; without max_wait nothing is ever overdue.
    assert q.on_request("b", (1, 0, 10))
    assert q.overdue(7.0) == []
    plain = UploadQueue()
    plain.add_peer("a")
    plain.on_request("a", (0, 0, 10))
    assert plain.overdue(0.0) == plain.overdue(100.0) == []


def test_overdue_counts_each_stay_in_the_queue_and_returns_the_oldest_first() -> None:
    q = UploadQueue(max_wait=4.0)
    for p in "abc":
        q.add_peer(p)
    assert q.on_request("c", (5, 0, 10))
    assert q.overdue(0.0) == []
    assert q.on_request("a", (1, 0, 10))
    assert q.on_request("b", (2, 0, 10))
    assert q.overdue(1.0) == []
    # Cancelled, then asked again before the next call: it waits afresh.
    assert q.on_cancel("a", (1, 0, 10))
    assert q.on_request("a", (1, 0, 10))
    assert q.overdue(2.0) == []
    assert q.overdue(5.0) == [("c", (5, 0, 10)), ("b", (2, 0, 10))]
    assert q.overdue(5.5) == []
    assert q.overdue(6.0) == [("a", (1, 0, 10))]
    assert q.remove_peer("a") == []  # nothing left queued
    assert q.on_request("b", (3, 0, 10))
    q.remove_peer("b")  # gone before it was ever seen: nothing to refuse
    assert q.overdue(20.0) == [] and q.overdue(30.0) == []


def test_neediest_keeps_the_peers_near_the_least_progress_in_order() -> None:
    progress = {"a": 0.5, "b": 0.1, "c": 0.15, "d": 0.2, "e": 0.0}
    assert neediest("abcd", progress.__getitem__, 0.0625) == ["b", "c"]
    assert neediest("dcba", progress.__getitem__, 0.1) == ["d", "c", "b"]  # order kept
    assert neediest("ae", progress.__getitem__, 0.0625) == ["e"]
    assert neediest([], progress.__getitem__, 0.5) == []


# --- against a plain model ----------------------------------------------------
_PEERS = "abc"
_CHUNKS = 3

_op = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(_PEERS), st.integers(0, _CHUNKS - 1)),
    st.tuples(st.just("cancel"), st.sampled_from(_PEERS), st.integers(0, _CHUNKS - 1)),
    st.tuples(st.just("serve"), st.sampled_from(_PEERS), st.just(0)),
    st.tuples(st.just("leave"), st.sampled_from(_PEERS), st.just(0)),
)


@given(
    st.lists(_op, max_size=60),
    st.booleans(),
    st.sampled_from([0, _CHUNKS]),
    st.integers(1, 3),
)
def test_matches_a_plain_model(
    ops: list[tuple[str, str, int]], fresh_first: bool, super_seed: int, max_queued: int
) -> None:
    """Accept, refuse, cancel and serve exactly as the rules say, whatever the order."""
    q = UploadQueue(max_queued=max_queued, fresh_first=fresh_first, super_seed=super_seed)
    queues: dict[str, list[tuple[int, int, int]]] = {}
    sent: dict[int, int] = {}
    given: dict[str, set[int]] = {}  # what each connected peer was sent
    refused: set[tuple[str, int]] = set()

    def held(index: int) -> bool:
        return any(index in g for g in given.values())

    def seeding() -> bool:
        queued = {r[0] for qu in queues.values() for r in qu}
        return any(not held(i) and i not in queued for i in range(super_seed))

    for op, peer, index in ops:
        if peer not in queues:
            q.add_peer(peer)
            queues[peer] = []
        mine = queues[peer]
        req = (index, 0, 10)
        if op == "request":
            queued = any(r[0] == index for qu in queues.values() for r in qu)
            if len(mine) >= max_queued:
                want = False
            elif seeding() and (queued or held(index)) and (peer, index) not in refused:
                refused.add((peer, index))
                want = False
            else:
                mine.append(req)
                want = True
            assert q.on_request(peer, req) is want
        elif op == "cancel":
            assert q.on_cancel(peer, req) is (req in mine)
            if req in mine:
                mine.remove(req)
        elif op == "serve":
            got = q.next_request_for(peer)
            if not mine:
                assert got is None
                continue
            best = min(mine, key=lambda r: sent.get(r[0], 0)) if fresh_first else mine[0]
            assert got == best
            mine.remove(best)
            sent[best[0]] = sent.get(best[0], 0) + 1
            given.setdefault(peer, set()).add(best[0])
        else:
            assert q.remove_peer(peer) == mine
            del queues[peer]
            given.pop(peer, None)
            refused = {(p, i) for p, i in refused if p != peer}
        assert q.super_seeding is seeding()
        for p, qu in queues.items():
            assert q.queued(p) == len(qu)
        for i in range(_CHUNKS):
            assert q.times_sent(i) == sent.get(i, 0)
