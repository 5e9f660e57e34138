"""``PeerTable``: the peers of one content id as the tracker knows them.

Parallel packed arrays indexed by a *slot* (freed slots are reused), not a
dict of peer objects, because memory is the tracker's constraint: per slot a
bitmap int (seeders share one), the msgpack-encoded start of its PEERS entry
(address and port, see ``_peers_frame``), an expiry and a key. Availability is
one big int with a 16-bit lane per chunk (one subtraction and one addition
per announce; a lane never carries: at most 65,535 peers). In full:
docs/ARCHITECTURE.md, "The tracker's index".
"""

from __future__ import annotations

import itertools
import socket
from array import array
from typing import cast

from peerd.errors import TrackerError

from ._peers_frame import KEY_HEADER, avail_field, bin_header

__all__ = [
    "MAX_LANES_PEERS",
    "PeerTable",
    "entry_cost",
    "pack_ip",
    "table_cost",
    "unpack_ip",
]

MAX_LANES_PEERS = 65_535  # a 16-bit availability lane must never overflow
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_serials = itertools.count(1)
_AVAIL_KEPT = 32 * 1024  # availability kept encoded up to this size

# byte -> its bit j (0 or 1), j = 0 the top bit (chunk 8k+0).
_BIT_J = tuple(bytes((b >> (7 - j)) & 1 for b in range(256)) for j in range(8))
# 0/1 bytes -> ASCII "0"/"1" so int(..., 2) packs them into a bitmap in C.
_TO_ASCII01 = bytes.maketrans(b"\x00\x01", b"01")
# any non-zero byte -> 0xff (saturates a count whose high byte is set).
_NONZERO_FF = bytes([0] + [0xFF] * 255)


def pack_ip(ip: str) -> bytes:
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        raise TrackerError("bad-request", f"not an IP address: {ip!r}") from None


def unpack_ip(packed: bytes) -> str:
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


def table_cost(num_chunks: int) -> int:
    """Bytes a table of ``num_chunks`` chunks holds before its first entry (an estimate
    from above): the 16-bit availability lanes, the full/empty bitmaps and rarity
    mask, the encoded availability while it is kept, and the fixed arrays."""
    return 4096 + 5 * num_chunks // 2 + min(2 * num_chunks + 16, _AVAIL_KEPT)


def entry_cost(nbytes: int) -> int:
    """Bytes one peer entry holds (an estimate from above): its bitmap int, its
    slot in each array, its key and its place in the key dict."""
    return 320 + nbytes


def _lanes(bits: bytes) -> int:
    """Widen a bitmap to an int with one 16-bit lane (0 or 1) per bit."""
    buf = bytearray(16 * len(bits))
    for j in range(8):  # lane of chunk 8k+j is bytes 16k+2j..16k+2j+1
        buf[2 * j + 1 :: 16] = bits.translate(_BIT_J[j])
    return int.from_bytes(buf, "big")


