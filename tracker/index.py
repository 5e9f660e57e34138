"""The tracker's swarm index: who holds which chunks of which content.

Theory of operation
-------------------
Pure bookkeeping: no sockets, no trio, and every method takes ``now`` (seconds
from any monotonic clock) so expiry is deterministic in tests.

Memory is the constraint (hundreds of thousands of entries), so a swarm is not
a dict of peer objects but a handful of parallel packed arrays indexed by a
*slot* number: ``bits`` (a list of each slot's bitmap as an int, so scoring
candidates needs no conversion; every seeder shares the one "all chunks"
int), ``heads`` (per slot, the peer's address and port already
msgpack-encoded as the start of its PEERS entry, ``[ip, port,``),
``expires`` (an ``array('d')``), and ``keys`` (a list of the 32-byte public
keys, shared with the ``slots`` dict that maps a key to its slot). Freed slots
go on a free list and are reused, so a swarm's arrays never outgrow its peak
population. A head is built once per (ip, port) and the same object is shared
by every slot with that address while it stays in a small memo (a peer
announces all its contents in one burst), so a peer in many swarms pays for
its head once.

An encoded answer is therefore a concatenation: per chosen peer its head, its
key, its bitmap's bytes and two bin headers -- no per-peer objects, no per-peer
validation (the wire's trusted ``join_peers_body``; every field is valid by
construction: text from ``inet_ntop``, a u16 port, an authenticated key,
a bitmap checked on the way in).

Per-chunk availability is one big Python int with a 16-bit lane per chunk.
A bitmap is widened to lanes with a 256-entry table (a C-level ``join``), so an
announce that changes a peer's bits updates every chunk's count with one
big-int subtraction and one addition, whatever the chunk count; the wire form
of availability (u16 big-endian per chunk) is then just ``to_bytes``. A lane
never carries into its neighbour because a swarm holds at most 65,535 peers.

Choosing peers for an asker scores at most ``sample`` candidates: chunks the
candidate has that the asker lacks, with chunks in the rarest quarter of the
availability range counted first; candidates with nothing to offer come last,
those that lack something the asker has before the rest (they will want to
download from it). The ranking depends only on the swarm's state and the
asker's bits, so it is cached per (swarm version, asker bits, want) for a
short while: most announces are periodic and change nothing. A ranking asked
for a second time also keeps the encoded PEERS bodies built from it (one per
"which asker was dropped from the list"), so ``announce_encoded`` answers a
repeated question -- e.g. every seeder of a swarm asks the same one -- with a
dict lookup. A body is only reused until the earliest expiry among the peers
it lists, so it never lists a peer that ``announce`` would have skipped. The
cache is one FIFO for the whole index, bounded in entries and in body bytes
(a few MiB: it must not undo the memory budget per entry); entries carry
their swarm's serial number and version, so a stale one is recognised on
sight.

Expiry is lazy (expired slots are skipped when answering) plus a sweep,
``expire(now)``, that the server calls every few seconds; a swarm is only
walked when the lower bound it keeps on its earliest expiry has passed.
"""

from __future__ import annotations

import itertools
import socket
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from peerd.errors import TrackerError
from peerd.wire import MAX_BODY, FrameType, encode_peer_entry, join_peers_body

__all__ = ["EVENTS", "PeerInfo", "SwarmIndex", "SwarmStat"]

EVENTS = ("started", "progress", "completed", "stopped", "periodic")

# One announced peer as returned to an asker: (ip, port, public key, bitmap).
PeerInfo = tuple[str, int, bytes, bytes]

_MAX_LANES_PEERS = 65_535  # a 16-bit availability lane must never overflow
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_RANK_CACHE_SECONDS = 2.0
_ANSWER_ENTRIES = 2048  # cached rankings, whole index
_ANSWER_BYTES = 4 * 2**20  # encoded PEERS bodies kept, whole index
_HEAD_MEMO = 4096  # (ip, port) -> head, for sharing heads between slots
_KEY_HEADER = b"\xc4\x20"  # msgpack bin 8 of a 32-byte key
_ANSWER_BODY_MAX = 64 * 1024  # bigger bodies are rebuilt every time
_PEERS_LIMIT = MAX_BODY[FrameType.PEERS]
# Upper bound of one encoded PEERS entry beyond its bitmap: array header,
# str8 of up to 45 characters, uint16 port, bin8 key, bin32 header.
_ENTRY_OVERHEAD = 1 + 47 + 3 + 34 + 5
_serials = itertools.count(1)

