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

When every chunk is in, the part file is fsynced and moved into place with
``link`` + ``unlink`` (which fails instead of overwriting an existing PATH)
or, with ``force``, ``rename``. So PATH never holds a partial file.

A shared file is served from the user's own file (:class:`SourceFile`); its
size and mtime are checked before each chunk goes out, and a changed file is
no longer served.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import trio

from peerd.content.hashing import hash_chunk
from peerd.content.manifest import Info
from peerd.errors import StorageError
from peerd.wire import bits_from_flags, flags_from_bits

__all__ = ["ChunkStore", "SourceFile", "aligned_buffer", "describe_os_error"]

STATE_VERSION = 1
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
        self.have = bytearray(info.num_chunks)
        self.resumed_bytes = 0
        self._dirty = False
        self._allocated = bytearray(-(-info.size // ALLOC_STEP))  # per ALLOC_STEP block
        self._alloc_lock = threading.Lock()  # chunk writes run on several threads

    # --- opening -------------------------------------------------------------
    @classmethod
    async def open(
        cls, info: Info, content_id: bytes, path: Path, *, force: bool = False
    ) -> ChunkStore:
        """Create or resume ``path.part``; re-verify what the state file claims.

        Raises:
            StorageError: PATH exists (without ``force``), the directory is not
                writable, the disk cannot hold the first block, ``PATH.part``
                exists but is not an unfinished download of this content, or
                another process is downloading into it.
        """
        store = cls(info, content_id, path, force)
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
                raise StorageError(
                    f"another process is downloading into {self.part_path}"
                ) from None
            if created:
                claimed = []
            elif interrupted and not isinstance(state, dict):
                # Finished but for removing the part file (the state went first):
                # every chunk is claimed, and re-verified below.
                claimed = list(range(self.info.num_chunks))
            else:
                claimed = self._claimed(state)
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
            self.direct_fd = os.open(self.part_path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.direct_fd = -1  # no O_DIRECT here (tmpfs): buffered writes only

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
            data = os.pread(self.fd, length, off)
            return len(data) == length and hash_chunk(info.algo, data) == info.chunk_hash(i)

        workers = max(1, min(len(claimed), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for i, good in zip(claimed, pool.map(check, claimed), strict=True):
                if good:
                    self.have[i] = 1
                    self.resumed_bytes += self.chunk_range(i)[1]

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
        """Atomically rewrite the resume state (only if something changed)."""
        if not self._dirty or self.fd < 0:
            return
        self._dirty = False
        try:
            self._write_state(self.have)
        except StorageError:
            self._dirty = True
            raise

    def _write_state(self, have: bytearray) -> None:
        blob = msgpack.packb(
            {"v": STATE_VERSION, "id": self.content_id, "bits": bits_from_flags(have)},
            use_bin_type=True,
        )
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.state_path)
        except OSError as exc:
            self._unlink_quietly(tmp)
            raise describe_os_error(exc, f"saving {self.state_path}") from None

    def finalize_sync(self) -> Path:
        """fsync the complete part file and move it to PATH (never a partial PATH)."""
        if not self.complete:
            raise StorageError("download is not complete")
        try:
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
