"""The proactor backend: socket and disk I/O as io_uring operations.

The ring machinery (submission, completion, cancellation) is in ``_ring.py``;
this module maps the stream contract onto ring operations.

* Sockets stay non-blocking. io_uring's recv/send wait for readiness inside
  the kernel; an op that still returns -EAGAIN waits with ``POLL_ADD`` and
  is retried. Non-blocking is what lets ``sendfile`` run on the Trio thread.
* Receiving: what is already in the socket is taken with a plain
  non-blocking ``recv`` on the Trio thread (a ring op would cost an SQE, a
  park and a wake-up for the same copy); the ring does the receives that
  have to wait. ``recv_exactly_into`` (the bulk path) works in the
  reactor's steps: SO_RCVLOWAT is set to the bytes still missing (at most
  ``LOWAT_CAP``); when nothing is there, one RECV waits inside io_uring
  until the mark is reached, so the task wakes about once per 512 KiB and
  the sender is not woken for every segment drained. liburing's
  ``prep_recv`` takes only a whole bytearray, so the SQE's address is set to
  the buffer's afterwards (``_ring.prep_recv_at``, its layout checked once:
  ``_ring.RAW_SQE``); where that check fails, a READV with an ``Iovec`` per
  step. ``receive_some`` puts the mark back to 1 byte.
* Sending: a frame of up to 64 KiB (control frames) goes with one plain
  non-blocking ``send`` on the Trio thread when the socket takes it, as the
  mux's replies do; what does not fit, and anything larger, is a SEND +
  ``MSG_WAITALL`` for bytes/bytearray, WRITEV otherwise;
  ``sendfile`` is ``os.sendfile`` (no copy), waiting for POLLOUT in the ring,
  after its ``header`` sent corked (``MSG_MORE``) by a plain ``send``.
* ``RingMux`` (many streams, one task): a multishot RECV per stream with a
  provided-buffer pool, replies written directly (see its docstring).
* Accept and connect use the reactor's Trio sockets (once per connection,
  same timeouts and errors); the connected fd is then handed to the ring.
* Closing a stream cancels its in-flight ops by fd *before* closing the fd:
  ``close`` alone does not cancel them (the ring holds a file reference).

Why these choices and not splice, multishot receive on streams, ``send_zc``
or ``IOSQE_ASYNC``: docs/ARCHITECTURE.md, "The proactor's choices" (figures:
docs/BENCHMARKS.md, "Transports").
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import trio

from peerd.errors import ConnectionClosed, StorageError, TransportError

from . import _ring
from ._base import (
    DEFAULT_BACKLOG,
    MUX_BATCH,
    Listener,
    Mux,
    MuxResult,
    SoonCall,
    Stream,
    StreamClosed,
    Transport,
    addr2,
    eof_error,
    stream_error,
)
from ._ring import current_ring, probe
from .reactor import _DEFER_FROM, LOWAT_CAP, ReactorListener, ReactorStream, ReactorTransport

__all__ = ["ProactorListener", "ProactorStream", "ProactorTransport", "RingMux", "probe"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_MSG_WAITALL = socket.MSG_WAITALL
_MSG_NOSIGNAL = socket.MSG_NOSIGNAL
_MSG_MORE = socket.MSG_MORE
_CANCELLED = (-errno.ECANCELED, -errno.EINTR)
_SEND_AT_ONCE = 65536  # send_all tries a plain send first up to this size
_RECVS_IN_A_ROW = 8  # recv_exactly_into lets other tasks run after this many


def _whole_bytearray(buf: Any) -> bytearray | None:
    """``buf`` as a whole bytearray when it is one (or a full view of one)."""
    if type(buf) is bytearray:
        return buf
    if (
        isinstance(buf, memoryview)
        and type(buf.obj) is bytearray
        and buf.contiguous
        and buf.nbytes == len(buf.obj)
    ):
        return buf.obj
    return None


class ProactorStream(Stream):
    """A connected socket whose I/O runs as io_uring operations."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)  # io_uring polls internally; os.sendfile must not block
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._fd = sock.fileno()
        self._ring = current_ring()
        self._inflight = 0
        self._closed = False
        self._lowat = 1  # the socket's current SO_RCVLOWAT
        self._sending = self._receiving = self._eof_sent = False
        self.bytes_sent = 0
        self.bytes_received = 0
        try:
            self.peer_address = addr2(sock.getpeername())
        except OSError:
            self.peer_address = ("", 0)

    @classmethod
    def from_reactor(cls, stream: ReactorStream) -> ProactorStream:
        """Take over the fd of a connected reactor stream."""
        family, fd = stream.detach()
        return cls(socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd))

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return -1 if self._closed else self._fd

    # -- plumbing ------------------------------------------------------------------
    def _failure(self, res: int, what: str) -> Exception:
        if self._closed:
            return StreamClosed(f"{what}: stream is closed")
        return stream_error(OSError(-res, os.strerror(-res)), what)

    async def _run(self, steps: list[_ring.Step], keep: object, what: str) -> list[int]:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise StreamClosed(f"{what}: stream is closed")
        self._inflight += 1
        try:
            return await self._ring.perform(steps, keep)
        finally:
            self._inflight -= 1

    async def _one(
        self, fn: Any, args: tuple[Any, ...], keep: object, what: str, events: int
    ) -> int:
        while True:
            res = (await self._run([(fn, args)], keep, what))[0]
            if res != -errno.EAGAIN:
                break
            # readv/writev honour O_NONBLOCK (recv/send poll inside io_uring):
            # wait for readiness through the ring, then retry.
            await self._wait(events, what)
        if res < 0:
            raise self._failure(res, what)
        return res

    async def _wait(self, events: int, what: str) -> None:
        res = (await self._run([(_ring.L.io_uring_prep_poll_add, (self._fd, events))], None, what))[
            0
        ]
        if res < 0:
            raise self._failure(res, what)

    # -- receiving -----------------------------------------------------------------
    async def _recv_into(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        self._set_lowat(1)  # a plain receive takes whatever is there
        if not view:
            await trio.lowlevel.checkpoint()
            return 0
        await trio.lowlevel.checkpoint_if_cancelled()
        n = self._recv_now(view)
        if n >= 0:
            self.bytes_received += n
            await trio.lowlevel.cancel_shielded_checkpoint()
            return n
        whole = _whole_bytearray(view)
        if whole is not None:
            n = await self._one(
                _ring.L.io_uring_prep_recv, (self._fd, whole, 0), view, "recv", _POLLIN
            )
        else:
            export, address = _ring.buffer_address(view) if _ring.RAW_SQE else (None, 0)
            try:
                n = await self._recv_waiting(view, export, address)
            finally:
                del export
        self.bytes_received += n
        return n

    def _recv_now(self, view: memoryview) -> int:
        """Take what is already there with one plain non-blocking ``recv`` on
        this thread; -1 if nothing is (or the stream is closed: the ring path
        says so). A ring RECV would cost an SQE, a park and a wake-up of the
        task for the same copy: only a receive that has to wait goes to the
        ring."""
        if self._closed:
            return -1
        try:
            return self._sock.recv_into(view)
        except BlockingIOError:
            return -1
        except OSError as exc:
            raise stream_error(exc, "recv") from exc

    async def _recv_waiting(self, rest: memoryview, export: Any, address: int) -> int:
        """One ring op into ``rest`` (at ``address``, exported by ``export``, if
        ``RAW_SQE``; else a READV) that waits for the socket's low-water mark."""
        if export is not None:
            args = (self._fd, address, len(rest), 0)
            return await self._one(_ring.prep_recv_at, args, export, "recv", _POLLIN)
        # READV honours O_NONBLOCK: _one waits for POLLIN
        iov = _ring.L.Iovec([rest])
        return await self._one(
            _ring.L.io_uring_prep_readv, (self._fd, iov), (rest, iov), "recv", _POLLIN
        )

    def _set_lowat(self, lowat: int) -> None:
        if lowat != self._lowat and not self._closed:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self._lowat = lowat

    async def recv_exactly_into(self, buf: Any) -> None:
        # Steps as the reactor's: the low-water mark is set to the bytes still
        # missing (at most LOWAT_CAP); what is there is taken at once, and
        # only if nothing is does one ring op wait (inside io_uring for a
        # RECV) until the mark is reached. The mark never exceeds what the
        # peer still owes, so it cannot wait for bytes that will not come.
        # See "Receiving" in the module doc.
        self._begin(False)
        try:
            view = memoryview(buf).cast("B")
            total = len(view)
            if not total:
                await trio.lowlevel.checkpoint()
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            export, address = _ring.buffer_address(view) if _ring.RAW_SQE else (None, 0)
            got = 0
            yielded = False
            in_a_row = 0  # plain recvs since this task last let others run
            try:
                while got < total:
                    self._set_lowat(min(total - got, LOWAT_CAP))
                    rest = view[got:]
                    n = self._recv_now(rest)
                    from_ring = n < 0
                    if from_ring:
                        n = await self._recv_waiting(rest, export, address + got)
                    self.bytes_received += n
                    if n == 0:
                        raise eof_error(got, total)
                    got += n
                    if from_ring:
                        yielded, in_a_row = True, 0
                    elif got < total:
                        in_a_row += 1
                        if in_a_row == _RECVS_IN_A_ROW:
                            # A peer that trickles bytes as fast as they are
                            # taken must not keep the other tasks waiting.
                            await trio.lowlevel.checkpoint()
                            yielded, in_a_row = True, 0
            finally:
                del export  # a traceback must not keep the buffer exported
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._receiving = False

    # -- sending ---------------------------------------------------------------------
    async def _closed_for_sending(self, what: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StreamClosed(f"{what}: stream is closed")
        raise StreamClosed(f"{what}: this side was shut (send_eof)")

    async def send_all(self, data: Any) -> None:
        self._begin(True)
        try:
            if self._eof_sent or self._closed:
                await self._closed_for_sending("send")
            view = memoryview(data).cast("B")
            total = len(view)
            if total == 0:
                await trio.lowlevel.checkpoint()
                return
            sent = 0
            if total <= _SEND_AT_ONCE:
                # A control frame: one plain non-blocking send on this thread
                # nearly always takes it whole; a ring SEND would cost an
                # SQE, a park and a wake-up for the same copy. Only the rest
                # of one that does not fit waits in the ring.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    sent = self._sock.send(view, _MSG_NOSIGNAL)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise stream_error(exc, "send") from exc
                self.bytes_sent += sent
                if sent == total:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return
            if sent == 0 and type(data) in (bytes, bytearray):
                flags = _MSG_WAITALL | _MSG_NOSIGNAL
                sent = await self._one(
                    _ring.L.io_uring_prep_send, (self._fd, data, flags), view, "send", _POLLOUT
                )
                self.bytes_sent += sent
            while sent < total:
                rest = view[sent:]
                iov = _ring.L.Iovec([rest])
                n = await self._one(
                    _ring.L.io_uring_prep_writev, (self._fd, iov), (rest, iov), "send", _POLLOUT
                )
                sent += n
                self.bytes_sent += n
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._begin(True)
        try:
            if self._closed:
                await self._closed_for_sending("send")
            await self._wait(_POLLOUT, "send")
        finally:
            self._sending = False

    async def sendfile(self, fd: int, offset: int, count: int, *, header: bytes = b"") -> None:
        if offset < 0 or count < 0:
            raise ValueError("offset and count must be >= 0")
        self._begin(True)
        try:
            if self._eof_sent or self._closed:
                await self._closed_for_sending("sendfile")
            await trio.lowlevel.checkpoint_if_cancelled()
            end = offset + count
            waited = False
            if header:  # corked (MSG_MORE): it leaves with the file's first bytes
                waited = await self._send_corked(header, _MSG_MORE if count else 0)
            while offset < end:
                if self._closed:
                    raise StreamClosed("sendfile: stream is closed")
                try:
                    n = os.sendfile(self._fd, fd, offset, end - offset)
                except BlockingIOError:
                    waited = True
                    await self._wait(_POLLOUT, "sendfile")
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EINVAL):
                        raise StorageError(f"sendfile: cannot read file: {exc.strerror}") from exc
                    raise stream_error(exc, "sendfile") from exc
                if n == 0:
                    raise StorageError(
                        f"sendfile: file ended at offset {offset}, {end - offset} bytes short"
                    )
                offset += n
                self.bytes_sent += n
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def _send_corked(self, header: bytes, more: int) -> bool:
        """Send ``header`` with a plain non-blocking send; True if it had to wait."""
        waited = False
        with memoryview(header) as view:
            sent = 0
            while sent < len(view):
                if self._closed:
                    raise StreamClosed("sendfile: stream is closed")
                try:
                    n = self._sock.send(view[sent:], more | _MSG_NOSIGNAL)
                except BlockingIOError:
                    waited = True
                    await self._wait(_POLLOUT, "sendfile")
                    continue
                except OSError as exc:
                    raise stream_error(exc, "sendfile") from exc
                sent += n
                self.bytes_sent += n
        return waited

    async def send_eof(self) -> None:
        self._begin(True)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise StreamClosed("send_eof: stream is closed")
            if not self._eof_sent:
                self._eof_sent = True
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise stream_error(exc, "send_eof") from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._inflight:
                self._ring.cancel_fd(self._fd)  # must precede close (see module doc)
            self._sock.close()
        await trio.lowlevel.checkpoint()


class ProactorListener(Listener):
    """Accepts on a Trio socket; accepted connections use the ring."""

    def __init__(self, inner: ReactorListener) -> None:
        self._inner = inner
        self.host, self.port = inner.host, inner.port

    async def accept(self) -> Stream:
        while True:
            stream = await self._inner.accept()
            assert isinstance(stream, ReactorStream)
            try:
                return ProactorStream.from_reactor(stream)
            except OSError:  # reset before we took it over: skip it
                await stream.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


class ProactorTransport(Transport):
    """io_uring for stream and disk I/O; Trio sockets for connection setup."""

    name = "proactor"

    def __init__(self) -> None:
        self._setup = ReactorTransport()

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source_host: str | None = None,
    ) -> Stream:
        stream = await self._setup.connect(host, port, timeout=timeout, source_host=source_host)
        assert isinstance(stream, ReactorStream)
        try:
            return ProactorStream.from_reactor(stream)
        except OSError as exc:
            await stream.aclose()
            raise stream_error(exc, "connect") from exc

    async def open_listener(
        self, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG
    ) -> Listener:
        inner = await self._setup.open_listener(host, port, backlog=backlog)
        assert isinstance(inner, ReactorListener)
        return ProactorListener(inner)

    def open_mux(self) -> Mux:
        return RingMux()


