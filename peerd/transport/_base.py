"""The stream contract shared by both backends, and the error translation.

A backend provides a ``Transport`` (opens listeners and connections, does
positional disk I/O, opens a ``Mux``), a ``Listener``, a ``Stream`` and a
``Mux``. Everything that does not depend on how bytes move lives here: the
byte counters, ``recv_exactly_into``/``receive_some`` on top of ``recv_into``,
the ``serve`` loop, address resolution and the translation of ``OSError``
into the transport exceptions of :mod:`peerd.errors`.

Trio's ``Cancelled`` (and therefore deadlines set with ``trio.move_on_after``
/ ``trio.fail_after`` by the caller) is never translated: it passes through
every method unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
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
    "Transport",
]

log = logging.getLogger("peerd.transport")

DEFAULT_BACKLOG = 128
MIN_BACKLOG = 128

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
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def stream_error(exc: OSError, what: str) -> TransportError:
    """Map an OSError raised on an established stream to a transport error."""
    if exc.errno in _RESET_ERRNOS:
        return ConnectionReset(f"{what}: connection reset by peer ({_reason(exc)})")
    if exc.errno == errno.EBADF:
        return ConnectionClosed(f"{what}: stream is closed")
    return TransportError(f"{what}: {_reason(exc)}")


def connect_error(host: str, port: int, exc: BaseException) -> ConnectError:
    """The one message format for a failed connect."""
    return ConnectError(f"cannot connect to {host}:{port}: {_reason(exc)}")


@contextlib.contextmanager
def translating(what: str) -> Iterator[None]:
    """Translate OSError / trio.ClosedResourceError raised by a stream op."""
    try:
        yield
    except trio.ClosedResourceError:
        raise ConnectionClosed(f"{what}: stream is closed") from None
    except OSError as exc:
        raise stream_error(exc, what) from exc


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
    """(host, port) of an IPv4 or IPv6 socket address."""
    return (str(sockaddr[0]), int(sockaddr[1]))


class Stream:
    """A connected TCP byte stream (one task sends, one task receives at a time)."""

    backend: str = ""
    # Bytes moved so far; kept for tests (how far a mux reads ahead, how much of
    # a cancelled send went out), read by nothing in the product.
    bytes_sent: int
    bytes_received: int
    peer_address: tuple[str, int]
    local_address: tuple[str, int]

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed)."""
        raise NotImplementedError

    async def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        """Receive up to ``nbytes`` (0 = ``len(buf)``) bytes into ``buf``.

        Returns:
            The number of bytes received; 0 means the peer closed (EOF).
        Raises:
            ConnectionReset, ConnectionClosed (stream closed locally).
        """
        raise NotImplementedError

    async def recv_exactly_into(self, buf: Any) -> None:
        """Fill all of ``buf``.

        Raises:
            ConnectionClosed: EOF before ``buf`` was full.
            ConnectionReset: the connection broke.
        """
        view = memoryview(buf).cast("B")
        total = len(view)
        got = 0
        while got < total:
            n = await self.recv_into(view[got:])
            if n == 0:
                raise ConnectionClosed(
                    f"connection closed by peer after {got} of {total} expected bytes"
                )
            got += n

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Receive at most ``max_bytes`` bytes; ``b""`` means EOF."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        buf = bytearray(max_bytes)
        n = await self.recv_into(buf)
        del buf[n:]
        return bytes(buf)

    async def send_all(self, data: Any) -> None:
        """Send every byte of the bytes-like ``data``.

        Raises:
            ConnectionReset: the peer reset or closed its receiving side.
        """
        raise NotImplementedError

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset``, not through Python.

        Raises:
            ConnectionReset: the connection broke.
            StorageError: the file ended before ``offset + count``.
        """
        raise NotImplementedError

    async def send_eof(self) -> None:
        """Half-close: the peer sees EOF; receiving still works."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the stream (idempotent); the socket is released even if cancelled."""
        raise NotImplementedError

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.local_address} -> {self.peer_address}>"


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

    async def pread_into(self, fd: int, buf: Any, offset: int) -> int:
        """Read file ``fd`` at ``offset`` into ``buf``; returns bytes read (short only at EOF)."""
        raise NotImplementedError

    async def pwrite(self, fd: int, data: Any, offset: int) -> int:
        """Write all of ``data`` to file ``fd`` at ``offset``; returns ``len(data)``."""
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
