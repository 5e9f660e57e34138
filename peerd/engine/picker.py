"""Which chunk to ask for next, and from whom: the chunk picker of one download.

Rarest first among the peer's chunks we lack and nobody is fetching, random
among equals so leechers spread over different chunks; in the tail, a fast
peer may duplicate a chunk stuck at slow holders, and in endgame any chunk in
flight may be asked of a second holder. A refused (REJECT ``busy``) chunk is
not asked of that peer again before its back-off ends; a late request is
returned by :meth:`PiecePicker.expired`. It does no I/O and reads no clock
(callers pass ``now``). Why each rule: docs/ARCHITECTURE.md, "Chunk
selection and request pipelining".
"""

from __future__ import annotations

import random
import struct
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from itertools import islice

__all__ = [
    "MAX_DEPTH",
    "PiecePicker",
    "pipeline_depth",
    "stream_depth",
    "swarm_counts",
]

MAX_DEPTH = 32
_WEIGHT_CAP = 15  # swarm-wide counts above this rank alike (a key's low 4 bits)
PIPELINE_SECONDS = 0.25
# Bytes of a stream's read-ahead window one peer may owe at a time (at least
# 2 chunks, at most MAX_DEPTH): 8 MiB keeps a 100 ms link busy at 80 MB/s per
# peer, while the reader's next chunk waits behind 8 MiB, not 32 MiB, in an
# uploader's queue (docs/BENCHMARKS.md, "Streaming").
STREAM_INFLIGHT_BYTES = 8 * 1024 * 1024


def pipeline_depth(rate: float, chunk_size: int) -> int:
    """Requests to keep in flight to a peer sending ``rate`` bytes/s.

    Enough to cover :data:`PIPELINE_SECONDS` of transfer at that rate (the
    link's bandwidth-delay product with a margin), plus one so the sender
    never idles between a completion and the next request; at most
    :data:`MAX_DEPTH`. A peer that has sent nothing yet (``rate`` 0) gets a
    single request: in a big swarm every connection starts at rate 0, and a
    second request per connection pinned chunks in the queues of busy
    uploaders while other holders idled (simulator, N = 100: T/T_min 1.21 ->
    1.16 homogeneous, 1.13 -> 1.10 heterogeneous).
    """
    return max(1, min(MAX_DEPTH, int(rate * PIPELINE_SECONDS / chunk_size + 0.999) + 1))


