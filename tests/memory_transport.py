"""An in-memory transport for tests: the stream contract over ``trio.testing`` memory streams.

No sockets and no real time: a whole Node (or a swarm of them) can run in one
process under ``trio.testing.MockClock``. A ``MemoryNetwork`` maps
``(host, port)`` to listeners; ``network.transport(host)`` gives each party
its address in it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import os
from collections.abc import Iterator
from typing import Any

import trio
import trio.testing

from peerd.errors import StorageError, TransportError, TransportTimeout
from peerd.transport import DEFAULT_BACKLOG, Listener, Mux, Stream, Transport
from peerd.transport._base import (
    MUX_BATCH,
    MuxResult,
    StreamBroken,
    StreamClosed,
    connect_error,
)

__all__ = ["MemoryListener", "MemoryMux", "MemoryNetwork", "MemoryStream", "MemoryTransport"]

_WILDCARDS = ("", "0.0.0.0", "::")
SENDFILE_PIECE = 256 * 1024  # sendfile reads and sends the file in pieces this large


@contextlib.contextmanager
def _translating(what: str) -> Iterator[None]:
    """Trio's stream exceptions as the transport's (which are Trio's too)."""
    try:
        yield
    except (StreamClosed, StreamBroken):
        raise
    except trio.ClosedResourceError:
        raise StreamClosed(f"{what}: stream is closed") from None
    except trio.BrokenResourceError as exc:
        raise StreamBroken(f"{what}: connection broken ({exc or 'peer closed'})") from None


class MemoryStream(Stream):
    """One end of an in-memory connection (a ``trio.testing`` stream pair)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, peer_address: tuple[str, int]):
        self._inner = inner
        self.peer_address = peer_address
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sending = self._receiving = self._eof_sent = False
        self._closed = False

    def fileno(self) -> int:
        return -1  # no socket: the node reads no TCP_INFO

    async def _recv_into(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        with _translating("recv"):
            data = await self._inner.receive_some(len(view))
        view[: len(data)] = data
        self.bytes_received += len(data)
        return len(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int or None")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._begin(False)
        try:
            with _translating("recv"):
                data = await self._inner.receive_some(max_bytes or 65536)
        finally:
            self._receiving = False
        self.bytes_received += len(data)
        return bytes(data)

    async def _check_can_send(self, what: str) -> None:
        if self._closed or self._eof_sent:
            await trio.lowlevel.checkpoint()
            shut = "stream is closed" if self._closed else "this side was shut (send_eof)"
            raise StreamClosed(f"{what}: {shut}")

    async def send_all(self, data: Any) -> None:
        self._begin(True)
        try:
            await self._check_can_send("send")
            with _translating("send"):
                await self._inner.send_all(data)
            self.bytes_sent += memoryview(data).nbytes
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._begin(True)
        try:
            if self._closed:
                await self._check_can_send("send")
            with _translating("send"):
                await self._inner.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def sendfile(self, fd: int, offset: int, count: int, *, header: bytes = b"") -> None:
        """``os.pread`` + ``send_all``, in pieces; the errors of the socket backends."""
        if offset < 0 or count < 0:
            raise ValueError("offset and count must be >= 0")
        self._begin(True)
        try:
            await self._check_can_send("sendfile")
            end = offset + count
            if header:
                with _translating("sendfile"):
                    await self._inner.send_all(header)
                self.bytes_sent += len(header)
            elif count == 0:
                await trio.lowlevel.checkpoint()
            while offset < end:
                try:
                    piece = os.pread(fd, min(SENDFILE_PIECE, end - offset), offset)
                except OSError as exc:
                    raise StorageError(f"sendfile: cannot read file: {exc.strerror}") from exc
                if not piece:
                    raise StorageError(
                        f"sendfile: file ended at offset {offset}, {end - offset} bytes short"
                    )
                with _translating("sendfile"):
                    await self._inner.send_all(piece)
                offset += len(piece)
                self.bytes_sent += len(piece)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        self._begin(True)
        try:
            if self._closed:
                await trio.lowlevel.checkpoint()
                raise StreamClosed("send_eof: stream is closed")
            self._eof_sent = True
            with _translating("send_eof"):
                await self._inner.send_eof()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()


class MemoryListener(Listener):
    """Incoming connections of one ``(host, port)`` of a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork, host: str, port: int) -> None:
        self._network = network
        self.host, self.port = host, port
        self._send, self._receive = trio.open_memory_channel[MemoryStream](math.inf)

    def _offer(self, stream: MemoryStream) -> bool:
        try:
            self._send.send_nowait(stream)
        except trio.ClosedResourceError:
            return False
        return True

    async def accept(self) -> Stream:
        try:
            return await self._receive.receive()
        except (trio.ClosedResourceError, trio.EndOfChannel):
            raise TransportError(f"accept on port {self.port}: listener is closed") from None

    async def aclose(self) -> None:
        if self._network.listeners.get((self.host, self.port)) is self:
            del self._network.listeners[self.host, self.port]
        self._send.close()
        while True:  # connections never accepted: their clients see EOF
            try:
                stream = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            await stream.aclose()
        await self._receive.aclose()


