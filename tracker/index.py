"""The tracker's swarm index: who holds which chunks of which content.

Theory of operation
-------------------
Pure bookkeeping: no sockets, no trio, and every method takes ``now`` (seconds
from any monotonic clock) so expiry is deterministic in tests.

Memory is the constraint (hundreds of thousands of entries), so a swarm is not
a dict of peer objects but a handful of parallel packed arrays indexed by a
*slot* number: ``bits`` (one bytearray, ``nbytes`` per slot), ``addrs`` (16
bytes of IPv6 or IPv4-mapped address plus a big-endian u16 port per slot),
``expires`` (an ``array('d')``), and ``keys`` (a list of the 32-byte public
keys, shared with the ``slots`` dict that maps a key to its slot). Freed slots
go on a free list and are reused, so a swarm's arrays never outgrow its peak
population.

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
short while: most announces are periodic and change nothing.

Expiry is lazy (expired slots are skipped when answering) plus a sweep,
``expire(now)``, that the server calls every few seconds; a swarm is only
walked when the lower bound it keeps on its earliest expiry has passed.
"""

from __future__ import annotations

import socket
from array import array
from dataclasses import dataclass

from peerd.errors import TrackerError

__all__ = ["EVENTS", "PeerInfo", "SwarmIndex", "SwarmStat"]

EVENTS = ("started", "progress", "completed", "stopped", "periodic")

# One announced peer as returned to an asker: (ip, port, public key, bitmap).
PeerInfo = tuple[str, int, bytes, bytes]

_MAX_LANES_PEERS = 65_535  # a 16-bit availability lane must never overflow
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_RANK_CACHE_SECONDS = 2.0
_RANK_CACHE_ENTRIES = 8

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