_MUX_RECV = 16384  # single-shot: per lent stream one receive buffer (one untaken result)
# Multishot: one buffer pool per mux. A stream's RECV is cancelled once this
# much of its input waits in the mux; what arrives before the cancel lands is
# bounded by the pool (docs/ARCHITECTURE.md, "The proactor's mux").
_MUX_AHEAD = 16384
_MUX_BUFS = 128  # buffers in the pool (a power of two)
_MUX_BUF = 2048  # bytes per buffer: a tracker frame fits; a bigger one takes several
# What a stream can have read ahead at most, in the worst case (tests use it):
# its threshold, and twice the pool (consumed before and while the cancel lands).
MUX_READ_AHEAD = max(_MUX_RECV, _MUX_AHEAD + 2 * _MUX_BUFS * _MUX_BUF)
_ENOBUFS = -errno.ENOBUFS
_F_BUFFER, _F_MORE = _ring.F_BUFFER, _ring.F_MORE  # read once per received frame


class _RingEntry:
    __slots__ = (
        "broken",
        "buf",
        "cancelling",
        "fd",
        "held",
        "on_readable",
        "on_recv",
        "on_writable",
        "out",
        "paused",
        "queued",
        "recv_uid",
        "removed",
        "send_uid",
        "stopped",
        "stream",
        "untaken",
    )
    # Completion callbacks, bound once by RingMux.add (see _arm / _flush).
    on_recv: Callable[..., None]
    on_readable: Callable[[int], None]
    on_writable: Callable[[int], None]

    def __init__(self, stream: Stream, fd: int) -> None:
        self.stream = stream
        self.fd = fd
        self.buf: bytearray | None = None  # single-shot RECV's buffer
        self.recv_uid = 0  # the RECV in the ring (0: none)
        self.cancelling = False  # the multishot RECV is being cancelled
        self.send_uid = 0  # the POLL_ADD(POLLOUT) in the ring (0: none)
        self.out: list[bytes] = []  # not written yet (socket buffer full, or deferred)
        self.held: list[bytes | TransportError] = []  # input that arrived while paused
        self.queued = 0  # results of this stream in the mux's ready list
        self.untaken = 0  # bytes received, not yet handed out by next_batch
        self.paused = False
        self.stopped = False  # EOF or an error was seen: nothing more is read
        self.broken = False  # a send failed: nothing more is sent
        self.removed = False


