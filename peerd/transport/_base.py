"""The stream contract shared by the backends, and the error translation.

A ``Stream`` is a ``trio.abc.HalfCloseableStream`` plus what the data path
needs (``peer_address``, ``fileno``, ``recv_exactly_into``, ``sendfile``); a
``Transport`` connects, listens, serves and opens a ``Mux``. Trio's
``Cancelled`` passes through every method unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from peerd.errors import (
    ConnectError,
    ConnectionClosed,
    ConnectionReset,
    ProtocolError,
    TransportError,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "Listener",
    "Mux",
    "Stream",
    "StreamBroken",
    "StreamClosed",
    "Transport",
    "is_wildcard",
]

log = logging.getLogger("peerd.transport")

DEFAULT_BACKLOG = 128
MIN_BACKLOG = 128


class StreamClosed(ConnectionClosed, trio.ClosedResourceError):
    """This end was closed (or, for sending, half-closed) before or during the call."""


class StreamBroken(ConnectionReset, trio.BrokenResourceError):
    """The connection broke: reset by the peer, or the peer stopped receiving."""


# errno values that mean "the connection is gone" on an established stream.
_RESET_ERRNOS = frozenset(
    {
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETRESET,
    }
)

# accept() failures caused by one bad incoming connection, not by the
# listener: retry at once (same list in spirit as trio.SocketListener).
IGNORED_ACCEPT_ERRNOS = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EOPNOTSUPP,
        errno.EPERM,
    }
)
# accept() failures caused by running out of a resource: back off and retry.
RESOURCE_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not a repr of the address
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def stream_error(exc: OSError, what: str) -> TransportError:
    """Map an OSError raised on an established stream to a transport error."""
    if exc.errno in _RESET_ERRNOS:
        return StreamBroken(f"{what}: connection reset by peer ({_reason(exc)})")
    if exc.errno == errno.EBADF:
        return StreamClosed(f"{what}: stream is closed")
    return TransportError(f"{what}: {_reason(exc)}")


def connect_error(host: str, port: int, exc: BaseException) -> ConnectError:
    """The one message format for a failed connect."""
    return ConnectError(f"cannot connect to {host}:{port}: {_reason(exc)}")


class translating:
    """Translate OSError / trio.ClosedResourceError raised by a stream op.

    A class, not a generator-based context manager: it wraps every receive
    and send of the reactor, and a generator per call was measurable.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or isinstance(exc, StreamClosed):
            return
        if isinstance(exc, trio.ClosedResourceError):
            raise StreamClosed(f"{self.what}: stream is closed") from None
        if isinstance(exc, OSError):
            raise stream_error(exc, self.what) from exc


async def resolve(host: str, port: int, *, for_bind: bool = False) -> tuple[int, Any]:
    """Resolve ``host``/``port`` to ``(family, sockaddr)`` (first TCP result).

    Raises:
        ConnectError: the name does not resolve.
    """
    flags = socket.AI_PASSIVE if for_bind else 0
    try:
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=flags
        )
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise connect_error(host, port, exc) from exc
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return family, sockaddr
    raise ConnectError(f"cannot connect to {host}:{port}: no IPv4/IPv6 address")


def check_backlog(backlog: int) -> int:
    """Backlog is at least 128; larger values are passed to listen() as asked."""
    if not isinstance(backlog, int) or isinstance(backlog, bool):
        raise TypeError("backlog must be an int")
    return max(backlog, MIN_BACKLOG)


def addr2(sockaddr: Any) -> tuple[str, int]:
    """(host, port) of an IPv4 or IPv6 socket address; an IPv4 peer reached
    through a dual-stack socket (``::ffff:a.b.c.d``) is named by its IPv4
    address, so one peer has one name whichever socket it came in on."""
    host = str(sockaddr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, int(sockaddr[1]))


WILDCARD_HOSTS = ("", "::", "*")  # listen on every IPv6 and IPv4 address


def is_wildcard(host: str) -> bool:
    """True for an address meaning "every interface" (IPv4, IPv6 or both)."""
    return host in WILDCARD_HOSTS or host == "0.0.0.0"