def _pack_ip(ip: str) -> bytes:
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        raise TrackerError("bad-request", f"not an IP address: {ip!r}") from None


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
        "addrs",
        "bits",
        "completed",
        "completed_keys",
        "counts",
        "expires",
        "free",
        "full",
        "full_int",
        "keys",
        "min_expiry",
        "nbytes",
        "num_chunks",
        "rank_cache",
        "rank_version",
        "rare",
        "rare_version",
        "seeders",
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
        self.bits = bytearray()
        self.addrs = bytearray()
        self.expires = array("d")
        self.free: list[int] = []
        self.counts = 0
        self.seeders = 0
        self.completed = 0
        self.completed_keys: set[bytes] = set()
        self.min_expiry = float("inf")
        self.version = 0
        self.rank_cache: dict[tuple[bytes, int], tuple[float, list[int]]] = {}
        self.rank_version = -1
        self.rare = 0
        self.rare_version = -1
        self.start = 0

    def __len__(self) -> int:
        return len(self.slots)

    def slot_bits(self, slot: int) -> bytes:
        nb = self.nbytes
        return bytes(self.bits[slot * nb : (slot + 1) * nb])

    def set_bits(self, slot: int, new: bytes) -> None:
        nb = self.nbytes
        old = bytes(self.bits[slot * nb : (slot + 1) * nb])
        if old == new:
            return
        self.counts += _lanes(new) - _lanes(old)
        self.seeders += (new == self.full) - (old == self.full)
        self.bits[slot * nb : (slot + 1) * nb] = new
        self.version += 1

    def add(self, key: bytes, addr: bytes, bits: bytes, expiry: float) -> int:
        nb = self.nbytes
        if self.free:
            slot = self.free.pop()
            self.keys[slot] = key
            self.addrs[slot * 18 : slot * 18 + 18] = addr
            self.expires[slot] = expiry
        else:
            slot = len(self.keys)
            self.keys.append(key)
            self.bits.extend(bytes(nb))
            self.addrs.extend(addr)
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
        self.free.append(slot)
        self.version += 1
        return key

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
        self._ip_names: dict[bytes, str] = {}  # packed -> text, a small bounded cache

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
            size or with pad bits set) or ``limit`` (a cap is reached).
        """
        if event not in EVENTS:
            raise TrackerError("bad-request", f"unknown announce event {event!r}")
        swarm = self._swarms.get(content_id)
        if event == "stopped":
            if swarm is not None:
                slot = swarm.slots.get(key)
                if slot is not None:
                    self._remove(content_id, swarm, slot)
            return [], b""
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
                    raise TrackerError("limit", "the tracker tracks too many contents")
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
        addr = _pack_ip(ip) + port.to_bytes(2, "big")
        try:
            if slot is None:
                self._admit(swarm, key)
                slot = swarm.add(key, addr, bits, expiry)
                self._peer_contents[key] = self._peer_contents.get(key, 0) + 1
                self._entries += 1
            else:
                if swarm.addrs[slot * 18 : slot * 18 + 18] != addr:
                    swarm.addrs[slot * 18 : slot * 18 + 18] = addr
                    swarm.version += 1
                swarm.expires[slot] = expiry
                swarm.set_bits(slot, bits)
        finally:
            if not swarm.slots:
                self._swarms.pop(content_id, None)
        if event == "completed" and key not in swarm.completed_keys:
            swarm.completed += 1
            if len(swarm.completed_keys) < self.max_peers_per_content:
                swarm.completed_keys.add(key)
        return self._choose(swarm, slot, bits, want, now), swarm.avail()

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
            del self._swarms[content_id]

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
            raise TrackerError("limit", "this content has too many peers")
        if self._peer_contents.get(key, 0) >= self.max_contents_per_peer:
            raise TrackerError(
                "limit", f"a peer may announce at most {self.max_contents_per_peer} contents"
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
            self._swarms.pop(content_id, None)

    def _rank(self, swarm: _Swarm, asker_bits: bytes, want: int, now: float) -> list[int]:
        if swarm.rank_version != swarm.version:
            # A ranking is only valid for the swarm state it was built on.
            swarm.rank_cache.clear()
            swarm.rank_version = swarm.version
        cache_key = (asker_bits, want)
        hit = swarm.rank_cache.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        nb = swarm.nbytes
        mine = int.from_bytes(asker_bits, "big")
        lacks = swarm.full_int & ~mine
        rare = swarm.rare_mask() & lacks
        keys = swarm.keys
        expires = swarm.expires
        total = len(keys)
        if total <= self.sample:
            start, count = 0, total
            window = bytes(swarm.bits)
        else:
            # Rotate a window of `sample` slots so big swarms are sampled fairly.
            start, count = swarm.start % total, self.sample
            swarm.start = start + count
            end = start + count
            window = bytes(swarm.bits[start * nb : end * nb])
            if end > total:
                window += bytes(swarm.bits[: (end - total) * nb])
        # useful = chunks it has that the asker lacks (rare ones weigh most);
        # a peer with nothing useful still ranks above one that lacks nothing
        # the asker has, since it will want to download from the asker.
        scores = []
        fb = int.from_bytes
        for i in range(count):
            theirs = fb(window[i * nb : (i + 1) * nb], "big")
            useful = theirs & lacks
            if useful:
                scores.append(((useful & rare).bit_count() << 42) | (useful.bit_count() << 21) | 1)
            else:
                scores.append(1 if mine & ~theirs else 0)
        # Stable sort: ties keep window order, which rotates between calls.
        order = sorted(range(count), key=scores.__getitem__, reverse=True)
        ranked: list[int] = []
        for i in order:
            slot = (start + i) % total
            if keys[slot] is None or expires[slot] <= now:
                continue
            ranked.append(slot)
            if len(ranked) > want:
                break
        # want + 1 so dropping the asker still leaves `want` peers.
        if len(swarm.rank_cache) >= _RANK_CACHE_ENTRIES:
            swarm.rank_cache.clear()
        swarm.rank_cache[cache_key] = (now + _RANK_CACHE_SECONDS, ranked)
        return ranked

    def _choose(
        self, swarm: _Swarm, asker: int, asker_bits: bytes, want: int, now: float
    ) -> list[PeerInfo]:
        if want <= 0:
            return []
        ranked = self._rank(swarm, asker_bits, want, now)
        out: list[PeerInfo] = []
        nb = swarm.nbytes
        keys, expires, addrs, bits = swarm.keys, swarm.expires, swarm.addrs, swarm.bits
        names = self._ip_names
        for slot in ranked:
            key = keys[slot]
            if slot == asker or key is None or expires[slot] <= now:
                continue
            a = slot * 18
            packed = bytes(addrs[a : a + 16])
            ip = names.get(packed)
            if ip is None:
                if len(names) >= 4096:
                    names.clear()
                ip = names[packed] = _unpack_ip(packed)
            out.append(
                (
                    ip,
                    addrs[a + 16] << 8 | addrs[a + 17],
                    key,
                    bytes(bits[slot * nb : (slot + 1) * nb]),
                )
            )
            if len(out) >= want:
                break
        return out
