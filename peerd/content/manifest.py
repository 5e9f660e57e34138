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

A **tree** (a shared directory) is one content too: its info adds ``files``
(``[path, size]`` of every regular file) and ``dirs`` (the empty
directories), both in canonical order (by the UTF-8 bytes of the path), and
its bytes are the files concatenated in that order, chunked like one file.
:func:`check_tree` holds every path rule (PROTOCOL.md, "Trees"); it runs
when a tree info is built, when one is decoded, and again in the store
before anything is created. A single file's info has neither key, so its
encoding and id are what they were before trees existed.

Building a manifest reads the file with large positional reads into reused
buffers and hashes chunks on a thread pool; the hash functions release the
GIL, so this runs at hashing speed on every core.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
import os
import re
import stat
import threading
import unicodedata
from collections.abc import Iterator
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
    "MAX_COMPONENT_BYTES",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_SIGNATURES",
    "MAX_SIZE",
    "MIN_CHUNK_SIZE",
    "SIGNATURE_CONTEXT",
    "Info",
    "Manifest",
    "ScannedFile",
    "build_manifest",
    "build_tree_manifest",
    "check_tree",
    "content_id_hex",
    "default_chunk_size",
    "open_tree_file",
    "parse_content_id",
    "scan_tree",
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

# Trees (see "Trees" below): limits on the paths a tree info lists.
MAX_COMPONENT_BYTES = 255  # one path component, in UTF-8
MAX_PATH_BYTES = 4096  # a whole relative path, in UTF-8
MAX_DEPTH = 64  # components in one path
MAX_ENTRIES = 1_000_000  # files plus empty directories in one tree

# The largest info: what fits in the largest manifest with 16 signatures.
# A single-file info is bounded tighter by its own rules (the hash list).
_MAX_INFO_BYTES = MAX_MANIFEST_BYTES - 4096
# Target size of the hash list when picking a chunk size (1 MiB = 32768 chunks).
_TARGET_HASH_BYTES = 1024 * 1024
_INFO_KEYS = ("v", "name", "size", "chunk_size", "algo", "hashes", "root")
_TREE_KEYS = (*_INFO_KEYS, "files", "dirs")
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


def _build_options(algo: str, chunk_size: int | None, threads: int | None) -> int:
    """Check a build's options (file or tree); the hashing thread count to use.

    Raises:
        ManifestError: unknown algorithm, bad chunk size or thread count.
    """
    if algo not in ALGORITHMS:
        raise ManifestError(f"unknown hash algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    if threads is None:
        return min(os.cpu_count() or 1, 8)
    if type(threads) is not int or threads < 1:
        raise ManifestError(f"threads must be a positive integer, got {threads!r}")
    return threads


def _chunking(what: object, size: int, chunk_size: int | None) -> tuple[int, int]:
    """(chunk size, chunk count) for ``size`` bytes of ``what`` (a file or a
    tree being built); ``chunk_size`` None picks the default.

    Raises:
        ManifestError: too large, or too many chunks at that chunk size.
    """
    if size > MAX_SIZE:
        raise ManifestError(f"{what} is {size} bytes; the limit is {MAX_SIZE}")
    if chunk_size is None:
        chunk_size = default_chunk_size(size)
    n = _num_chunks(size, chunk_size)
    if n > MAX_CHUNKS:
        raise ManifestError(
            f"{what} would have {n} chunks of {chunk_size} bytes; the limit is "
            f"{MAX_CHUNKS}: use a larger chunk size"
        )
    return chunk_size, n


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


# --- trees: path rules ----------------------------------------------------------
# C0 controls, DEL and C1 controls: they can rewrite a terminal or log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _validate_path(path: object, what: str = "path") -> bytes:
    """Check one relative path of a tree (PROTOCOL.md lists the rules); its UTF-8."""
    if type(path) is not str:
        raise ManifestError(f"a {what} must be a string, got {type(path).__name__}")
    shown = repr(path[:200])
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} {shown} is not valid UTF-8") from None
    if not encoded:
        raise ManifestError(f"a {what} is empty")
    if len(encoded) > MAX_PATH_BYTES:
        raise ManifestError(
            f"{what} {shown}... is {len(encoded)} bytes in UTF-8; the limit is {MAX_PATH_BYTES}"
        )
    if "\\" in path:
        raise ManifestError(f"{what} {shown} contains a backslash")
    if _has_control(path):
        raise ManifestError(f"{what} {shown} contains a NUL or control character")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise ManifestError(f"{what} {shown} is {len(parts)} levels deep; the limit is {MAX_DEPTH}")
    for part in parts:
        if not part:
            raise ManifestError(
                f"{what} {shown} has an empty component (absolute, or a doubled or "
                "trailing '/'); paths are relative"
            )
        if part in (".", ".."):
            raise ManifestError(f"{what} {shown} has a {part!r} component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ManifestError(
                f"{what} {shown} has a component longer than {MAX_COMPONENT_BYTES} bytes"
            )
    return encoded


