"""The tracker's swarm index: who holds which chunks of which content.

Pure bookkeeping: no sockets, no trio, and every method takes ``now`` (seconds
from any monotonic clock), so expiry is deterministic in tests. Each content's
peers live in a ``PeerTable`` (``_peer_table.py``); answers are PEERS frames
joined from pieces kept encoded (``_peers_frame.py``).

* Choosing peers: at most ``sample`` candidates are scored by the chunks they
  have that the asker lacks (the rarest first); those with nothing to offer
  come last. Seeders are scored once, and when the sample holds enough of
  them nothing else is.
* Rankings are cached per (content, asker bits, want) for 1.5-2 s, and most
  askers share the *generic* one (for an asker that has nothing yet), whose
  PEERS frame is encoded once and kept. A peer joining or leaving always ends
  a ranking (a fresh one rotates where ties start, so newcomers spread); a
  full one outlives bitmap changes. The cache is one FIFO, bounded in entries
  and bytes, and a ranking is never used past its first listed peer's expiry.
* Expiry is lazy (expired slots are skipped) plus a sweep, ``expire(now)``,
  that the server calls every few seconds.

In full, and why each rule: docs/ARCHITECTURE.md, "The tracker's index".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import accumulate
from random import Random

import msgpack

from peerd.errors import TrackerError
from peerd.wire import FRAME_HEADER, MAX_BODY, FrameType

from ._addresses import is_loopback
from ._budget import Budget
from ._peer_table import MAX_LANES_PEERS, PeerTable, entry_cost, pack_ip, unpack_ip
from ._peers_frame import body_head, entry_head, frame_header

__all__ = ["EVENTS", "PeerInfo", "SwarmIndex", "SwarmStat"]

EVENTS = ("started", "progress", "completed", "stopped", "periodic")
_EVENT_SET = frozenset(EVENTS)

# One announced peer as returned to an asker: (ip, port, public key, bitmap).
PeerInfo = tuple[str, int, bytes, bytes]

_RANK_CACHE_SECONDS = 2.0
_ANSWER_ENTRIES = 4096  # cached rankings, whole index
_ANSWER_BYTES = 8 * 2**20  # encoded PEERS entries kept, whole index
_HEAD_MEMO = 4096  # (ip, port) -> head, for sharing heads between slots
_PEERS_LIMIT = MAX_BODY[FrameType.PEERS]
_HEADER = FRAME_HEADER.size
# Upper bound of one encoded PEERS entry beyond its bitmap: array header,
# str8 of up to 45 characters, uint16 port, bin8 key, bin32 header.
_ENTRY_OVERHEAD = 1 + 47 + 3 + 34 + 5


@dataclass(frozen=True, slots=True)
class SwarmStat:
    """Scrape figures for one content id."""

    content_id: bytes
    seeders: int
    leechers: int
    completed: int


class _Answer:
    """One cached ranking and, once it is asked for again, its encoded answer."""

    __slots__ = (
        "asked",
        "extra",
        "frame",
        "frame_version",
        "interval",
        "leech",
        "members",
        "offsets",
        "position",
        "ranked",
        "serial",
        "until",
        "version",
    )

    def __init__(self, table: PeerTable, until: float, ranked: list[int]) -> None:
        self.serial = table.serial
        self.version = table.version
        self.members = table.members
        self.until = until
        self.ranked = ranked
        self.asked = 1
        # Built on the second ask (see _cached_frame): the PEERS frame that
        # answers an asker it does not list (its first `m` ranked peers), the
        # table version whose availability that frame carries, where each
        # entry starts in it (and where the last ends), and the encoded entry
        # of ranked peer `m`, if any (a listed asker gets it instead of its own).
        self.frame = b""
        self.frame_version = -1
        self.interval = 0
        self.offsets: list[int] = []
        self.extra = b""
        # The bitmaps of the non-seeders in `ranked` (built on first use).
        self.leech: list[int] | None = None
        # slot -> its place in `ranked` (built on the second ask).
        self.position: dict[int, int] | None = None

    def place(self, slot: int) -> int:
        """Where ``slot`` is in the ranking, -1 if it is not listed."""
        position = self.position
        if position is None:
            if self.asked < 2:
                return self.ranked.index(slot) if slot in self.ranked else -1
            position = self.position = {s: i for i, s in enumerate(self.ranked)}
        return position.get(slot, -1)

    @property
    def nbytes(self) -> int:
        return len(self.frame) + len(self.extra)


class SwarmIndex:
    """Per content id: which peers (by public key) hold which chunks.

    Args:
        ttl: seconds after its last announce when a peer entry vanishes.
        interval: seconds between periodic announces that the tracker asks for.
        max_contents: content ids tracked at once (new ones beyond are refused).
        max_contents_per_peer: contents one public key may be announced in.
        max_peers_per_content: peers per content id (at most 65,535).
        sample: candidates scored per answer (bounds the work of one announce).
        memory: the bytes swarms and entries may hold, in all and per address
            (the address whose announce created a table pays for it; an entry
            is paid by the address it announced from). None: unbounded.
    """

    def __init__(
        self,
        *,
        ttl: float = 180.0,
        interval: float = 60.0,
        max_contents: int = 100_000,
        max_contents_per_peer: int = 1_000,
        max_peers_per_content: int = 10_000,
        sample: int = 300,
        memory: Budget | None = None,
    ) -> None:
        if not 0 < max_peers_per_content <= MAX_LANES_PEERS:
            raise ValueError("max_peers_per_content must be in 1..65535")
        if not 0 < sample <= 0xFFFF:  # a window position must fit a rank key's low 16 bits
            raise ValueError("sample must be in 1..65535")
        if ttl <= 0 or interval <= 0:
            raise ValueError("ttl and interval must be positive")
        self.ttl = float(ttl)
        self.interval = float(interval)
        self.max_contents = max_contents
        self.max_contents_per_peer = max_contents_per_peer
        self.max_peers_per_content = max_peers_per_content
        self.sample = sample
        self.memory = memory if memory is not None else Budget(1 << 62, 1 << 62)
        self._tables: dict[bytes, PeerTable] = {}
        self._peer_contents: dict[bytes, int] = {}  # key -> number of contents it is in
        self._entries = 0
        self._heads: dict[tuple[str, int], bytes] = {}  # (ip, port) -> entry head
        # FIFO (see module doc). An OrderedDict because popping a plain dict's
        # first item scans the deleted entries before it.
        self._answers: OrderedDict[tuple[bytes, bytes, int], _Answer] = OrderedDict()
        self._answer_bytes = 0
        # Spreads ranking lifetimes (see _ranking); seeded, so that two indexes
        # fed the same announces answer alike.
        self._jitter = Random(0x5EED).random

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        """Number of peer entries over all contents."""
        return self._entries

    @property
    def num_contents(self) -> int:
        """Number of content ids with at least one peer."""
        return len(self._tables)

    def num_chunks(self, content_id: bytes) -> int | None:
        """The bitmap size in chunks of a tracked content, or None if untracked."""
        table = self._tables.get(content_id)
        return None if table is None else table.num_chunks

    def scrape(self, content_ids: list[bytes], now: float) -> list[SwarmStat]:
        """Seeders, leechers and completed count of each id that has a live peer.

        Ids without one (never announced, or every peer gone) are left out,
        as PROTOCOL.md says of SCRAPE.
        """
        self.expire_some(content_ids, now)
        out = []
        for cid in content_ids:
            table = self._tables.get(cid)
            if table is not None:
                out.append(
                    SwarmStat(cid, table.seeders, len(table) - table.seeders, table.completed)
                )
        return out

    # -- updates -------------------------------------------------------------
    def announce(
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        event: str,
        bits: bytes,
        num_chunks: int | None,
        want: int,
        now: float,
        *,
        at: str = "",
    ) -> tuple[list[PeerInfo], bytes]:
        """Record one announce and answer it.

        Args:
            content_id: the content (32 bytes).
            key: the announcing peer's public key (already authenticated).
            ip: the address its connection comes from (never a field it chose).
            port: its listening port.
            event: one of ``EVENTS``; ``stopped`` removes the entry.
            bits: its chunk bitmap, ``ceil(num_chunks / 8)`` bytes, pad bits zero.
            num_chunks: the chunk count from the content's manifest if the
                tracker has it; otherwise the first announce fixes the bitmap
                size at ``8 * len(bits)`` chunks.
            want: how many peers to return (0 allowed).
            now: the current time.
            at: the address others are told to dial, when not ``ip`` (an
                address the announcer stated that the server decided to
                believe: tracker._addresses); ``ip`` still pays for the entry.

        Returns:
            ``(peers, availability)``: up to ``want`` peers other than the asker,
            most useful first, and a u16 big-endian count per chunk. Both are
            empty for ``stopped``.

        Raises:
            TrackerError: ``bad-request`` (unknown event, bitmap of the wrong
            size or with pad bits set), ``too-many`` (a cap is reached) or
            ``limit`` (the memory budget, in all or for ``ip``, is reached).
        """
        recorded = self._record(content_id, key, ip, port, event, bits, num_chunks, now, at)
        if recorded is None:
            return [], b""
        table, slot = recorded
        if want <= 0:
            return [], table.avail()
        if table.loopback and not is_loopback(ip):
            chosen = self._pick_remote(content_id, table, slot, bits, want, now)
            return [_info(table.entry(s)) for s in chosen], table.avail()
        answer = self._answer_for(content_id, table, slot, bits, want, now)
        frame = self._cached_frame(content_id, 1, table, answer, slot, want)
        if frame is not None:  # what the encoded path answers, as tuples
            peers = msgpack.unpackb(frame[_HEADER:])["peers"]
            return [(ip, port, key, bits) for ip, port, key, bits in peers], table.avail()
        entries = [table.entry(s) for s in self._pick(table, answer.ranked, slot, want)]
        return [_info(e) for e in entries], table.avail()

    def announce_frame(
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        event: str,
        bits: bytes,
        num_chunks: int | None,
        want: int,
        now: float,
        interval: int,
        *,
        at: str = "",
    ) -> bytes | None:
        """``announce``, answered as an encoded PEERS frame (the server's hot path).

        Same arguments, effects and errors as ``announce``; ``interval`` is the
        PEERS ``interval`` field. Returns the whole PEERS frame (header and
        msgpack body) that carries ``announce``'s answer, byte for byte what
        framing an encoded ``Peers`` would give, or None for ``stopped``.
        Repeated questions are answered from the cache described in the
        module doc.
        """
        recorded = self._record(content_id, key, ip, port, event, bits, num_chunks, now, at)
        if recorded is None:
            return None
        table, slot = recorded
        chosen: list[int] = []
        if want > 0 and table.loopback and not is_loopback(ip):
            chosen = self._pick_remote(content_id, table, slot, bits, want, now)
        elif want > 0:
            answer = self._answer_for(content_id, table, slot, bits, want, now)
            frame = self._cached_frame(content_id, interval, table, answer, slot, want)
            if frame is not None:
                return frame
            chosen = self._pick(table, answer.ranked, slot, want)
        start = body_head(content_id, interval, len(chosen))
        tail = table.avail_tail()
        size = len(start) + sum(table.entry_sizes(chosen)) + len(tail)
        return b"".join((frame_header(size), start, *table.entry_parts(chosen), tail))

    def _record(
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        event: str,
        bits: bytes,
        num_chunks: int | None,
        now: float,
        at: str = "",
    ) -> tuple[PeerTable, int] | None:
        """The bookkeeping half of an announce: (table, asker's slot), None if stopped."""
        if event not in _EVENT_SET:
            raise TrackerError("bad-request", f"unknown announce event {event!r}")
        if len(key) != 32:  # encoded answers carry it behind a fixed bin-8 header
            raise TrackerError("bad-request", f"a public key is 32 bytes, not {len(key)}")
        table = self._tables.get(content_id)
        if event == "stopped":
            if table is not None:
                slot = table.slots.get(key)
                if slot is not None:
                    self._remove(content_id, table, slot)
            return None
        if table is not None and num_chunks is not None and table.num_chunks != num_chunks:
            # The table was sized from bitmaps before the manifest was known.
            self.set_num_chunks(content_id, num_chunks)
            table = self._tables.get(content_id)
        if table is None:
            n = num_chunks if num_chunks is not None else 8 * len(bits)
            self._check_bits(n, bits)
            if len(self._tables) >= self.max_contents:
                self.expire(now)
                if len(self._tables) >= self.max_contents:
                    raise TrackerError("too-many", "the tracker tracks too many contents")
            table = PeerTable(n)
            if not self.memory.take(table.cost, ip):
                raise TrackerError(
                    "limit", "the tracker's memory for swarms is full (in all or for this address)"
                )
            table.owner = ip
            self._tables[content_id] = table
        else:
            self._check_bits(table.num_chunks, bits)
        expiry = now + self.ttl
        slot = table.slots.get(key)
        if slot is not None and table.expires[slot] <= now:
            self._remove(content_id, table, slot)  # expired: starts afresh
            if content_id not in self._tables:  # that was its last entry: back in
                self.memory.force(table.cost, table.owner)
                self._tables[content_id] = table
            slot = None
        where = at or ip
        head = self._heads.get((where, port))
        if head is None:
            if len(self._heads) >= _HEAD_MEMO:
                self._heads.clear()
            # Canonical text (e.g. "::FFFF:1.2.3.4" -> "1.2.3.4"); the PEERS
            # entry minus its key and bitmap (and their bin headers).
            text = unpack_ip(pack_ip(where))
            head = entry_head(text, port)
            self._heads[(where, port)] = head
        try:
            if slot is None:
                self._admit(table, key, ip)
                slot = table.add(key, head, bits, expiry, ip)
                self._peer_contents[key] = self._peer_contents.get(key, 0) + 1
                self._entries += 1
            else:
                if table.heads[slot] != head:
                    table.heads[slot] = head
                    table.version += 1
                table.expires[slot] = expiry
                table.set_bits(slot, bits)
        finally:
            if not table.slots:
                self._drop_table(content_id, table)
        if is_loopback(where):
            table.loopback.add(slot)
        else:
            table.loopback.discard(slot)
        if event == "completed" and key not in table.completed_keys:
            table.completed += 1
            if len(table.completed_keys) < self.max_peers_per_content:
                table.completed_keys.add(key)
        return table, slot

    def put_entry(
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        bits: bytes,
        num_chunks: int,
        expiry: float,
        now: float,
        *,
        at: str = "",
    ) -> bool:
        """Record an entry learnt from a shared store, with the expiry it has there.

        The same checks and charges as an announce (``ip`` pays); returns
        False if it is already expired or does not fit (a cap, the budget).
        """
        if expiry <= now:
            return False
        try:
            recorded = self._record(
                content_id, key, ip, port, "periodic", bits, num_chunks, now, at
            )
        except TrackerError:
            return False
        if recorded is None:
            return False
        table, slot = recorded
        table.expires[slot] = expiry
        table.min_expiry = min(table.min_expiry, expiry)
        return True

    def remove_entry(self, content_id: bytes, key: bytes) -> bool:
        """Remove one peer entry (as ``stopped`` does); returns whether there was one."""
        table = self._tables.get(content_id)
        slot = None if table is None else table.slots.get(key)
        if table is None or slot is None:
            return False
        self._remove(content_id, table, slot)
        return True

    def has_entry(self, content_id: bytes, key: bytes) -> bool:
        """Whether ``key`` has an entry (maybe expired, not yet swept) in ``content_id``."""
        table = self._tables.get(content_id)
        return table is not None and key in table.slots

    def contents(self) -> list[bytes]:
        """The content ids with at least one entry."""
        return list(self._tables)

    def set_num_chunks(self, content_id: bytes, num_chunks: int) -> None:
        """Tell the index a content's real chunk count (its manifest arrived).

        A table sized differently from its first bitmaps is dropped; its peers
        come back with their next announce.
        """
        table = self._tables.get(content_id)
        if table is not None and table.num_chunks != num_chunks:
            for key in table.keys:
                if key is not None:
                    self._forget_key(key)
            cost = entry_cost(table.nbytes)
            for addr in table.addrs:
                if addr is not None:
                    self.memory.give(cost, addr)
            self._entries -= len(table)
            self._drop_table(content_id, table)

    def expire(self, now: float) -> int:
        """Remove every entry whose TTL has passed; returns how many went."""
        return self.expire_some(list(self._tables), now)

    def expire_some(self, content_ids: list[bytes], now: float) -> int:
        """Like ``expire`` but only for the given content ids."""
        removed = 0
        for cid in content_ids:
            table = self._tables.get(cid)
            if table is None or table.min_expiry > now:
                continue
            earliest = float("inf")
            for slot, key in enumerate(table.keys):
                if key is None:
                    continue
                exp = table.expires[slot]
                if exp <= now:
                    self._remove(cid, table, slot)
                    removed += 1
                elif exp < earliest:
                    earliest = exp
            table.min_expiry = earliest
        return removed

    # -- internals -----------------------------------------------------------
    def _check_bits(self, num_chunks: int, bits: bytes) -> None:
        nbytes = (num_chunks + 7) // 8
        if len(bits) != nbytes:
            raise TrackerError(
                "bad-request",
                f"bitmap is {len(bits)} bytes, this content needs {nbytes} ({num_chunks} chunks)",
            )
        spare = nbytes * 8 - num_chunks
        if spare and bits[-1] & ((1 << spare) - 1):
            raise TrackerError("bad-request", "bitmap has bits set beyond the last chunk")

    def _admit(self, table: PeerTable, key: bytes, ip: str) -> None:
        if len(table) >= self.max_peers_per_content:
            raise TrackerError("too-many", "this content has too many peers")
        if self._peer_contents.get(key, 0) >= self.max_contents_per_peer:
            raise TrackerError(
                "too-many", f"a peer may announce at most {self.max_contents_per_peer} contents"
            )
        if not self.memory.take(entry_cost(table.nbytes), ip):
            raise TrackerError(
                "limit", "the tracker's memory for peers is full (in all or for this address)"
            )

    def _forget_key(self, key: bytes) -> None:
        left = self._peer_contents[key] - 1
        if left:
            self._peer_contents[key] = left
        else:
            del self._peer_contents[key]

    def _remove(self, content_id: bytes, table: PeerTable, slot: int) -> None:
        addr = table.addrs[slot]
        if addr is not None:
            self.memory.give(entry_cost(table.nbytes), addr)
        self._forget_key(table.remove(slot))
        self._entries -= 1
        if not table.slots:
            # Nothing of a content survives its last peer: memory stays bounded
            # by live entries (completed counts are soft state, like the peers).
            self._drop_table(content_id, table)

    def _drop_table(self, content_id: bytes, table: PeerTable) -> None:
        if self._tables.get(content_id) is table:
            del self._tables[content_id]
            self.memory.give(table.cost, table.owner)

    def _evict_answer(self) -> None:
        _, gone = self._answers.popitem(last=False)
        self._answer_bytes -= gone.nbytes

    def _answer_for(
        self, content_id: bytes, table: PeerTable, slot: int, bits: bytes, want: int, now: float
    ) -> _Answer:
        """The ranking that answers the asker in ``slot`` (see "Choosing peers")."""
        generic = self._ranking(content_id, table, table.nothing, want, now)
        if bits == table.nothing:
            return generic
        full = table.full_int
        lacks = full & ~int.from_bytes(bits, "big")
        if lacks:
            # Seeders always have something the asker lacks; check the others
            # in C (map + count). The asker itself, if listed, is the one
            # expected miss: it never has what it lacks.
            leech = generic.leech
            if leech is None:
                packed = table.bits
                leech = generic.leech = [b for s in generic.ranked if (b := packed[s]) is not full]
            if list(map(lacks.__and__, leech)).count(0) == (generic.place(slot) >= 0):
                return generic
        return self._ranking(content_id, table, bits, want, now)

    def _ranking(
        self, content_id: bytes, table: PeerTable, asker_bits: bytes, want: int, now: float
    ) -> _Answer:
        """The cached ranking for this question, recomputed if stale or missing."""
        cache_key = (content_id, asker_bits, want)
        answer = self._answers.get(cache_key)
        if answer is not None:
            # Reused for up to 2 s while nobody joined or left; if it is full
            # (``want + 1`` peers), also while bitmaps move (see "Choosing peers").
            if (
                answer.until > now
                and answer.serial == table.serial
                and answer.members == table.members
                and (answer.version == table.version or len(answer.ranked) > want)
            ):
                answer.asked += 1
                return answer
            del self._answers[cache_key]
            self._answer_bytes -= answer.nbytes
        ranked = self._rank(table, asker_bits, want, now)
        # Valid until the first listed peer expires: until then every slot in
        # it is live, so answering from it needs no per-peer liveness check.
        # (The table's earliest expiry is a cheaper bound while it is ahead.)
        # Lifetimes are spread over the last quarter of the 2 s: rankings made
        # together (a tracker's first second, a burst of joins) would
        # otherwise all be rescored together, every 2 s, in a wave of work
        # that delays every reply queued behind it.
        until = now + _RANK_CACHE_SECONDS * (1.0 - 0.25 * self._jitter())
        first_expiry = table.min_expiry
        if first_expiry <= until:
            first_expiry = min(map(table.expires.__getitem__, ranked), default=float("inf"))
        answer = _Answer(table, min(until, first_expiry), ranked)
        while len(self._answers) >= _ANSWER_ENTRIES:
            self._evict_answer()
        self._answers[cache_key] = answer
        return answer

    def _rank(self, table: PeerTable, asker_bits: bytes, want: int, now: float) -> list[int]:
        mine = int.from_bytes(asker_bits, "big")
        lacks = table.full_int & ~mine
        rare = table.rare_mask() & lacks
        keys = table.keys
        expires = table.expires
        total = len(keys)
        if total <= self.sample:
            # Everyone fits: still rotate where ties start, so that askers with
            # the same bitmap (a flash crowd) are not all sent to the same peers.
            start, count = (table.start % total if total else 0), total
            table.start = start + 1
            ints = table.bits[start:] + table.bits[:start] if start else table.bits
        else:
            # Rotate a window of `sample` slots so big swarms are sampled fairly.
            start, count = table.start % total, self.sample
            table.start = start + count
            end = start + count
            ints = table.bits[start:end]
            if end > total:
                ints += table.bits[: end - total]
        # useful = chunks it has that the asker lacks (rare ones weigh most);
        # a peer with nothing useful still ranks above one that lacks nothing
        # the asker has, since it will want to download from the asker.
        # Seeders all share table.full_int (see set_bits): score them once.
        # Each key is the score with the window position below it (inverted,
        # so that a descending sort of plain ints keeps ties in window order,
        # which rotates between calls).
        full = table.full_int
        all_live = not table.free and table.min_expiry > now
        if lacks and all_live and ints.count(full) > want:
            # Seeders have everything the asker lacks, so nobody outranks
            # them, and there are enough of them: no need to score the rest.
            pos = [i for i, t in enumerate(ints) if t is full]
            return [(start + i) % total for i in pos[: want + 1]]
        w = table.num_chunks.bit_length()
        seeder = (((rare.bit_count() << w | lacks.bit_count()) << 1 | 1) << 16) if lacks else 0
        asker_has = 1 << 16 if mine else 0
        keyed = [
            (
                seeder
                if t is full
                else (((u & rare).bit_count() << w | u.bit_count()) << 1 | 1) << 16
                if (u := t & lacks)
                else (asker_has if mine & ~t else 0)
            )
            | (0xFFFF - i)
            for i, t in enumerate(ints)
        ]
        keyed.sort(reverse=True)
        # want + 1 so dropping the asker still leaves `want` peers.
        if all_live:
            return [(start + 0xFFFF - (k & 0xFFFF)) % total for k in keyed[: want + 1]]
        slots = [(start + 0xFFFF - (k & 0xFFFF)) % total for k in keyed]
        ranked = [s for s in slots if keys[s] is not None and expires[s] > now]
        del ranked[want + 1 :]
        return ranked

    def _cached_frame(
        self,
        content_id: bytes,
        interval: int,
        table: PeerTable,
        answer: _Answer,
        asker: int,
        want: int,
    ) -> bytes | None:
        """The PEERS frame answering ``asker`` from a ranking asked more than once.

        The ranking keeps the frame for an asker it does not list: such an
        asker gets it as it is while the table's availability is unchanged,
        else it is rebuilt once around the new availability. A listed asker
        gets the same entries without its own, plus the next ranked one (one
        join). None for a ranking asked once (most are): building and keeping
        its entries would cost more than encoding the answer directly.
        """
        frame = answer.frame
        if not frame or answer.interval != interval:
            if answer.asked < 2:
                return None
            self._answer_bytes -= answer.nbytes
            ranked = answer.ranked
            m = min(len(ranked), self._fit(table, want))
            listed = ranked[:m]
            start = body_head(content_id, interval, m)
            offsets = list(accumulate(table.entry_sizes(listed), initial=_HEADER + len(start)))
            tail = table.avail_tail()
            size = offsets[-1] - _HEADER + len(tail)
            frame = b"".join((frame_header(size), start, *table.entry_parts(listed), tail))
            answer.frame, answer.frame_version = frame, table.version
            answer.offsets = offsets
            answer.extra = table.entry(ranked[m]) if m < len(ranked) else b""
            answer.interval = interval
            self._answer_bytes += answer.nbytes
            while self._answer_bytes > _ANSWER_BYTES and len(self._answers) > 1:
                self._evict_answer()
        # Every frame stays within the PEERS limit: `_fit` sized `m` for the
        # biggest availability this table can have.
        offsets = answer.offsets
        end = offsets[-1]
        if 0 <= (i := answer.place(asker)) < len(offsets) - 1:
            view, extra, tail = memoryview(frame), answer.extra, table.avail_tail()
            count = len(offsets) - 1 if extra else len(offsets) - 2
            start = body_head(content_id, interval, count)
            size = (
                len(start) + end - offsets[0] - offsets[i + 1] + offsets[i] + len(extra) + len(tail)
            )
            return b"".join(
                (
                    frame_header(size),
                    start,
                    view[offsets[0] : offsets[i]],
                    view[offsets[i + 1] : end],
                    extra,
                    tail,
                )
            )
        if answer.frame_version != table.version:  # the availability moved
            tail = table.avail_tail()
            before = len(frame)
            with memoryview(frame) as view:
                frame = b"".join((frame_header(end - _HEADER + len(tail)), view[_HEADER:end], tail))
            answer.frame, answer.frame_version = frame, table.version
            self._answer_bytes += len(frame) - before
        return frame

    def _pick_remote(
        self, content_id: bytes, table: PeerTable, slot: int, bits: bytes, want: int, now: float
    ) -> list[int]:
        """Up to ``want`` slots for an asker not on loopback, in a table that
        has loopback entries: the ranking's, without them (they name the
        asker's own machine; see ``_addresses``). The ranking is asked for as
        many more as there are such entries, so the asker still gets
        ``want`` usable peers where the table has them. Not from a cached
        frame: those may list loopback entries."""
        hidden = table.loopback
        answer = self._answer_for(content_id, table, slot, bits, want + len(hidden), now)
        chosen = [s for s in answer.ranked if s != slot and s not in hidden]
        del chosen[self._fit(table, want) :]
        return chosen

    def _pick(self, table: PeerTable, ranked: list[int], asker: int, want: int) -> list[int]:
        """Up to ``want`` slots of a valid ``ranked`` (all live) other than ``asker``.

        Fewer if their bitmaps would not fit one PEERS body.
        """
        chosen = [s for s in ranked if s != asker]
        del chosen[self._fit(table, want) :]
        return chosen

    @staticmethod
    def _fit(table: PeerTable, want: int) -> int:
        """How many of ``want`` entries one PEERS body can carry."""
        fit = (_PEERS_LIMIT - 2 * table.num_chunks - 64) // (_ENTRY_OVERHEAD + table.nbytes)
        return min(want, fit)


def _info(entry: bytes) -> PeerInfo:
    """(ip, port, key, bits) back from an encoded PEERS entry (the tuple API)."""
    ip, port, key, bits = msgpack.unpackb(entry)
    return ip, port, key, bits