# byte -> its bit j (0 or 1), j = 0 the top bit (chunk 8k+0).
_BIT_J = tuple(bytes((b >> (7 - j)) & 1 for b in range(256)) for j in range(8))
# 0/1 bytes -> ASCII "0"/"1" so int(..., 2) packs them into a bitmap in C.
_TO_ASCII01 = bytes.maketrans(b"\x00\x01", b"01")
# any non-zero byte -> 0xff (saturates a count whose high byte is set).
_NONZERO_FF = bytes([0] + [0xFF] * 255)


@dataclass(frozen=True, slots=True)
class SwarmStat:
    """Scrape figures for one content id."""

    content_id: bytes
    seeders: int
    leechers: int
    completed: int


class _Answer:
    """One cached ranking and the PEERS bodies built from it."""

    __slots__ = ("asked", "bodies", "ranked", "serial", "until", "version")

    def __init__(self, serial: int, version: int, until: float, ranked: list[int]) -> None:
        self.serial = serial
        self.version = version
        self.until = until
        self.ranked = ranked
        self.asked = 1
        # asker slot dropped from `ranked` (-1: none) -> (valid until, body)
        self.bodies: dict[int, tuple[float, bytes]] = {}


def _pack_ip(ip: str) -> bytes:
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        raise TrackerError("bad-request", f"not an IP address: {ip!r}") from None


def _bin_header(n: int) -> bytes:
    """msgpack bin header for ``n`` bytes (bin 8 / 16 / 32, as msgpack picks)."""
    if n < 256:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 65536:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _unpack_ip(packed: bytes) -> str:
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def _lanes(bits: bytes) -> int:
    """Widen a bitmap to an int with one 16-bit lane (0 or 1) per bit."""
    buf = bytearray(16 * len(bits))
    for j in range(8):  # lane of chunk 8k+j is bytes 16k+2j..16k+2j+1
        buf[2 * j + 1 :: 16] = bits.translate(_BIT_J[j])
    return int.from_bytes(buf, "big")


