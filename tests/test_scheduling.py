"""Swarm-shape decisions: random dials, re-announce when under-connected."""

from __future__ import annotations

import random

from peerd.scheduling import (
    ASK_FACTOR,
    UNDERCONNECTED_RETRY,
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
    assert tracker_want(16) == ASK_FACTOR * 16


def test_underconnected_downloader_announces_again_soon() -> None:
    assert next_announce_delay(2, 16, 60.0, downloading=True) == UNDERCONNECTED_RETRY
    assert next_announce_delay(8, 16, 60.0, downloading=True) == 60.0
    assert next_announce_delay(0, 16, 60.0, downloading=False) == 60.0
    assert next_announce_delay(0, 16, 1.0, downloading=True) == 1.0
