"""Swarm-level rules, pure (callers pass ``now`` and a ``random.Random``).

Dial a random subset of a tracker answer a few times wider than the free
room (:func:`tracker_want`, :func:`choose_dials`); re-announce soon while
under-connected (:func:`next_announce_delay`); one upload at a time per node,
furthest behind first (:class:`UploadTurns`, :class:`RemoteProgress`); the
back-off and queue-wait constants. Why each rule, and what it measured:
docs/ARCHITECTURE.md, "Swarm-scale rules".
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

from peerd.engine.upload_queue import neediest

__all__ = [
    "ASK_FACTOR",
    "BUSY_BACKOFF",
    "NEEDY_WINDOW",
    "QUEUE_WAIT",
    "TURN_STALL",
    "UNDERCONNECTED_RETRY",
    "RemoteProgress",
    "UploadTurns",
    "choose_dials",
    "next_announce_delay",
    "tracker_want",
]

ASK_FACTOR = 4  # ask the tracker for this many times the free connection slots
BUSY_BACKOFF = 5.0  # seconds before a peer that said busy is asked for that chunk again
UNDERCONNECTED_RETRY = 2.0  # seconds between announces while under-connected
QUEUE_WAIT = 4.0  # seconds a request may wait in a leecher's upload queue, then busy
NEEDY_WINDOW = 1 / 16  # share of the chunks: a leecher serves first who is within
# this of the furthest behind (16 of 256; tuned in the simulator)
TURN_STALL = 0.25  # seconds an upload turn may go without progress before others go ahead

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


class RemoteProgress:
    """What a remote holds as far as we know: its BITFIELD, its HAVEs, and the
    chunks we sent it. Its :attr:`share` orders upload turns (furthest
    behind first, ``needy_window``). Indices must already be checked
    against the chunk count."""

    __slots__ = ("_bits", "held", "num_chunks")

    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self._bits = bytearray((num_chunks + 7) // 8)
        self.held = 0

    @property
    def share(self) -> float:
        """The share of the chunks it holds (0..1)."""
        return self.held / self.num_chunks if self.num_chunks else 0.0

    def set_bitfield(self, bits: bytes) -> None:
        """Its BITFIELD (``(num_chunks + 7) // 8`` bytes, chunk 0 = top bit)."""
        if len(bits) != len(self._bits):
            raise ValueError("bitfield length does not match the chunk count")
        self._bits[:] = bits
        self.held = int.from_bytes(bits, "big").bit_count()

    def add(self, indices: Iterable[int]) -> bool:
        """It holds these chunks too; True if that is news."""
        bits, held = self._bits, self.held
        for i in indices:
            mask = 0x80 >> (i & 7)
            if not bits[i >> 3] & mask:
                bits[i >> 3] |= mask
                held += 1
        moved = held != self.held
        self.held = held
        return moved


class UploadTurns:
    """Which of a node's connections may start an upload: ``at_once`` at a time.

    Pure (callers pass ``now``). A writer with a queued upload calls
    :meth:`request`; True means it holds a turn and sends one chunk, then
    reports progress with :meth:`touch` while the kernel still holds unsent
    bytes of it, and :meth:`release` once it has none (or its connection
    ends). False means it was queued: :meth:`release` returns the writers
    granted a turn, to be woken. A turn that made no progress for ``stall``
    seconds (a receiver that stopped reading, a peer gone silent) no longer
    counts: the next :meth:`request` at or after :meth:`deadline` lets the
    next writer go ahead, so one stuck connection cannot hold up the node's
    other uploads. ``at_once`` = 0: no turns, every request is granted.

    ``blocked(who)``, if given, says that a holder's receiver has closed its
    window (it is not reading): such a turn ends at the next :meth:`request`
    without waiting for ``stall``, so a receiver that never reads costs the
    node's uploads no more than the waiters' polling interval.

    Order: first come, first served; with ``needy_window`` > 0, the next
    turn goes to the first waiting writer whose remote is within that share
    of the chunks of the least advanced waiting remote (``progress(who)``;
    see :func:`peerd.engine.upload_queue.neediest`).
    """

    def __init__(
        self,
        at_once: int = 1,
        *,
        stall: float = TURN_STALL,
        needy_window: float = 0.0,
        progress: Callable[[Hashable], float] | None = None,
        blocked: Callable[[Hashable], bool] | None = None,
    ):
        if at_once < 0 or stall <= 0 or not 0 <= needy_window <= 1:
            raise ValueError("need at_once >= 0, stall > 0 and 0 <= needy_window <= 1")
        if needy_window and progress is None:
            raise ValueError("needy_window needs progress(who)")
        self.at_once = at_once
        self.stall = stall
        self.needy_window = needy_window
        self._progress = progress
        self._blocked = blocked
        self._active: dict[Hashable, float] = {}  # holder -> time of its last progress
        self._waiting: deque[Hashable] = deque()

    def holds(self, who: Hashable) -> bool:
        return who in self._active

    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, who: Hashable, now: float) -> bool:
        """May ``who`` start an upload now? If not, it waits in line."""
        if self.at_once == 0:
            return True
        if who in self._active:
            return True
        self._expire(now)
        if who not in self._waiting:
            self._waiting.append(who)
        # A free turn goes to the next in line even if that is someone else:
        # it holds the turn until it comes back (its own wait ends by the
        # deadline) or the turn stalls. Never leave a turn free while writers
        # wait: each waits for the deadline of a held turn, and with none
        # held that wait would have no end (a writer whose session died
        # first in line stalled a seeder's every upload until peers gave up).
        self._grant(now)
        return who in self._active

    def touch(self, who: Hashable, now: float) -> None:
        """``who``'s upload made progress (its turn is not stalled)."""
        if who in self._active:
            self._active[who] = now

    def release(self, who: Hashable, now: float) -> list[Hashable]:
        """``who`` is done (or gone); returns the writers that now hold a turn."""
        if self._active.pop(who, None) is None:
            if who not in self._waiting:
                return []
            self._waiting.remove(who)
        return self._grant(now)

    def deadline(self) -> float:
        """When the oldest turn counts as stalled (inf: no turn held)."""
        if not self._active:
            return float("inf")
        return min(self._active.values()) + self.stall

    def holders(self) -> list[Hashable]:
        """The writers that hold a turn now."""
        return list(self._active)

    def _expire(self, now: float) -> None:
        blocked = self._blocked
        for who, last in list(self._active.items()):
            if now - last >= self.stall or (blocked is not None and blocked(who)):
                del self._active[who]

    def _next(self) -> Hashable:
        """The waiting writer whose turn is next (there is one)."""
        if not self.needy_window or self._progress is None:
            return self._waiting[0]
        return neediest(self._waiting, self._progress, self.needy_window)[0]

    def _take(self, who: Hashable, now: float) -> None:
        if self._waiting[0] == who:
            self._waiting.popleft()
        else:
            self._waiting.remove(who)
        self._active[who] = now

    def _grant(self, now: float) -> list[Hashable]:
        granted = []
        while self._waiting and len(self._active) < self.at_once:
            who = self._next()
            self._take(who, now)
            granted.append(who)
        return granted