def _fold(path: str) -> str:
    """The form two paths collide in on common file systems (case-insensitive,
    normalizing), with '/' as NUL so that sorting puts a directory's contents
    right after it."""
    return unicodedata.normalize("NFC", path).casefold().replace("/", "\x00")


def _check_sorted(encoded: list[bytes], paths: list[str], what: str) -> None:
    for i in range(1, len(encoded)):
        if encoded[i - 1] >= encoded[i]:
            if encoded[i - 1] == encoded[i]:
                raise ManifestError(f"{what} {paths[i][:200]!r} is listed twice")
            raise ManifestError(
                f"{what} are not in canonical order (by the UTF-8 bytes of the path): "
                f"{paths[i - 1][:200]!r} before {paths[i][:200]!r}"
            )


def check_tree(files: object, dirs: object) -> int:
    """Validate a tree's file and empty-directory lists; return the total size.

    ``files`` is a tuple of ``(path, size)`` and ``dirs`` a tuple of paths, each
    sorted by the UTF-8 bytes of the path. Every rule of PROTOCOL.md is checked:
    the paths themselves, order, no duplicates, no file that is also a
    directory, listed directories empty, no two paths (or their parent
    directories) equal once case-folded and NFC-normalized, the entry count.

    Raises:
        ManifestError: the first rule broken.
    """
    if type(files) is not tuple or type(dirs) is not tuple:
        raise ManifestError("a tree's files and dirs must be lists")
    if len(files) + len(dirs) > MAX_ENTRIES:
        raise ManifestError(
            f"tree has {len(files) + len(dirs)} files and directories; the limit is {MAX_ENTRIES}"
        )
    total = 0
    file_paths: list[str] = []
    file_bytes: list[bytes] = []
    for entry in files:
        if type(entry) is not tuple or len(entry) != 2:
            raise ManifestError("each file of a tree must be a [path, size] pair")
        path, size = entry
        file_bytes.append(_validate_path(path, "file path"))
        size = _check_int(size, "file size")
        if not 0 <= size <= MAX_SIZE:
            raise ManifestError(f"file {path[:200]!r} has size {size}, out of range 0..{MAX_SIZE}")
        total += size
        file_paths.append(path)
    dir_paths = list(dirs)
    dir_bytes = [_validate_path(d, "directory path") for d in dir_paths]
    _check_sorted(file_bytes, file_paths, "files")
    _check_sorted(dir_bytes, dir_paths, "directories")
    if total > MAX_SIZE:
        raise ManifestError(f"tree is {total} bytes; the limit is {MAX_SIZE}")
    # One pass over every entry sorted by its folded form: a collision, a
    # duplicate, or one entry inside another always shows in two neighbours.
    entries = sorted(
        [(_fold(p), p, True) for p in file_paths] + [(_fold(d), d, False) for d in dir_paths]
    )
    for (fold_a, a, a_file), (fold_b, b, _b_file) in itertools.pairwise(entries):
        folded_a, folded_b = fold_a.split("\x00"), fold_b.split("\x00")
        parts_a, parts_b = a.split("/"), b.split("/")
        common = 0
        for fa, fb, pa, pb in zip(folded_a, folded_b, parts_a, parts_b, strict=False):
            if fa != fb:
                break
            if pa != pb:
                raise ManifestError(
                    f"paths {a[:200]!r} and {b[:200]!r} differ only in case or Unicode "
                    "normalization; they would collide on common file systems"
                )
            common += 1
        if common == len(parts_a):
            if len(parts_a) == len(parts_b):
                raise ManifestError(f"path {a[:200]!r} is listed twice")
            what = "a file" if a_file else "an empty directory"
            raise ManifestError(f"{a[:200]!r} is listed as {what} but {b[:200]!r} is inside it")
    return total