class PeerTable:
    """The peers of one content id, as parallel packed arrays (see the module doc)."""

    __slots__ = (
        "addrs",
        "avail_version",
        "bin_header",
        "bits",
        "completed",
        "completed_keys",
        "cost",
        "counts",
        "expires",
        "free",
        "full",
        "full_int",
        "heads",
        "keys",
        "loopback",
        "members",
        "min_expiry",
        "nbytes",
        "nothing",
        "num_chunks",
        "owner",
        "rare",
        "rare_version",
        "seeders",
        "serial",
        "slots",
        "start",
        "tail",
        "version",
    )

    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self.nbytes = (num_chunks + 7) // 8
        full_int = ((1 << num_chunks) - 1) << (self.nbytes * 8 - num_chunks)
        self.full_int = full_int
        self.full = full_int.to_bytes(self.nbytes, "big")
        self.nothing = bytes(self.nbytes)  # the bitmap of a peer with no chunk yet
        self.slots: dict[bytes, int] = {}
        self.keys: list[bytes | None] = []
        self.bits: list[int] = []  # bitmap per slot, as a big-endian int (0 when free)
        self.heads: list[bytes | None] = []
        self.addrs: list[str | None] = []  # per slot, the address its entry is charged to
        self.loopback: set[int] = set()  # slots whose entry names a loopback address
        self.owner = ""  # the address whose announce created the table (pays its cost)
        self.cost = table_cost(num_chunks)
        self.bin_header = bin_header(self.nbytes)
        self.expires = array("d")
        self.free: list[int] = []
        self.counts = 0
        self.seeders = 0
        self.completed = 0
        self.completed_keys: set[bytes] = set()
        self.min_expiry = float("inf")
        self.version = 0  # bumped by every change (bits, address, who is in)
        self.members = 0  # bumped only when a peer joins or leaves
        self.serial = next(_serials)  # tells a recreated table from its predecessor
        self.rare = 0
        self.rare_version = -1
        self.tail = b""  # the encoded PEERS avail field, while avail_version is current
        self.avail_version = -1
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

    def add(self, key: bytes, head: bytes, bits: bytes, expiry: float, addr: str = "") -> int:
        if self.free:
            slot = self.free.pop()
            self.keys[slot] = key
            self.heads[slot] = head
            self.addrs[slot] = addr
            self.expires[slot] = expiry
        else:
            slot = len(self.keys)
            self.keys.append(key)
            self.bits.append(0)
            self.heads.append(head)
            self.addrs.append(addr)
            self.expires.append(expiry)
        self.slots[key] = slot
        self.min_expiry = min(self.min_expiry, expiry)
        self.version += 1
        self.members += 1
        self.set_bits(slot, bits)
        return slot

    def remove(self, slot: int) -> bytes:
        key = self.keys[slot]
        assert key is not None
        self.set_bits(slot, bytes(self.nbytes))
        del self.slots[key]
        self.keys[slot] = None
        self.heads[slot] = None
        self.addrs[slot] = None
        self.loopback.discard(slot)
        self.free.append(slot)
        self.version += 1
        self.members += 1
        return key

    def entry(self, slot: int) -> bytes:
        """The encoded PEERS entry ``[ip, port, key, bits]`` of a live slot."""
        return b"".join(self.entry_parts([slot]))

    def entry_parts(self, slots: list[int]) -> list[bytes]:
        """The encoded PEERS entries of live ``slots``, as pieces to join."""
        # A live slot has its head and key (free slots hold None).
        heads = cast("list[bytes]", self.heads)
        keys = cast("list[bytes]", self.keys)
        packed, nb, hdr = self.bits, self.nbytes, self.bin_header
        full_int, full = self.full_int, self.full
        parts: list[bytes] = []
        add = parts.extend
        for s in slots:
            b = packed[s]
            add(
                (
                    heads[s],
                    KEY_HEADER,
                    keys[s],
                    hdr,
                    full if b is full_int else b.to_bytes(nb, "big"),
                )
            )
        return parts

    def entry_sizes(self, slots: list[int]) -> list[int]:
        """The encoded length of each live slot's PEERS entry."""
        fixed = len(KEY_HEADER) + 32 + len(self.bin_header) + self.nbytes  # keys are 32 bytes
        heads = self.heads
        return [len(heads[s]) + fixed for s in slots]  # type: ignore[arg-type]

    def avail(self) -> bytes:
        """u16 big-endian count per chunk: the wire form."""
        tail = self.avail_tail()
        return tail[len(tail) - 2 * self.num_chunks :]

    def avail_tail(self) -> bytes:
        """The end of a PEERS body answering for this table: its ``avail`` field.

        Kept until the counts change when it is small (<= 32 KiB); a bigger
        one would double the table's memory (its counts take as much).
        """
        if self.avail_version == self.version:
            return self.tail
        avail = self.counts.to_bytes(self.nbytes * 16, "big")[: self.num_chunks * 2]
        tail = avail_field(avail)
        if len(avail) <= _AVAIL_KEPT:
            self.tail = tail
            self.avail_version = self.version
        return tail

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
