"""The requests remotes sent us, and the order we serve them.

The protocol has no CHOKE message: a node uploads whatever its remotes ask,
and the :class:`UploadQueue` only bounds what it accepts (per-connection
queue, super-seeding) and orders what it serves (fresh first). A leecher
also refuses what waited too long (:meth:`UploadQueue.overdue`), so the
requester asks another holder. It does no I/O and reads no clock (callers
pass ``now``). Why each rule: docs/ARCHITECTURE.md, "Upload queue".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable

__all__ = ["UploadQueue", "neediest"]

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


class UploadQueue:
    """The upload queue of one node: every connection's queued requests.

    Args:
        max_queued: requests one peer may have queued (more are refused, so the
            caller can answer REJECT ``busy``).
        fresh_first: serve first a peer's request for the chunk we uploaded
            least.
        super_seed: chunks in the content when this node is the origin
            seeder and should serve every chunk once before any twice
            (0 = off). Chunk indices must then be below it.
        max_wait: seconds a request may wait in the queue; :meth:`overdue`
            takes longer-waiting ones off it so the caller can refuse them
            (REJECT ``busy``) and the requester asks another holder
            (0 = off; not for the origin seeder, which holds what nobody
            else does).

    Raises:
        ValueError: ``max_queued`` < 1, or ``super_seed`` or ``max_wait``
            negative.
    """

    def __init__(
        self,
        *,
        max_queued: int = 64,
        fresh_first: bool = True,
        super_seed: int = 0,
        max_wait: float = 0.0,
    ) -> None:
        if super_seed < 0:
            raise ValueError("super_seed must be a chunk count (0 = off)")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0 (0 = requests wait as long as it takes)")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.max_queued = max_queued
        self.fresh_first = fresh_first
        self.super_seed = super_seed
        self.max_wait = max_wait
        self._queues: dict[PeerKey, deque[Request]] = {}
        self._sent: dict[int, int] = {}  # chunk index -> times we uploaded it
        self._queued: dict[int, int] = {}  # chunk index -> requests queued for it
        self._refused: dict[PeerKey, set[int]] = {}  # super-seeding refusals, once each
        # Super-seeding: the chunks each connected peer was sent, and how many
        # connected peers were sent each chunk. A copy that left with its peer
        # is no copy: that chunk is fresh again.
        self._given: dict[PeerKey, set[int]] = {}
        self._holders: dict[int, int] = {}
        self._untouched = super_seed  # chunks neither held (via us) nor queued (super-seeding)
        # Queue-wait bookkeeping (max_wait only): queued request -> when
        # overdue() first saw it (None: not yet); the requests queued since
        # the last overdue(); (first seen, request), oldest first.
        self._seen: dict[tuple[PeerKey, Request], float | None] = {}
        self._unseen: list[tuple[PeerKey, Request]] = []
        self._waiting: deque[tuple[float, tuple[PeerKey, Request]]] = deque()

    # --- membership -----------------------------------------------------------
    def add_peer(self, peer: PeerKey) -> None:
        """A connection is up (idempotent)."""
        self._queues.setdefault(peer, deque())

    def remove_peer(self, peer: PeerKey) -> list[Request]:
        """A connection is gone: forget it; returns the requests it had queued."""
        queue = self._queues.pop(peer, None)
        self._refused.pop(peer, None)
        for req in queue or ():
            self._dequeued(peer, req)
        holders = self._holders
        for index in self._given.pop(peer, ()):
            left = holders[index] - 1
            if left:
                holders[index] = left
                continue
            del holders[index]
            if index not in self._queued:
                self._untouched += 1  # its only copy (via us) left with this peer
        return list(queue or ())

    # --- the queue ------------------------------------------------------------
    def on_request(self, peer: PeerKey, request: Request) -> bool:
        """Queue a request from the peer; False if it is refused (reject it).

        Refused: the peer's queue is full, or (super-seeding) the chunk was
        sent to a peer still connected, or is queued, while some chunk is
        neither.

        Raises:
            KeyError: the peer was never added (a caller bug).
        """
        queue = self._queues[peer]
        if len(queue) >= self.max_queued:
            return False
        index = request[0]
        queued = self._queued.get(index, 0)
        if self._untouched > 0 and (queued or self._holders.get(index)):
            # Super-seeding: a connected peer has (or gets) this one. Refused
            # once per peer and chunk only: if the peer asks again (after its
            # busy back-off), it found nobody else to give it (it may not be
            # connected to the holder): serve it rather than stall the download.
            refused = self._refused.setdefault(peer, set())
            if index not in refused:
                refused.add(index)
                return False
        queue.append(request)
        if self.max_wait:
            key = (peer, request)
            self._seen[key] = None
            self._unseen.append(key)
        if not queued and self._untouched > 0 and not self._holders.get(index):
            self._untouched -= 1
        self._queued[index] = queued + 1
        return True

    def _dequeued(self, peer: PeerKey, request: Request) -> None:
        """``request`` left ``peer``'s queue (served, cancelled, or the peer left)."""
        if self.max_wait:
            self._seen.pop((peer, request), None)
        index = request[0]
        left = self._queued[index] - 1
        if left:
            self._queued[index] = left
            return
        del self._queued[index]
        if self.super_seed and not self._holders.get(index):
            self._untouched += 1  # cancelled before it was sent, or its asker left: fresh again

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
        (REJECT ``busy``).
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
        """How many times :meth:`next_request_for` handed out chunk ``index``."""
        return self._sent.get(index, 0)

    def next_request_for(self, peer: PeerKey) -> Request | None:
        """The request to upload next on ``peer``'s connection, taken off its queue.

        With ``fresh_first``, the request for the chunk we uploaded the fewest
        times (the oldest among equals); otherwise the oldest. Which
        connection uploads next is the caller's business
        (:class:`peerd.engine.scheduling.UploadTurns`).
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
        index = request[0]
        self._sent[index] = self._sent.get(index, 0) + 1
        if self.super_seed:
            given = self._given.setdefault(peer, set())
            if index not in given:
                given.add(index)
                self._holders[index] = self._holders.get(index, 0) + 1
        self._dequeued(peer, request)
        return request
