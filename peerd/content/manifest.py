"""Manifests: what a piece of content is, how it is chunked, who vouches for it.

Theory of operation
-------------------
An :class:`Info` describes one file: its name, size, chunk size, hash
algorithm, the list of chunk hashes and their Merkle root. It has exactly one
byte encoding (a msgpack map with a fixed key order and the smallest integer
forms msgpack produces), and the **content id** is the SHA-256 of those bytes.
Because the encoding is canonical, anyone who has the info can recompute the
id, and :meth:`Info.decode` rejects any other encoding of the same values
(it re-encodes and compares), so an id always names exactly one byte string.

A :class:`Manifest` wraps the info bytes with 1..16 Ed25519 signatures,
each over ``b"peer-manifest-v1\\0" + content_id``. Signing the id (not the
whole info) keeps signatures small and makes them independent of each other.
An unsigned manifest exists only while one is being built: ``decode`` refuses
one (PROTOCOL.md: a manifest on the wire carries at least one signature).
:meth:`Manifest.verify` checks, in order: the id the user asked for, every
signature (one that fails invalidates the whole manifest), and that the key
the user trusts is among the signers.

Everything decoded here may come from a hostile peer, so decoding is bounded
(total input size, msgpack length limits), strict (exact keys and types) and
validating (limits on name, sizes, counts; the root is recomputed). Every
failure is a :class:`ManifestError`; msgpack's own exceptions never escape.

Building a manifest reads the file with large positional reads into reused
buffers and hashes chunks on a thread pool; the hash functions release the
GIL, so this runs at hashing speed on every core.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from peerd.content.hashing import ALGORITHMS, DIGEST_SIZE, hash_chunk, merkle_root
from peerd.content.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify_signature
from peerd.errors import (
    ChunkHashMismatch,
    ContentIdMismatch,
    ManifestError,
    SignatureError,
    StorageError,
    UntrustedManifest,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "INFO_VERSION",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_BYTES",
    "MAX_SIGNATURES",
    "MAX_SIZE",
    "MIN_CHUNK_SIZE",
    "SIGNATURE_CONTEXT",
    "Info",
    "Manifest",
    "build_manifest",
    "content_id_hex",
    "default_chunk_size",
    "parse_content_id",
    "valid_chunk_size",
    "verify_chunk",
]

INFO_VERSION = 1
MAX_NAME_BYTES = 255
MAX_SIZE = 2**50
MIN_CHUNK_SIZE = 16 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNKS = 2**20
MAX_SIGNATURES = 16
MAX_MANIFEST_BYTES = 40 * 1024 * 1024
SIGNATURE_CONTEXT = b"peer-manifest-v1\x00"
CONTENT_ID_SIZE = 32

# The largest canonical info: the hash list plus a small fixed overhead.
_MAX_INFO_BYTES = DIGEST_SIZE * MAX_CHUNKS + 1024
# Target size of the hash list when picking a chunk size (1 MiB = 32768 chunks).
_TARGET_HASH_BYTES = 1024 * 1024
_INFO_KEYS = ("v", "name", "size", "chunk_size", "algo", "hashes", "root")
_MANIFEST_KEYS = ("info", "sigs")
# The msgpack exceptions a hostile input can trigger (unpack errors, bad UTF-8,
# unhashable map keys, over-limit lengths); all become ManifestError.
_DECODE_ERRORS = (msgpack.UnpackException, ValueError, TypeError, OverflowError)


# --- validation helpers -------------------------------------------------------
def _validate_name(name: object) -> None:
    if type(name) is not str:
        raise ManifestError(f"name must be a string, got {type(name).__name__}")
    if not name:
        raise ManifestError("name is empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"name {name!r} is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ManifestError(f"name is {len(encoded)} bytes in UTF-8; the limit is {MAX_NAME_BYTES}")
    for bad, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\x00", "a NUL byte"), ("..", "'..'")):
        if bad in name:
            raise ManifestError(f"name {name!r} contains {what}; a name is one plain file name")
    # C0 controls, DEL and C1 controls: they can rewrite a terminal or log line.
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ManifestError(f"name {name!r} contains a control character")
    if name == ".":
        raise ManifestError("name '.' is not a file name")


def _check_int(value: object, what: str) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it too
        raise ManifestError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _check_bytes(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise ManifestError(f"{what} must be bytes, got {type(value).__name__}")
    return value


def _num_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def default_chunk_size(size: int) -> int:
    """Pick the chunk size for a file of ``size`` bytes.

    1 MiB, doubled until the hash list fits in 1 MiB (32768 chunks) or the
    64 MiB maximum is reached.
    """
    chunk_size = DEFAULT_CHUNK_SIZE
    while chunk_size < MAX_CHUNK_SIZE and _num_chunks(size, chunk_size) * DIGEST_SIZE > (
        _TARGET_HASH_BYTES
    ):
        chunk_size *= 2
    return chunk_size


def valid_chunk_size(chunk_size: int) -> bool:
    """Whether ``chunk_size`` is a power of two in [16 KiB, 64 MiB] (the one rule)."""
    return MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and not chunk_size & (chunk_size - 1)


def _check_chunk_size(chunk_size: object) -> int:
    chunk_size = _check_int(chunk_size, "chunk_size")
    if not valid_chunk_size(chunk_size):
        raise ManifestError(
            f"chunk size {chunk_size} is not a power of two between "
            f"{MIN_CHUNK_SIZE} (16 KiB) and {MAX_CHUNK_SIZE} (64 MiB)"
        )
    return chunk_size


# --- Info ---------------------------------------------------------------------
@dataclass(frozen=True)
class Info:
    """The signed description of one file. Validates itself on construction.

    Raises:
        ManifestError: any field is of the wrong type or out of its limits, or
            ``root`` is not the Merkle root of ``hashes``.
    """

    name: str
    size: int
    chunk_size: int
    algo: str
    hashes: bytes
    root: bytes

    def __post_init__(self) -> None:
        _validate_name(self.name)
        size = _check_int(self.size, "size")
        if not 0 <= size <= MAX_SIZE:
            raise ManifestError(f"size {size} is out of range 0..{MAX_SIZE}")
        chunk_size = _check_chunk_size(self.chunk_size)
        if type(self.algo) is not str or self.algo not in ALGORITHMS:
            raise ManifestError(
                f"unknown hash algorithm {self.algo!r}: use one of {', '.join(ALGORITHMS)}"
            )
        n = _num_chunks(size, chunk_size)
        if n > MAX_CHUNKS:
            raise ManifestError(
                f"{n} chunks is more than the limit of {MAX_CHUNKS}; use a larger chunk size"
            )
        hashes = _check_bytes(self.hashes, "hashes")
        if len(hashes) != DIGEST_SIZE * n:
            raise ManifestError(
                f"hash list is {len(hashes)} bytes; {n} chunks need {DIGEST_SIZE * n}"
            )
        root = _check_bytes(self.root, "root")
        if len(root) != DIGEST_SIZE:
            raise ManifestError(f"root is {len(root)} bytes, expected {DIGEST_SIZE}")
        if merkle_root(self.algo, hashes) != root:
            raise ManifestError("root does not match the chunk hashes; the manifest is corrupt")

    @property
    def num_chunks(self) -> int:
        """Number of chunks (0 for an empty file)."""
        return _num_chunks(self.size, self.chunk_size)

    def _check_index(self, index: int) -> None:
        n = self.num_chunks
        if type(index) is not int or not 0 <= index < n:
            raise ManifestError(
                f"chunk index {index!r} is out of range: {self.name} has {n} chunks"
            )

    def chunk_length(self, index: int) -> int:
        """Length in bytes of chunk ``index`` (the last one may be short).

        Raises:
            ManifestError: no such chunk.
        """
        self._check_index(index)
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def chunk_hash(self, index: int) -> bytes:
        """The 32-byte hash of chunk ``index``.

        Raises:
            ManifestError: no such chunk.
        """
        self._check_index(index)
        return self.hashes[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    @functools.cached_property
    def _encoded(self) -> bytes:
        # A dict keeps insertion order, and msgpack writes it in that order.
        body = {
            "v": INFO_VERSION,
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "algo": self.algo,
            "hashes": self.hashes,
            "root": self.root,
        }
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return data

    def encode(self) -> bytes:
        """The canonical msgpack encoding (the bytes the content id is computed over)."""
        return self._encoded

    @functools.cached_property
    def content_id(self) -> bytes:
        """The 32-byte content id: SHA-256 of :meth:`encode`."""
        return hashlib.sha256(self._encoded).digest()

    @classmethod
    def decode(cls, data: bytes) -> Info:
        """Decode and validate a canonical info encoding.

        Raises:
            ManifestError: too large, not msgpack, wrong keys or types, values
                out of range, a wrong root, or a non-canonical encoding.
        """
        data = _check_bytes_like(data, "info")
        if len(data) > _MAX_INFO_BYTES:
            raise ManifestError(f"info is {len(data)} bytes; the limit is {_MAX_INFO_BYTES}")
        body = _unpack(data, max_bin_len=_MAX_INFO_BYTES, max_array_len=0, what="info")
        _check_keys(body, _INFO_KEYS, "info")
        version = _check_int(body["v"], "info version")
        if version != INFO_VERSION:
            raise ManifestError(
                f"info version {version} is not supported (this peer reads version "
                f"{INFO_VERSION}); upgrade peer"
            )
        info = cls(
            name=body["name"],
            size=body["size"],
            chunk_size=body["chunk_size"],
            algo=body["algo"],
            hashes=body["hashes"],
            root=body["root"],
        )
        if info.encode() != data:
            raise ManifestError("info is not in canonical encoding")
        return info


def _check_bytes_like(data: object, what: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise ManifestError(f"{what} must be bytes, got {type(data).__name__}")


def _unpack(data: bytes, *, max_bin_len: int, max_array_len: int, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            max_str_len=4 * MAX_NAME_BYTES,
            max_array_len=max_array_len,
            max_map_len=len(_INFO_KEYS),
            max_ext_len=0,
        )
    except _DECODE_ERRORS as exc:
        raise ManifestError(f"{what} is not a valid msgpack encoding ({exc})") from None


def _check_keys(body: object, keys: tuple[str, ...], what: str) -> None:
    if type(body) is not dict:
        raise ManifestError(f"{what} must be a msgpack map, got {type(body).__name__}")
    if tuple(body) != keys:
        raise ManifestError(f"{what} must have exactly the keys {', '.join(keys)} in that order")


# --- Manifest -----------------------------------------------------------------
def _signed_message(content_id: bytes) -> bytes:
    return SIGNATURE_CONTEXT + content_id


@dataclass(frozen=True)
class Manifest:
    """An :class:`Info` and up to 16 ``(public_key, signature)`` pairs.

    Construction checks the shape of the signatures (sizes, count, no key
    twice), not their validity: call :meth:`verify` for that.

    Raises:
        ManifestError: malformed signature list.
    """

    info: Info
    signatures: tuple[tuple[bytes, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.info, Info):
            raise ManifestError(f"manifest info must be an Info, got {type(self.info).__name__}")
        sigs = self.signatures
        if type(sigs) is not tuple:
            raise ManifestError("manifest signatures must be a tuple of (key, signature) pairs")
        if len(sigs) > MAX_SIGNATURES:
            raise ManifestError(
                f"manifest has {len(sigs)} signatures; the limit is {MAX_SIGNATURES}"
            )
        seen: set[bytes] = set()
        for pair in sigs:
            if type(pair) is not tuple or len(pair) != 2:
                raise ManifestError("each signature must be a (public_key, signature) pair")
            key, sig = pair
            if type(key) is not bytes or len(key) != PUBLIC_KEY_SIZE:
                raise ManifestError(f"a signer key must be {PUBLIC_KEY_SIZE} bytes")
            if type(sig) is not bytes or len(sig) != SIGNATURE_SIZE:
                raise ManifestError(f"a signature must be {SIGNATURE_SIZE} bytes")
            if key in seen:
                raise ManifestError(f"key {key.hex()} signed the manifest twice")
            seen.add(key)

    @property
    def content_id(self) -> bytes:
        """The content id of the info (SHA-256 of its canonical bytes)."""
        return self.info.content_id

    def encode(self) -> bytes:
        """The canonical msgpack encoding ``{"info": bin, "sigs": [[key, sig], ...]}``."""
        body = {"info": self.info.encode(), "sigs": [[k, s] for k, s in self.signatures]}
        data: bytes = msgpack.packb(body, use_bin_type=True)
        return data

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode a manifest received from anywhere (bounded, strict, canonical).

        Signatures are not checked here; call :meth:`verify`.

        Raises:
            ManifestError: anything malformed.
        """
        data = _check_bytes_like(data, "manifest")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
        body = _unpack(
            data, max_bin_len=_MAX_INFO_BYTES, max_array_len=MAX_SIGNATURES, what="manifest"
        )
        _check_keys(body, _MANIFEST_KEYS, "manifest")
        info = Info.decode(_check_bytes(body["info"], "manifest info"))
        raw_sigs = body["sigs"]
        if type(raw_sigs) is not list:
            raise ManifestError("manifest sigs must be a list")
        if not raw_sigs:
            raise ManifestError(
                f"manifest {info.content_id.hex()} is not signed "
                f"(a manifest carries 1..{MAX_SIGNATURES} signatures)"
            )
        sigs = []
        for pair in raw_sigs:
            if type(pair) is not list or len(pair) != 2:
                raise ManifestError("each manifest signature must be a [key, signature] pair")
            sigs.append((_check_bytes(pair[0], "signer key"), _check_bytes(pair[1], "signature")))
        manifest = cls(info, tuple(sigs))
        if manifest.encode() != data:
            raise ManifestError("manifest is not in canonical encoding")
        return manifest

    def signed(self, identity: Identity) -> Manifest:
        """Return a copy with ``identity``'s signature added (unchanged if already signed).

        Raises:
            ManifestError: the manifest already has the maximum number of signatures.
        """
        if any(key == identity.public_key for key, _ in self.signatures):
            return self
        sig = identity.sign(_signed_message(self.content_id))
        return Manifest(self.info, (*self.signatures, (identity.public_key, sig)))

    @property
    def signers(self) -> tuple[bytes, ...]:
        """Public keys that (claim to) have signed, in order."""
        return tuple(key for key, _ in self.signatures)

    def verify(self, expected_id: bytes | None = None, trust: bytes | None = None) -> None:
        """Check the manifest is the one asked for and is properly signed.

        Args:
            expected_id: the content id the user asked for, if any.
            trust: a public key that must be among the signers, if any.

        Raises:
            ContentIdMismatch: the info does not hash to ``expected_id``.
            SignatureError: no signatures, or a signature that does not verify.
            UntrustedManifest: ``trust`` is given and did not sign.
        """
        cid = self.content_id
        if expected_id is not None and bytes(expected_id) != cid:
            raise ContentIdMismatch(
                f"manifest has content id {cid.hex()}, not the requested "
                f"{bytes(expected_id).hex()}; it was tampered with or you got the wrong one "
                "— fetch it again from another source"
            )
        if not self.signatures:
            raise SignatureError(
                f"manifest {cid.hex()} is not signed; ask the publisher to sign it"
            )
        message = _signed_message(cid)
        for key, sig in self.signatures:
            if not verify_signature(key, sig, message):
                raise SignatureError(
                    f"signature by {key.hex()} on manifest {cid.hex()} does not verify; "
                    "the manifest was tampered with — discard it and fetch it again"
                )
        if trust is not None and bytes(trust) not in self.signers:
            raise UntrustedManifest(
                f"manifest {cid.hex()} is not signed by the trusted key {bytes(trust).hex()} "
                f"(signed by: {', '.join(k.hex() for k in self.signers)}); "
                "check the key you trust, or drop --trust to accept it"
            )


