"""Swarm-shape decisions: random dials, re-announce when under-connected, upload turns."""

from __future__ import annotations

import random

import pytest

from peerd.engine.scheduling import (
    UNDERCONNECTED_RETRY,
    RemoteProgress,
    UploadTurns,
    choose_dials,
    next_announce_delay,
    tracker_want,
)


def test_choose_dials_is_a_random_subset_of_the_right_size() -> None:
    cands = list(range(40))
    picks = [tuple(choose_dials(cands, 10, random.Random(s))) for s in range(5)]
    assert all(len(p) == 10 and len(set(p)) == 10 and set(p) <= set(cands) for p in picks)
    assert len(set(picks)) > 1  # not always the tracker's first ten
    assert sorted(choose_dials(cands[:3], 10, random.Random(0))) == [0, 1, 2]
    assert choose_dials(cands, 0, random.Random(0)) == []
    assert choose_dials([], 5, random.Random(0)) == []


def test_tracker_want_asks_for_more_than_there_is_room_for() -> None:
    # Expected values written out, not re-derived from ASK_FACTOR: four times
    # the free slots (docs/ARCHITECTURE.md), so a random subset of the answer
    # can be dialled; no room, no peers asked for.
    assert [tracker_want(room) for room in (0, 1, 3, 16, 50)] == [0, 4, 12, 64, 200]
    assert all(tracker_want(room) > room for room in range(1, 51))


def test_underconnected_downloader_announces_again_soon() -> None:
    assert next_announce_delay(2, 16, 60.0, downloading=True) == UNDERCONNECTED_RETRY
    assert next_announce_delay(8, 16, 60.0, downloading=True) == 60.0
    assert next_announce_delay(0, 16, 60.0, downloading=False) == 60.0
    assert next_announce_delay(0, 16, 1.0, downloading=True) == 1.0


def test_upload_turns_one_at_a_time_in_fifo_order() -> None:
    turns = UploadTurns(1, stall=0.25)
    assert turns.request("a", 0.0)
    assert not turns.request("b", 0.0)
    assert not turns.request("c", 0.01)
    assert not turns.request("b", 0.02)  # asking again keeps its place
    assert turns.waiting() == 2
    assert turns.release("a", 0.1) == ["b"]
    assert turns.holds("b") and not turns.holds("c")
    assert turns.request("b", 0.1)  # the holder may go on
    assert turns.release("b", 0.2) == ["c"]
    assert turns.release("c", 0.3) == []
    assert turns.deadline() == float("inf")


def test_upload_turns_a_stalled_turn_lets_the_next_go_ahead() -> None:
    turns = UploadTurns(1, stall=0.25)
    assert turns.request("stuck", 0.0)
    assert not turns.request("next", 0.1)
    turns.touch("stuck", 0.2)  # progress: not stalled yet
    assert turns.deadline() == 0.45
    assert not turns.request("next", 0.4)
    assert turns.request("next", 0.46)  # no progress for 0.26 s
    assert not turns.holds("stuck")
    assert turns.release("stuck", 0.5) == []  # its late release takes nothing away
    assert turns.holds("next")


def test_upload_turns_never_stay_free_while_writers_wait() -> None:
    # A writer first in line that never comes back (its wake-up goes nowhere)
    # must not leave the others waiting for a turn nobody holds.
    turns = UploadTurns(1, stall=0.25)
    assert turns.request("a", 0.0)
    assert not turns.request("dead", 0.1)
    assert not turns.request("b", 0.1)
    # a's turn stalled: it goes to the next in line, and b waits for its deadline.
    assert not turns.request("b", 0.4)
    assert turns.holds("dead")
    assert turns.deadline() == 0.65
    assert turns.request("b", 0.66)  # the dead writer's turn stalled too


def test_upload_turns_a_waiter_that_leaves_is_not_granted() -> None:
    turns = UploadTurns(1)
    turns.request("a", 0.0)
    turns.request("b", 0.0)
    turns.request("c", 0.0)
    assert turns.release("b", 0.1) == []  # b gave up waiting (nothing to send)
    assert turns.release("a", 0.1) == ["c"]


def test_upload_turns_zero_slots_grants_everything_and_bad_values_fail() -> None:
    turns = UploadTurns(0)
    assert all(turns.request(k, 0.0) for k in range(5))
    assert turns.waiting() == 0
    with pytest.raises(ValueError):
        UploadTurns(-1)
    with pytest.raises(ValueError):
        UploadTurns(1, stall=0)


def test_upload_turns_with_a_needy_window_go_to_the_furthest_behind() -> None:
    progress = {"holder": 0.5, "ahead": 0.9, "behind": 0.3, "near": 0.33, "late": 1.0}
    turns = UploadTurns(1, needy_window=1 / 16, progress=progress.__getitem__)
    assert turns.request("holder", 0.0)
    assert not turns.request("ahead", 0.0)
    assert not turns.request("behind", 0.0)
    assert not turns.request("near", 0.0)  # within the window of "behind"
    assert turns.release("holder", 0.1) == ["behind"]
    progress["ahead"] = 0.1  # its remote's progress as known when the turn is decided
    assert turns.release("behind", 0.2) == ["ahead"]
    assert turns.release("ahead", 0.3) == ["near"]
    # A free turn goes to whoever asks when nobody needier waits.
    assert turns.release("near", 0.4) == []
    assert turns.request("late", 0.5)
    with pytest.raises(ValueError):
        UploadTurns(1, needy_window=-0.1, progress=progress.__getitem__)
    with pytest.raises(ValueError, match="progress"):
        UploadTurns(1, needy_window=0.1)


def test_remote_progress_counts_bitfield_haves_and_sent_chunks() -> None:
    known = RemoteProgress(10)
    assert known.share == 0.0
    known.set_bitfield(bytes([0b1010_0000, 0b0100_0000]))  # chunks 0, 2 and 9
    assert known.held == 3
    assert known.add([2, 9]) is False  # nothing new
    assert known.add([3, 3, 4]) is True
    assert known.held == 5 and known.share == 0.5
    with pytest.raises(ValueError, match="length"):
        known.set_bitfield(bytes(3))
    assert RemoteProgress(0).share == 0.0


def test_a_turn_whose_receiver_closed_its_window_ends_at_once() -> None:
    blocked: set[str] = set()
    turns = UploadTurns(1, stall=0.25, blocked=blocked.__contains__)
    assert turns.request("a", 0.0)
    assert not turns.request("b", 0.01)  # a's receiver still reads: b waits
    blocked.add("a")  # a's remote stopped reading (window 0)
    assert turns.request("b", 0.02)  # long before the 0.25 s stall
    assert turns.holders() == ["b"]
    assert not turns.holds("a")
