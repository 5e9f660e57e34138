"""Chunks on disk: the download target with resume state, and shared sources.

Theory of operation (resume)
----------------------------
A download writes into ``PATH.part`` with one positional write per verified
chunk. Beside it, ``PATH.part.state`` records which chunks were verified and
written; it is rewritten atomically (temp file + rename) at intervals and at
exit, always *after* the chunk writes it describes, so it never claims a
chunk that is not on disk. It is still not trusted: on restart every claimed
chunk is read back and hashed (on all cores, at hashing speed) and only the
ones that match are kept.

The manifest is remote input, so its size is not taken as a licence to fill
the disk: the part file has its full length as a sparse file, and disk space
is allocated (``posix_fallocate``) in aligned blocks of ``ALLOC_STEP`` when a
verified chunk is about to land in one, plus the first block at open (so a
disk that cannot hold even that fails at once). Allocation is therefore at
most ``ALLOC_STEP`` per block that holds a verified chunk, plus one. A
download that ends without any verified chunk removes its part and state
files (:meth:`ChunkStore.discard_if_empty`).

Ownership: the state file is written *before* the part file is created with
``O_EXCL``, so a ``PATH.part`` without a state file of the same content beside
it is not ours; it is refused by name and never truncated or overwritten. The
part file is ``flock``-ed while open, so two processes never download into it
at once.

Chunk writes use ``O_DIRECT`` where the file system supports it (the chunk
buffers are page-aligned ``mmap`` memory and chunk offsets are multiples of
the page size): the data goes from our buffer to the disk without the
page-cache copy, which measured as the largest single CPU cost of a download
on this 2-core machine (~30% of the leecher's CPU for buffered writes into a
preallocated file). The short last chunk, unaligned buffers, and file systems
without ``O_DIRECT`` (tmpfs) use ordinary buffered writes on a second
descriptor; the kernel keeps the two coherent and one fsync covers both.
A stream's cache (``-o -``) is written the same way, and what it reads back
to write out, :meth:`ChunkStore.read_into_sync`, also bypasses the page
cache: buffered, every byte of a 1 GiB stream was first copied into fresh
page-cache pages, ~2 s of system CPU per GiB here (docs/BENCHMARKS.md,
"Streaming").

When every chunk is in, the part file is fsynced and moved into place with
``link`` + ``unlink`` (which fails instead of overwriting an existing PATH)
or, with ``force``, ``rename``. So PATH never holds a partial file.

A shared file is served from the user's own file (:class:`SourceFile`); its
size and mtime are checked before each chunk goes out, and a changed file is
no longer served.

Trees
-----
A tree (an info with ``files``) is one byte stream: its files concatenated in
the listed order. :meth:`Info.segments` maps a range of it to ``(file,
offset, length)`` pieces, so one chunk may span many files. Every store and
source has :meth:`segments`: the ``(descriptor, position, length)`` pieces of
a chunk range, which the sender passes to ``sendfile`` one by one.

:class:`SourceTree` serves the user's own directory. Its files are opened on
demand (``O_NOFOLLOW``) and kept in a bounded cache of descriptors
(:class:`_FdCache`; a descriptor in use by a sender is pinned, never closed
under it), so a 100,000-file tree never holds 100,000 descriptors. A file
is checked against the size and mtime it had when hashed when it is opened,
and every cached one at each look (:meth:`SourceTree.moved`), as
:class:`SourceFile` does for one file.

:class:`TreeStore` downloads a tree into the directory ``PATH.part`` beside
the target, with ``PATH.part.state`` as for a file. At open it re-validates
every path, then creates the directories and the files (sparse, at their full
size) by walking from a descriptor of ``PATH.part`` one component at a time
with ``O_NOFOLLOW``: a symbolic link planted anywhere in the part tree is
refused by name, never followed, so nothing is written outside it; a file
with more than one hard link is refused too. A chunk that spans files is
several positional writes. When every chunk is verified, and the part
directory holds nothing the manifest does not list, the file system is
synced (``syncfs``) and ``PATH.part`` is renamed to ``PATH`` with
``renameat2(RENAME_NOREPLACE)`` (with ``force``, ``RENAME_EXCHANGE`` and the
old tree removed after), so PATH never holds a partial tree. Disk space is
not preallocated for trees (the files are sparse until chunks land).

Locking: the part file (or the part directory) is ``flock``-ed while a get
runs; the state file names the pid that holds it, so a second get into the
same output fails at once and says who holds it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import trio

from peerd.content.hashing import hash_chunk
from peerd.content.manifest import MAX_DEPTH, Info, check_tree
from peerd.errors import StorageError
from peerd.wire import bits_from_flags, flags_from_bits

__all__ = [
    "ChunkStore",
    "SourceFile",
    "SourceTree",
    "TreeStore",
    "aligned_buffer",
    "describe_os_error",
]

STATE_VERSION = 1
# What ``segments`` gives: ``(descriptor, position, length)`` pieces (a generator:
# close it when stopping early, so pinned descriptors are released).
Segments = Generator[tuple[int, int, int], None, None]
DIRECT_ALIGN = 4096
# Disk space for a download is allocated in aligned blocks of this size, as
# verified chunks arrive (a power of two, so a chunk of up to this size lies in
# one block).
ALLOC_STEP = 32 << 20


def aligned_buffer(size: int) -> mmap.mmap:
    """A zeroed, page-aligned, writable buffer (anonymous mmap) for chunk data."""
    return mmap.mmap(-1, max(size, 1))


def _is_aligned(view: memoryview) -> bool:
    if view.readonly:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % DIRECT_ALIGN == 0


def describe_os_error(exc: OSError, what: str) -> StorageError:
    """Turn an OSError into a StorageError a user can act on."""
    if exc.errno == errno.ENOSPC:
        return StorageError(f"disk full while {what}: free some space and run the command again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"permission denied while {what}: {exc.strerror}")
    return StorageError(f"{what} failed: {exc.strerror or exc}")


class SourceFile:
    """A complete local file being shared; every chunk is available."""

    def __init__(self, path: Path, info: Info) -> None:
        self.path = path
        self.info = info
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise describe_os_error(exc, f"opening {path}") from None
        st = os.fstat(self.fd)
        self._signature: tuple[int, int] = (st.st_size, st.st_mtime_ns)
        if st.st_size != info.size:
            os.close(self.fd)
            raise StorageError(f"{path} changed since its manifest was built; share it again")
        self.have = bytearray(b"\x01" * info.num_chunks)
        # Set from the moment the file's size or mtime moved until a re-hash
        # says its bytes still match: nothing is served meanwhile.
        self.suspect = False

    @property
    def servable(self) -> bool:
        """True unless the file may have changed (see :meth:`moved`)."""
        return not self.suspect

    def moved(self) -> bool:
        """True if the file's size or mtime differ from the last look (one
        ``fstat``); from then on nothing is served until :meth:`rehash_sync`
        says the bytes still match."""
        try:
            st = os.fstat(self.fd)
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = (-1, -1)
        if now != self._signature:
            self.suspect = True
            return True
        return False

    def rehash_sync(self) -> bool:
        """Worker thread: re-hash the whole file. True if every chunk still
        matches the manifest (serving resumes, the new size and mtime are
        remembered), False if not (this file can no longer be shared)."""
        info = self.info
        try:
            st = os.fstat(self.fd)
            if st.st_size != info.size:
                return False
            for index in range(info.num_chunks):
                offset = index * info.chunk_size
                data = os.pread(self.fd, info.chunk_length(index), offset)
                if hash_chunk(info.algo, data) != info.chunk_hash(index):
                    return False
        except OSError:
            return False
        self._signature = (st.st_size, st.st_mtime_ns)
        self.suspect = False
        return True

    def segments(self, index: int, offset: int, length: int) -> Segments:
        """``(descriptor, position, length)`` pieces of a chunk range, for ``sendfile``."""
        yield self.fd, index * self.info.chunk_size + offset, length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ChunkStore:
    """The file being downloaded: ``PATH.part`` plus its resume state."""

    def __init__(self, info: Info, content_id: bytes, path: Path, force: bool) -> None:
        self.info = info
        self.content_id = content_id
        self.path = path
        self.part_path = path.with_name(path.name + ".part")
        self.state_path = path.with_name(path.name + ".part.state")
        self.force = force
        self.fd = -1
        self.direct_fd = -1
        self._stream_cache = False  # a stream's cache (see open)
        self.have = bytearray(info.num_chunks)
        self.resumed_bytes = 0
        self._dirty = False
        self._allocated = bytearray(-(-info.size // ALLOC_STEP))  # per ALLOC_STEP block
        self._alloc_lock = threading.Lock()  # chunk writes run on several threads
        self._state_lock = threading.Lock()  # state flushes vs finishing
        self._finished = False

    # --- opening -------------------------------------------------------------
    @classmethod
    async def open(
        cls, info: Info, content_id: bytes, path: Path, *, force: bool = False, cache: bool = False
    ) -> ChunkStore:
        """Create or resume ``path.part``; re-verify what the state file claims.

        ``cache``: the store is a stream's cache (``-o -``, ``peer stream``),
        read back as it fills: it is not fsynced when complete (its bytes
        have gone out already).

        Raises:
            StorageError: PATH exists (without ``force``), the directory is not
                writable, the disk cannot hold the first block, ``PATH.part``
                exists but is not an unfinished download of this content, or
                another process is downloading into it.
        """
        if info.is_tree and cls is ChunkStore:
            cls = TreeStore
        store = cls(info, content_id, path, force)
        store._stream_cache = cache
        await trio.to_thread.run_sync(store._open_sync)
        return store

    def _open_sync(self) -> None:
        interrupted = self._interrupted_finish()
        if interrupted:
            pass  # PATH was our own link to the part file: resume from the part file
        elif self.path.exists() and not self.force:
            raise StorageError(f"{self.path} already exists; use --force to overwrite it")
        if not self.path.parent.is_dir():
            raise StorageError(f"directory {self.path.parent} does not exist")
        state = self._read_state()
        created = False
        try:
            self.fd = os.open(self.part_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if state is not None and not isinstance(state, dict):
                raise StorageError(
                    f"{self.state_path} exists and is not a download's resume state; "
                    "move it away or remove it"
                ) from None
            # The state goes first: a part file with no state of its content
            # beside it is someone else's (see the module comment).
            self._write_state(bytearray(self.info.num_chunks))
            try:
                self.fd = os.open(
                    self.part_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            except FileExistsError:
                # Another get created it since we looked: the state is its now.
                raise StorageError(self._held_message()) from None
            except OSError as exc:
                self._unlink_state()
                raise describe_os_error(exc, f"creating {self.part_path}") from None
            created = True
            state = None
        except OSError as exc:
            raise describe_os_error(exc, f"opening {self.part_path}") from None
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                created = False  # another process holds it: not ours to remove
                raise StorageError(self._held_message()) from None
            if not created:
                # Read again under the lock: a get that created the part
                # file after our first look wrote its state before (the
                # state goes first), and we may have taken the lock first.
                state = self._read_state()
            if created:
                claimed = []
            elif interrupted and not isinstance(state, dict):
                # Finished but for removing the part file (the state went first):
                # every chunk is claimed, and re-verified below.
                claimed = list(range(self.info.num_chunks))
            else:
                claimed = self._claimed(state)
            self._write_state(self._flags(claimed))  # now names this process as the holder
            try:
                if os.fstat(self.fd).st_size != self.info.size:
                    os.ftruncate(self.fd, self.info.size)  # sparse: no disk space yet
                self._allocate(0, min(self.info.size, ALLOC_STEP))
            except OSError as exc:
                raise describe_os_error(exc, f"preallocating {self.part_path}") from None
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            if created:  # ours and empty: leave nothing behind
                self._unlink_quietly(self.part_path)
                self._unlink_state()
            raise
        if claimed:
            self._verify_claimed(claimed)
        try:
            self.direct_fd = os.open(self.part_path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.direct_fd = -1  # no O_DIRECT here (tmpfs): buffered writes only

    def _flags(self, claimed: Sequence[int]) -> bytearray:
        flags = bytearray(self.info.num_chunks)
        for i in claimed:
            flags[i] = 1
        return flags

    def _held_message(self) -> str:
        """Who holds the lock on the part file, from the pid its state names."""
        state = self._read_state()
        pid = state.get("pid") if isinstance(state, dict) else None
        who = f"another `peer get` (pid {pid})" if type(pid) is int else "another `peer get`"
        return (
            f"{who} is downloading into {self.part_path}; wait for it to finish, "
            "or stop it, or download to another path"
        )

    def _interrupted_finish(self) -> bool:
        """Undo a finish cut short between linking PATH and removing PATH.part.

        Both names are then the same complete file; dropping the PATH link loses
        nothing, and the resume below re-verifies the part file and links it again.
        """
        try:
            if not os.path.samefile(self.path, self.part_path):
                return False
            os.unlink(self.path)
        except OSError:
            return False
        return True

    def _read_state(self) -> dict[str, object] | bytes | None:
        """The state file: a dict if it is a resume state (of any content), its
        raw bytes if it is something else, None if there is none."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise describe_os_error(exc, f"reading {self.state_path}") from None
        try:
            state = msgpack.unpackb(raw, raw=False, max_bin_len=1 << 20)
        except Exception:
            return raw
        if not (
            isinstance(state, dict)
            and state.get("v") == STATE_VERSION
            and isinstance(state.get("id"), bytes)
            and isinstance(state.get("bits"), bytes)
        ):
            return raw
        return state

    def _claimed(self, state: dict[str, object] | bytes | None) -> list[int]:
        """The chunks an existing part file's state claims.

        Raises:
            StorageError: the part file has no resume state of this content
                beside it: it is not ours to resume, truncate or overwrite.
        """
        if not isinstance(state, dict):
            raise StorageError(
                f"{self.part_path} exists but is not an unfinished download of this "
                f"content ({self.state_path} is missing or unreadable); "
                "move it away or remove it, or download to another path"
            )
        other = state["id"]
        bits = state["bits"]
        assert isinstance(other, bytes) and isinstance(bits, bytes)
        if other != self.content_id:
            raise StorageError(
                f"{self.part_path} holds an unfinished download of another content "
                f"({other.hex()[:16]}); remove it and {self.state_path.name} to start over, "
                "or download to another path"
            )
        if len(bits) != (self.info.num_chunks + 7) // 8:
            return []  # cannot happen for one content id; claim nothing
        flags = flags_from_bits(bits, self.info.num_chunks)
        return [i for i, v in enumerate(flags) if v]

    def _verify_claimed(self, claimed: list[int]) -> None:
        info = self.info

        def check(i: int) -> bool:
            off, length = self.chunk_range(i)
            try:
                data = self._read_range(off, length)
            except OSError:
                return False
            return len(data) == length and hash_chunk(info.algo, data) == info.chunk_hash(i)

        workers = max(1, min(len(claimed), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for i, good in zip(claimed, pool.map(check, claimed), strict=True):
                if good:
                    self.have[i] = 1
                    self.resumed_bytes += self.chunk_range(i)[1]

    def _read_range(self, off: int, length: int) -> bytes:
        return os.pread(self.fd, length, off)

    def read_into_sync(self, off: int, view: memoryview) -> memoryview:
        """Read ``len(view)`` bytes at ``off`` into ``view`` (call from a worker
        thread); returns the part of ``view`` filled (shorter only past the end).

        With ``O_DIRECT`` (a page-aligned buffer such as an ``mmap``, an aligned
        offset and length) the bytes go from the disk into ``view`` without
        a page-cache copy: that is how a stream's chunks are read back to go
        to stdout (see the module comment); otherwise an ordinary ``preadv``.
        """
        fd = self.direct_fd
        length = len(view)
        if fd < 0 or off % DIRECT_ALIGN or length % DIRECT_ALIGN or not _is_aligned(view):
            fd = self.fd
        done = 0
        try:
            while done < length:
                try:
                    n = os.preadv(fd, [view[done:]], off + done)
                except OSError as exc:
                    if fd != self.direct_fd or exc.errno != errno.EINVAL:
                        raise
                    fd = self.fd  # O_DIRECT refused after all: read buffered
                    continue
                if n == 0:
                    break
                done += n
        except OSError as exc:
            raise describe_os_error(exc, f"reading {self.part_path}") from None
        return view[:done]

    def segments(self, index: int, offset: int, length: int) -> Segments:
        """``(descriptor, position, length)`` pieces of a chunk range, for ``sendfile``."""
        yield self.fd, index * self.info.chunk_size + offset, length

    def _allocate(self, off: int, length: int) -> None:
        """Allocate disk space for the blocks that ``[off, off + length)`` touches."""
        if length <= 0:
            return
        first, last = off // ALLOC_STEP, (off + length - 1) // ALLOC_STEP
        with self._alloc_lock:
            for block in range(first, last + 1):
                if not self._allocated[block]:
                    start = block * ALLOC_STEP
                    os.posix_fallocate(self.fd, start, min(ALLOC_STEP, self.info.size - start))
                    self._allocated[block] = 1

    @property
    def allocated_bytes(self) -> int:
        """Disk space this store has allocated for the part file so far (an upper bound)."""
        return min(self.info.size, sum(self._allocated) * ALLOC_STEP)

    # --- chunks --------------------------------------------------------------
    def chunk_range(self, index: int) -> tuple[int, int]:
        off = index * self.info.chunk_size
        return off, min(self.info.chunk_size, self.info.size - off)

    def mark_have(self, index: int) -> None:
        """Record a chunk that is verified and written."""
        if not self.have[index]:
            self.have[index] = 1
            self._dirty = True

    @property
    def complete(self) -> bool:
        return all(self.have)

    def write_chunk_sync(self, index: int, data: memoryview | bytes) -> None:
        """Positional write of one verified chunk (call from a worker thread).

        Disk space for the chunk's block is allocated first (see the module
        comment). Nothing is written once the store is closed.
        """
        off, length = self.chunk_range(index)
        view = memoryview(data)[:length]
        fd = self.fd
        if fd < 0:
            return  # closed: the download was stopped
        try:
            self._allocate(off, length)
        except OSError as exc:
            raise describe_os_error(exc, f"writing {self.part_path}") from None
        if (
            self.direct_fd >= 0
            and off % DIRECT_ALIGN == 0
            and length % DIRECT_ALIGN == 0
            and _is_aligned(view)
        ):
            fd = self.direct_fd
        try:
            while view:
                try:
                    n = os.pwrite(fd, view, off)
                except OSError as exc:
                    if fd != self.direct_fd or exc.errno != errno.EINVAL:
                        raise
                    fd = self.fd  # O_DIRECT refused after all: write buffered
                    continue
                view = view[n:]
                off += n
        except OSError as exc:
            raise describe_os_error(exc, f"writing {self.part_path}") from None

    # --- state ---------------------------------------------------------------
    def flush_state_sync(self) -> None:
        """Atomically rewrite the resume state (only if something changed).

        Never after the download was moved into place: a flush running in
        another thread meanwhile must not put the state file back."""
        with self._state_lock:
            if not self._dirty or self.fd < 0 or self._finished:
                return
            self._dirty = False
            try:
                self._write_state(self.have)
            except StorageError:
                self._dirty = True
                raise

    def _write_state(self, have: bytearray) -> None:
        blob = msgpack.packb(
            {
                "v": STATE_VERSION,
                "id": self.content_id,
                "bits": bits_from_flags(have),
                "pid": os.getpid(),
            },
            use_bin_type=True,
        )
        # Per process and thread: two gets racing to start must not share a temp file.
        tmp = self.state_path.with_name(
            f"{self.state_path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
        )
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            self._unlink_quietly(tmp)
            raise describe_os_error(exc, f"saving {self.state_path}") from None

    def finalize_sync(self) -> Path:
        """fsync the complete part file and move it to PATH (never a partial PATH)."""
        with self._state_lock:
            path = self._finalize_locked()
            self._finished = True
            return path

    def _finalize_locked(self) -> Path:
        if not self.complete:
            raise StorageError("download is not complete")
        try:
            if not self._stream_cache:
                os.fsync(self.fd)
            if self.force:
                os.replace(self.part_path, self.path)
            else:
                try:
                    os.link(self.part_path, self.path)
                except FileExistsError:
                    raise StorageError(
                        f"{self.path} appeared while downloading; use --force to overwrite it"
                    ) from None
                # The state goes before the part file: a crash in between leaves
                # PATH and PATH.part as one file, which the next open recognises.
                self._unlink_state()
                os.unlink(self.part_path)
            if not self._stream_cache:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise describe_os_error(exc, f"moving the download to {self.path}") from None
        self._unlink_state()
        self._dirty = False
        return self.path

    def _unlink_state(self) -> None:
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def close(self) -> None:
        """Flush state and close the part file (the part file stays for resume).

        Only once nothing uses the store any more (its content has stopped):
        a closed descriptor's number can be reused by the next open file.
        """
        if self.fd >= 0:
            try:
                self.flush_state_sync()
            except StorageError:
                pass
            os.close(self.fd)
            self.fd = -1
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def discard_if_empty(self) -> bool:
        """Close; then remove the part and state files if no chunk in them is verified.

        For a download that gives up or fails: a part file holding verified
        chunks stays for a later resume; one holding nothing would only hold
        disk space. Returns True if the files were removed.
        """
        self.close()
        if any(self.have):
            return False
        self._unlink_quietly(self.part_path)
        self._unlink_state()
        return True


# --- trees ------------------------------------------------------------------------
SOURCE_FDS = 64  # descriptors a shared tree keeps open (checked at every look)
STORE_FDS = 256  # descriptors a tree being downloaded keeps open
DIR_FDS = 128  # directory descriptors it keeps (more than MAX_DEPTH)
assert DIR_FDS > MAX_DEPTH
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _FdCache:
    """Open descriptors of a tree's files by file index, least recently used
    closed first once more than ``limit`` are open. A descriptor handed out by
    :meth:`acquire` is pinned until :meth:`release`: it is never closed while
    someone uses it (the cache may then hold more than ``limit``). Thread-safe."""

    def __init__(self, opener: Callable[[int], int], limit: int) -> None:
        self._opener = opener
        self._limit = limit
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._lock = threading.Lock()
        self.closed = False

    def acquire(self, index: int) -> int:
        with self._lock:
            if self.closed:
                raise StorageError("the tree is closed")
            fd = self._fds.get(index)
            if fd is not None:
                self._fds.move_to_end(index)
                self._pins[index] = self._pins.get(index, 0) + 1
                return fd
        fd = self._opener(index)
        with self._lock:
            if self.closed:
                os.close(fd)
                raise StorageError("the tree is closed")
            existing = self._fds.get(index)
            if existing is not None:
                os.close(fd)
                fd = existing
            else:
                self._fds[index] = fd
            self._fds.move_to_end(index)
            self._pins[index] = self._pins.get(index, 0) + 1
            self._evict()
        return fd

    def release(self, index: int) -> None:
        with self._lock:
            left = self._pins[index] - 1
            if left:
                self._pins[index] = left
            else:
                del self._pins[index]
            self._evict()

    def _evict(self) -> None:
        if len(self._fds) <= self._limit:
            return
        for index in list(self._fds):
            if len(self._fds) <= self._limit:
                break
            if index not in self._pins:
                os.close(self._fds.pop(index))

    def check(self, test: Callable[[int, int], bool]) -> bool:
        """True if ``test(index, fd)`` holds for every open descriptor."""
        with self._lock:
            return all(test(index, fd) for index, fd in self._fds.items())

    def __len__(self) -> int:
        return len(self._fds)

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _tree_segments(info: Info, cache: _FdCache, index: int, offset: int, length: int) -> Segments:
    for i, position, n in info.segments(index * info.chunk_size + offset, length):
        fd = cache.acquire(i)
        try:
            yield fd, position, n
        finally:
            cache.release(i)


def _read_tree_range(info: Info, cache: _FdCache, off: int, length: int) -> bytes:
    out = bytearray()
    for i, position, n in info.segments(off, length):
        fd = cache.acquire(i)
        try:
            piece = os.pread(fd, n, position)
        finally:
            cache.release(i)
        out += piece
        if len(piece) != n:
            break
    return bytes(out)


class SourceTree(SourceFile):
    """A complete local directory tree being shared (see "Trees" above).

    ``signatures`` is each file's ``(size, mtime_ns)`` when it was hashed.
    """

    def __init__(self, path: Path, info: Info, signatures: Sequence[tuple[int, int]]) -> None:
        if info.files is None or len(signatures) != len(info.files):
            raise StorageError(f"{path}: the tree's layout does not match its manifest")
        self.path = path
        self.info = info
        self.fd = -1
        self._files = info.files
        self._signatures = list(signatures)
        for (rel, size), (now_size, _mtime) in zip(self._files, self._signatures, strict=True):
            if size != now_size:
                raise StorageError(
                    f"{path / rel} changed since its manifest was built; share it again"
                )
        self._cache = _FdCache(self._open_checked, SOURCE_FDS)
        self.have = bytearray(b"\x01" * info.num_chunks)
        self.suspect = False

    @classmethod
    def reopen(cls, path: Path, info: Info) -> SourceTree:
        """A tree this node downloaded (and verified) before, served again as
        its files are now; one that is no longer a regular file of its size
        (``lstat``: a link is not followed) is refused."""
        if info.files is None:
            raise StorageError(f"{path}: the manifest is not a tree's")
        signatures: list[tuple[int, int]] = []
        for rel, size in info.files:
            try:
                st = os.lstat(path / rel)
            except OSError as exc:
                raise describe_os_error(exc, f"opening {path / rel}") from None
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise StorageError(f"{path / rel} changed since it was downloaded")
            signatures.append((st.st_size, st.st_mtime_ns))
        return cls(path, info, signatures)

    def _open(self, index: int) -> tuple[int, os.stat_result]:
        path = self.path / self._files[index][0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            self.suspect = True
            raise describe_os_error(exc, f"opening {path}") from None
        return fd, os.fstat(fd)

    def _open_checked(self, index: int) -> int:
        fd, st = self._open(index)
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != self._signatures[index]:
            os.close(fd)
            self.suspect = True
            raise StorageError(f"source changed: {self.path / self._files[index][0]}")
        return fd

    def moved(self) -> bool:
        """True if an open file's size or mtime moved (one ``fstat`` per open
        descriptor, at most :data:`SOURCE_FDS`), or a file opened since the last
        look had changed; nothing is served then until :meth:`rehash_sync`."""

        def same(index: int, fd: int) -> bool:
            try:
                st = os.fstat(fd)
            except OSError:
                return False
            return (st.st_size, st.st_mtime_ns) == self._signatures[index]

        if self.suspect or not self._cache.check(same):
            self.suspect = True
            return True
        return False

    def rehash_sync(self) -> bool:
        """Worker thread: re-hash the whole tree; True if every chunk still matches."""
        info = self.info
        signatures: list[tuple[int, int]] = []
        try:
            for rel, size in self._files:
                st = os.lstat(self.path / rel)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    return False
                signatures.append((st.st_size, st.st_mtime_ns))
            fresh = _FdCache(lambda i: self._open(i)[0], SOURCE_FDS)
            try:
                for index in range(info.num_chunks):
                    off = index * info.chunk_size
                    data = _read_tree_range(info, fresh, off, info.chunk_length(index))
                    if hash_chunk(info.algo, data) != info.chunk_hash(index):
                        return False
            finally:
                fresh.close_all()
        except (OSError, StorageError):
            return False
        old, self._cache = self._cache, _FdCache(self._open_checked, SOURCE_FDS)
        self._signatures = signatures
        old.close_all()
        self.suspect = False
        return True

    def segments(self, index: int, offset: int, length: int) -> Segments:
        return _tree_segments(self.info, self._cache, index, offset, length)

    def close(self) -> None:
        self._cache.close_all()


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _rename2(old: Path, new: Path, flags: int) -> bool:
    """``renameat2``; False if this system or file system does not have it.

    Raises:
        OSError: the rename failed (``EEXIST`` with ``RENAME_NOREPLACE``...).
    """
    libc = _libc()
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), os.fspath(new))


def _syncfs(fd: int) -> None:
    libc = _libc()
    fn = getattr(libc, "syncfs", None)
    if fn is None or fn(fd) != 0:
        os.sync()


class TreeStore(ChunkStore):
    """A tree being downloaded: the directory ``PATH.part`` plus its resume
    state (see "Trees" above). :meth:`ChunkStore.open` returns one for a tree."""

    def __init__(self, info: Info, content_id: bytes, path: Path, force: bool) -> None:
        super().__init__(info, content_id, path, force)
        if info.files is None:
            raise StorageError("not a tree")
        self._files = info.files
        self._cache = _FdCache(self._open_file, STORE_FDS)
        self._dirs: OrderedDict[str, int] = OrderedDict()  # see _dir
        self._dir_lock = threading.Lock()

    # --- opening -------------------------------------------------------------
    def _open_sync(self) -> None:
        info = self.info
        assert info.files is not None
        check_tree(info.files, info.dirs)  # again, here, before anything touches the disk
        base = os.path.abspath(self.part_path)
        for rel in [p for p, _s in info.files] + list(info.dirs):
            full = os.path.normpath(os.path.join(base, rel))
            if not full.startswith(base + os.sep):
                raise StorageError(f"path {rel[:200]!r} would leave {self.part_path}")
        state = self._read_state()
        part_exists = os.path.lexists(self.part_path)
        if os.path.lexists(self.path):
            if not part_exists and isinstance(state, dict) and state.get("id") == self.content_id:
                self._unlink_state()  # a finish cut short after the rename: stale
            if not self.force:
                raise StorageError(f"{self.path} already exists; use --force to replace it")
        if not self.path.parent.is_dir():
            raise StorageError(f"directory {self.path.parent} does not exist")
        created = False
        if not part_exists:
            if state is not None and not isinstance(state, dict):
                raise StorageError(
                    f"{self.state_path} exists and is not a download's resume state; "
                    "move it away or remove it"
                )
            self._write_state(bytearray(info.num_chunks))  # first: see the module comment
            try:
                os.mkdir(self.part_path, 0o755)
            except FileExistsError:
                raise StorageError(self._held_message()) from None
            except OSError as exc:
                self._unlink_state()
                raise describe_os_error(exc, f"creating {self.part_path}") from None
            created = True
        try:
            self.fd = os.open(
                self.part_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise StorageError(
                    f"{self.part_path} exists and is not the directory of an unfinished "
                    "download; move it away or remove it, or download to another path"
                ) from None
            raise describe_os_error(exc, f"opening {self.part_path}") from None
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                created = False  # another process holds it: not ours to remove
                raise StorageError(self._held_message()) from None
            # Read again under the lock (see ChunkStore._open_sync).
            claimed = [] if created else self._claimed(self._read_state())
            self._write_state(self._flags(claimed))
            self._make_tree()
        except BaseException:
            self._close_dirs()
            os.close(self.fd)
            self.fd = -1
            if created:  # ours and holding nothing: leave nothing behind
                shutil.rmtree(self.part_path, ignore_errors=True)
                self._unlink_state()
            raise
        if claimed:
            self._verify_claimed(claimed)

    def _dir(self, rel_dir: str, create: bool, rel: str) -> int:
        """A descriptor of the part tree's directory ``rel_dir`` (``""``: the
        part directory), opened from its parent with ``O_NOFOLLOW`` (a link is
        refused), created first with ``create``. Cached (at most
        :data:`DIR_FDS`, more than the deepest path, so a path's chain stays
        open while it is walked); call with ``_dir_lock`` held and use the
        descriptor only while holding it."""
        if not rel_dir:
            return self.fd
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            self._dirs.move_to_end(rel_dir)
            return fd
        parent, _, name = rel_dir.rpartition("/")
        parent_fd = self._dir(parent, create, rel)
        try:
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=parent_fd)
                except FileExistsError:
                    pass
            fd = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=parent_fd,
            )
        except OSError as exc:
            raise self._tree_error(exc, rel) from None
        self._dirs[rel_dir] = fd
        while len(self._dirs) > DIR_FDS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _tree_error(self, exc: OSError, rel: str) -> StorageError:
        where = self.part_path / rel
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EMLINK):
            return StorageError(
                f"{where} (or a directory above it) is not what this download created "
                "(a symbolic link or another kind of file was put there); refusing to "
                f"write through it: remove {self.part_path} and {self.state_path.name} "
                "to start over"
            )
        return describe_os_error(exc, f"opening {where}")

    def _open_file(self, index: int, create: bool = False) -> int:
        rel, size = self._files[index]
        parent, _, leaf = rel.rpartition("/")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        with self._dir_lock:
            dirfd = self._dir(parent, create, rel)
            try:
                fd = os.open(leaf, flags | (os.O_CREAT if create else 0), 0o644, dir_fd=dirfd)
            except OSError as exc:
                raise self._tree_error(exc, rel) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise StorageError(
                    f"{self.part_path / rel} is not a regular file of this download "
                    f"(a special file, or a hard link to another file); remove "
                    f"{self.part_path} and {self.state_path.name} to start over"
                )
            if st.st_size != size:
                os.ftruncate(fd, size)  # sparse: no disk space yet
        except OSError as exc:
            os.close(fd)
            raise describe_os_error(exc, f"sizing {self.part_path / rel}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_tree(self) -> None:
        """Create (or check, on resume) every directory and file of the tree."""
        for rel in self.info.dirs:
            with self._dir_lock:
                self._dir(rel, True, rel)
        for index in range(len(self._files)):
            os.close(self._open_file(index, create=True))

    # --- chunks --------------------------------------------------------------
    def _read_range(self, off: int, length: int) -> bytes:
        return _read_tree_range(self.info, self._cache, off, length)

    def segments(self, index: int, offset: int, length: int) -> Segments:
        return _tree_segments(self.info, self._cache, index, offset, length)

    @property
    def allocated_bytes(self) -> int:
        return 0

    def write_chunk_sync(self, index: int, data: memoryview | bytes) -> None:
        """Positional writes of one verified chunk, one per file it spans."""
        off, length = self.chunk_range(index)
        view = memoryview(data)[:length]
        if self.fd < 0:
            return
        at = 0
        for i, position, n in self.info.segments(off, length):
            fd = self._cache.acquire(i)
            try:
                piece = view[at : at + n]
                while piece:
                    done = os.pwrite(fd, piece, position)
                    piece = piece[done:]
                    position += done
            except OSError as exc:
                raise describe_os_error(
                    exc, f"writing {self.part_path / self._files[i][0]}"
                ) from None
            finally:
                self._cache.release(i)
            at += n

    # --- finishing -----------------------------------------------------------
    def _check_nothing_else(self) -> None:
        """Refuse to move the tree into place if the part directory holds
        anything the manifest does not list (put there by someone else)."""
        expected = {p for p, _s in self._files} | set(self.info.dirs)
        for rel in list(expected):
            while "/" in rel:
                rel = rel.rpartition("/")[0]
                expected.add(rel)
        base = os.fspath(self.part_path)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            for name in dirnames + filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), base)
                if rel not in expected:
                    raise StorageError(
                        f"{self.part_path / rel} is not part of this download (someone put it "
                        f"there); move it out of {self.part_path} and run the command again"
                    )

    def _finalize_locked(self) -> Path:
        """Sync the complete tree and rename it to PATH (never a partial PATH)."""
        if not self.complete:
            raise StorageError("download is not complete")
        self._check_nothing_else()
        try:
            _syncfs(self.fd)
            replaced = False
            if self.force and os.path.lexists(self.path):
                replaced = _rename2(self.part_path, self.path, RENAME_EXCHANGE)
                if not replaced:
                    raise StorageError(
                        f"{self.path} exists and this file system cannot swap it for the "
                        "download; remove it and run the command again"
                    )
            elif not _rename2(self.part_path, self.path, RENAME_NOREPLACE):
                if os.path.lexists(self.path):
                    raise FileExistsError(errno.EEXIST, "exists", os.fspath(self.path))
                os.rename(self.part_path, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except FileExistsError:
            raise StorageError(
                f"{self.path} appeared while downloading; use --force to replace it"
            ) from None
        except OSError as exc:
            raise describe_os_error(exc, f"moving the download to {self.path}") from None
        self._unlink_state()
        if replaced:  # the old PATH is now at PATH.part
            if os.path.isdir(self.part_path) and not os.path.islink(self.part_path):
                shutil.rmtree(self.part_path, ignore_errors=True)
            else:
                self._unlink_quietly(self.part_path)
        self._dirty = False
        return self.path

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush_state_sync()
            except StorageError:
                pass
            self._cache.close_all()
            self._close_dirs()
            os.close(self.fd)
            self.fd = -1

    def _close_dirs(self) -> None:
        with self._dir_lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()

    def discard_if_empty(self) -> bool:
        self.close()
        if any(self.have):
            return False
        shutil.rmtree(self.part_path, ignore_errors=True)
        self._unlink_state()
        return True