class Stream(trio.abc.HalfCloseableStream):
    """A connected byte stream: Trio's ``HalfCloseableStream`` plus the data path's needs.

    Trio's part (``send_all``, ``wait_send_all_might_not_block``,
    ``receive_some``, ``send_eof``, ``aclose``) keeps Trio's rules: one task
    sends and one receives at a time (else ``trio.BusyResourceError``); use
    after ``aclose`` (or sending after ``send_eof``) raises ``StreamClosed``,
    a broken connection ``StreamBroken``. Both are Trio's exceptions and
    peer's ``TransportError`` at once, so either ``except`` works.
    """

    peer_address: tuple[str, int]
    # Bytes moved so far; read by tests (how far a mux reads ahead, how much
    # of a cancelled send went out), by nothing in the product.
    bytes_sent: int
    bytes_received: int
    # Conflict detection (Trio's "one sender, one receiver"), and half-close.
    _sending: bool
    _receiving: bool
    _eof_sent: bool

    def fileno(self) -> int:
        """The socket's file descriptor; -1 once closed, or if there is none."""
        raise NotImplementedError

    async def _recv_into(self, buf: Any) -> int:
        """Receive up to ``len(buf)`` bytes; 0 means EOF (the backend's primitive)."""
        raise NotImplementedError

    def _begin(self, sending: bool) -> None:
        if sending:
            if self._sending:
                raise trio.BusyResourceError("another task is sending on this stream")
            self._sending = True
        else:
            if self._receiving:
                raise trio.BusyResourceError("another task is receiving on this stream")
            self._receiving = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive at most ``max_bytes`` (default 64 KiB) bytes; ``b""`` means EOF."""
        if max_bytes is None:
            max_bytes = 65536
        elif not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int or None")
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._begin(False)
        try:
            buf = bytearray(max_bytes)
            n = await self._recv_into(buf)
        finally:
            self._receiving = False
        del buf[n:]
        return bytes(buf)

    async def recv_exactly_into(self, buf: Any) -> None:
        """Fill all of ``buf``.

        Raises:
            ConnectionClosed: EOF before ``buf`` was full.
            StreamBroken: the connection broke.
        """
        self._begin(False)
        try:
            view = memoryview(buf).cast("B")
            total = len(view)
            got = 0
            while got < total:
                n = await self._recv_into(view[got:])
                if n == 0:
                    raise eof_error(got, total)
                got += n
            if total == 0:
                await trio.lowlevel.checkpoint()
        finally:
            self._receiving = False

    async def sendfile(self, fd: int, offset: int, count: int, *, header: bytes = b"") -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset`` (sockets: not through Python).

        ``header`` (a frame header, a few bytes) goes out first, corked with
        ``MSG_MORE`` so that it leaves in the same TCP segment as the file's
        first bytes instead of a segment (and a push) of its own. It counts
        in ``bytes_sent`` like the file's bytes.

        Raises:
            StreamBroken: the connection broke.
            StorageError: the file ended before ``offset + count``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} to {self.peer_address}>"


def eof_error(got: int, total: int) -> ConnectionClosed:
    """What ``recv_exactly_into`` raises when the peer closes too early."""
    return ConnectionClosed(f"connection closed by peer after {got} of {total} expected bytes")


class Listener:
    """A listening TCP socket; ``port`` is the real port when 0 was asked."""

    host: str
    port: int

    async def accept(self) -> Stream:
        """Wait for the next incoming connection."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop listening and release the port (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


Handler = Callable[[Stream], Awaitable[object]]


#: At most this many streams per ``Mux.next_batch``: small batches, taken
#: oldest first, serve streams in arrival order (a reply waits for ~32
#: answers, not for everything that was ready), so latency stays even.
MUX_BATCH = 32

#: What ``Mux.next_batch`` reports per stream: bytes received (``b""`` = the
#: peer closed its side) or the ``TransportError`` that ended the stream.
MuxResult = tuple[Stream, "bytes | TransportError"]


class SoonCall:
    """Call ``fn`` once the current task yields, unless it is called before.

    The muxes' safety net for deferred replies: a dispatcher that awaits
    anything but ``next_batch`` still gets its replies written. Like Trio's
    ``run_sync_soon`` but for the Trio thread itself, without its wake-up
    socket (a write, an epoll event and a read per call): ``arm`` reschedules
    a parked system task, which runs ``fn`` in the next scheduling pass.
    ``fn`` must be idempotent and must not raise. ``close`` ends the task.
    """

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._task: trio.lowlevel.Task | None = None  # set while parked
        self._started = self._armed = self._closed = False

    def arm(self) -> None:
        if self._closed:
            return
        self._armed = True
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="peerd.mux.soon")
        elif self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    async def _run(self) -> None:
        while not self._closed:
            if self._armed:
                self._armed = False
                self._fn()
            else:
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None  # the run is ending
        self._closed = True
        return trio.lowlevel.Abort.SUCCEEDED