# --- Info ---------------------------------------------------------------------
@dataclass(frozen=True)
class Info:
    """The signed description of one file or one tree. Validates itself on construction.

    A tree (``files`` is not None) lists its regular files as ``(path, size)``
    and its empty directories (``dirs``), both sorted by the UTF-8 bytes of
    the path; its bytes are the files' bytes concatenated in that order,
    chunked like one file. ``name`` is the tree's top directory.

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
    files: tuple[tuple[str, int], ...] | None = None
    dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _validate_name(self.name)
        size = _check_int(self.size, "size")
        if not 0 <= size <= MAX_SIZE:
            raise ManifestError(f"size {size} is out of range 0..{MAX_SIZE}")
        if self.files is None:
            if self.dirs != ():
                raise ManifestError("only a tree lists directories")
        elif check_tree(self.files, self.dirs) != size:
            raise ManifestError(f"size {size} is not the sum of the tree's file sizes")
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

    @property
    def is_tree(self) -> bool:
        """True for a directory tree, False for one file."""
        return self.files is not None

    @functools.cached_property
    def _starts(self) -> list[int]:
        """Offset of each file in the tree's byte stream."""
        starts, at = [], 0
        for _path, size in self.files or ():
            starts.append(at)
            at += size
        return starts

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """The ``(file index, offset in that file, length)`` pieces of the
        byte range ``[offset, offset + length)``, in order; empty files take
        no piece. One file's content is file 0."""
        if self.files is None:
            if length > 0:
                yield 0, offset, length
            return
        starts, files = self._starts, self.files
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while length > 0 and i < len(files):
            size = files[i][1]
            within = offset - starts[i]
            if within < size:
                n = min(size - within, length)
                yield i, within, n
                offset += n
                length -= n
            i += 1

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
        if self.files is not None:
            body["files"] = [[path, size] for path, size in self.files]
            body["dirs"] = list(self.dirs)
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
        body = _unpack(
            data,
            max_bin_len=_MAX_INFO_BYTES,
            max_array_len=MAX_ENTRIES,
            what="info",
            max_str_len=MAX_PATH_BYTES,
        )
        if type(body) is dict and tuple(body) == _TREE_KEYS:
            files, dirs = _tree_lists(body["files"], body["dirs"])
        else:
            _check_keys(body, _INFO_KEYS, "info")
            files, dirs = None, ()
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
            files=files,
            dirs=dirs,
        )
        if info.encode() != data:
            raise ManifestError("info is not in canonical encoding")
        return info


def _check_bytes_like(data: object, what: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise ManifestError(f"{what} must be bytes, got {type(data).__name__}")


def _tree_lists(files: object, dirs: object) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """A decoded tree's lists as tuples (their contents are checked by :func:`check_tree`)."""
    if type(files) is not list or type(dirs) is not list:
        raise ManifestError("a tree's files and dirs must be lists")
    pairs = []
    for entry in files:
        if type(entry) is not list or len(entry) != 2:
            raise ManifestError("each file of a tree must be a [path, size] pair")
        pairs.append((entry[0], entry[1]))
    return tuple(pairs), tuple(dirs)


def _unpack(
    data: bytes,
    *,
    max_bin_len: int,
    max_array_len: int,
    what: str,
    max_str_len: int = 4 * MAX_NAME_BYTES,
) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            max_str_len=max_str_len,
            max_array_len=max_array_len,
            max_map_len=len(_TREE_KEYS),
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
    def decode(cls, data: bytes, *, expected_id: bytes | None = None) -> Manifest:
        """Decode a manifest received from anywhere (bounded, strict, canonical).

        Signatures are not checked here; call :meth:`verify`. With
        ``expected_id`` (the id the caller asked for), the info's bytes are
        hashed and compared *before* they are decoded, so a manifest of any
        other content costs one hash, never the decoding of its (up to
        40 MiB) info.

        Raises:
            ManifestError: anything malformed.
            ContentIdMismatch: the info does not hash to ``expected_id``.
        """
        data = _check_bytes_like(data, "manifest")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}")
        body = _unpack(
            data, max_bin_len=_MAX_INFO_BYTES, max_array_len=MAX_SIGNATURES, what="manifest"
        )
        _check_keys(body, _MANIFEST_KEYS, "manifest")
        info_bytes = _check_bytes(body["info"], "manifest info")
        if expected_id is not None:
            got = hashlib.sha256(info_bytes).digest()
            if got != bytes(expected_id):
                raise ContentIdMismatch(
                    f"manifest has content id {got.hex()}, not the requested "
                    f"{bytes(expected_id).hex()}; it was tampered with or you got the wrong one "
                    "— fetch it again from another source"
                )
        info = Info.decode(info_bytes)
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
    threads = _build_options(algo, chunk_size, threads)
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
        chunk_size, n = _chunking(path, size, chunk_size)
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


# --- building a tree ------------------------------------------------------------
@dataclass(frozen=True)
class ScannedFile:
    """A regular file found by :func:`scan_tree`: its path in the tree and the
    ``(size, mtime_ns)`` it had when found."""

    path: str
    size: int
    mtime_ns: int


