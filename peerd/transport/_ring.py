"""One io_uring per Trio run, woken through an eventfd that Trio's epoll watches.

Theory of operation (in full, with the liburing pitfalls behind each rule:
docs/ARCHITECTURE.md, "The io_uring ring"):

* The ring lives in a ``trio.lowlevel.RunVar``: created by the first proactor
  operation of a run, torn down when the run ends (the reaper's ``finally``).
* Submission: an operation prepares its SQE(s) and parks. A *flusher* system
  task, woken by the first preparation in a scheduling pass, sends the whole
  pass's SQEs in one ``io_uring_submit`` and harvests what completed inline.
* Completion: a *reaper* system task waits for the eventfd, harvests every
  ready CQE and wakes exactly the tasks whose operation (one SQE or a linked
  chain) is complete, or calls ``done`` for an op begun with ``start``.
* Buffers: ``keep`` holds everything the kernel may touch until the CQE is in.
* Cancellation: submit ``ASYNC_CANCEL`` and return ``Abort.FAILED``; the task
  stays parked until its op's own CQE, so the kernel is done with the buffer
  before the caller runs again.
* The wheel's liburing calls never release the GIL, so nothing here ever
  blocks in the ring. The submit is liburing's C function called through
  ctypes instead, which releases it: the kernel's receive work done in that
  call does not stall the process's other threads (``SUBMIT_RELEASES_GIL``).
* An *owned* ring (``Ring(owned=True)``, the proactor's mux) has neither
  system task: its owner submits, harvests and parks on the eventfd itself
  (``harvest``, ``pump``), and the eventfd is on only while it is parked.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import mmap
import os
import platform
import struct
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from peerd.errors import TransportUnavailable

try:  # the probe reports a missing wheel; importing this module must not fail
    import liburing as L
except ImportError:  # pragma: no cover - depends on the machine
    L = None

__all__ = ["BufferRing", "Ring", "current_ring", "probe"]

RING_ENTRIES = 1024  # CQ is twice that; overflow is handled by the kernel anyway
# Set-ups tried in order, the first the kernel accepts is kept (EINVAL: an
# older kernel without the flag). Only the Trio thread submits, and it enters
# the kernel often (epoll_wait, submits): completion work can wait for that
# instead of interrupting it (COOP_TASKRUN). A module-level list so that a
# test can force the fallback.
SETUP_FLAGS: list[int] = (
    [L.IORING_SETUP_COOP_TASKRUN | L.IORING_SETUP_SINGLE_ISSUER, 0] if L is not None else [0]
)
_CANCEL_UID = 0  # user_data of cancel requests and neutralised SQEs (ignored)

Step = tuple[Callable[..., Any], tuple[Any, ...]]

_REQUIRED_OPS = (
    "IORING_OP_READV",
    "IORING_OP_WRITEV",
    "IORING_OP_RECV",
    "IORING_OP_SEND",
    "IORING_OP_POLL_ADD",
    "IORING_OP_ASYNC_CANCEL",
    "IORING_OP_NOP",
)


def _unavailable(why: str) -> TransportUnavailable:
    return TransportUnavailable(
        f"proactor (io_uring) transport unavailable: {why}; `--transport reactor` works"
    )


@functools.lru_cache(maxsize=1)
def _probe_cached() -> str | None:
    if L is None:
        return "the liburing package is not installed (pip install liburing)"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = f.read().strip()
    except OSError:
        disabled = "0"
    if disabled == "2":
        return "io_uring is disabled by sysctl kernel.io_uring_disabled=2"
    ring = L.Ring()
    try:
        L.io_uring_queue_init(8, ring, 0)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return "the kernel has no io_uring or a seccomp filter blocks it (ENOSYS)"
        if exc.errno == errno.EPERM:
            extra = " (kernel.io_uring_disabled=1)" if disabled == "1" else ""
            return f"io_uring setup is not permitted here{extra} (EPERM)"
        return f"io_uring setup failed: {exc.strerror}"
    try:
        probe_obj = L.io_uring_get_probe_ring(ring)
        if probe_obj is None:
            return "the kernel does not support the io_uring opcode probe"
        missing = [
            name
            for name in _REQUIRED_OPS
            if not L.io_uring_opcode_supported(probe_obj, getattr(L.io_uring_op, name))
        ]
        if missing:
            return f"the kernel's io_uring lacks {', '.join(missing)}"
    finally:
        L.io_uring_queue_exit(ring)
    return None


def probe() -> None:
    """Check that io_uring can be used: import, sysctl, ring setup, opcodes.

    Raises:
        TransportUnavailable: one line saying why, and that the reactor works.
    """
    why = _probe_cached()
    if why is not None:
        raise _unavailable(why)


class _Op:
    __slots__ = ("done", "keep", "multi", "raise_cancel", "remaining", "results", "task", "uids")

    def __init__(self, task: trio.lowlevel.Task | None, n: int, keep: object) -> None:
        self.task = task  # None: ``done`` is called instead of waking a task
        self.done: Callable[..., None] | None = None
        self.multi = False  # a multishot op: done(res, flags) per CQE until F_MORE is clear
        self.keep = keep  # everything the kernel may touch, alive until the CQE
        self.results = [0] * n
        self.remaining = n
        self.uids: list[int] = []
        self.raise_cancel: Callable[[], Any] | None = None


class Ring:
    """An io_uring bound to the current Trio run (use :func:`current_ring`).

    ``owned=True`` makes a ring driven by one owner instead (``RingMux``):
    no reaper and no flusher task; the owner calls :meth:`pump`, which
    submits, waits for the eventfd and harvests in the owner's own task, and
    :meth:`close` at the end. An SQE prepared by any other task of the run
    is submitted at once, since the owner may be parked in ``pump``.
    """

    def __init__(self, *, owned: bool = False) -> None:
        assert L is not None
        self._cqe = L.Cqe()
        self.flags = -1  # the set-up flags the kernel took
        for i, flags in enumerate(SETUP_FLAGS):
            self._ring = L.Ring()
            try:
                L.io_uring_queue_init(RING_ENTRIES, self._ring, flags)
            except OSError as exc:  # EINVAL: a kernel without these flags
                if exc.errno != errno.EINVAL or i == len(SETUP_FLAGS) - 1:
                    raise
                continue
            self.flags = flags
            break
        # DEFER_TASKRUN: completions are posted only when this thread asks
        # (io_uring_get_events); the eventfd still fires when work is queued.
        self._defer = bool(self.flags & L.IORING_SETUP_DEFER_TASKRUN)
        # The ring's struct io_uring, for a submit that releases the GIL
        # (0: the wheel's own submit; see SUBMIT_RELEASES_GIL).
        self._struct = _wheel_pointer(self._ring) if SUBMIT_RELEASES_GIL else 0
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        L.io_uring_register_eventfd(self._ring, self._efd)
        if owned:  # signalled only while the owner waits (pump)
            L.io_uring_cq_eventfd_toggle(self._ring, False)
        self._uids = itertools.count(1)
        self._bgids = itertools.count(1)
        self._buffer_rings: set[BufferRing] = set()  # registered: alive until unregistered
        self._ops: dict[int, tuple[_Op, int]] = {}  # uid -> (op, index in chain)
        self._unsubmitted = 0
        self._flusher: trio.lowlevel.Task | None = None  # set while parked
        self._closed = False
        self._owned = owned
        self.pumper: trio.lowlevel.Task | None = None  # an owned ring's pumping task
        if not owned:
            trio.lowlevel.spawn_system_task(self._reaper, name="peerd.io_uring.reaper")
            trio.lowlevel.spawn_system_task(self._flush_loop, name="peerd.io_uring.flusher")

    # -- submission ------------------------------------------------------------
    def _get_sqe(self) -> Any:
        sqe = L.io_uring_get_sqe(self._ring)
        if sqe is None:  # SQ full: push what we have to the kernel, then retry
            self._submit()
            sqe = L.io_uring_get_sqe(self._ring)
            if sqe is None:
                raise RuntimeError("io_uring submission queue is full")
        return sqe

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...], uid: int, flags: int) -> Any:
        sqe = self._get_sqe()
        self._unsubmitted += 1
        try:
            fn(sqe, *args)
        except BaseException:
            _neutralise(sqe)  # the SQE is in the ring already
            raise
        if flags:
            L.io_uring_sqe_set_flags(sqe, flags)
        L.io_uring_sqe_set_data64(sqe, uid)
        return sqe

    def harvest(self) -> None:
        """Submit what is prepared, handle the completions already in (owner only)."""
        self._submit()
        if self._defer and not self._closed:  # post the completion work queued so far
            L.io_uring_get_events(self._ring)
        self._harvest()

    def _submit(self) -> None:
        if self._unsubmitted and not self._closed:
            self._unsubmitted = 0
            if self._defer:
                L.io_uring_submit_and_get_events(self._ring)
            elif self._struct and _submit_releasing_gil is not None:
                # The kernel runs the receives it can complete, and the
                # retries queued for this thread, inside this call: copies
                # that other Python threads (hashing, writing) need not wait
                # for. The wheel's own call holds the GIL throughout.
                res = _submit_releasing_gil(self._struct)
                if res < 0:
                    raise OSError(-res, os.strerror(-res))
            else:
                L.io_uring_submit(self._ring)

    async def _flush_loop(self) -> None:
        while True:
            if not self._unsubmitted:
                self._flusher = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
            self._submit()
            self._harvest()

    def _wake_flusher(self) -> None:
        if self._owned:
            if trio.lowlevel.current_task() is not self.pumper:
                self._submit()  # the owner may be parked in pump: do not wait for it
            return
        task, self._flusher = self._flusher, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    # -- an owned ring's driving ---------------------------------------------------
    def claim(self) -> None:
        """Make the calling task the one that pumps (an owned ring)."""
        self.pumper = trio.lowlevel.current_task()

    async def pump(self) -> None:
        """Submit, park until the kernel signals completions, and handle them.

        Only the task that ``claim``-ed the ring may call it (one task may
        wait for the eventfd). :meth:`kick` wakes it early.
        """
        assert self._owned and trio.lowlevel.current_task() is self.pumper
        if self._closed:
            raise RuntimeError("io_uring ring is closed")
        # The eventfd is signalled only while the owner is parked here: a
        # signal per completion costs the kernel a wake-up of epoll each.
        self._submit()
        L.io_uring_cq_eventfd_toggle(self._ring, True)
        if self._defer:  # work queued while the eventfd was off signalled nothing
            L.io_uring_get_events(self._ring)
        if not L.io_uring_cq_ready(self._ring):  # none came in before the toggle
            try:
                await trio.lowlevel.wait_readable(self._efd)  # close() ends it too
            finally:
                if not self._closed:  # the ring's memory is gone once closed
                    L.io_uring_cq_eventfd_toggle(self._ring, False)
        else:
            L.io_uring_cq_eventfd_toggle(self._ring, False)
            await trio.lowlevel.checkpoint()
        self._drain_eventfd()
        if self._defer and not self._closed:
            L.io_uring_get_events(self._ring)
        self._harvest()

    def kick(self) -> None:
        """Wake the task parked in ``pump`` (news that is not a completion)."""
        if not self._closed:
            os.eventfd_write(self._efd, 1)

    def _drain_eventfd(self) -> None:
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Tear an owned ring down: every operation must have completed."""
        if self._owned and not self._closed:
            self._close()

    async def perform(self, steps: Sequence[Step], keep: object) -> list[int]:
        """Run one SQE, or a chain linked with IOSQE_IO_LINK; return every result.

        Results are raw: ``>= 0`` or ``-errno`` (a failed link gives the rest
        ``-ECANCELED``). Cancellation is delivered as Trio's ``Cancelled`` only
        once every SQE of the chain has completed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("io_uring ring is closed")
        assert not self._owned, "an owned ring has no reaper: use start and pump"
        op = _Op(trio.lowlevel.current_task(), len(steps), keep)
        last = len(steps) - 1
        if L.io_uring_sq_space_left(self._ring) < len(steps):
            self._submit()  # a chain must not be split across two submits
        sqes = []
        try:
            for i, (fn, args) in enumerate(steps):
                uid = next(self._uids)
                sqes.append(self._prepare(fn, args, uid, L.IOSQE_IO_LINK if i < last else 0))
                op.uids.append(uid)
        except BaseException:
            for sqe in sqes:  # not submitted yet: turn the earlier links into NOPs
                _neutralise(sqe)
            raise
        for i, uid in enumerate(op.uids):
            self._ops[uid] = (op, i)
        self._wake_flusher()

        def abort(raise_cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
            op.raise_cancel = raise_cancel
            for uid in op.uids:
                if uid in self._ops:
                    self._prepare(L.io_uring_prep_cancel64, (uid,), _CANCEL_UID, 0)
            self._submit()  # submits the op too if the flusher has not run yet
            return trio.lowlevel.Abort.FAILED

        results: list[int] = await trio.lowlevel.wait_task_rescheduled(abort)
        if op.raise_cancel is not None and any(
            r in (-errno.ECANCELED, -errno.EINTR) for r in results
        ):
            op.raise_cancel()
        return results

    async def perform1(self, fn: Callable[..., Any], args: tuple[Any, ...], keep: object) -> int:
        """Run a single SQE prepared by ``fn(sqe, *args)``; return its raw result."""
        return (await self.perform(((fn, args),), keep))[0]

    def start(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        keep: object,
        done: Callable[[int], None],
    ) -> int:
        """Submit one SQE and return at once; returns its uid (for ``cancel``).

        ``done(result)`` (raw: ``>= 0`` or ``-errno``) is called from the
        harvest, in a system task, once the completion is in; it must not
        raise or block. ``keep`` is held until then, like ``perform``'s.
        """
        if self._closed:
            raise RuntimeError("io_uring ring is closed")
        op = _Op(None, 1, keep)
        op.done = done
        uid = next(self._uids)
        self._prepare(fn, args, uid, 0)
        op.uids.append(uid)
        self._ops[uid] = (op, 0)
        self._wake_flusher()
        return uid

    def start_multishot(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        done: Callable[[int, int], None],
        buf_group: int,
    ) -> int:
        """Submit a multishot op taking buffers from ``buf_group``; returns its uid.

        ``done(result, cqe_flags)`` is called for every completion, like
        ``start``'s; the op is over (and ``cancel`` no longer applies) with
        the first completion whose flags lack ``IORING_CQE_F_MORE``.
        """
        if self._closed:
            raise RuntimeError("io_uring ring is closed")
        for br in self._buffer_rings:  # what the kernel may pick from: all of it
            br.publish()
        op = _Op(None, 1, None)
        op.done = done
        op.multi = True
        uid = next(self._uids)
        sqe = self._prepare(fn, args, uid, L.IOSQE_BUFFER_SELECT)
        L.io_uring_sqe_set_buf_group(sqe, buf_group)
        op.uids.append(uid)
        self._ops[uid] = (op, 0)
        self._wake_flusher()
        return uid

    def buffer_ring(self, count: int, size: int) -> BufferRing | None:
        """Register ``count`` provided buffers of ``size`` bytes (a new group).

        None where they cannot be used: the kernel refuses the registration,
        or a CPU whose memory ordering the plain stores that hand buffers back
        do not respect (see BufferRing); the caller then keeps single-shot ops.
        """
        if self._closed or not BUFFER_RINGS or platform.machine() not in ("x86_64", "AMD64"):
            return None
        try:
            br = BufferRing(self._ring.ring_fd, next(self._bgids), count, size)
        except OSError:
            return None
        self._buffer_rings.add(br)
        return br

    def drop_buffer_ring(self, br: BufferRing) -> None:
        """Unregister a group; no op may use it any more (every one has completed)."""
        if br in self._buffer_rings:
            self._buffer_rings.discard(br)
            if not self._closed:
                br.unregister()

    def cancel(self, uid: int) -> None:
        """Ask the kernel to cancel a started operation (its ``done`` still runs)."""
        if uid in self._ops and not self._closed:
            self._prepare(L.io_uring_prep_cancel64, (uid,), _CANCEL_UID, 0)
            self._wake_flusher()

    def cancel_fd(self, fd: int) -> None:
        """Cancel every in-flight operation on ``fd`` (before closing it)."""
        if self._closed:
            return
        flags = L.IORING_ASYNC_CANCEL_ALL | L.IORING_ASYNC_CANCEL_FD
        self._prepare(L.io_uring_prep_cancel_fd, (fd, flags), _CANCEL_UID, 0)
        self._submit()

    # -- completion ------------------------------------------------------------
    def _harvest(self) -> None:
        if self._closed:
            return
        ring, cqe, ops = self._ring, self._cqe, self._ops
        while True:
            try:
                L.io_uring_peek_cqe(ring, cqe)
            except BlockingIOError:
                for br in self._buffer_rings:  # the buffers taken by this harvest
                    br.publish()
                return
            entry = cqe[0]
            uid = entry.user_data
            try:
                flags = entry.flags
                res = entry.res
            except OSError as exc:
                res = -(exc.errno or errno.EIO)
            finally:
                L.io_uring_cqe_seen(ring, entry)
            found = ops.get(uid)
            if found is None:
                continue
            op, index = found
            if op.multi:
                if not flags & F_MORE:  # its last: more completions do not follow
                    del ops[uid]
                    op.keep = None
                op.done(res, flags)  # type: ignore[misc]
                continue
            del ops[uid]
            op.results[index] = res
            op.remaining -= 1
            if op.remaining == 0:
                op.keep = None
                if op.task is None:
                    assert op.done is not None
                    op.done(res)
                else:
                    trio.lowlevel.reschedule(op.task, outcome.Value(op.results))

    async def _reaper(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._efd)
                self._drain_eventfd()
                if self._defer and not self._closed:
                    L.io_uring_get_events(self._ring)
                self._harvest()
        finally:
            self._close()

    def _close(self) -> None:
        self._closed = True
        # Tasks still parked here would be a bug (the run is over); the kernel
        # cancels and waits for their SQEs in queue_exit.
        trio.lowlevel.notify_closing(self._efd)
        L.io_uring_queue_exit(self._ring)  # unregisters the buffer rings too
        self._buffer_rings.clear()
        os.close(self._efd)


# Provided buffer rings (IORING_REGISTER_PBUF_RING). The wheel's
# io_uring_setup_buf_ring cannot be called from Python (its error argument is
# a C pointer), so the ring is registered with the raw system call over memory
# of our own; set to False to keep every receive single-shot.
BUFFER_RINGS = True
# Completion flags (the kernel's values where liburing is missing).
F_BUFFER = L.IORING_CQE_F_BUFFER if L is not None else 1  # a pool buffer holds the data
F_MORE = L.IORING_CQE_F_MORE if L is not None else 2  # a multishot op goes on
_SYS_IO_URING_REGISTER = 427  # the same number on every architecture
_REGISTER_PBUF_RING = 22
_UNREGISTER_PBUF_RING = 23
_BUF_ENTRY = struct.Struct("=QIH")  # struct io_uring_buf: addr, len, bid (resv/tail follows)
_BUF_ENTRY_SIZE = _BUF_ENTRY.size
_TAIL = struct.Struct("=H")  # the tail: the first entry's resv field (offset 14)
_libc = ctypes.CDLL(None, use_errno=True)


class BufferRing:
    """A group of equal buffers the kernel picks from (multishot receive).

    The kernel reads the ring of buffer descriptors (an anonymous mapping of
    ours) up to its tail and fills the buffer it picks; a completion carries
    the buffer id. ``take`` copies the data out and puts the buffer's
    descriptor back; ``publish`` then moves the tail past all of them (plain
    stores, ordered on x86, which is why ``Ring.buffer_ring`` offers these
    only there). The ring publishes at the end of every harvest and before
    it arms a multishot op, which must find the whole pool. Everything lives
    until ``unregister`` (the ring's close unregisters it otherwise).
    """

    def __init__(self, ring_fd: int, bgid: int, count: int, size: int) -> None:
        if count & (count - 1) or not 0 < count <= 32768:
            raise ValueError("count must be a power of two up to 32768")
        self.bgid = bgid
        self.size = size
        self._ring_fd = ring_fd
        self._mask = count - 1
        self._map = mmap.mmap(-1, max(count * 16, mmap.PAGESIZE))
        self.pool = bytearray(count * size)
        # ctypes views export the buffers: neither can be resized or freed
        # while they exist, and they give the addresses the kernel uses.
        self._exports = (
            ctypes.c_char.from_buffer(self._map),
            ctypes.c_char.from_buffer(self.pool),
        )
        self._view = memoryview(self.pool)
        base = ctypes.addressof(self._exports[1])
        # Each buffer's descriptor never changes: packed once.
        self._entries = [_BUF_ENTRY.pack(base + bid * size, size, bid) for bid in range(count)]
        self._reg = ctypes.create_string_buffer(
            struct.pack("=QIHH3Q", ctypes.addressof(self._exports[0]), count, bgid, 0, 0, 0, 0)
        )
        self._call(_REGISTER_PBUF_RING)
        self.registered = True
        for bid in range(count):  # slot k holds buffer k; take puts buffers back
            self._map[bid << 4 : (bid << 4) + _BUF_ENTRY_SIZE] = self._entries[bid]
        self._tail = count & 0xFFFF
        self._published = -1
        self.publish()

    def _call(self, opcode: int) -> None:
        if _libc.syscall(_SYS_IO_URING_REGISTER, self._ring_fd, opcode, self._reg, 1) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def take(self, cqe_flags: int, n: int) -> bytes:
        """The ``n`` bytes in the buffer a completion names; the buffer goes
        back with the next ``publish``."""
        bid = cqe_flags >> _BUFFER_SHIFT
        start = bid * self.size
        data = self._view[start : start + n].tobytes()
        at = (self._tail & self._mask) << 4  # the next free slot of the ring
        self._map[at : at + _BUF_ENTRY_SIZE] = self._entries[bid]
        self._tail = (self._tail + 1) & 0xFFFF
        return data

    def publish(self) -> None:
        """Hand the buffers given back since the last call to the kernel (the
        tail: one store for a whole harvest)."""
        if self._tail != self._published:
            self._published = self._tail
            _TAIL.pack_into(self._map, 14, self._tail)

    def unregister(self) -> None:
        if self.registered:
            self.registered = False
            self._call(_UNREGISTER_PBUF_RING)


_BUFFER_SHIFT = L.IORING_CQE_BUFFER_SHIFT if L is not None else 16


# Receiving into any buffer. The wheel's io_uring_prep_recv takes only a whole
# bytearray, but chunk buffers are page-aligned mmaps (O_DIRECT) or slices of
# one. So the SQE is prepared for an empty bytearray and its ``addr`` and
# ``len`` are then set to the buffer's: the wheel's SQE object holds a pointer
# to the ring's io_uring_sqe right after the object header. That layout is
# checked once (``RAW_SQE``) on a detached SQE; where the check fails, callers
# keep READV, which takes an Iovec over any buffer.
_SQE_ADDR_LEN = struct.Struct("=QI")  # io_uring_sqe.addr (offset 16) and .len (offset 24)
_SQE_HEAD = struct.Struct("=BBHiQQII")  # opcode, flags, ioprio, fd, off, addr, len, msg_flags
_NO_BYTES = bytearray()


def _wheel_pointer(obj: Any) -> int:
    """The C struct a wheel object (Sqe, Ring) stands for: its pointer sits
    right after the object header."""
    return ctypes.c_void_p.from_address(id(obj) + 16).value or 0


_sqe_struct = _wheel_pointer  # the io_uring_sqe of a wheel SQE object


def _read_memory(address: int, n: int) -> bytes | None:
    """``n`` bytes at ``address``, or None if it is not readable (no crash:
    the kernel reads it for a ``write`` into a pipe and says EFAULT)."""
    r, w = os.pipe()
    try:
        if _libc.write(w, ctypes.c_void_p(address), n) != n:
            return None
        return os.read(r, n)
    finally:
        os.close(r)
        os.close(w)


def _raw_sqe_works() -> bool:
    """Whether ``prep_recv_at`` may write into the SQEs of this wheel.

    On an SQE of a scratch ring: prepare a RECV the wheel's way, then read
    the io_uring_sqe our pointer names (through the kernel, so a wrong
    pointer cannot crash) and compare it with what was prepared and with
    the wheel's own getters.
    """
    return _check_on_scratch_ring(_raw_sqe_layout)


def _check_on_scratch_ring(check: Callable[[Any], bool]) -> bool:
    """``check(ring)`` on a 2-entry ring of its own; False on any surprise."""
    if L is None:
        return False
    ring = L.Ring()
    try:
        L.io_uring_queue_init(2, ring, 0)
    except OSError:
        return False
    try:
        return check(ring)
    except Exception:  # any surprise: not the layout we know
        return False
    finally:
        L.io_uring_queue_exit(ring)


def _raw_sqe_layout(ring: Any) -> bool:
    sqe = L.io_uring_get_sqe(ring)
    probe_buf = bytearray(100)
    L.io_uring_prep_recv(sqe, 7, probe_buf, 0x100)
    address = _sqe_struct(sqe)
    raw = _read_memory(address, _SQE_HEAD.size) if address else None
    if raw is None:
        return False
    head = _SQE_HEAD.unpack(raw)
    buf_address = ctypes.addressof(ctypes.c_char.from_buffer(probe_buf))
    recv = int(L.io_uring_op.IORING_OP_RECV)
    wheel = (sqe.opcode, sqe.fd, sqe.len)
    L.io_uring_prep_nop(sqe)  # never submitted; the ring is torn down after
    return (
        head[0] == recv and head[3:] == (7, 0, buf_address, 100, 0x100) and wheel == (recv, 7, 100)
    )


RAW_SQE = _raw_sqe_works()


# Submitting without the GIL. The wheel's functions hold the GIL even in the
# system call, and io_uring_submit is where the kernel does most of the
# proactor's receiving: the receives that can complete at once, and (with
# COOP_TASKRUN) the retries queued for this thread, run on its way back. A
# getter's hashing and writing threads then wait for the GIL while the kernel
# copies. The wheel's shared object exports liburing's C io_uring_submit;
# ctypes calls it with the GIL released, given the ring's struct io_uring,
# whose pointer the wheel's Ring object holds after its header. Checked once
# per process on a scratch ring, through the kernel like RAW_SQE: the pointer
# must name memory laid out as liburing's struct io_uring (its ABI on x86-64)
# holding that ring's sizes, flags, fd and features, and a NOP submitted
# through the C call must complete. Where the check fails, the wheel's own
# submit stays.
_RING_SIZES = struct.Struct("=II")  # io_uring_sq/_cq: ring_mask, ring_entries
_SQ_SIZES, _CQ_SIZES = 88, 176  # their offsets in struct io_uring
_RING_FIELDS = struct.Struct("=IiI")  # struct io_uring: flags, ring_fd, features
_RING_FIELDS_AT = 192


def _find_submit() -> Callable[[int], int] | None:
    if L is None:
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(L.__file__), "liburing.so"))
        submit = lib.io_uring_submit
    except (OSError, AttributeError):
        return None
    submit.argtypes = [ctypes.c_void_p]
    submit.restype = ctypes.c_int
    return submit  # type: ignore[no-any-return]


def _names_ring(address: int, ring: Any, entries: int) -> bool:
    """Whether ``address`` holds ``ring``'s struct io_uring (read through the
    kernel), ``ring`` having ``entries`` SQ entries (the CQ twice as many)."""
    size = _RING_FIELDS_AT + _RING_FIELDS.size
    raw = _read_memory(address, size) if address and platform.machine() == "x86_64" else None
    if raw is None:
        return False
    return (
        _RING_SIZES.unpack_from(raw, _SQ_SIZES) == (entries - 1, entries)
        and _RING_SIZES.unpack_from(raw, _CQ_SIZES) == (2 * entries - 1, 2 * entries)
        and _RING_FIELDS.unpack_from(raw, _RING_FIELDS_AT)
        == (ring.flags, ring.ring_fd, ring.features)
    )


def _submit_without_gil_works() -> bool:
    return _submit_releasing_gil is not None and _check_on_scratch_ring(_submits_through_c)


def _submits_through_c(ring: Any) -> bool:
    assert _submit_releasing_gil is not None
    address = _wheel_pointer(ring)
    if not _names_ring(address, ring, 2):
        return False
    # One NOP through the C call: it must be submitted and complete.
    L.io_uring_prep_nop(L.io_uring_get_sqe(ring))
    if _submit_releasing_gil(address) != 1:
        return False
    cqe = L.Cqe()
    L.io_uring_peek_cqe(ring, cqe)  # BlockingIOError if it did not run
    L.io_uring_cqe_seen(ring, cqe[0])
    return True


_submit_releasing_gil = _find_submit()
SUBMIT_RELEASES_GIL = _submit_without_gil_works()


def buffer_address(view: memoryview) -> tuple[Any, int]:
    """An export of a writable buffer (keep it until the completion) and its address."""
    export = ctypes.c_char.from_buffer(view)
    return export, ctypes.addressof(export)


def prep_recv_at(sqe: Any, fd: int, address: int, length: int, flags: int) -> None:
    """``io_uring_prep_recv`` into ``length`` bytes at ``address`` (needs ``RAW_SQE``)."""
    L.io_uring_prep_recv(sqe, fd, _NO_BYTES, flags)
    ctypes.memmove(_sqe_struct(sqe) + 16, _SQE_ADDR_LEN.pack(address, length), 12)


def _neutralise(sqe: Any) -> None:
    L.io_uring_prep_nop(sqe)  # also clears the SQE's flags (no dangling link)
    L.io_uring_sqe_set_data64(sqe, _CANCEL_UID)


_RING: trio.lowlevel.RunVar[Ring] = trio.lowlevel.RunVar("peerd_io_uring")


def current_ring() -> Ring:
    """The ring of the current Trio run, created on first use."""
    try:
        return _RING.get()
    except LookupError:
        ring = Ring()
        _RING.set(ring)
        return ring
