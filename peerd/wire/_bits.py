"""Bitfield and availability encodings (the wire only knows them as ``bin``).

Bitfield: ``ceil(n / 8)`` bytes; chunk ``i`` is bit ``0x80 >> (i % 8)`` of byte
``i // 8`` (most significant bit first); the pad bits after chunk ``n - 1``
must be zero. Flags: the node's working form, one byte (0/1) per chunk.
Availability: one u16 big-endian count per chunk, saturating at 65535.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence

from peerd.errors import RemoteProtocolError

__all__ = [
    "bits_from_flags",
    "bits_from_indices",
    "bits_length",
    "count_bits",
    "decode_availability",
    "encode_availability",
    "flags_from_bits",
    "has_bit",
    "indices_from_bits",
    "validate_bits",
]

_U16_MAX = 0xFFFF
_TO_FLAGS = bytes.maketrans(b"01", b"\x00\x01")
_TO_CHARS = bytes.maketrans(b"\x00\x01", b"01")


def bits_length(n: int) -> int:
    """Number of bytes in the bitfield of ``n`` chunks."""
    return (n + 7) // 8


def validate_bits(n: int, bits: bytes) -> None:
    """Check a received bitfield for ``n`` chunks: exact length, zero pad bits.

    Raises:
        RemoteProtocolError: wrong length or a pad bit set.
    """
    if len(bits) != bits_length(n):
        raise RemoteProtocolError(
            f"bitfield for {n} chunks must be {bits_length(n)} bytes, got {len(bits)}"
        )
    spare = bits_length(n) * 8 - n
    if spare and bits[-1] & ((1 << spare) - 1):
        raise RemoteProtocolError(f"bitfield for {n} chunks has pad bits set after chunk {n - 1}")


def bits_from_indices(n: int, indices: Iterable[int]) -> bytes:
    """Return the bitfield of ``n`` chunks with exactly ``indices`` set.

    Raises:
        ValueError: an index outside ``0..n-1``.
    """
    out = bytearray(bits_length(n))
    for i in indices:
        if not 0 <= i < n:
            raise ValueError(f"chunk index {i} out of range for {n} chunks")
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def indices_from_bits(n: int, bits: bytes) -> list[int]:
    """Return the sorted chunk indices set in a bitfield of ``n`` chunks.

    Raises:
        RemoteProtocolError: the bitfield is malformed (see ``validate_bits``).
    """
    validate_bits(n, bits)
    out: list[int] = []
    for byte_index, byte in enumerate(bits):
        if byte:
            base = byte_index * 8
            out.extend(base + b for b in range(8) if byte & (0x80 >> b))
    return out


def has_bit(bits: bytes, i: int) -> bool:
    """Whether chunk ``i`` is set (False past the end of ``bits``)."""
    byte = i >> 3
    return 0 <= byte < len(bits) and bool(bits[byte] & (0x80 >> (i & 7)))


def flags_from_bits(bits: bytes, n: int) -> bytearray:
    """Wire bitfield (MSB first) -> one byte (0/1) per chunk, length ``n``."""
    if n == 0:
        return bytearray()
    text = format(int.from_bytes(bits, "big"), f"0{len(bits) * 8}b")[:n]
    return bytearray(text.encode("ascii").translate(_TO_FLAGS))


def bits_from_flags(flags: bytes | bytearray) -> bytes:
    """One byte (0/1) per chunk -> wire bitfield (MSB first, zero padded)."""
    n = len(flags)
    if n == 0:
        return b""
    nbytes = (n + 7) // 8
    text = bytes(flags).translate(_TO_CHARS) + b"0" * (nbytes * 8 - n)
    return int(text, 2).to_bytes(nbytes, "big")


def count_bits(bits: bytes) -> int:
    """Number of chunks set in a bitfield."""
    return int.from_bytes(bits, "big").bit_count()


def encode_availability(counts: Sequence[int]) -> bytes:
    """Encode per-chunk peer counts as u16 big-endian, saturating at 65535."""
    arr = array("H", (min(max(c, 0), _U16_MAX) for c in counts))
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes()


def decode_availability(n: int, data: bytes) -> list[int]:
    """Decode a PEERS availability field for ``n`` chunks.

    Raises:
        RemoteProtocolError: ``data`` is not exactly ``2 * n`` bytes.
    """
    if len(data) != 2 * n:
        raise RemoteProtocolError(
            f"availability for {n} chunks must be {2 * n} bytes, got {len(data)}"
        )
    arr = array("H")
    arr.frombytes(data)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tolist()