# --- chunks -------------------------------------------------------------------
def verify_chunk(info: Info, index: int, data: Any) -> None:
    """Check that ``data`` is exactly chunk ``index`` of ``info``.

    Raises:
        ManifestError: no such chunk.
        ChunkHashMismatch: wrong length or wrong hash.
    """
    expected = info.chunk_length(index)
    if len(data) != expected:
        raise ChunkHashMismatch(
            f"chunk {index} of {info.name} is {len(data)} bytes, expected {expected}"
        )
    if hash_chunk(info.algo, data) != info.chunk_hash(index):
        raise ChunkHashMismatch(
            f"chunk {index} of {info.name} does not match its hash; the sender gave bad data"
        )


def content_id_hex(cid: bytes) -> str:
    """The printable form of a content id: 64 lowercase hex characters."""
    if len(cid) != CONTENT_ID_SIZE:
        raise ManifestError(f"a content id is {CONTENT_ID_SIZE} bytes, got {len(cid)}")
    return bytes(cid).hex()


def parse_content_id(text: str) -> bytes | str:
    """Parse a content id typed by a user.

    Returns:
        The 32-byte id for 64 hex characters, or the lowercased prefix (a
        ``str``) for 16..63 hex characters, to be resolved by the tracker.

    Raises:
        ManifestError: not hex, or of an unusable length.
    """
    cleaned = text.strip().lower()
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned):
        raise ManifestError(f"not a content id: {text[:80]!r}; expected hex characters")
    if len(cleaned) == 2 * CONTENT_ID_SIZE:
        return bytes.fromhex(cleaned)
    if 16 <= len(cleaned) < 2 * CONTENT_ID_SIZE:
        return cleaned
    raise ManifestError(
        f"content id {text[:80]!r} has {len(cleaned)} hex characters; give all 64, "
        "or a prefix of at least 16"
    )


