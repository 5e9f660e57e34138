"""Chunk hashing and the Merkle root over chunk hashes.

Two algorithms are supported, both with 32-byte digests: ``blake3`` (the
default, several GB/s per core) and ``sha256`` (for users who want a FIPS
primitive). Both bindings release the GIL while hashing a large buffer, so
callers get real parallelism by hashing different chunks on different threads.
That is why :func:`hash_chunk` pins blake3 to one thread: parallelism comes from
hashing many chunks at once, not from splitting one chunk.

The Merkle root binds the ordered list of chunk hashes into one digest. Leaves
and inner nodes are domain-separated (``0x00`` / ``0x01`` prefixes) so an inner
node can never be passed off as a leaf (the classic second-preimage trick on
unprefixed Merkle trees). An odd node at the end of a level is promoted
unchanged to the next level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import blake3

from peerd.errors import ManifestError

__all__ = ["ALGORITHMS", "DIGEST_SIZE", "hash_chunk", "merkle_root", "new_hasher"]

ALGORITHMS = ("blake3", "sha256")
DIGEST_SIZE = 32

_LEAF = b"\x00"
_NODE = b"\x01"


# blake3.blake3 is single-threaded unless asked otherwise (max_threads defaults
# to 1); we rely on that, because parallelism comes from hashing many chunks at once.
_CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
}


def _constructor(algo: str) -> Callable[..., Any]:
    try:
        return _CONSTRUCTORS[algo]
    except (KeyError, TypeError):
        raise ManifestError(
            f"unknown hash algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}"
        ) from None


def new_hasher(algo: str) -> Any:
    """Return a fresh incremental hasher (``update()`` / ``digest()``) for ``algo``.

    Raises:
        ManifestError: ``algo`` is not one of :data:`ALGORITHMS`.
    """
    return _constructor(algo)()


def hash_chunk(algo: str, data: Any) -> bytes:
    """Hash one chunk.

    Args:
        algo: ``"blake3"`` or ``"sha256"``.
        data: any bytes-like object (bytes, bytearray, memoryview); it is not copied.

    Returns:
        The 32-byte digest.

    Raises:
        ManifestError: unknown algorithm.
    """
    if algo == "blake3":
        # Explicit max_threads=1: one chunk per thread, never a nested thread pool.
        return blake3.blake3(data, max_threads=1).digest()  # type: ignore[no-any-return]
    digest: bytes = _constructor(algo)(data).digest()
    return digest


def merkle_root(algo: str, hashes: bytes) -> bytes:
    """Compute the Merkle root of a list of chunk hashes.

    Args:
        algo: the hash algorithm of the tree (the same as the chunks').
        hashes: concatenated 32-byte chunk digests (may be empty).

    Returns:
        The 32-byte root: ``H(b"")`` for no chunks; otherwise leaves are
        ``H(0x00 || chunk_hash)``, nodes ``H(0x01 || left || right)``, and an
        odd node at the end of a level moves up unchanged.

    Raises:
        ManifestError: unknown algorithm, or ``len(hashes)`` not a multiple of 32.
    """
    new = _constructor(algo)
    if len(hashes) % DIGEST_SIZE:
        raise ManifestError(
            f"chunk hash list is {len(hashes)} bytes, not a multiple of {DIGEST_SIZE}"
        )
    if not hashes:
        digest: bytes = new(b"").digest()
        return digest
    view = bytes(hashes)
    level = [
        new(_LEAF + view[i : i + DIGEST_SIZE]).digest() for i in range(0, len(view), DIGEST_SIZE)
    ]
    while len(level) > 1:
        paired = len(level) & ~1
        nxt = [new(_NODE + level[i] + level[i + 1]).digest() for i in range(0, paired, 2)]
        if paired != len(level):
            nxt.append(level[-1])
        level = nxt
    return level[0]