class RingMux(Mux):
    """The proactor's mux: a multishot RECV per stream; replies written at once.

    The mux has a ring of its own (``Ring(owned=True)``), driven by the
    dispatcher: ``next_batch`` submits what the last batch armed, harvests
    what completed (handing the pool's buffers back), and parks on the
    ring's eventfd only when nothing is ready (``_pump``). ``remove`` cancels
    the stream's operations and waits for their completions, pumping the
    ring itself if no other task does, so the kernel is done with its
    buffers before the owner closes the fd.

    Receiving (where the ring offers a buffer pool, see ``Ring.buffer_ring``):
    one multishot RECV stays armed per stream and the kernel fills buffers of
    the mux's pool; each completion's bytes are copied out and the buffer
    handed back by the end of the harvest. Read-ahead is bounded: once
    ``_MUX_AHEAD`` bytes of a stream wait in the mux undelivered, or it is
    paused, its RECV is cancelled (what arrives before the cancel lands is
    held; at most ``MUX_READ_AHEAD`` in all), and armed again when
    ``next_batch`` hands the data out or on ``resume``. A completion without
    F_MORE (``-ENOBUFS``: the pool ran dry; our cancel; EOF; an error) ends
    it. Without a pool: one
    single-shot RECV into a 16 KiB buffer per stream, armed only when
    ``next_batch`` hands out the data of the previous one (one received
    buffer per stream in the mux at most). Either way a fast sender is held
    back by the socket buffers, where the owner's accounting (the tracker
    charges each frame from its header) can refuse it before it is in memory.
    ``pause`` also takes back what was already queued for ``next_batch``; it
    is held until ``resume``. Why and figures: docs/ARCHITECTURE.md, "Many
    small conversations: the Mux"; docs/BENCHMARKS.md, "Transports".

    Replies are written with a plain non-blocking ``write`` on the Trio
    thread, as EpollMux does (bunched for a batch of several streams, until
    the next ``next_batch``): a reply nearly always fits the socket buffer,
    and a SEND in the ring cost an SQE, a completion and a callback for the
    same copy. Only a reply that does not fit waits, with a
    ``POLL_ADD(POLLOUT)`` in the ring, behind which later replies queue in
    order.

    A RECV answered with ``-EAGAIN`` (a kernel whose socket ops do not poll
    internally) is not re-submitted at once, which would spin: a ``POLL_ADD``
    for readiness takes its place in the ring (same slot, so ``remove``
    cancels it the same way) and its completion re-submits it.
    """

    def __init__(self) -> None:
        self._ring = _ring.Ring(owned=True)  # pumped by next_batch (or remove)
        self._pumping = False  # a task is parked in the ring's pump
        self._changed = trio.lowlevel.ParkingLot()  # tasks waiting for the pumping one
        self._entries: dict[Stream, _RingEntry] = {}
        self._ready: list[tuple[_RingEntry, bytes | TransportError]] = []
        self._in_batch = False  # a batch of _DEFER_FROM+ streams is being worked on
        self._deferred: list[_RingEntry] = []  # written when next_batch is called
        self._soon = SoonCall(self._write_deferred)  # should the dispatcher not ask soon
        # Multishot RECVs with a buffer pool where the ring offers one (on
        # first add); single-shot RECVs into a buffer per stream otherwise.
        self._bufs: _ring.BufferRing | None = None
        self._multishot: bool | None = None
        self._ahead = _MUX_RECV  # untaken bytes from which no RECV is armed

    def _wake(self) -> None:
        """News for next_batch: wake whoever waits for it."""
        if self._changed:  # parked behind the task that pumps
            self._changed.unpark_all()
        if self._pumping and trio.lowlevel.current_task() is not self._ring.pumper:
            self._ring.kick()  # the pumping task waits for the ring only

    async def _pump(self) -> None:
        """Wait for completions and handle them, or for the task that does.

        One task at a time waits on the ring (the dispatcher in next_batch,
        or a remove while it is not there); the others park until it is
        done, then look again.
        """
        if self._pumping:
            await self._changed.park()
            return
        self._pumping = True
        self._ring.claim()
        try:
            await self._ring.pump()
        finally:
            self._pumping = False
            self._changed.unpark_all()

    def add(self, stream: Stream) -> None:
        fd = stream.fileno()
        if fd < 0:
            raise ConnectionClosed("mux: stream is closed")
        if stream in self._entries:
            raise ValueError("stream is already in this mux")
        if self._multishot is None:
            self._bufs = self._ring.buffer_ring(_MUX_BUFS, _MUX_BUF)
            self._multishot = self._bufs is not None
            self._ahead = _MUX_AHEAD if self._multishot else 1
        e = _RingEntry(stream, fd)
        e.on_recv = functools.partial(self._on_recv_multi if self._multishot else self._on_recv, e)
        e.on_readable = functools.partial(self._on_readable, e)
        e.on_writable = functools.partial(self._on_writable, e)
        self._entries[stream] = e
        self._arm(e)

    def _arm(self, e: _RingEntry) -> None:
        if self._bufs is not None:
            e.recv_uid = self._ring.start_multishot(
                _ring.L.io_uring_prep_recv_multishot, (e.fd, None, 0), e.on_recv, self._bufs.bgid
            )
            return
        if e.buf is None:
            e.buf = bytearray(_MUX_RECV)
        e.recv_uid = self._ring.start(
            _ring.L.io_uring_prep_recv,
            (e.fd, e.buf, 0),
            e.buf,
            e.on_recv,
        )

    def _arm_if_idle(self, e: _RingEntry) -> None:
        """Arm the next RECV unless one is in the ring or enough input is untaken."""
        if not (e.recv_uid or e.untaken >= self._ahead or e.paused or e.stopped or e.removed):
            self._arm(e)

    def _deliver(self, e: _RingEntry, result: bytes | TransportError) -> None:
        """Queue ``result`` for next_batch. Called from the ring's harvest,
        whose caller wakes whoever waits (see next_batch and _pump), or
        followed by ``_wake``."""
        if e.paused:
            e.held.append(result)
        else:
            self._ready.append((e, result))
            e.queued += 1

    def _on_recv(self, e: _RingEntry, res: int) -> None:
        e.recv_uid = 0
        if e.removed:
            return
        if e.broken:
            return  # a send failed: the stream is over (reported once already)
        if res > 0:
            assert e.buf is not None
            data = bytes(memoryview(e.buf)[:res])
            e.stream.bytes_received += res
            e.untaken += res  # the next RECV is armed when next_batch hands it out
            self._deliver(e, data)
        elif res == -errno.EAGAIN:
            self._wait_readable(e)
        else:
            self._recv_ended(e, res)

    def _wait_readable(self, e: _RingEntry) -> None:
        # Sockets poll inside io_uring; a kernel that does not: wait first.
        e.recv_uid = self._ring.start(
            _ring.L.io_uring_prep_poll_add, (e.fd, _POLLIN), None, e.on_readable
        )

    def _recv_ended(self, e: _RingEntry, res: int) -> None:
        e.stopped = True
        if res == 0:
            self._deliver(e, b"")
        else:
            e.broken = True
            e.out.clear()  # nothing more is written
            self._deliver(e, stream_error(OSError(-res, os.strerror(-res)), "recv"))

    def _on_recv_multi(self, e: _RingEntry, res: int, flags: int) -> None:
        # Runs once per received frame on a busy tracker: kept lean.
        data = b""
        if flags & _F_BUFFER:  # copied out; the buffer goes back with the harvest
            data = self._bufs.take(flags, res if res > 0 else 0)  # type: ignore[union-attr]
        final = not flags & _F_MORE
        if final:
            e.recv_uid = 0
            e.cancelling = False
        if e.removed or e.broken or e.stopped:
            return  # the stream is over (reported once already)
        if res > 0:
            e.stream.bytes_received += res
            e.untaken += res
            self._deliver(e, data)
            if final:  # the kernel ended it (e.g. CQ overflow): arm again if due
                self._arm_if_idle(e)
            elif (e.untaken >= _MUX_AHEAD or e.paused) and not e.cancelling:
                # Enough waits in the mux: leave the rest in the socket.
                e.cancelling = True
                self._ring.cancel(e.recv_uid)
        elif res in (_ENOBUFS, *_CANCELLED):
            # The pool ran dry (every buffer is back by now) or our cancel:
            # arm again once the stream is due.
            self._arm_if_idle(e)
        elif res == -errno.EAGAIN:
            self._wait_readable(e)
        else:
            self._recv_ended(e, res)

    def _on_readable(self, e: _RingEntry, res: int) -> None:
        e.recv_uid = 0
        if not e.removed:
            # An error (POLLERR/POLLHUP or a failed poll) is found by the RECV.
            self._arm_if_idle(e)

    def _on_writable(self, e: _RingEntry, res: int) -> None:
        e.send_uid = 0
        if not e.removed and not e.broken and e.out:
            self._flush(e)  # an error (POLLERR) is found by the write

    def _flush(self, e: _RingEntry) -> None:
        """Write what ``e`` has queued; wait for POLLOUT in the ring if it does not fit."""
        out = e.out
        while out:
            data = out[0]
            try:
                n = os.write(e.fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._send_failed(e, exc)
                return
            e.stream.bytes_sent += n
            if n < len(data):
                out[0] = data[n:]
                e.send_uid = self._ring.start(
                    _ring.L.io_uring_prep_poll_add, (e.fd, _POLLOUT), None, e.on_writable
                )
                return
            out.pop(0)

    def _send_failed(self, e: _RingEntry, exc: OSError) -> None:
        e.out.clear()
        e.broken = True
        if not e.stopped:  # after EOF or an error nothing more is reported
            e.stopped = True
            self._deliver(e, stream_error(exc, "send"))
            self._wake()

    def _write_deferred(self) -> None:
        self._in_batch = False
        deferred, self._deferred = self._deferred, []
        for e in deferred:
            if e.out and not (e.broken or e.removed or e.send_uid):
                self._flush(e)

    async def remove(self, stream: Stream) -> None:
        e = self._entries.pop(stream, None)
        if e is None:
            await trio.lowlevel.checkpoint()
            return
        e.removed = True
        e.out.clear()
        e.held.clear()
        if e.queued:
            self._ready = [r for r in self._ready if r[0] is not e]
            e.queued = 0
        if not (e.recv_uid or e.send_uid):
            await trio.lowlevel.checkpoint()
            return
        for uid in (e.recv_uid, e.send_uid):
            if uid:
                self._ring.cancel(uid)
        with trio.CancelScope(shield=True):  # the kernel must let go of the buffers
            while e.recv_uid or e.send_uid:  # cleared by their final completions
                await self._pump()

    def pause(self, stream: Stream) -> None:
        e = self._entries[stream]
        e.paused = True
        if e.recv_uid and self._multishot and not e.cancelling:
            e.cancelling = True  # read no further (what arrives meanwhile is held)
            self._ring.cancel(e.recv_uid)
        if e.queued:  # not reported any more: held, in order, until resume
            e.held += [r for x, r in self._ready if x is e]
            self._ready = [r for r in self._ready if r[0] is not e]
            e.queued = 0

    def resume(self, stream: Stream) -> None:
        e = self._entries[stream]
        if not e.paused:
            return
        e.paused = False
        if e.held:
            self._ready += [(e, r) for r in e.held]
            e.queued += len(e.held)
            e.held.clear()
            self._wake()
        self._arm_if_idle(e)

    def send(self, stream: Stream, data: bytes) -> None:
        e = self._entries[stream]
        if e.broken:
            return  # a send failed already; that failure is reported by next_batch
        queued = bool(e.out)
        e.out.append(data)
        if queued or e.send_uid:
            return  # written after what is queued, in order
        if self._in_batch:
            if not self._deferred:
                # Written when the caller asks for its next batch or, should
                # it wait for anything else first, as soon as it does.
                self._soon.arm()
            self._deferred.append(e)
            return
        self._flush(e)

    async def next_batch(self) -> list[MuxResult]:
        if self._deferred:
            self._write_deferred()
        self._in_batch = False
        await trio.lowlevel.checkpoint_if_cancelled()
        self._ring.harvest()  # hands the pool's buffers back to the kernel
        if self._pumping:  # a remove waits in the ring: it may be done now
            self._ring.kick()
        if self._ready:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not self._ready:
            await self._pump()
        taken = self._ready[:MUX_BATCH]
        del self._ready[:MUX_BATCH]
        batch: list[MuxResult] = []
        for e, result in taken:
            e.queued -= 1
            if result and type(result) is bytes:  # its data is taken: read on
                e.untaken -= len(result)
                if not e.recv_uid:
                    self._arm_if_idle(e)
            batch.append((e.stream, result))
        # Replies to a batch of several streams are written together (see
        # EpollMux): the peers' wake-ups bunch up; a lone reply goes at once.
        self._in_batch = len(batch) >= _DEFER_FROM
        return batch

    async def aclose(self) -> None:
        self._soon.close()
        for stream in list(self._entries):
            await self.remove(stream)
        if self._bufs is not None:  # every RECV has completed (remove waited)
            self._ring.drop_buffer_ring(self._bufs)
            self._bufs = None
        self._ring.close()
        await trio.lowlevel.checkpoint()