class _Swarm:
    """The peers of one content id, as parallel packed arrays (see module doc)."""

    __slots__ = (
        "bin_header",
        "bits",
        "completed",
        "completed_keys",
        "counts",
        "expires",
        "free",
        "full",
        "full_int",
        "heads",
        "keys",
        "min_expiry",
        "nbytes",
        "num_chunks",
        "rare",
        "rare_version",
        "seeders",
        "serial",
        "slots",
        "start",
        "version",
    )

    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self.nbytes = (num_chunks + 7) // 8
        full_int = ((1 << num_chunks) - 1) << (self.nbytes * 8 - num_chunks)
        self.full_int = full_int
        self.full = full_int.to_bytes(self.nbytes, "big")
        self.slots: dict[bytes, int] = {}
        self.keys: list[bytes | None] = []
        self.bits: list[int] = []  # bitmap per slot, as a big-endian int (0 when free)
        self.heads: list[bytes | None] = []
        self.bin_header = _bin_header(self.nbytes)
        self.expires = array("d")
        self.free: list[int] = []
        self.counts = 0
        self.seeders = 0
        self.completed = 0
        self.completed_keys: set[bytes] = set()
        self.min_expiry = float("inf")
        self.version = 0
        self.serial = next(_serials)  # tells a recreated swarm from its predecessor
        self.rare = 0
        self.rare_version = -1
        self.start = 0

    def __len__(self) -> int:
        return len(self.slots)

    def slot_bits(self, slot: int) -> bytes:
        return self.bits[slot].to_bytes(self.nbytes, "big")

    def set_bits(self, slot: int, new: bytes) -> None:
        value = int.from_bytes(new, "big")
        old = self.bits[slot]
        if old == value:
            return
        full = self.full_int
        self.counts += _lanes(new) - _lanes(old.to_bytes(self.nbytes, "big"))
        self.seeders += (value == full) - (old == full)
        self.bits[slot] = full if value == full else value  # seeders share one int
        self.version += 1

    def add(self, key: bytes, head: bytes, bits: bytes, expiry: float) -> int:
        if self.free:
            slot = self.free.pop()
            self.keys[slot] = key
            self.heads[slot] = head
            self.expires[slot] = expiry
        else:
            slot = len(self.keys)
            self.keys.append(key)
            self.bits.append(0)
            self.heads.append(head)
            self.expires.append(expiry)
        self.slots[key] = slot
        self.min_expiry = min(self.min_expiry, expiry)
        self.version += 1
        self.set_bits(slot, bits)
        return slot

    def remove(self, slot: int) -> bytes:
        key = self.keys[slot]
        assert key is not None
        self.set_bits(slot, bytes(self.nbytes))
        del self.slots[key]
        self.keys[slot] = None
        self.heads[slot] = None
        self.free.append(slot)
        self.version += 1
        return key

    def entry(self, slot: int) -> bytes:
        """The encoded PEERS entry ``[ip, port, key, bits]`` of a live slot."""
        head, key = self.heads[slot], self.keys[slot]
        assert head is not None and key is not None
        bits = self.bits[slot].to_bytes(self.nbytes, "big")
        return head + _KEY_HEADER + key + self.bin_header + bits

    def avail(self) -> bytes:
        """u16 big-endian count per chunk: the wire form."""
        return self.counts.to_bytes(self.nbytes * 16, "big")[: self.num_chunks * 2]

    def rare_mask(self) -> int:
        """Chunks (as a bitmap int) in the lowest quarter of the availability range."""
        if self.rare_version == self.version:
            return self.rare
        avail = self.avail()
        # Counts saturated to one byte: rarity only matters among small counts.
        sat = (
            int.from_bytes(avail[1::2], "big")
            | int.from_bytes(avail[0::2].translate(_NONZERO_FF), "big")
        ).to_bytes(self.num_chunks, "big")
        present = sat.translate(None, b"\x00")
        rare = 0
        if present:
            lo, hi = min(present), max(present)
            threshold = lo + (hi - lo) // 4
            table = bytes(1 if 1 <= c <= threshold else 0 for c in range(256))
            flags = sat.translate(table).translate(_TO_ASCII01)
            rare = int(flags, 2) << (self.nbytes * 8 - self.num_chunks)
        self.rare = rare
        self.rare_version = self.version
        return rare