def scan_tree(root: str | os.PathLike[str]) -> tuple[list[ScannedFile], list[str]]:
    """Walk a directory without following links: its regular files and its
    empty directories, sorted by the UTF-8 bytes of their paths.

    Raises:
        StorageError: ``root`` is not a directory or cannot be read, or the
            tree holds a symbolic link or a special file (named).
        ManifestError: a path breaks a rule (not UTF-8, too long, too deep,
            a case collision, too many entries).
    """
    root = Path(root)
    files: list[ScannedFile] = []
    dirs: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        where = root / rel if rel else root
        try:
            with os.scandir(where) as it:
                entries = list(it)
        except NotADirectoryError:
            raise StorageError(f"{where} is not a directory") from None
        except OSError as exc:
            raise StorageError(f"cannot read {where}: {exc.strerror or exc}") from None
        if not entries and rel:
            dirs.append(rel)
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            _validate_path(path, "path")
            if len(files) + len(dirs) + len(stack) >= MAX_ENTRIES:
                raise ManifestError(f"{root} holds more than {MAX_ENTRIES} files and directories")
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise StorageError(f"cannot read {entry.path}: {exc.strerror or exc}") from None
            if stat.S_ISLNK(st.st_mode):
                raise StorageError(
                    f"{entry.path} is a symbolic link; a shared tree holds only regular files "
                    "and directories (links are not followed): remove or replace it"
                )
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                files.append(ScannedFile(path, st.st_size, st.st_mtime_ns))
            else:
                raise StorageError(
                    f"{entry.path} is not a regular file or directory (a fifo, socket or "
                    "device); a shared tree holds only regular files and directories"
                )
    files.sort(key=lambda f: f.path.encode("utf-8"))
    dirs.sort(key=lambda d: d.encode("utf-8"))
    check_tree(tuple((f.path, f.size) for f in files), tuple(dirs))
    return files, dirs


def open_tree_file(root: Path, scanned: ScannedFile) -> int:
    """Open a scanned file for reading; refuse it if it is no longer the
    regular file of that size and mtime.

    Raises:
        StorageError: it cannot be opened or has changed.
    """
    path = root / scanned.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (
        scanned.size,
        scanned.mtime_ns,
    ):
        os.close(fd)
        raise StorageError(f"{path} changed while the tree was being read; try again")
    return fd


def build_tree_manifest(
    path: str | os.PathLike[str],
    algo: str = "blake3",
    chunk_size: int | None = None,
    threads: int | None = None,
    scanned: tuple[list[ScannedFile], list[str]] | None = None,
) -> Info:
    """Hash a directory tree into a tree :class:`Info` (named after the directory).

    The files are concatenated in canonical order and chunked as one stream;
    worker threads each hash whole chunks, reading the files a chunk spans.
    ``scanned`` is :func:`scan_tree`'s result if the caller has it.

    Raises:
        StorageError: unreadable, a link or special file inside, or a file
            changed while being hashed.
        ManifestError: a path breaks a rule, bad algorithm or chunk size, too large.
    """
    root = Path(path)
    threads = _build_options(algo, chunk_size, threads)
    files, dirs = scanned if scanned is not None else scan_tree(root)
    size = sum(f.size for f in files)
    chunk_size, n = _chunking(root, size, chunk_size)
    # The layout first (validated), so chunks can be mapped to files.
    layout = Info(
        name=root.name,
        size=size,
        chunk_size=chunk_size,
        algo=algo,
        hashes=b"\0" * (DIGEST_SIZE * n),
        root=merkle_root(algo, b"\0" * (DIGEST_SIZE * n)),
        files=tuple((f.path, f.size) for f in files),
        dirs=tuple(dirs),
    )
    out = bytearray(DIGEST_SIZE * n)
    lock = threading.Lock()
    indices = iter(range(n))
    failed = threading.Event()

    def worker() -> None:
        buf = memoryview(bytearray(min(chunk_size, size)))
        open_index, fd = -1, -1
        try:
            while not failed.is_set():
                with lock:
                    index = next(indices, None)
                if index is None:
                    return
                offset = index * chunk_size
                length = min(chunk_size, size - offset)
                at = 0
                for i, file_offset, piece in layout.segments(offset, length):
                    if i != open_index:
                        if fd >= 0:
                            os.close(fd)
                            fd = -1
                        fd = open_tree_file(root, files[i])
                        open_index = i
                    _read_exactly(fd, buf[at : at + piece], file_offset)
                    at += piece
                out[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = hash_chunk(
                    algo, buf[:length]
                )
        except BaseException:
            failed.set()
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    try:
        with ThreadPoolExecutor(
            max_workers=max(1, min(threads, n)), thread_name_prefix="peer-hash"
        ) as pool:
            futures = [pool.submit(worker) for _ in range(max(1, min(threads, n)))]
            for future in futures:
                future.result()
    except OSError as exc:
        raise StorageError(f"cannot read {root}: {exc.strerror or exc}") from None
    for f in files:
        try:
            st = os.lstat(root / f.path)
        except OSError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise StorageError(f"{root / f.path} changed while it was being hashed; try again")
    hashes = bytes(out)
    return Info(
        name=root.name,
        size=size,
        chunk_size=chunk_size,
        algo=algo,
        hashes=hashes,
        root=merkle_root(algo, hashes),
        files=layout.files,
        dirs=layout.dirs,
    )