def stream_depth(chunk_size: int) -> int:
    """Window chunks one peer may owe at a time while a reader waits in order:
    :data:`STREAM_INFLIGHT_BYTES` of them, at least 2, at most :data:`MAX_DEPTH`."""
    return max(2, min(MAX_DEPTH, STREAM_INFLIGHT_BYTES // max(chunk_size, 1)))


PeerKey = Hashable


def swarm_counts(avail: bytes) -> tuple[int, ...]:
    """The tracker's availability field (2-byte big-endian holder counts) as ints."""
    n = len(avail) // 2
    counts = struct.unpack_from(f">{n}H", avail)
    if len(avail) % 2:  # not from a valid PEERS frame; read the odd byte as a count
        counts += (avail[-1],)
    return counts


@dataclass(slots=True)
class _Peer:
    flags: bytearray
    inflight: set[int] = field(default_factory=set)
    useful: int = 0  # chunks it holds that are missing and unrequested here
    held: int = 0  # chunks it holds
    refused: dict[int, float] = field(default_factory=dict)  # chunk -> not before
    rate: float = 0.0  # bytes/s it sends us (0 = unknown)

    def eta(self, extra: int = 0) -> float:
        """Time (in chunk-size units) to deliver what it owes us plus ``extra``."""
        if self.rate <= 0:
            return float("inf")
        return (len(self.inflight) + extra) / self.rate

    def barred(self, i: int, now: float) -> bool:
        """Did it refuse chunk ``i`` with a back-off that lasts beyond ``now``?
        (A refusal that is over is forgotten here.)"""
        until = self.refused.get(i)
        if until is None:
            return False
        if until > now:
            return True
        del self.refused[i]
        return False


class PiecePicker:
    """Rarest-first chunk selection with a rate-aware tail and endgame.

    Args:
        num_chunks: chunks in the file.
        have: one byte (0/1) per chunk we already hold (verified).
        rng: a ``random.Random`` (seeded in tests and the simulator).
        endgame_copies: most peers one chunk may be requested from at once
            (a clearly faster peer may add one beyond it, see ``rescue_factor``).
        rescue_factor: with rates known (:meth:`set_rate`), a peer may
            duplicate a chunk in the tail when every holder would take this
            many times longer than it to deliver it (0 = never).
    """

    def __init__(
        self,
        num_chunks: int,
        have: bytes | bytearray | None = None,
        *,
        rng: random.Random | None = None,
        endgame_copies: int = 2,
        rescue_factor: float = 2.0,
    ) -> None:
        if rescue_factor < 0 or endgame_copies < 1:
            raise ValueError("need rescue_factor >= 0 and endgame_copies >= 1")
        self.num_chunks = num_chunks
        self.rescue_factor = rescue_factor
        self.have = bytearray(have) if have is not None else bytearray(num_chunks)
        if len(self.have) != num_chunks:
            raise ValueError("have must have one entry per chunk")
        self._rng = rng or random.Random()
        self.endgame_copies = endgame_copies
        self.avail = [0] * num_chunks  # connected peers holding each chunk
        # Tracker counts, used before peers connect; stored capped at
        # _WEIGHT_CAP so they only break ties between equal availabilities.
        self._swarm_weight = [0] * num_chunks
        self._peers: dict[PeerKey, _Peer] = {}
        # chunk -> {peer: deadline}
        self._inflight: dict[int, dict[PeerKey, float]] = {}
        # Missing, unrequested ("open") chunks, in buckets by _key: lists
        # with a position map, so adding and removing one is O(1).
        self._buckets: dict[int, list[int]] = {}
        self._open_n = 0  # chunks in the buckets
        # Chunks to ask for first, in order, before rarest first (a stream's
        # read-ahead window; empty: none).
        self.priority: range = range(0)
        # Window chunks one peer may owe at a time while a reader waits (set
        # with priority; see pick).
        self.priority_depth = MAX_DEPTH
        self._pos = [-1] * num_chunks  # index inside its bucket, -1 if not in one
        self._bucket_of = [0] * num_chunks
        self.missing = num_chunks - sum(self.have)
        for i in range(num_chunks):
            if not self.have[i]:
                self._bucket_add(i)

    # --- buckets ------------------------------------------------------------
    def _key(self, i: int) -> int:
        # Connected peers dominate; swarm-wide counts only break ties among
        # chunks nobody connected holds yet (both capped so keys stay small).
        return min(self.avail[i], 1000) * 16 + self._swarm_weight[i]

    def _open(self, i: int) -> None:
        """Chunk ``i`` became requestable: it counts as useful for its holders."""
        self._bucket_add(i)
        for q in self._peers.values():
            if q.flags[i]:
                q.useful += 1

    def _close(self, i: int) -> None:
        """Chunk ``i`` is no longer requestable (in flight or held)."""
        if self._pos[i] < 0:
            return
        self._bucket_remove(i)
        for q in self._peers.values():
            if q.flags[i]:
                q.useful -= 1

    def _bucket_add(self, i: int) -> None:
        key = self._key(i)
        bucket = self._buckets.setdefault(key, [])
        self._pos[i] = len(bucket)
        self._bucket_of[i] = key
        bucket.append(i)
        self._open_n += 1

    def _bucket_remove(self, i: int) -> None:
        pos = self._pos[i]
        if pos < 0:
            return
        bucket = self._buckets[self._bucket_of[i]]
        last = bucket.pop()
        if last != i:
            bucket[pos] = last
            self._pos[last] = pos
        if not bucket:
            del self._buckets[self._bucket_of[i]]
        self._pos[i] = -1
        self._open_n -= 1

    def _rebucket(self, i: int) -> None:
        """Chunk ``i``'s key may have changed: if it is open, move it."""
        if self._pos[i] >= 0 and self._bucket_of[i] != self._key(i):
            self._bucket_remove(i)
            self._bucket_add(i)

    # --- swarm knowledge ----------------------------------------------------
    def set_swarm_availability(self, counts: Iterable[int]) -> None:
        """Per-chunk holder counts from the tracker (a prior for rarest-first)."""
        weight = self._swarm_weight
        for i, c in enumerate(islice(counts, self.num_chunks)):
            c = min(c, _WEIGHT_CAP)
            if weight[i] != c:
                weight[i] = c
                self._rebucket(i)

    def add_peer(self, peer: PeerKey, flags: bytes | bytearray | None = None) -> None:
        """A connection is up; ``flags`` is its bitfield (one byte per chunk)."""
        if peer in self._peers:
            self.remove_peer(peer)
        f = bytearray(flags) if flags is not None else bytearray(self.num_chunks)
        if len(f) != self.num_chunks:
            raise ValueError("peer flags must have one entry per chunk")
        p = _Peer(f, held=f.count(1))
        self._peers[peer] = p
        i = f.find(1)
        while i >= 0:
            self.avail[i] += 1
            if self._pos[i] >= 0:
                p.useful += 1
                self._rebucket(i)
            i = f.find(1, i + 1)

    def peer_has(self, peer: PeerKey, index: int) -> None:
        """The peer announced (HAVE) one more chunk."""
        p = self._peers.get(peer)
        if p is None or not 0 <= index < self.num_chunks or p.flags[index]:
            return
        p.flags[index] = 1
        p.held += 1
        self.avail[index] += 1
        if self._pos[index] >= 0:
            p.useful += 1
            self._rebucket(index)

    def peer_lacks(self, peer: PeerKey, index: int) -> bool:
        """Might the peer still want chunk ``index``? (False once it said it has it.)

        A HAVE for a chunk the remote already holds tells it nothing it can
        use (it never requests what it has), so the caller may skip it.
        """
        p = self._peers.get(peer)
        return p is None or not p.flags[index]

    def lacking(self, peers: Iterable[PeerKey], index: int) -> list[PeerKey]:
        """Those of ``peers`` that might still want chunk ``index`` (see
        :meth:`peer_lacks`), in order: whom to tell about a new chunk."""
        known = self._peers
        return [q for q in peers if (p := known.get(q)) is None or not p.flags[index]]

    def holding(self, peers: Iterable[PeerKey], index: int) -> list[PeerKey]:
        """Those of ``peers`` known to hold chunk ``index``, in order: the
        ones that could be asked for it once it is released (the others
        are :meth:`lacking`)."""
        known = self._peers
        return [q for q in peers if (p := known.get(q)) is not None and p.flags[index]]

    def remove_peer(self, peer: PeerKey) -> list[int]:
        """A connection is gone; its in-flight chunks become requestable again."""
        p = self._peers.pop(peer, None)
        if p is None:
            return []
        f = p.flags
        i = f.find(1)
        while i >= 0:
            self.avail[i] -= 1
            self._rebucket(i)
            i = f.find(1, i + 1)
        released = sorted(p.inflight)
        for i in released:
            self._release(peer, p, i)
        return released

    def set_rate(self, peer: PeerKey, rate: float) -> None:
        """The rate (bytes/s) at which ``peer`` currently sends us chunks.

        Optional: only the rate-aware tail and endgame use it.
        """
        p = self._peers.get(peer)
        if p is not None:
            p.rate = rate if rate > 0 else 0.0

    def peer_flags(self, peer: PeerKey) -> bytearray | None:
        """The peer's chunk flags (live; only change them after :meth:`remove_peer`)."""
        p = self._peers.get(peer)
        return p.flags if p is not None else None

    # --- requests -----------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.missing == 0

    @property
    def endgame(self) -> bool:
        """True once every missing chunk is already in flight."""
        return not self._buckets and self.missing > 0

    @property
    def in_tail(self) -> bool:
        """Half the missing chunks in flight: from here on, what one peer may
        be asked for depends on what the others owe (rate-aware rescue,
        endgame), not only on events about that peer."""
        return 2 * len(self._inflight) >= self.missing

    def pick(self, peer: PeerKey, count: int, now: float, timeout: float) -> list[int]:
        """Choose up to ``count`` chunks to request from ``peer``.

        The chosen chunks are marked in flight from ``peer`` with deadline
        ``now + timeout``. Never a chunk we hold, the peer lacks, or the peer
        refused (:meth:`refuse`) with a back-off that has not ended by ``now``.
        """
        p = self._peers.get(peer)
        if p is None or count <= 0:
            return []
        deadline = now + timeout
        # The streaming window first, in order; then useful chunks, rarest
        # first (a peer with none costs nothing here).
        chosen: list[int] = []
        window = self.priority
        if window:
            # A peer owes at most priority_depth window chunks at a time, and
            # one that owes any is asked for nothing else meanwhile: its
            # uploader serves its queue fresh first, not in our order, so the
            # reader's next chunk can wait behind everything queued there.
            owed = sum(1 for i in p.inflight if i in window)
            room = min(count, self.priority_depth - owed)
            if room > 0:
                chosen = self._pick_in_order(peer, p, room, now, deadline)
            if owed or chosen:
                return chosen
        left = count - len(chosen)
        if left > 0 and p.useful:
            chosen += self._pick_rarest(peer, p, min(left, p.useful), now, deadline)
        left = count - len(chosen)
        if left <= 0:
            return chosen
        if not self._buckets:
            chosen += self._pick_endgame(peer, p, left, now, deadline)
        elif self.rescue_factor > 0 and p.rate > 0 and self.in_tail:
            chosen += self._pick_rescue(peer, p, left, now, deadline)
        return chosen

    def _pick_in_order(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Open chunks of the :attr:`priority` window that the peer holds, in order."""
        flags, pos = p.flags, self._pos
        chosen: list[int] = []
        for i in self.priority:
            if pos[i] >= 0 and flags[i] and not p.barred(i, now):
                chosen.append(i)
                if len(chosen) >= count:
                    break
        for i in chosen:
            self._close(i)
            self._mark(peer, p, i, deadline)
        return chosen

    def _slow_holders(self, p: _Peer, holders: dict[PeerKey, float], extra: int) -> bool:
        """Would every holder deliver much later than ``p`` (``rescue_factor`` times)?"""
        mine = p.eta(extra) * self.rescue_factor
        peers = self._peers
        for q in holders:
            qp = peers.get(q)
            if qp is None or qp.eta() <= mine:
                return False
        return True

    def _pick_rescue(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Before endgame, in the tail: chunks in flight only at much slower holders."""
        flags = p.flags
        out: list[int] = []
        for i, holders in self._inflight.items():
            if (
                flags[i]
                and peer not in holders
                and len(holders) < self.endgame_copies
                and not p.barred(i, now)
                and self._slow_holders(p, holders, len(out) + 1)
            ):
                out.append(i)
                if len(out) >= count:
                    break
        for i in out:
            self._mark(peer, p, i, deadline)
        return out

    def _pick_rarest(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Open chunks the peer holds, rarest first, random among equals."""
        if p.held * p.useful < count * self._open_n:
            return self._pick_rarest_held(peer, p, count, now, deadline)
        # Walk the buckets from the rarest up, each from a random start.
        chosen: list[int] = []
        flags = p.flags
        for key in sorted(self._buckets):
            bucket = self._buckets[key]
            if not any(map(flags.__getitem__, bucket)):
                continue  # none of its chunks (a scan in C, not a loop here)
            n = len(bucket)
            start = self._rng.randrange(n)
            # Collect first, close afterwards: closing swaps the last one in.
            picked_here: list[int] = []
            for k in range(n):
                i = bucket[(start + k) % n]
                if flags[i] and not p.barred(i, now):
                    picked_here.append(i)
                    if len(chosen) + len(picked_here) >= count:
                        break
            for i in picked_here:
                self._close(i)
                self._mark(peer, p, i, deadline)
            chosen += picked_here
            if len(chosen) >= count:
                break
        return chosen

    def _pick_rarest_held(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Rarest first by walking what the peer holds: the same choice, and
        cheaper than the buckets when it holds few of many open chunks."""
        flags, pos, key_of = p.flags, self._pos, self._bucket_of
        cands: list[tuple[int, int]] = []
        i = flags.find(1)
        while i >= 0:
            if pos[i] >= 0 and not p.barred(i, now):
                cands.append((key_of[i], i))
            i = flags.find(1, i + 1)
        cands.sort()
        chosen: list[int] = []
        k, n = 0, len(cands)
        while k < n and len(chosen) < count:
            end = k + 1
            while end < n and cands[end][0] == cands[k][0]:
                end += 1
            group = [c[1] for c in cands[k:end]]
            room = count - len(chosen)
            chosen += group if len(group) <= room else self._rng.sample(group, room)
            k = end
        for i in chosen:
            self._close(i)
            self._mark(peer, p, i, deadline)
        return chosen

    def _pick_endgame(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Every missing chunk is in flight: duplicate those with the fewest
        copies, the ones stuck at the slowest holders first."""
        flags, peers, copies = p.flags, self._peers, self.endgame_copies
        cands: list[tuple[int, float, int]] = []
        for i, holders in self._inflight.items():
            if peer in holders or not flags[i] or p.barred(i, now):
                continue
            n = len(holders)
            if n >= copies and not (
                self.rescue_factor > 0
                and p.rate > 0
                and n <= copies
                and self._slow_holders(p, holders, 1)
            ):
                continue
            # The soonest any holder delivers it (unknown rate: never).
            soonest = min(
                (qp.eta() for q in holders if (qp := peers.get(q)) is not None),
                default=float("inf"),
            )
            cands.append((i, soonest, n))
        self._rng.shuffle(cands)
        cands.sort(key=lambda c: (c[2], -c[1]))
        out = [c[0] for c in cands[:count]]
        for i in out:
            self._mark(peer, p, i, deadline)
        return out

    def _mark(self, peer: PeerKey, p: _Peer, i: int, deadline: float) -> None:
        self._inflight.setdefault(i, {})[peer] = deadline
        p.inflight.add(i)

    def _release(self, peer: PeerKey, p: _Peer | None, i: int) -> None:
        holders = self._inflight.get(i)
        if holders is None or peer not in holders:
            return
        del holders[peer]
        if p is not None:
            p.inflight.discard(i)
        if not holders:
            del self._inflight[i]
            if not self.have[i] and self._pos[i] < 0:
                self._open(i)

    def is_requested(self, peer: PeerKey, index: int) -> bool:
        holders = self._inflight.get(index)
        return holders is not None and peer in holders

    def cancel(self, peer: PeerKey, index: int) -> None:
        """The request is void (rejected, cancelled, timed out, failed hash)."""
        self._release(peer, self._peers.get(peer), index)

    def refuse(self, peer: PeerKey, index: int, until: float) -> None:
        """The peer refused chunk ``index`` (REJECT ``busy``): release it, and do
        not ask that peer for it again before ``until`` (other peers may be
        asked at once)."""
        p = self._peers.get(peer)
        if p is None:
            return
        p.refused[index] = until
        self._release(peer, p, index)

    def chunk_received(self, peer: PeerKey, index: int) -> list[PeerKey]:
        """A verified chunk from ``peer`` is stored.

        Returns the other peers that still have it in flight (cancel those).
        """
        holders = self._inflight.pop(index, {})
        for q in self._peers.values():
            q.inflight.discard(index)
            q.refused.pop(index, None)  # never asked again: the refusal is moot
        self._close(index)
        if not self.have[index]:
            self.have[index] = 1
            self.missing -= 1
        return [q for q in holders if q != peer]

    def expired(self, now: float, renew: float = 0.0) -> list[tuple[PeerKey, int]]:
        """Requests whose deadline has passed (not released: call cancel).

        With ``renew`` > 0, a request for a chunk that no other connected
        peer holds is not returned but given ``renew`` more seconds:
        cancelling it could only lead to asking the same peer again, and a
        CANCEL that crosses the chunk on the wire wastes that upload. A dead
        peer is the stall timeout's business.
        """
        out: list[tuple[PeerKey, int]] = []
        for i, holders in self._inflight.items():
            for peer, deadline in holders.items():
                if deadline <= now:
                    if renew > 0 and self.avail[i] <= 1:
                        holders[peer] = now + renew
                    else:
                        out.append((peer, i))
        return out