class Mux:
    """Many streams served by one task: input in batches, output queued.

    The per-connection ``recv``/``send`` calls of ``Stream`` cost one task
    wake-up each; a server with many small request/reply conversations (the
    tracker) spends most of its time there. A mux turns that around: one task
    asks ``next_batch()`` for *every* stream with input (one readiness wait
    or one harvest of completions for all of them), answers, and queues the
    replies with ``send``, which never blocks. The reactor implements it with
    its own epoll set, the proactor with receive and send operations in the
    ring whose completions are collected in batches.

    Ownership: the caller keeps owning each stream. ``add`` lends it to the
    mux; ``await remove(stream)`` takes it back once the kernel holds none of
    its buffers any more, and only then may the owner close it. A stream must
    not be used directly while it is lent. Use as ``async with`` (or call
    ``aclose``): closing removes every stream still lent.
    """

    # Each backend keeps one entry per lent stream, whose ``out`` is the list
    # of queued output (bytes) not yet taken by the kernel.
    _entries: dict[Stream, Any]

    async def __aenter__(self) -> Mux:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def add(self, stream: Stream) -> None:
        """Lend ``stream`` to the mux; its input is reported by ``next_batch``."""
        raise NotImplementedError

    async def remove(self, stream: Stream) -> None:
        """Take ``stream`` back: nothing more is read or sent, queued output is dropped."""
        raise NotImplementedError

    def pause(self, stream: Stream) -> None:
        """Stop reporting input of ``stream`` (what arrives meanwhile waits)."""
        raise NotImplementedError

    def resume(self, stream: Stream) -> None:
        """Report input of ``stream`` again."""
        raise NotImplementedError

    def send(self, stream: Stream, data: bytes) -> None:
        """Queue ``data`` for ``stream``; written in order, as fast as the peer reads.

        Never blocks. A failure is reported by ``next_batch`` for that stream.
        """
        raise NotImplementedError

    def unsent(self, stream: Stream) -> int:
        """Bytes queued for ``stream`` that the kernel has not taken yet."""
        e = self._entries.get(stream)
        return sum(map(len, e.out)) if e is not None else 0

    async def next_batch(self) -> list[MuxResult]:
        """Wait until some lent stream has input (or failed); return up to ``MUX_BATCH``.

        Streams come oldest first; the rest wait for the next call.

        A stream is reported at most once with ``b""`` or an error, and
        nothing follows that (after ``b""`` it can still be written to: the
        peer only closed its sending side). Its owner should then ``remove``
        it. Always a checkpoint.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Remove every stream still lent and release the mux's own resources."""
        raise NotImplementedError


class Transport:
    """Opens listeners and connections of one backend."""

    name: str = ""

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source_host: str | None = None,
    ) -> Stream:
        """Open a TCP connection (``source_host``: bind this local address first).

        Raises:
            ConnectError: refused, unreachable, or the name does not resolve.
            TransportTimeout: not connected within ``timeout`` seconds.
        """
        raise NotImplementedError

    async def open_listener(
        self, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG
    ) -> Listener:
        """Listen on ``host``/``port`` (0 = any free port) with SO_REUSEADDR.

        Raises:
            TransportError: the address cannot be bound.
        """
        raise NotImplementedError

    def open_mux(self) -> Mux:
        """A new :class:`Mux` of this backend (must be used inside a Trio run)."""
        raise NotImplementedError

    async def serve(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        backlog: int = DEFAULT_BACKLOG,
        task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections forever, running ``await handler(stream)`` for each.

        Each handler runs in its own task of a nursery owned by this call; its
        stream is closed when it returns. A handler failing with a
        ``TransportError`` or ``ProtocolError`` (the remote side misbehaved)
        only ends that connection; any other exception propagates. Cancelling
        ``serve`` closes the listener and every connection.

        ``task_status.started(listener)`` reports the listener (and its port).
        """
        listener = await self.open_listener(host, port, backlog=backlog)
        live: set[Stream] = set()

        async def run_handler(stream: Stream) -> None:
            try:
                await handler(stream)
            except (TransportError, ProtocolError) as exc:
                log.debug("connection from %s ended: %s", stream.peer_address, exc)
            finally:
                live.discard(stream)
                with trio.CancelScope(shield=True):
                    await stream.aclose()

        try:
            async with trio.open_nursery() as nursery:
                task_status.started(listener)
                while True:
                    try:
                        stream = await listener.accept()
                    except TransportError as exc:
                        cause = exc.__cause__
                        if isinstance(cause, OSError) and cause.errno in RESOURCE_ACCEPT_ERRNOS:
                            log.warning("accept on port %d: %s; retrying", listener.port, exc)
                            await trio.sleep(0.1)
                            continue
                        raise
                    live.add(stream)
                    nursery.start_soon(run_handler, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
                for stream in list(live):
                    await stream.aclose()