class MemoryTransport(Transport):
    """The transport of one host of a ``MemoryNetwork``."""

    name = "memory"

    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self.network = network
        self.host = host

    async def connect(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source_host: str | None = None,
    ) -> Stream:
        await trio.lowlevel.checkpoint()
        if host in self.network.unreachable:
            await trio.sleep(timeout)
            raise TransportTimeout(f"cannot connect to {host}:{port}: timed out after {timeout}s")
        listener = self.network.listeners.get((host, port))
        refused = OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        if listener is None:
            raise connect_error(host, port, refused)
        local = (source_host or self.host, self.network.ephemeral_port())
        pair: tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
        if self.network.lockstep:
            pair = trio.testing.lockstep_stream_pair()
        else:
            pair = trio.testing.memory_stream_pair()
        ours, theirs = pair
        if not listener._offer(MemoryStream(theirs, local)):
            raise connect_error(host, port, refused)
        return MemoryStream(ours, (host, port))

    async def open_listener(
        self, host: str, port: int, *, backlog: int = DEFAULT_BACKLOG
    ) -> Listener:
        await trio.lowlevel.checkpoint()
        bound = self.host if host in _WILDCARDS else host
        if port == 0:
            port = self.network.ephemeral_port()
        if (bound, port) in self.network.listeners:
            raise TransportError(f"cannot listen on {host}:{port}: Address already in use")
        listener = MemoryListener(self.network, bound, port)
        self.network.listeners[bound, port] = listener
        return listener

    def open_mux(self) -> Mux:
        return MemoryMux()


class MemoryNetwork:
    """Listeners by ``(host, port)``; ``transport(host)`` is one party's view of it.

    ``lockstep=True`` gives connections with no buffer at all (a send waits
    for the receiver), instead of unbounded buffers; hosts in ``unreachable``
    time out on connect.
    """

    def __init__(self, *, lockstep: bool = False) -> None:
        self.lockstep = lockstep
        self.listeners: dict[tuple[str, int], MemoryListener] = {}
        self.unreachable: set[str] = set()
        self._ports = itertools.count(40000)

    def transport(self, host: str = "127.0.0.1") -> MemoryTransport:
        return MemoryTransport(self, host)

    def ephemeral_port(self) -> int:
        return next(self._ports)


class _Lent:
    __slots__ = ("done", "ended", "out", "paused", "queued", "scope", "stream", "taken", "wake")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self.done = trio.Event()  # both of its tasks have ended
        self.out: list[bytes] = []  # queued output, not yet handed to the stream
        self.paused = False
        self.ended = False  # EOF or an error was reported: nothing follows
        self.taken = trio.Event()  # the last input was handed out (and not paused)
        self.taken.set()
        self.wake = trio.Event()  # output was queued
        self.queued: list[bytes | TransportError] = []


class MemoryMux(Mux):
    """A mux for memory streams: one reader and one writer task per lent stream.

    Input is read no further ahead than ``next_batch`` takes it (one receive
    per stream), as the socket backends' muxes do.
    """

    def __init__(self) -> None:
        self._entries: dict[Stream, _Lent] = {}
        self._ready: list[_Lent] = []  # streams with queued results, oldest first
        self._changed = trio.Event()

    def add(self, stream: Stream) -> None:
        if stream in self._entries:
            raise ValueError("stream is already in this mux")
        e = _Lent(stream)
        self._entries[stream] = e
        trio.lowlevel.spawn_system_task(functools.partial(self._run, e))

    async def _run(self, e: _Lent) -> None:
        with e.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, e)
                await self._reader(e)
        e.done.set()

    def _report(self, e: _Lent, result: bytes | TransportError) -> None:
        if e.ended:
            return
        e.ended = not isinstance(result, bytes) or not result
        e.queued.append(result)
        if e not in self._ready:
            self._ready.append(e)
        self._changed.set()

    async def _reader(self, e: _Lent) -> None:
        while True:
            await e.taken.wait()
            try:
                data = await e.stream.receive_some(16384)
            except TransportError as exc:
                self._report(e, exc)
                return
            e.taken = trio.Event()
            self._report(e, data)
            if not data:
                return

    async def _writer(self, e: _Lent) -> None:
        while True:
            await e.wake.wait()
            e.wake = trio.Event()
            while e.out:
                data = e.out[0]
                try:
                    await e.stream.send_all(data)
                except TransportError as exc:
                    e.out.clear()
                    self._report(e, exc)
                    return
                del e.out[0]

    async def remove(self, stream: Stream) -> None:
        e = self._entries.pop(stream, None)
        if e is not None:
            e.scope.cancel()
            if e in self._ready:
                self._ready.remove(e)
            with trio.CancelScope(shield=True):
                await e.done.wait()
        await trio.lowlevel.checkpoint()

    def pause(self, stream: Stream) -> None:
        self._entries[stream].paused = True

    def resume(self, stream: Stream) -> None:
        self._entries[stream].paused = False
        self._changed.set()

    def send(self, stream: Stream, data: bytes) -> None:
        e = self._entries[stream]
        e.out.append(data)
        e.wake.set()

    async def next_batch(self) -> list[MuxResult]:
        await trio.lowlevel.checkpoint()
        while True:
            batch: list[MuxResult] = []
            for e in list(self._ready):
                if len(batch) >= MUX_BATCH:
                    break
                if e.paused:
                    continue
                self._ready.remove(e)
                for result in e.queued:
                    batch.append((e.stream, result))
                e.queued.clear()
                e.taken.set()  # read on
            if batch:
                return batch
            self._changed = trio.Event()
            await self._changed.wait()

    async def aclose(self) -> None:
        for stream in list(self._entries):
            await self.remove(stream)
        await trio.lowlevel.checkpoint()