class SwarmIndex:
    """Per content id: which peers (by public key) hold which chunks.

    Args:
        ttl: seconds after its last announce when a peer entry vanishes.
        interval: seconds between periodic announces that the tracker asks for.
        max_contents: content ids tracked at once (new ones beyond are refused).
        max_contents_per_peer: contents one public key may be announced in.
        max_peers_per_content: peers per content id (at most 65,535).
        sample: candidates scored per answer (bounds the work of one announce).
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
    ) -> None:
        if not 0 < max_peers_per_content <= _MAX_LANES_PEERS:
            raise ValueError("max_peers_per_content must be in 1..65535")
        if ttl <= 0 or interval <= 0:
            raise ValueError("ttl and interval must be positive")
        self.ttl = float(ttl)
        self.interval = float(interval)
        self.max_contents = max_contents
        self.max_contents_per_peer = max_contents_per_peer
        self.max_peers_per_content = max_peers_per_content
        self.sample = sample
        self._swarms: dict[bytes, _Swarm] = {}
        self._peer_contents: dict[bytes, int] = {}  # key -> number of swarms it is in
        self._entries = 0
        self._heads: dict[tuple[str, int], bytes] = {}  # see module doc
        # FIFO (see module doc). An OrderedDict because popping a plain dict's
        # first item scans the deleted entries before it: ~2 us at 2,048.
        self._answers: OrderedDict[tuple[bytes, bytes, int], _Answer] = OrderedDict()
        self._answer_bytes = 0

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        """Number of peer entries over all contents."""
        return self._entries

    @property
    def num_contents(self) -> int:
        """Number of content ids with at least one peer."""
        return len(self._swarms)

    def num_chunks(self, content_id: bytes) -> int | None:
        """The bitmap size in chunks of a tracked content, or None if untracked."""
        swarm = self._swarms.get(content_id)
        return None if swarm is None else swarm.num_chunks

    def scrape(self, content_ids: list[bytes], now: float) -> list[SwarmStat]:
        """Seeders, leechers and completed count for each id (zeros when unknown)."""
        self.expire_some(content_ids, now)
        out = []
        for cid in content_ids:
            swarm = self._swarms.get(cid)
            if swarm is None:
                out.append(SwarmStat(cid, 0, 0, 0))
            else:
                out.append(
                    SwarmStat(cid, swarm.seeders, len(swarm) - swarm.seeders, swarm.completed)
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

        Returns:
            ``(peers, availability)``: up to ``want`` peers other than the asker,
            most useful first, and a u16 big-endian count per chunk. Both are
            empty for ``stopped``.

        Raises:
            TrackerError: ``bad-request`` (unknown event, bitmap of the wrong
            size or with pad bits set) or ``too-many`` (a cap is reached).
        """
        recorded = self._record(content_id, key, ip, port, event, bits, num_chunks, now)
        if recorded is None:
            return [], b""
        swarm, slot = recorded
        if want <= 0:
            return [], swarm.avail()
        answer = self._ranking(content_id, swarm, bits, want, now)
        chosen = self._pick(swarm, answer.ranked, slot, want)
        return [_info(swarm.entry(s)) for s in chosen], swarm.avail()

    def announce_encoded(
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
    ) -> bytes | None:
        """``announce``, answered as an encoded PEERS body (the server's hot path).

        Same arguments, effects and errors as ``announce``; ``interval`` is the
        PEERS ``interval`` field. Returns the msgpack body of the PEERS message
        that carries ``announce``'s answer (byte for byte what encoding
        ``Peers`` would give), or None for ``stopped``. Repeated questions are
        answered from the cache described in the module doc.
        """
        recorded = self._record(content_id, key, ip, port, event, bits, num_chunks, now)
        if recorded is None:
            return None
        swarm, slot = recorded
        if want <= 0:
            return join_peers_body(content_id, interval, 0, (), swarm.avail())
        answer = self._ranking(content_id, swarm, bits, want, now)
        dropped = slot if slot in answer.ranked else -1
        hit = answer.bodies.get(dropped)
        if hit is not None and hit[0] > now:
            return hit[1]
        chosen = self._pick(swarm, answer.ranked, slot, want)
        heads, keys, packed = swarm.heads, swarm.keys, swarm.bits
        nb, hdr, kh = swarm.nbytes, swarm.bin_header, _KEY_HEADER
        full_int, full = swarm.full_int, swarm.full
        parts: list[bytes | bytearray | None] = []
        add = parts.extend
        for s in chosen:
            b = packed[s]
            add((heads[s], kh, keys[s], hdr, full if b is full_int else b.to_bytes(nb, "big")))
        body = join_peers_body(content_id, interval, len(chosen), parts, swarm.avail())  # type: ignore[arg-type]
        # Keep bodies only of questions asked more than once: most are not.
        if answer.asked > 1 and len(body) <= _ANSWER_BODY_MAX:
            old = answer.bodies.get(dropped)
            if old is not None:
                self._answer_bytes -= len(old[1])
            answer.bodies[dropped] = (answer.until, body)
            self._answer_bytes += len(body)
            while self._answer_bytes > _ANSWER_BYTES and len(self._answers) > 1:
                self._evict_answer()
        return body

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
    ) -> tuple[_Swarm, int] | None:
        """The bookkeeping half of an announce: (swarm, asker's slot), None if stopped."""
        if event not in EVENTS:
            raise TrackerError("bad-request", f"unknown announce event {event!r}")
        if len(key) != 32:  # encoded answers carry it behind a fixed bin-8 header
            raise TrackerError("bad-request", f"a public key is 32 bytes, not {len(key)}")
        swarm = self._swarms.get(content_id)
        if event == "stopped":
            if swarm is not None:
                slot = swarm.slots.get(key)
                if slot is not None:
                    self._remove(content_id, swarm, slot)
            return None
        if swarm is not None and num_chunks is not None and swarm.num_chunks != num_chunks:
            # The swarm was sized from bitmaps before the manifest was known.
            self.set_num_chunks(content_id, num_chunks)
            swarm = self._swarms.get(content_id)
        if swarm is None:
            n = num_chunks if num_chunks is not None else 8 * len(bits)
            self._check_bits(n, bits)
            if len(self._swarms) >= self.max_contents:
                self.expire(now)
                if len(self._swarms) >= self.max_contents:
                    raise TrackerError("too-many", "the tracker tracks too many contents")
            swarm = _Swarm(n)
            self._swarms[content_id] = swarm
        else:
            self._check_bits(swarm.num_chunks, bits)
        expiry = now + self.ttl
        slot = swarm.slots.get(key)
        if slot is not None and swarm.expires[slot] <= now:
            self._remove(content_id, swarm, slot)  # expired: starts afresh
            swarm = self._swarms.setdefault(content_id, swarm)
            slot = None
        head = self._heads.get((ip, port))
        if head is None:
            if len(self._heads) >= _HEAD_MEMO:
                self._heads.clear()
            # Canonical text (e.g. "::FFFF:1.2.3.4" -> "1.2.3.4"); the PEERS
            # entry minus its key and bitmap (and their bin headers).
            text = _unpack_ip(_pack_ip(ip))
            head = encode_peer_entry(text, port, b"", b"")[:-4]
            self._heads[(ip, port)] = head
        try:
            if slot is None:
                self._admit(swarm, key)
                slot = swarm.add(key, head, bits, expiry)
                self._peer_contents[key] = self._peer_contents.get(key, 0) + 1
                self._entries += 1
            else:
                if swarm.heads[slot] != head:
                    swarm.heads[slot] = head
                    swarm.version += 1
                swarm.expires[slot] = expiry
                swarm.set_bits(slot, bits)
        finally:
            if not swarm.slots:
                self._drop_swarm(content_id, swarm)
        if event == "completed" and key not in swarm.completed_keys:
            swarm.completed += 1
            if len(swarm.completed_keys) < self.max_peers_per_content:
                swarm.completed_keys.add(key)
        return swarm, slot

    def set_num_chunks(self, content_id: bytes, num_chunks: int) -> None:
        """Tell the index a content's real chunk count (its manifest arrived).

        A swarm sized differently from its first bitmaps is dropped; its peers
        come back with their next announce.
        """
        swarm = self._swarms.get(content_id)
        if swarm is not None and swarm.num_chunks != num_chunks:
            for key in swarm.keys:
                if key is not None:
                    self._forget_key(key)
            self._entries -= len(swarm)
            self._drop_swarm(content_id, swarm)

    def expire(self, now: float) -> int:
        """Remove every entry whose TTL has passed; returns how many went."""
        return self.expire_some(list(self._swarms), now)

    def expire_some(self, content_ids: list[bytes], now: float) -> int:
        """Like ``expire`` but only for the given content ids."""
        removed = 0
        for cid in content_ids:
            swarm = self._swarms.get(cid)
            if swarm is None or swarm.min_expiry > now:
                continue
            earliest = float("inf")
            for slot, key in enumerate(swarm.keys):
                if key is None:
                    continue
                exp = swarm.expires[slot]
                if exp <= now:
                    self._remove(cid, swarm, slot)
                    removed += 1
                elif exp < earliest:
                    earliest = exp
            swarm.min_expiry = earliest
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

    def _admit(self, swarm: _Swarm, key: bytes) -> None:
        if len(swarm) >= self.max_peers_per_content:
            raise TrackerError("too-many", "this content has too many peers")
        if self._peer_contents.get(key, 0) >= self.max_contents_per_peer:
            raise TrackerError(
                "too-many", f"a peer may announce at most {self.max_contents_per_peer} contents"
            )

    def _forget_key(self, key: bytes) -> None:
        left = self._peer_contents[key] - 1
        if left:
            self._peer_contents[key] = left
        else:
            del self._peer_contents[key]

    def _remove(self, content_id: bytes, swarm: _Swarm, slot: int) -> None:
        self._forget_key(swarm.remove(slot))
        self._entries -= 1
        if not swarm.slots:
            # Nothing of a content survives its last peer: memory stays bounded
            # by live entries (completed counts are soft state, like the peers).
            self._drop_swarm(content_id, swarm)

    def _drop_swarm(self, content_id: bytes, swarm: _Swarm) -> None:
        self._swarms.pop(content_id, None)

    def _evict_answer(self) -> None:
        _, gone = self._answers.popitem(last=False)
        if gone.bodies:
            self._answer_bytes -= sum(len(b) for _, b in gone.bodies.values())

    def _ranking(
        self, content_id: bytes, swarm: _Swarm, asker_bits: bytes, want: int, now: float
    ) -> _Answer:
        """The cached ranking for this question, recomputed if stale or missing."""
        cache_key = (content_id, asker_bits, want)
        answer = self._answers.get(cache_key)
        if answer is not None:
            # A ranking is only valid for the swarm state it was built on.
            if answer.serial == swarm.serial and answer.version == swarm.version:
                if answer.until > now:
                    answer.asked += 1
                    return answer
            del self._answers[cache_key]
            self._answer_bytes -= sum(len(b) for _, b in answer.bodies.values())
        ranked = self._rank(swarm, asker_bits, want, now)
        # Valid until the first listed peer expires: until then every slot in
        # it is live, so answering from it needs no per-peer liveness check.
        first_expiry = min(map(swarm.expires.__getitem__, ranked), default=float("inf"))
        answer = _Answer(
            swarm.serial, swarm.version, min(now + _RANK_CACHE_SECONDS, first_expiry), ranked
        )
        while len(self._answers) >= _ANSWER_ENTRIES:
            self._evict_answer()
        self._answers[cache_key] = answer
        return answer

    def _rank(self, swarm: _Swarm, asker_bits: bytes, want: int, now: float) -> list[int]:
        mine = int.from_bytes(asker_bits, "big")
        lacks = swarm.full_int & ~mine
        rare = swarm.rare_mask() & lacks
        keys = swarm.keys
        expires = swarm.expires
        total = len(keys)
        if total <= self.sample:
            # Everyone fits: still rotate where ties start, so that askers with
            # the same bitmap (a flash crowd) are not all sent to the same peers.
            start, count = (swarm.start % total if total else 0), total
            swarm.start = start + 1
            ints = swarm.bits[start:] + swarm.bits[:start] if start else swarm.bits
        else:
            # Rotate a window of `sample` slots so big swarms are sampled fairly.
            start, count = swarm.start % total, self.sample
            swarm.start = start + count
            end = start + count
            ints = swarm.bits[start:end]
            if end > total:
                ints += swarm.bits[: end - total]
        # useful = chunks it has that the asker lacks (rare ones weigh most);
        # a peer with nothing useful still ranks above one that lacks nothing
        # the asker has, since it will want to download from the asker.
        # Seeders all share swarm.full_int (see set_bits): score them once.
        full = swarm.full_int
        seeder = ((rare.bit_count() << 42) | (lacks.bit_count() << 21) | 1) if lacks else 0
        scores = [
            seeder
            if t is full
            else ((u & rare).bit_count() << 42) | (u.bit_count() << 21) | 1
            if (u := t & lacks)
            else (1 if mine & ~t else 0)
            for t in ints
        ]
        # Stable sort: ties keep window order, which rotates between calls.
        order = sorted(range(count), key=scores.__getitem__, reverse=True)
        if start:
            order = [(start + i) % total for i in order]
        # want + 1 so dropping the asker still leaves `want` peers. Free or
        # expired slots are rare: filter a little more than needed first.
        head = want + 9
        ranked = [s for s in order[:head] if keys[s] is not None and expires[s] > now]
        if len(ranked) <= want and len(order) > head:
            ranked += [s for s in order[head:] if keys[s] is not None and expires[s] > now]
        del ranked[want + 1 :]
        return ranked

    def _pick(self, swarm: _Swarm, ranked: list[int], asker: int, want: int) -> list[int]:
        """Up to ``want`` slots of a valid ``ranked`` (all live) other than ``asker``.

        Fewer if their bitmaps would not fit one PEERS body.
        """
        fit = (_PEERS_LIMIT - 2 * swarm.num_chunks - 64) // (_ENTRY_OVERHEAD + swarm.nbytes)
        chosen = [s for s in ranked if s != asker]
        del chosen[min(want, fit) :]
        return chosen


def _info(entry: bytes) -> PeerInfo:
    """(ip, port, key, bits) back from an encoded PEERS entry (the tuple API)."""
    ip, port, key, bits = msgpack.unpackb(entry)
    return ip, port, key, bits