# --- building -------------------------------------------------------------------
def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise StorageError("the file got shorter while it was being hashed; try again")
        done += n


def build_manifest(
    path: str | os.PathLike[str],
    algo: str = "blake3",
    chunk_size: int | None = None,
    threads: int | None = None,
) -> Info:
    """Hash a file into an :class:`Info` (its name is the file's base name).

    Chunks are read with large positional reads into per-thread reusable
    buffers and hashed on ``threads`` worker threads (default: the CPU count,
    at most 8). Blocking; from Trio use ``trio.to_thread.run_sync``.

    Args:
        path: the file to describe.
        algo: ``"blake3"`` or ``"sha256"``.
        chunk_size: a power of two in [16 KiB, 64 MiB]; default picks 1 MiB or
            more so the hash list stays within 1 MiB.
        threads: number of hashing threads.

    Raises:
        StorageError: the file cannot be read, is not a regular file, or
            changed while being hashed.
        ManifestError: bad algorithm, chunk size or name, or the file is too large.
    """
    path = Path(path)
    if algo not in ALGORITHMS:
        raise ManifestError(f"unknown hash algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    if threads is None:
        threads = min(os.cpu_count() or 1, 8)
    if type(threads) is not int or threads < 1:
        raise ManifestError(f"threads must be a positive integer, got {threads!r}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it has no
        # effect on reads from a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise StorageError(f"{path} is not a regular file")
        size = before.st_size
        if size > MAX_SIZE:
            raise ManifestError(f"{path} is {size} bytes; the limit is {MAX_SIZE}")
        if chunk_size is None:
            chunk_size = default_chunk_size(size)
        n = _num_chunks(size, chunk_size)
        if n > MAX_CHUNKS:
            raise ManifestError(
                f"{path} would have {n} chunks of {chunk_size} bytes; the limit is "
                f"{MAX_CHUNKS}: use a larger chunk size"
            )
        with contextlib.suppress(OSError, AttributeError):  # only a hint; not on every OS
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        hashes = _hash_file(fd, size, chunk_size, n, algo, min(threads, max(n, 1)), path)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise StorageError(f"{path} changed while it was being hashed; try again")
    finally:
        os.close(fd)
    return Info(
        name=path.name,
        size=size,
        chunk_size=chunk_size,
        algo=algo,
        hashes=hashes,
        root=merkle_root(algo, hashes),
    )


def _hash_file(
    fd: int, size: int, chunk_size: int, n: int, algo: str, threads: int, path: Path
) -> bytes:
    out = bytearray(DIGEST_SIZE * n)
    lock = threading.Lock()
    indices = iter(range(n))
    failed = threading.Event()

    def worker() -> None:
        # One buffer per worker, reused for every chunk it hashes. Workers pull
        # the next index from a shared iterator so a slow read never leaves the
        # other threads idle.
        buf = memoryview(bytearray(min(chunk_size, size)))
        try:
            while not failed.is_set():
                with lock:
                    index = next(indices, None)
                if index is None:
                    return
                offset = index * chunk_size
                view = buf[: min(chunk_size, size - offset)]
                _read_exactly(fd, view, offset)
                out[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = hash_chunk(algo, view)
        except BaseException:
            failed.set()  # stop the other workers early
            raise

    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="peer-hash") as pool:
            futures = [pool.submit(worker) for _ in range(threads)]
            for future in futures:
                future.result()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return bytes(out)
