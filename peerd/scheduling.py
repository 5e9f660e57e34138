"""Swarm-level scheduling decisions, pure: whom to dial, when to re-announce.

Theory of operation
-------------------
The node's Trio glue (:mod:`peerd.swarm`, :mod:`peerd.session`) makes a few
decisions that are not about one chunk or one upload slot but about the
shape of the swarm: which of the peers the tracker named to dial, when to
ask the tracker again, how long to leave a peer alone after it refused a
chunk. They live here as small pure functions (no clock, no I/O; callers
pass ``now`` and a ``random.Random``) so the simulator (:mod:`peerd.sim`)
runs the very decisions the node makes, on a thousand peers.

Why each rule exists (measured in the simulator, docs/BENCHMARKS.md):

* **Random choice among the tracker's peers.** In a flash crowd every
  newcomer has the same (empty) bitmap, so the tracker ranks everyone the
  same way and names the same first peers to all of them: those fill up,
  everyone else is connected only to them, and most upload links sit idle.
  Asking the tracker for a few times more peers than there is room for and
  dialling a random subset spreads the connection graph.
* **Re-announce while under-connected.** A leecher whose dials were refused
  (the remote was full) would otherwise wait a whole tracker interval with
  too few peers; it asks again after :data:`UNDERCONNECTED_RETRY` seconds.
* **Back off after ``busy``.** A REJECT ``busy`` means "retry later or
  elsewhere"; asking the same peer for the same chunk at once just repeats
  the refusal. The picker keeps that pair apart for :data:`BUSY_BACKOFF`.
* **Refuse what waited too long.** A leecher that gets a new chunk first is
  asked for it by all its neighbours; they wait in its queue for seconds
  while the neighbours it already served hold the chunk and sit idle (the
  requesters do not ask them: the chunk is in flight). A request queued at a
  leecher for :data:`QUEUE_WAIT` seconds is refused ``busy``
  (``Choker(max_wait=...)``) and the requester asks another holder. Not at
  the origin seeder, where nobody else has the chunk. Simulator, N = 1000:
  T/T_min 1.20 -> 1.17.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "ASK_FACTOR",
    "BUSY_BACKOFF",
    "QUEUE_WAIT",
    "UNDERCONNECTED_RETRY",
    "choose_dials",
    "next_announce_delay",
    "tracker_want",
]

ASK_FACTOR = 4  # ask the tracker for this many times the free connection slots
BUSY_BACKOFF = 5.0  # seconds before a peer that said busy is asked for that chunk again
UNDERCONNECTED_RETRY = 2.0  # seconds between announces while under-connected
QUEUE_WAIT = 4.0  # seconds a request may wait in a leecher's upload queue, then busy

T = TypeVar("T")


def tracker_want(max_peers: int) -> int:
    """How many peers to ask the tracker for (``want`` in ANNOUNCE)."""
    return ASK_FACTOR * max_peers


def choose_dials(candidates: Sequence[T], room: int, rng: random.Random) -> list[T]:
    """Which of the tracker's peers to dial: ``room`` of them, chosen at random.

    Args:
        candidates: the peers named by the tracker that we may dial (already
            filtered: not ourselves, not connected, not connecting, not banned).
        room: free connection slots (``max_peers - connected - connecting``).
        rng: randomness (seeded in the simulator).

    Returns:
        At most ``room`` candidates, a uniform random subset in random order.
    """
    if room <= 0 or not candidates:
        return []
    if room >= len(candidates):
        out = list(candidates)
        rng.shuffle(out)
        return out
    return rng.sample(list(candidates), room)


def next_announce_delay(
    connected: int, max_peers: int, interval: float, *, downloading: bool
) -> float:
    """Seconds until the next periodic announce.

    A downloader with fewer than half of ``max_peers`` connections asks again
    after :data:`UNDERCONNECTED_RETRY` (capped by ``interval``); everyone else
    waits the tracker's ``interval``.
    """
    if downloading and connected < max_peers // 2:
        return min(UNDERCONNECTED_RETRY, interval)
    return interval
