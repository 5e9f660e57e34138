"""Who gets our upload next: the pure upload-slot (unchoke) policy.

A node's upload link is one shared resource; the :class:`Choker` owns the
queue of requests from every connection (in with :meth:`on_request`, out with
:meth:`on_cancel`, :meth:`next_request` or a writer's :meth:`next_request_for`)
and decides which one is served next. It does no I/O and reads no clock
(callers pass ``now``). The protocol has no CHOKE message, so
the policy is purely a *service order*; it is always work conserving (if no
favoured peer asks, anyone who asks is served).

* Fair share (``slots=0``, the default): round robin, one chunk per turn.
  Tit-for-tat (``slots=k``): ``k - 1`` reciprocation slots plus one rotating
  optimistic slot.
* Fresh first: the request for the chunk we uploaded the fewest times wins.
* Furthest behind first (``needy_window``): only requesters within the window
  of the least advanced one's progress are eligible (:func:`neediest`).
* Super-seeding (``super_seed=n``, origin seeder): while some chunk is neither
  sent nor queued, a request for one already sent or queued is refused once.
* Queue wait (``max_wait``): :meth:`overdue` refuses what waited too long.

Why each rule, and what it measured: docs/ARCHITECTURE.md, "Upload slots"
and "Swarm-scale rules".
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping

__all__ = ["Choker", "neediest"]

PeerKey = Hashable


Request = tuple[int, int, int]  # (index, offset, length), as on the wire


def neediest(
    peers: Iterable[PeerKey], progress: Callable[[PeerKey], float], window: float
) -> list[PeerKey]:
    """Those of ``peers`` (in their order) whose progress is within ``window``
    of the least: the ones a "furthest behind first" uploader serves next.

    ``progress(peer)`` is the share of the chunks the peer holds as far as
    we know (its BITFIELD, its HAVEs and the chunks we sent it). It is asked
    here, when a turn is decided, not on every HAVE.
    """
    peers = list(peers)
    shares = list(map(progress, peers))
    if not shares:
        return []
    cutoff = min(shares) + window
    return [p for p, share in zip(peers, shares, strict=True) if share <= cutoff]


def _unknown_progress(peer: PeerKey) -> float:
    return 0.0


class Choker:
    """Upload-slot policy and upload queue for one node (one link, many connections).

    Args:
        slots: peers served at once; 0 = every requesting peer, in fair round
            robin. Otherwise at least 2 (``slots - 1`` regular + 1 optimistic).
        max_queued: requests one peer may have queued (more are refused, so the
            caller can answer REJECT ``busy``).
        fresh_first: prefer requests for the chunks we uploaded least.
        rechoke_every: seconds between recomputations of the unchoked set.
        optimistic_every: seconds an optimistic unchoke lasts.
        rng: randomness for the optimistic choice (seeded in tests).
        super_seed: chunks in the content when this node is the origin
            seeder and should serve every chunk once before any twice
            (0 = off). Chunk indices must then be below it.
        max_backlog: requests queued across all peers at most (0 = no bound
            beyond ``max_queued`` per peer). A request beyond it is refused,
            so it is sent to another holder instead of waiting here.
        max_wait: seconds a request may wait in the queue; :meth:`overdue`
            takes longer-waiting ones off it so the caller can refuse them
            (REJECT ``busy``) and the requester asks another holder
            (0 = off; not for the origin seeder, which holds what nobody
            else does).
        needy_window: serve first the requesters whose progress (share of
            the chunks held, ``progress``) is within this of the
            least advanced one's (0 = off).
        progress: ``progress(peer)``, the share of the chunks the peer holds
            as far as we know (for ``needy_window``; default: 0 for all).

    Raises:
        ValueError: ``slots`` is 1 or negative, ``max_queued`` < 1, or a
            period is not positive.
    """

    def __init__(
        self,
        *,
        slots: int = 0,
        max_queued: int = 64,
        fresh_first: bool = True,
        rechoke_every: float = 10.0,
        optimistic_every: float = 30.0,
        rng: random.Random | None = None,
        super_seed: int = 0,
        max_backlog: int = 0,
        max_wait: float = 0.0,
        needy_window: float = 0.0,
        progress: Callable[[PeerKey], float] = _unknown_progress,
    ) -> None:
        if super_seed < 0 or max_backlog < 0:
            raise ValueError("super_seed must be a chunk count (0 = off)")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0 (0 = requests wait as long as it takes)")
        if not 0 <= needy_window <= 1:
            raise ValueError("needy_window must be a share of the chunks, 0..1 (0 = off)")
        if slots < 0 or slots == 1:
            raise ValueError("slots must be 0 (fair share) or at least 2")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if rechoke_every <= 0 or optimistic_every <= 0:
            raise ValueError("rechoke_every and optimistic_every must be positive")
        self.slots = slots
        self.max_queued = max_queued
        self.fresh_first = fresh_first
        self.rechoke_every = rechoke_every
        self.optimistic_every = optimistic_every
        self._rng = rng or random.Random()
        self._queues: dict[PeerKey, deque[Request]] = {}
        self._served: dict[PeerKey, int] = {}  # peer -> bytes we sent it
        self._rates: dict[PeerKey, float] = {}  # peer -> bytes/s it sends us
        self._sent: dict[int, int] = {}  # chunk index -> times we uploaded it
        self._queued: dict[int, int] = {}  # chunk index -> requests queued for it
        self._refused: dict[PeerKey, set[int]] = {}  # super-seeding refusals, once each
        self.super_seed = super_seed
        self.max_backlog = max_backlog
        self.max_wait = max_wait
        self.needy_window = needy_window
        self._progress = progress
        # Queue-wait bookkeeping (max_wait only): queued request -> when
        # overdue() first saw it (None: not yet); the requests queued since
        # the last overdue(); (first seen, request), oldest first.
        self._seen: dict[tuple[PeerKey, Request], float | None] = {}
        self._unseen: list[tuple[PeerKey, Request]] = []
        self._waiting: deque[tuple[float, tuple[PeerKey, Request]]] = deque()
        self._backlog = 0  # requests queued, all peers
        self._untouched = super_seed  # chunks neither sent nor queued (super-seeding)
        self._turns: deque[PeerKey] = deque()  # round-robin order of waiting peers
        self._unchoked: set[PeerKey] = set()
        self._optimistic: PeerKey | None = None
        self._next_rechoke = float("-inf")
        self._next_optimistic = float("-inf")

    # --- membership -----------------------------------------------------------
    def add_peer(self, peer: PeerKey) -> None:
        """A connection is up (idempotent)."""
        self._queues.setdefault(peer, deque())
        self._served.setdefault(peer, 0)

    def remove_peer(self, peer: PeerKey) -> list[Request]:
        """A connection is gone: forget it; returns the requests it had queued."""
        queue = self._queues.pop(peer, None)
        self._refused.pop(peer, None)
        self._served.pop(peer, None)
        self._rates.pop(peer, None)
        self._unchoked.discard(peer)
        if queue:
            self._turns.remove(peer)
            for req in queue:
                self._dequeued(peer, req)
        if self._optimistic == peer:
            self._optimistic = None
            self._next_optimistic = float("-inf")
        return list(queue or ())

    # --- the queue ------------------------------------------------------------
    def on_request(self, peer: PeerKey, request: Request) -> bool:
        """Queue a request from the peer; False if its queue is full (reject it).

        Raises:
            KeyError: the peer was never added (a caller bug).
        """
        queue = self._queues[peer]
        if len(queue) >= self.max_queued:
            return False
        if self.max_backlog and self._backlog >= self.max_backlog:
            return False
        index = request[0]
        queued = self._queued.get(index, 0)
        if self._untouched > 0 and (queued or self._sent.get(index)):
            # Super-seeding: someone already has (or gets) this one. Refused
            # once per peer and chunk only: if the peer asks again (after its
            # busy back-off), nobody else could give it, e.g. the one we sent
            # it to has left — serve it rather than stall the download.
            refused = self._refused.setdefault(peer, set())
            if index not in refused:
                refused.add(index)
                return False
        if not queue:
            self._turns.append(peer)
        queue.append(request)
        if self.max_wait:
            key = (peer, request)
            self._seen[key] = None
            self._unseen.append(key)
        if not queued and self._untouched > 0 and not self._sent.get(index):
            self._untouched -= 1
        self._queued[index] = queued + 1
        self._backlog += 1
        return True

    def _dequeued(self, peer: PeerKey, request: Request) -> None:
        """``request`` left ``peer``'s queue (served, cancelled, or the peer left)."""
        if self.max_wait:
            self._seen.pop((peer, request), None)
        index = request[0]
        self._backlog -= 1
        left = self._queued[index] - 1
        if left:
            self._queued[index] = left
            return
        del self._queued[index]
        if self.super_seed and not self._sent.get(index):
            self._untouched += 1  # cancelled before it was sent: fresh again

    @property
    def super_seeding(self) -> bool:
        """True while requests for chunks already sent or queued are refused."""
        return self._untouched > 0

    def on_cancel(self, peer: PeerKey, request: Request) -> bool:
        """Drop a queued request (the peer cancelled it); False if it was not queued."""
        queue = self._queues.get(peer)
        if not queue:
            return False
        try:
            queue.remove(request)
        except ValueError:
            return False
        if not queue:
            self._turns.remove(peer)
        self._dequeued(peer, request)
        return True

    def queued(self, peer: PeerKey) -> int:
        """Requests the peer has waiting with us."""
        queue = self._queues.get(peer)
        return len(queue) if queue else 0

    def overdue(self, now: float) -> list[tuple[PeerKey, Request]]:
        """Queued requests that waited ``max_wait`` or longer, taken off the queue.

        Call it periodically (the node's ticker): a request's wait counts
        from the first call that saw it queued (one that left the queue and
        came back waits afresh); the longest-waiting come first, and the cost
        is that of the requests queued since the last call plus the ones
        returned, not of the whole queue. The caller refuses each one
        (REJECT ``busy``). Why: a leecher's queue fills with requests for
        the chunk it got first, each pinned there while the requester's
        other neighbours that got it since sit idle; refused, the requester
        asks one of them.
        """
        max_wait = self.max_wait
        if max_wait <= 0:
            return []
        seen, waiting = self._seen, self._waiting
        if self._unseen:
            for key in self._unseen:
                if key in seen and seen[key] is None:  # still queued, first seen now
                    seen[key] = now
                    waiting.append((now, key))
            self._unseen = []
        out: list[tuple[PeerKey, Request]] = []
        while waiting and now - waiting[0][0] >= max_wait:
            first, key = waiting.popleft()
            if seen.get(key) == first:  # queued ever since
                out.append(key)
        for peer, req in out:
            self.on_cancel(peer, req)
        return out

    def times_sent(self, index: int) -> int:
        """How many times :meth:`next_request` handed out chunk ``index``."""
        return self._sent.get(index, 0)

    # --- policy -------------------------------------------------------------
    def is_unchoked(self, peer: PeerKey) -> bool:
        """Would the peer's requests be served in turn now (always True in fair share)?"""
        return self.slots == 0 or peer in self._unchoked

    def update(self, now: float, rates: Mapping[PeerKey, float] | None = None) -> None:
        """Feed fresh download rates (bytes/s we receive from each peer).

        Recomputes the unchoked set when ``rechoke_every`` has passed, and the
        optimistic slot when ``optimistic_every`` has passed.
        """
        if rates is not None:
            for peer, rate in rates.items():
                if peer in self._queues:
                    self._rates[peer] = rate
        if self.slots == 0 or now < self._next_rechoke:
            return
        self._next_rechoke = now + self.rechoke_every
        wanting = list(self._turns)
        # Reciprocation first; among equals (e.g. we are a seeder and receive
        # nothing) the peer we served least so far.
        wanting.sort(key=lambda p: (-self._rates.get(p, 0.0), self._served[p]))
        regular = set(wanting[: self.slots - 1])
        if self._optimistic not in self._queues or now >= self._next_optimistic:
            others = [p for p in wanting if p not in regular]
            self._optimistic = self._rng.choice(others) if others else None
            self._next_optimistic = now + self.optimistic_every
        self._unchoked = regular
        if self._optimistic is not None:
            self._unchoked.add(self._optimistic)

    def next_request_for(self, peer: PeerKey) -> Request | None:
        """The request to upload next on ``peer``'s own connection, taken off its queue.

        For a node whose connections each have their own writer (the real
        node): the writers share the upload link, so the link itself splits
        the rate among them; the policy still decides *which* of the peer's
        requests goes first (fresh first) and, in :meth:`on_request`, which
        requests are accepted at all (queue bounds, super-seeding).
        """
        queue = self._queues.get(peer)
        if not queue:
            return None
        pos = 0
        if self.fresh_first:
            sent = self._sent
            pos = min(range(len(queue)), key=lambda k: sent.get(queue[k][0], 0))
        request = queue[pos]
        del queue[pos]
        if not queue:
            self._turns.remove(peer)
        self._sent[request[0]] = self._sent.get(request[0], 0) + 1
        self._dequeued(peer, request)
        self._served[peer] += request[2]
        return request

    def next_request(self, now: float) -> tuple[PeerKey, Request] | None:
        """The request to upload now, taken off its queue; None if nothing is queued.

        Round robin over the peers with queued requests (only the unchoked
        ones while any of them asks, when ``slots`` > 0); with ``fresh_first``
        the turn goes to the request for our least-uploaded chunk, round-robin
        order breaking ties.
        """
        if self.slots:
            self.update(now)
        turns = self._turns
        if not turns:
            return None
        eligible: deque[PeerKey] | list[PeerKey] = turns  # only read until the choice
        if self.slots:
            eligible = [p for p in turns if p in self._unchoked] or turns
        if self.needy_window and len(eligible) > 1:
            eligible = neediest(eligible, self._progress, self.needy_window)
        sent, queues = self._sent, self._queues
        best_peer, best_pos, best_count = eligible[0], 0, -1
        if self.fresh_first:
            for peer in eligible:
                pos = 0
                for req in queues[peer]:
                    count = sent.get(req[0], 0)
                    if best_count < 0 or count < best_count:
                        best_peer, best_pos, best_count = peer, pos, count
                        if count == 0:
                            break  # nothing fresher than never sent
                    pos += 1
                if best_count == 0:
                    break
        queue = queues[best_peer]
        request = queue[best_pos]
        del queue[best_pos]
        turns.remove(best_peer)
        if queue:
            turns.append(best_peer)
        sent[request[0]] = sent.get(request[0], 0) + 1
        self._dequeued(best_peer, request)
        self._served[best_peer] += request[2]
        return best_peer, request
