"""The reactor backend: Trio's own sockets (readiness via epoll on Linux).

Trio's I/O manager waits on epoll until a socket is readable or writable,
then the non-blocking system call runs in the Trio thread. ``sendfile`` is
``os.sendfile``, retried after ``wait_writable`` whenever the socket buffer is
full, so file bytes never pass through Python.

``recv_exactly_into`` raises ``SO_RCVLOWAT`` to the bytes still missing (at
most ``LOWAT_CAP``), so epoll reports the socket readable only once that much
is queued: a receiver slower than its sender (one that hashes every chunk)
is not woken, through Trio's scheduler, for every few segments.
``receive_some`` puts the mark back to 1 byte. ``EpollMux`` serves many small conversations
from one task (docs/ARCHITECTURE.md, "Many small conversations: the Mux").
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
from typing import Any

import trio

from peerd.errors import ConnectionClosed, StorageError, TransportError, TransportTimeout

from ._base import (
    DEFAULT_BACKLOG,
    IGNORED_ACCEPT_ERRNOS,
    MUX_BATCH,
    WILDCARD_HOSTS,
    Listener,
    Mux,
    MuxResult,
    SoonCall,
    Stream,
    StreamClosed,
    Transport,
    addr2,
    check_backlog,
    connect_error,
    eof_error,
    resolve,
    stream_error,
    translating,
)

__all__ = ["EpollMux", "ReactorListener", "ReactorStream", "ReactorTransport"]

# recv_exactly_into raises SO_RCVLOWAT up to this many bytes, so epoll reports
# the socket readable (and the kernel wakes us) only once that much is queued.
LOWAT_CAP = 512 * 1024
_MSG_MORE = socket.MSG_MORE


class ReactorStream(Stream):
    """A connected Trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sending = self._receiving = self._eof_sent = False
        self._lowat = 1  # the socket's current SO_RCVLOWAT
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.peer_address = addr2(sock.getpeername())
        except OSError:  # already reset by the peer: keep an honest placeholder
            self.peer_address = ("", 0)

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    def detach(self) -> tuple[int, int]:
        """Give up the socket (this stream is unusable after): its family and fd."""
        return self._sock.family, self._sock.detach()

    def _set_lowat(self, lowat: int) -> None:
        if lowat != self._lowat and self._sock.fileno() >= 0:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self._lowat = lowat

    async def _recv_into(self, buf: Any) -> int:
        with translating("recv"):
            self._set_lowat(1)
            n = await self._sock.recv_into(buf)
        self.bytes_received += n
        return n

    async def recv_exactly_into(self, buf: Any) -> None:
        # Same contract as the base version. The low-water mark is the bytes
        # still missing (capped): a receiver that is slower than the network
        # (e.g. one that hashes every chunk) otherwise wakes, schedules and
        # recv()s for every few segments that arrive, each a Trio task switch.
        # It never exceeds what we still expect, so it cannot wait for bytes
        # the peer will not send; the kernel also wakes us early when the
        # receive window is nearly shut, so a lowat larger than the window
        # cannot stall the sender.
        self._begin(False)
        try:
            view = memoryview(buf).cast("B")
            total = len(view)
            got = 0
            with translating("recv"):
                while got < total:
                    self._set_lowat(min(total - got, LOWAT_CAP))
                    n = await self._sock.recv_into(view[got:])
                    self.bytes_received += n
                    if n == 0:
                        raise eof_error(got, total)
                    got += n
            if total == 0:
                await trio.lowlevel.checkpoint()
        finally:
            self._receiving = False

    async def _closed_for_sending(self, what: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._sock.fileno() < 0:
            raise StreamClosed(f"{what}: stream is closed")
        raise StreamClosed(f"{what}: this side was shut (send_eof)")

    async def send_all(self, data: Any) -> None:
        self._begin(True)
        try:
            if self._eof_sent or self._sock.fileno() < 0:
                await self._closed_for_sending("send")
            with memoryview(data) as view, view.cast("B") as flat:
                total = len(flat)
                sent = 0
                if total == 0:
                    await trio.lowlevel.checkpoint()
                    return
                with translating("send"):
                    while sent < total:
                        n = await self._sock.send(flat[sent:])
                        sent += n
                        self.bytes_sent += n
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._begin(True)
        try:
            if self._sock.fileno() < 0:
                await self._closed_for_sending("send")
            with translating("send"):
                await self._sock.wait_writable()
        finally:
            self._sending = False

    async def sendfile(self, fd: int, offset: int, count: int, *, header: bytes = b"") -> None:
        if offset < 0 or count < 0:
            raise ValueError("offset and count must be >= 0")
        self._begin(True)
        try:
            if self._eof_sent or self._sock.fileno() < 0:
                await self._closed_for_sending("sendfile")
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            end = offset + count
            with translating("sendfile"):
                if header:  # corked: it leaves with the file's first bytes
                    waited = True  # trio's send is a checkpoint
                    more = _MSG_MORE if count else 0
                    with memoryview(header) as view:
                        sent = 0
                        while sent < len(view):
                            n = await self._sock.send(view[sent:], more)
                            sent += n
                            self.bytes_sent += n
                while offset < end:
                    sockfd = self._sock.fileno()
                    if sockfd < 0:
                        raise trio.ClosedResourceError
                    try:
                        n = os.sendfile(sockfd, fd, offset, end - offset)
                    except BlockingIOError:
                        waited = True
                        await trio.lowlevel.wait_writable(self._sock)
                        continue
                    except OSError as exc:
                        if exc.errno in (errno.EBADF, errno.EINVAL) and self._sock.fileno() >= 0:
                            raise StorageError(
                                f"sendfile: cannot read file: {exc.strerror}"
                            ) from exc
                        raise
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

    async def send_eof(self) -> None:
        self._begin(True)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            with translating("send_eof"):
                if self._sock.fileno() < 0:
                    raise trio.ClosedResourceError
                if not self._eof_sent:
                    self._eof_sent = True
                    try:
                        self._sock.shutdown(socket.SHUT_WR)
                    except OSError as exc:
                        if exc.errno != errno.ENOTCONN:  # peer already gone: EOF is moot
                            raise
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self._sock.close()  # wakes tasks blocked on it with ClosedResourceError
        await trio.lowlevel.checkpoint()


class ReactorListener(Listener):
    """A listening Trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self.host, self.port = addr2(sock.getsockname())

    async def accept(self) -> Stream:
        while True:
            try:
                sock, _addr = await self._sock.accept()
            except trio.ClosedResourceError:
                raise TransportError(f"accept on port {self.port}: listener is closed") from None
            except OSError as exc:
                if exc.errno in IGNORED_ACCEPT_ERRNOS:
                    continue
                raise TransportError(f"accept on port {self.port}: {exc.strerror}") from exc
            try:
                return ReactorStream(sock)
            except OSError:  # reset between accept() and setsockopt(): skip it
                sock.close()

    async def aclose(self) -> None:
        self._sock.close()
        await trio.lowlevel.checkpoint()


class ReactorTransport(Transport):
    """Trio sockets."""

    name = "reactor"

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source_host: str | None = None,
    ) -> Stream:
        family, sockaddr = await resolve(host, port)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if source_host is not None:
                try:
                    await sock.bind((source_host, 0))
                except OSError as exc:
                    raise connect_error(host, port, exc) from exc
            with trio.move_on_after(timeout) as scope:
                try:
                    await sock.connect(sockaddr)
                except OSError as exc:
                    raise connect_error(host, port, exc) from exc
            if scope.cancelled_caught:
                raise TransportTimeout(
                    f"cannot connect to {host}:{port}: timed out after {timeout}s"
                )
            try:
                return ReactorStream(sock)
            except OSError as exc:
                raise connect_error(host, port, exc) from exc
        except BaseException:
            sock.close()
            raise

    async def open_listener(
        self, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG
    ) -> Listener:
        backlog = check_backlog(backlog)
        family: int
        sockaddr: Any
        if host in WILDCARD_HOSTS and socket.has_ipv6:
            # Every interface, both families: one IPv6 socket that also takes IPv4.
            family, sockaddr = int(socket.AF_INET6), ("::", port, 0, 0)
        else:
            try:
                family, sockaddr = await resolve(host, port, for_bind=True)
            except TransportError as exc:
                raise TransportError(f"cannot listen on {host}:{port}: {exc}") from exc
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host in WILDCARD_HOSTS:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            await sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        return ReactorListener(sock)

    def open_mux(self) -> Mux:
        return EpollMux()


_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_MUX_RECV = 65536
_DEFER_FROM = 4  # batch size from which replies are written together (EpollMux)


class _MuxEntry:
    __slots__ = ("broken", "ended", "fd", "mask", "out", "paused", "stream")

    def __init__(self, stream: Stream, fd: int) -> None:
        self.stream = stream
        self.fd = fd
        self.mask = 0  # what the epoll set has for fd (0: not registered)
        self.out: list[bytes] = []  # queued output, oldest first
        self.paused = False
        self.ended = False  # EOF or an error was reported: never read again
        self.broken = False  # the connection failed: nothing more is written


class EpollMux(Mux):
    """The reactor's mux: one epoll set of its own, watched by Trio's epoll.

    ``next_batch`` asks the set for every ready fd (level-triggered) and reads
    each with one non-blocking ``read``; it parks on
    ``trio.lowlevel.wait_readable`` of the epoll fd itself only when nothing
    is ready. ``send`` writes at once if nothing is queued (the usual case:
    replies are small, the socket buffer has room) and otherwise queues and
    asks for EPOLLOUT. A paused stream is taken out of the read mask, so
    level-triggered readiness cannot spin.

    Replies sent while the caller works through a batch of several streams
    are written when it asks for the next batch (or, if it awaits anything
    else first, as soon as it does), like the proactor's SENDs that go in
    with one submit: the peers' wake-ups bunch up instead of one per reply,
    and a burst of writes mostly finds them awake (at 256 tracker
    connections: ~10% less CPU per announce on both sides). Anything else is
    written at once.

    A send that fails while the dispatcher is parked (no socket ready) is
    news only the mux has: it writes an eventfd kept in its epoll set, so the
    parked ``next_batch`` wakes and reports the failure at once.
    """

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._entries: dict[Stream, _MuxEntry] = {}
        self._by_fd: dict[int, _MuxEntry] = {}
        self._failed: list[MuxResult] = []  # send failures, reported by next_batch
        self._in_batch = False  # a batch of _DEFER_FROM+ streams is being worked on
        self._deferred: list[_MuxEntry] = []  # written when next_batch is called
        self._soon = SoonCall(self._write_deferred)  # should the dispatcher not ask soon
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wakeup, _EPOLLIN)
        self._parked = False  # next_batch waits for the epoll fd

    def _update(self, e: _MuxEntry) -> None:
        mask = (0 if e.paused or e.ended else _EPOLLIN) | (_EPOLLOUT if e.out else 0)
        if mask == e.mask:
            return
        if not e.mask:
            self._ep.register(e.fd, mask)
        elif mask:
            self._ep.modify(e.fd, mask)
        else:
            self._ep.unregister(e.fd)
        e.mask = mask

    def add(self, stream: Stream) -> None:
        fd = stream.fileno()
        if fd < 0:
            raise ConnectionClosed("mux: stream is closed")
        if stream in self._entries:
            raise ValueError("stream is already in this mux")
        e = _MuxEntry(stream, fd)
        self._entries[stream] = e
        self._by_fd[fd] = e
        self._update(e)

    def _drop(self, e: _MuxEntry) -> None:
        if e.mask:
            self._ep.unregister(e.fd)
            e.mask = 0
        e.out.clear()
        del self._entries[e.stream]
        del self._by_fd[e.fd]

    async def remove(self, stream: Stream) -> None:
        e = self._entries.get(stream)
        if e is not None:
            self._drop(e)
            self._failed = [r for r in self._failed if r[0] is not stream]
        await trio.lowlevel.checkpoint()

    def pause(self, stream: Stream) -> None:
        e = self._entries[stream]
        e.paused = True
        self._update(e)

    def resume(self, stream: Stream) -> None:
        e = self._entries[stream]
        e.paused = False
        self._update(e)

    def send(self, stream: Stream, data: bytes) -> None:
        e = self._entries[stream]
        if e.broken:
            return  # it failed already; that failure is reported by next_batch
        if e.out:
            e.out.append(data)
            return
        if self._in_batch:
            e.out.append(data)
            if not self._deferred:
                # Written when the caller asks for its next batch or, should
                # it wait for anything else first, as soon as it does.
                self._soon.arm()
            self._deferred.append(e)
            return
        try:
            n = os.write(e.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._fail(e, exc, "send")
            return
        stream.bytes_sent += n
        if n < len(data):
            e.out.append(data[n:])
            self._update(e)

    def _fail(self, e: _MuxEntry, exc: OSError, what: str) -> None:
        if not e.ended:
            self._failed.append((e.stream, stream_error(exc, what)))
        e.out.clear()
        e.ended = e.broken = True
        self._update(e)  # nothing more is read or written
        if self._parked:
            os.eventfd_write(self._wakeup, 1)  # next_batch reports it now

    def _flush(self, e: _MuxEntry) -> None:
        out = e.out
        while out:
            data = out[0]
            try:
                n = os.write(e.fd, data)
            except BlockingIOError:
                break
            except OSError as exc:
                self._fail(e, exc, "send")
                return
            e.stream.bytes_sent += n
            if n < len(data):
                out[0] = data[n:]
                break
            out.pop(0)
        self._update(e)

    def _write_deferred(self) -> None:
        self._in_batch = False
        deferred, self._deferred = self._deferred, []
        for e in deferred:
            if e.out and not e.broken and self._by_fd.get(e.fd) is e:  # still lent
                self._flush(e)

    async def next_batch(self) -> list[MuxResult]:
        if self._deferred:
            self._write_deferred()
        self._in_batch = False
        await trio.lowlevel.checkpoint_if_cancelled()
        by_fd = self._by_fd
        while True:
            batch, self._failed = self._failed, []
            # epoll hands out its ready list oldest first (a level-triggered
            # fd still ready goes to the back), so small batches are FIFO.
            for fd, events in self._ep.poll(0, MUX_BATCH):
                e = by_fd.get(fd)
                if e is None:
                    if fd == self._wakeup:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wakeup)
                    continue
                if e.out and events & ~_EPOLLIN:  # writable, or an error to discover
                    self._flush(e)
                if e.paused or e.ended or not events & ~_EPOLLOUT:
                    continue
                try:
                    data = os.read(fd, _MUX_RECV)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(e, exc, "recv")
                    continue
                e.stream.bytes_received += len(data)
                if not data:
                    e.ended = True  # nothing follows EOF
                    self._update(e)
                batch.append((e.stream, data))
            if self._failed:
                batch += self._failed
                self._failed = []
            if batch:
                await trio.lowlevel.cancel_shielded_checkpoint()
                # Bunching replies pays off from a few streams on; a lone
                # reply is written at once (no wake-up to share).
                self._in_batch = len(batch) >= _DEFER_FROM
                return batch
            self._parked = True
            try:
                await trio.lowlevel.wait_readable(self._ep.fileno())
            finally:
                self._parked = False

    async def aclose(self) -> None:
        self._soon.close()
        for e in list(self._entries.values()):
            self._drop(e)
        if not self._ep.closed:
            trio.lowlevel.notify_closing(self._ep.fileno())
            self._ep.close()
            os.close(self._wakeup)
        await trio.lowlevel.checkpoint()
