"""Which chunk to ask for next, and from whom: the pure chunk picker.

Theory of operation
-------------------
The picker knows, for one download, which chunks we hold, which are in
flight (and from which peers), and how many connected peers hold each chunk
(*availability*). It does no I/O and reads no clock: callers pass ``now``.
That keeps it deterministic, which is what lets the simulator drive a
thousand-peer swarm through the very same code.

Rarest first. Missing, unrequested chunks live in *buckets* keyed by their
availability among connected peers (plus a small weight from the tracker's
swarm-wide counts before we have talked to anyone). A request for peer P
walks the buckets from the rarest up and, inside a bucket, starts at a random
position so that leechers spread over different chunks; the first chunk P
holds wins. Buckets are lists with a position map, so add/remove are O(1);
a picked chunk costs O(1) when the peer is a seeder and a short scan otherwise.

Each peer keeps a count of its *useful* chunks (it holds them, we lack them,
nobody is fetching them): a request for a peer with nothing useful returns at
once, and a scan stops as soon as it found what the peer can give. In a big
swarm most top-ups find nothing new, so this keeps the picker's cost
proportional to the chunks it actually hands out.

Refusals. A peer that answers REJECT ``busy`` for a chunk (its queue is full,
or it is a seeder serving every chunk once before any twice) should not be
asked for that chunk again at once: :meth:`refuse` releases the request and
keeps that (peer, chunk) pair out of :meth:`pick` until a given time, so the
next request to that peer goes to a different chunk and the refused one is
fetched from someone else.

Stale requests. A request queued behind many others at a busy uploader pins
its chunk: no other neighbour is asked for it, so a neighbour that got the
chunk meanwhile sits idle while we wait (the simulator showed most idle
upload links in a swarm's first minute were idle for exactly this reason).
With ``stale_after`` set, a chunk in flight for longer than that, from one
peer only, may be asked of a second peer that has nothing fresh to give;
the first copy to arrive wins and the other is cancelled (while it is still
queued that costs its uploader nothing). Candidates are kept in a queue
ordered by request time, so finding them costs only the stale ones.

Endgame. When no unrequested chunk is left that P holds, P may duplicate a
request already in flight elsewhere (at most ``endgame_copies`` holders per
chunk). The first copy to arrive wins; :meth:`chunk_received` returns the
other peers so their copies can be cancelled.

Rate-aware tail. The caller may tell the picker how fast each peer sends
(:meth:`set_rate`, bytes/s). In a mixed swarm the last chunks are often in
flight at a slow peer while a fast one has nothing left to fetch: the
download then ends at the slow peer's pace. With rates known, (1) endgame
duplicates the chunks stuck at the slowest holders first, and a peer
clearly faster than every holder of a chunk may add a copy beyond
``endgame_copies``; (2) *before* endgame, once most missing chunks are in
flight (the tail), a fast peer with nothing fresh to give duplicates a chunk
whose holders would, at their rates and backlogs, deliver it much later
than it would itself (``rescue_factor`` times). Only in-flight chunks are
scanned and only in the tail, so the cost stays small.

Timeouts. Each request carries a deadline; :meth:`expired` returns the ones
that passed so the caller can cancel them and the chunk goes back in its
bucket, to be fetched from someone else. A request for a chunk nobody else
we know holds is renewed instead (there is nobody else to fetch it from).
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from itertools import islice

__all__ = [
    "MAX_DEPTH",
    "PiecePicker",
    "pipeline_depth",
    "swarm_counts",
]

MAX_DEPTH = 32
_WEIGHT_CAP = 15  # swarm-wide counts above this rank alike
PIPELINE_SECONDS = 0.25


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
    refused: dict[int, float] | None = None  # chunk -> not before this time
    rate: float = 0.0  # bytes/s it sends us (0 = unknown)

    def eta(self, extra: int = 0) -> float:
        """Time (in chunk-size units) to deliver what it owes us plus ``extra``."""
        if self.rate <= 0:
            return float("inf")
        return (len(self.inflight) + extra) / self.rate


class PiecePicker:
    """Rarest-first chunk selection with endgame, for one download.

    Args:
        num_chunks: chunks in the file.
        have: one byte (0/1) per chunk we already hold (verified).
        rng: a ``random.Random`` (seeded in tests and the simulator).
        endgame_copies: most peers one chunk may be requested from at once
            in endgame mode (and for stale requests).
        stale_after: seconds after which a chunk requested from one peer may
            also be requested from another (0 = only in endgame).
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
        stale_after: float = 0.0,
        rescue_factor: float = 2.0,
    ) -> None:
        if rescue_factor < 0 or endgame_copies < 1 or stale_after < 0:
            raise ValueError("need rescue_factor >= 0, endgame_copies >= 1, stale_after >= 0")
        self.num_chunks = num_chunks
        self.rescue_factor = rescue_factor
        self.have = bytearray(have) if have is not None else bytearray(num_chunks)
        if len(self.have) != num_chunks:
            raise ValueError("have must have one entry per chunk")
        self._rng = rng or random.Random()
        self.endgame_copies = endgame_copies
        self.stale_after = stale_after
        self._since: dict[int, float] = {}  # chunk in flight -> when first requested
        self._stale_q: deque[tuple[float, int]] = deque()  # (since, chunk), oldest first
        self.avail = [0] * num_chunks
        # Tracker counts, used before peers connect; kept capped at
        # _WEIGHT_CAP (all the key uses), so an answer that moved only counts
        # above the cap changes nothing here.
        self._swarm_weight = [0] * num_chunks
        self._peers: dict[PeerKey, _Peer] = {}
        # chunk -> {peer: deadline}
        self._inflight: dict[int, dict[PeerKey, float]] = {}
        self._buckets: dict[int, list[int]] = {}
        self._open_n = 0  # chunks in the buckets
        self._pos = [-1] * num_chunks  # index inside its bucket, -1 if not in one
        self._bucket_of = [0] * num_chunks
        self._earliest = float("inf")  # lower bound on every request deadline
        self._refusals_end = float("inf")  # lower bound on when a refusal ends
        # Every refusal as (until, seq, chunk, peer), earliest first; one whose
        # peer left or whose entry was replaced or dropped is stale. Entries
        # leave once their time is over (see _prune), so it stays as long as
        # the refusals of one back-off.
        self._refusal_q: list[tuple[float, int, int, PeerKey]] = []
        self._refusal_seq = 0
        self._clock = float("-inf")  # the latest ``now`` a caller passed
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

    def _bucket_move(self, i: int, key: int) -> None:
        """Move open chunk ``i`` to the bucket ``key`` (its new key)."""
        buckets, pos = self._buckets, self._pos
        old = self._bucket_of[i]
        bucket = buckets[old]
        last = bucket.pop()
        if last != i:
            bucket[pos[i]] = last
            pos[last] = pos[i]
        if not bucket:
            del buckets[old]
        to = buckets.get(key)
        if to is None:
            to = buckets[key] = []
        pos[i] = len(to)
        self._bucket_of[i] = key
        to.append(i)

    def _rebucket(self, i: int) -> None:
        if self._pos[i] >= 0 and self._bucket_of[i] != (key := self._key(i)):
            self._bucket_move(i, key)

    # --- swarm knowledge ----------------------------------------------------
    def set_swarm_availability(self, counts: Iterable[int]) -> None:
        """Per-chunk holder counts from the tracker (a prior for rarest-first)."""
        weight = self._swarm_weight
        new = [c if c < _WEIGHT_CAP else _WEIGHT_CAP for c in islice(counts, self.num_chunks)]
        if new == weight[: len(new)]:
            return  # the usual case: nothing moved since the last answer
        for i, c in enumerate(new):
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
        avail, pos, key_of, weight = self.avail, self._pos, self._bucket_of, self._swarm_weight
        useful = 0
        i = f.find(1)
        while i >= 0:
            a = avail[i] = avail[i] + 1
            if pos[i] >= 0:
                useful += 1
                # self._rebucket(i), inlined (a bitfield's worth of calls)
                if key_of[i] != (key := min(a, 1000) * 16 + weight[i]):
                    self._bucket_move(i, key)
            i = f.find(1, i + 1)
        p.useful = useful

    def peer_has(self, peer: PeerKey, index: int) -> None:
        """The peer announced (HAVE) one more chunk."""
        p = self._peers.get(peer)
        if p is None or not 0 <= index < self.num_chunks or p.flags[index]:
            return
        p.flags[index] = 1
        p.held += 1
        counts = self.avail
        avail = counts[index] = counts[index] + 1
        if self._pos[index] >= 0:
            p.useful += 1
            # self._rebucket(index), inlined: one call per HAVE in a big swarm.
            key = (avail if avail < 1000 else 1000) * 16 + self._swarm_weight[index]
            if self._bucket_of[index] != key:
                self._bucket_move(index, key)

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
        avail, f, pos, key_of, weight = (
            self.avail,
            p.flags,
            self._pos,
            self._bucket_of,
            self._swarm_weight,
        )
        i = f.find(1)
        while i >= 0:
            a = avail[i] = avail[i] - 1
            # self._rebucket(i), inlined (a bitfield's worth of calls)
            if pos[i] >= 0 and key_of[i] != (key := min(a, 1000) * 16 + weight[i]):
                self._bucket_move(i, key)
            i = f.find(1, i + 1)
        released = sorted(p.inflight)
        for i in released:
            self._release(peer, p, i)
        return released

    def set_rate(self, peer: PeerKey, rate: float) -> None:
        """The rate (bytes/s) at which ``peer`` currently sends us chunks.

        Optional: only the rate-aware tail uses it (see the module notes).
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

    def pick(self, peer: PeerKey, count: int, now: float, timeout: float) -> list[int]:
        """Choose up to ``count`` chunks to request from ``peer``.

        The chosen chunks are marked in flight from ``peer`` with deadline
        ``now + timeout``. Chunks the peer refused (:meth:`refuse`) are not
        asked of it again before their time.
        """
        self._clock = now
        p = self._peers.get(peer)
        if p is None or count <= 0:
            return []
        if p.useful:
            chosen = self._pick_rarest(peer, p, min(count, p.useful), now, now + timeout)
            left = count - len(chosen)
            if left <= 0:
                return chosen
        else:
            chosen, left = [], count
        # (The usual case in a big swarm ends here: nothing useful, not in the tail.)
        if self.stale_after > 0 and self._stale_q:
            chosen.extend(self._pick_stale(peer, p, left, now, now + timeout))
            left = count - len(chosen)
            if left <= 0:
                return chosen
        if not self._buckets:
            chosen.extend(self._pick_endgame(peer, p, left, now, now + timeout))
        elif self.rescue_factor > 0 and p.rate > 0 and 2 * len(self._inflight) >= self.missing:
            chosen.extend(self._pick_rescue(peer, p, left, now, now + timeout))
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
        flags = p.flags
        out: list[int] = []
        for i, holders in self._inflight.items():
            if (
                flags[i]
                and peer not in holders
                and len(holders) < self.endgame_copies
                and self._slow_holders(p, holders, len(out) + 1)
            ):
                out.append(i)
                if len(out) >= count:
                    break
        for i in out:
            self._mark(peer, p, i, now, deadline)
        return out

    def _pick_rarest(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        if p.held * p.useful < count * self._open_n:
            return self._pick_rarest_held(peer, p, count, now, deadline)
        chosen: list[int] = []
        flags, refused = p.flags, p.refused
        for key in sorted(self._buckets):
            bucket = self._buckets.get(key)
            if not bucket:
                continue
            # Scan from a random start; removals swap the last element in,
            # so collect first and mark afterwards.
            if not any(map(flags.__getitem__, bucket)):
                continue  # (the usual bucket: none of its chunks; a scan in C)
            n = len(bucket)
            start = self._rng.randrange(n)
            picked_here: list[int] = []
            for k in range(n):
                i = bucket[(start + k) % n]
                if flags[i]:
                    if refused and i in refused:
                        if refused[i] > now:
                            continue
                        del refused[i]
                    picked_here.append(i)
                    if len(chosen) + len(picked_here) >= count:
                        break
            for i in picked_here:
                self._close(i)
                self._mark(peer, p, i, now, deadline)
            chosen.extend(picked_here)
            if len(chosen) >= count:
                break
        return chosen

    def _pick_rarest_held(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        """Rarest first by walking what the peer holds (cheaper when it holds
        few chunks than scanning the buckets for them); random among equals."""
        flags, refused, pos, key_of = p.flags, p.refused, self._pos, self._bucket_of
        cands: list[tuple[int, int]] = []
        i = flags.find(1)
        while i >= 0:
            if pos[i] >= 0:
                if refused and i in refused:
                    if refused[i] > now:
                        i = flags.find(1, i + 1)
                        continue
                    del refused[i]
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
            chosen.extend(group if len(group) <= room else self._rng.sample(group, room))
            k = end
        for i in chosen:
            self._close(i)
            self._mark(peer, p, i, now, deadline)
        return chosen

    def _pick_stale(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        queue, since, inflight = self._stale_q, self._since, self._inflight
        while queue and since.get(queue[0][1]) != queue[0][0]:
            queue.popleft()  # received or released since
        cutoff = now - self.stale_after
        flags, refused = p.flags, p.refused
        out: list[int] = []
        for start, i in queue:
            if start > cutoff:
                break
            holders = inflight.get(i)
            if (
                holders is None
                or since.get(i) != start
                or len(holders) >= self.endgame_copies
                or peer in holders
                or not flags[i]
                or (refused and refused.get(i, now) > now)
            ):
                continue
            out.append(i)
            if len(out) >= count:
                break
        for i in out:
            self._mark(peer, p, i, now, deadline)
        return out

    def _pick_endgame(
        self, peer: PeerKey, p: _Peer, count: int, now: float, deadline: float
    ) -> list[int]:
        flags, peers, copies = p.flags, self._peers, self.endgame_copies
        cands: list[tuple[int, float, int]] = []
        for i, holders in self._inflight.items():
            if peer in holders or not flags[i]:
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
        # Fewest copies in flight first; among those, the chunk its holders
        # would deliver last (stuck at slow peers) first.
        cands.sort(key=lambda c: (c[2], -c[1]))
        out = [c[0] for c in cands[:count]]
        for i in out:
            self._mark(peer, p, i, now, deadline)
        return out

    def _mark(self, peer: PeerKey, p: _Peer, i: int, now: float, deadline: float) -> None:
        holders = self._inflight.get(i)
        if holders is None:
            holders = self._inflight[i] = {}
            if self.stale_after > 0:
                self._since[i] = now
                self._stale_q.append((now, i))
        holders[peer] = deadline
        p.inflight.add(i)
        if deadline < self._earliest:
            self._earliest = deadline

    def _release(self, peer: PeerKey, p: _Peer | None, i: int) -> None:
        holders = self._inflight.get(i)
        if holders is None or peer not in holders:
            return
        del holders[peer]
        if p is not None:
            p.inflight.discard(i)
        if not holders:
            del self._inflight[i]
            self._since.pop(i, None)
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
        if p.refused is None:
            p.refused = {}
        p.refused[index] = until
        self._refusal_seq += 1
        heapq.heappush(self._refusal_q, (until, self._refusal_seq, index, peer))
        self._prune(self._clock)
        if until < self._refusals_end:
            self._refusals_end = until
        self._release(peer, p, index)

    def _prune(self, now: float) -> None:
        """Drop the refusals that are over by ``now`` (the chunk may be asked
        again: pick already treats them as gone) and the stale entries before
        the first live one."""
        queue, peers = self._refusal_q, self._peers
        while queue:
            until, _seq, i, key = queue[0]
            p = peers.get(key)
            refused = p.refused if p is not None else None
            live = refused is not None and refused.get(i) == until
            if live and until > now:
                return
            heapq.heappop(queue)
            if live:
                del refused[i]  # type: ignore[union-attr]

    @property
    def in_tail(self) -> bool:
        """Half the missing chunks in flight (or ``stale_after`` set): from here
        on, what one peer may be asked for depends on what the others owe
        (rate-aware rescue, endgame, stale duplicates)."""
        return self.stale_after > 0 or 2 * len(self._inflight) >= self.missing

    def top_up_due(self, now: float) -> bool:
        """Could a periodic top-up find a request that no event offered yet?

        What :meth:`pick` can return changes when a peer announces chunks, a
        request ends (data, reject, cancel, timeout) or a peer comes or goes;
        a caller that tops up on those events needs its periodic top-up only
        when a refusal's back-off has ended, in the tail (the rate-aware
        rescue and endgame depend on every peer's backlog) or with
        ``stale_after`` (duplicates by age). False means a top-up of every
        peer now would return nothing.
        """
        if self.in_tail:
            return True
        if now < self._refusals_end:
            return False
        # Drop the refusals that are over and find when the next one ends:
        # the earliest live entry of the queue.
        self._clock = now
        self._prune(now)
        queue = self._refusal_q
        self._refusals_end = queue[0][0] if queue else float("inf")
        return True

    def chunk_received(self, peer: PeerKey, index: int) -> list[PeerKey]:
        """A verified chunk from ``peer`` is stored.

        Returns the other peers that still have it in flight (cancel those).
        """
        holders = self._inflight.pop(index, {})
        self._since.pop(index, None)
        for q in holders:
            qp = self._peers.get(q)
            if qp is not None:
                qp.inflight.discard(index)
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
        CANCEL that crosses the chunk on the wire wastes that upload. (At
        the origin seeder of a big swarm the queue is longer than any
        timeout: at N = 1000 a quarter of its uploads were lost that way.)
        A dead peer is the stall timeout's business.
        """
        if now < self._earliest:
            return []  # the common case, without walking every request
        out: list[tuple[PeerKey, int]] = []
        earliest = float("inf")
        avail = self.avail
        for i, holders in self._inflight.items():
            for peer, deadline in holders.items():
                if deadline <= now:
                    if renew > 0 and avail[i] <= 1:
                        deadline = holders[peer] = now + renew
                    else:
                        out.append((peer, i))
                if deadline < earliest:
                    earliest = deadline
        self._earliest = earliest
        return out
