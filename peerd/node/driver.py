"""One content in a node: runs the content engine's decisions over real sockets.

The :class:`~peerd.engine.content_engine.ContentEngine` decides; this driver
feeds it events (from its sessions, the clock, the tracker) and carries out
its actions: queue a frame on a session, close one, dial a peer, announce.
It also owns what is I/O: chunk buffers, hashing and writing a received chunk
in a worker thread, the resume-state flushes, the tracker calls.
"""

from __future__ import annotations

import ipaddress
import logging
import mmap
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Protocol

import trio

from peerd.content.hashing import hash_chunk
from peerd.content.identity import Identity
from peerd.content.manifest import Manifest
from peerd.content.store import ChunkStore, SourceFile, aligned_buffer
from peerd.engine.content_engine import (
    TICK,
    Action,
    Close,
    ContentEngine,
    Dial,
    Send,
    SendHave,
)
from peerd.engine.scheduling import UploadTurns
from peerd.errors import PeerError, StorageError, TrackerError
from peerd.node.ratelimit import RateLimiter
from peerd.node.session import PeerSession
from peerd.wire import (
    Bitfield,
    Cancel,
    Event,
    Have,
    Hello,
    ManifestResponse,
    PeerConnection,
    Peers,
    Pex,
    Reject,
    Request,
    encode_message,
)

if TYPE_CHECKING:
    from peerd.transport import Stream

__all__ = ["BufferPool", "Content", "NodeLink", "connection_bytes"]

log = logging.getLogger("peerd.node.driver")

STATE_FLUSH_EVERY = 1.0
RATE_SPAN = 5.0  # seconds the shown transfer rates are measured over
BUFFER_BUDGET = 32 * 1024 * 1024  # bytes of chunk buffers per download
HOLD_BUDGET = 64 * 1024 * 1024  # bytes of verified chunks held for an in-order reader


def _is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost`` (a name that is not an
    address counts as remote: its peers are dialled, loopback ones are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Offsets in Linux's struct tcp_info (linux/tcp.h, since 4.1/4.2): u64 counters.
_TCP_INFO_BYTES_ACKED = 120
_TCP_INFO_BYTES_RECEIVED = 128


def connection_bytes(fd: int) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) on a TCP connection, as
    the kernel counts them (frames included), or None if the OS cannot say."""
    if fd < 0:
        return None
    sock = socket.socket(fileno=fd)  # a view of the session's descriptor ...
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_RECEIVED + 8)
    except OSError:
        return None
    finally:
        sock.detach()  # ... that must not close it
    if len(raw) < _TCP_INFO_BYTES_RECEIVED + 8:
        return None
    acked = int.from_bytes(raw[_TCP_INFO_BYTES_ACKED : _TCP_INFO_BYTES_ACKED + 8], sys.byteorder)
    received = int.from_bytes(raw[_TCP_INFO_BYTES_RECEIVED:], sys.byteorder)
    return acked, received


class NodeLink(Protocol):
    """What a content needs from its node."""

    identity: Identity
    tracker_address: tuple[str, int]
    port: int  # where the node listens (0: it does not)
    up_limiter: RateLimiter
    down_limiter: RateLimiter
    upload_turns: UploadTurns

    async def announce(
        self, cid: bytes, event: str, bits: bytes, want: int = 50
    ) -> Peers | None: ...

    async def connect_peer(self, content: Content, ip: str, port: int, key: bytes) -> None: ...


class BufferPool:
    """Preallocated chunk buffers, bounded: the reader waits when all are busy."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._sem = trio.Semaphore(count)

    async def acquire(self) -> mmap.mmap:
        await self._sem.acquire()
        # Most recently released first: its pages are still warm in the cache.
        return self._free.pop() if self._free else aligned_buffer(self.size)

    def release(self, buf: mmap.mmap) -> None:
        self._free.append(buf)
        self._sem.release()

    def detach(self) -> None:
        """A buffer leaves the pool (held for a reader): its place is free for another."""
        self._sem.release()

    def reattach(self, buf: mmap.mmap) -> None:
        """A detached buffer is done with: kept for reuse. (Buffers are made only
        when none is free, so there are never more than the pool's ``count``
        plus the most ever detached at once.)"""
        self._free.append(buf)


class Content:
    """Everything one node does about one content id."""

    def __init__(self, node: NodeLink, manifest: Manifest, source: SourceFile | ChunkStore) -> None:
        self.node = node
        self.manifest = manifest
        # The MANIFEST frame, encoded once for every connection that asks.
        self.manifest_frame = encode_message(ManifestResponse(manifest.encode()))
        self.info = info = manifest.info
        self.content_id = manifest.content_id
        self.source = source
        self.origin = isinstance(source, SourceFile)
        now = trio.current_time()
        self.engine = ContentEngine(
            size=info.size,
            chunk_size=info.chunk_size,
            have=source.have,
            my_key=node.identity.public_key,
            origin=self.origin,
            now=now,
            source_ready=self._source_ready,
        )
        self.engine.down_limit = node.down_limiter.rate
        self.engine.tracker_local = _is_loopback(node.tracker_address[0])
        self.engine.listen_port = node.port
        chunk = max(1, min(info.chunk_size, info.size or 1))
        self.buffers = BufferPool(chunk, max(2, BUFFER_BUDGET // chunk))
        self.bytes_from: dict[str, int] = {}
        self.peers_seen = 0  # connections that completed a handshake, ever
        self.completed = trio.Event()
        if self.engine.complete:
            self.completed.set()
        self.nursery: trio.Nursery
        self._tracker_wake = trio.Event()
        self._rechecking = False
        self._stored = trio.Event()
        # Verified chunks kept in their receive buffers for an in-order reader
        # (see hold): index -> buffer, for indexes in [_hold_from, _hold_end).
        self._held: dict[int, mmap.mmap] = {}
        self._hold_from = self._hold_end = 0
        # (time, downloaded, uploaded) each tick over the last RATE_SPAN s: rates.
        self._samples: deque[tuple[float, int, int]] = deque()
        self.started_at = now
        self.ended = trio.Event()  # set by the node once this content has stopped

    # --- what the app layer reads ----------------------------------------------
    @property
    def sessions(self) -> list[PeerSession]:
        """The registered sessions (one per route)."""
        return list(self.engine.by_route.values())  # type: ignore[arg-type]

    @property
    def have(self) -> bytearray:
        return self.source.have

    @property
    def have_bytes(self) -> int:
        return self.engine.have_bytes()

    @property
    def downloaded(self) -> int:
        return self.engine.downloaded

    @property
    def uploaded(self) -> int:
        return self.engine.uploaded

    @property
    def hash_failures(self) -> int:
        return self.engine.hash_failures

    @property
    def tracker_peers(self) -> int:
        return self.engine.tracker_peers

    def rates(self) -> tuple[float, float]:
        """Payload bytes/s received and sent over the last few seconds."""
        samples = self._samples
        if len(samples) < 2:
            return 0.0, 0.0
        (t0, down0, up0), (t1, down1, up1) = samples[0], samples[-1]
        span = max(t1 - t0, 1e-9)
        return (down1 - down0) / span, (up1 - up0) / span

    def tracker_changed(self) -> None:
        """A new tracker connection: announce ``started`` again, now."""
        self.engine.tracker_changed()
        self._tracker_wake.set()

    # --- carrying out the engine's actions -----------------------------------
    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                action.peer.send_control(action.message)  # type: ignore[attr-defined]
            elif isinstance(action, SendHave):
                action.peer.announce_have(action.index)  # type: ignore[attr-defined]
            elif isinstance(action, Close):
                session = action.peer
                assert isinstance(session, PeerSession)
                if action.abort:
                    log.info("dropping peer %s: %s", session.name, action.reason)
                    session.abort()
                else:
                    session.close(action.reason)
            elif isinstance(action, Dial):
                if not self._spawn(self._connect_one, action.ip, action.port, action.route):
                    self.engine.dial_ended(action.route, trio.current_time())
        if self.engine.complete and not self.completed.is_set():
            self.completed.set()
        if self.engine.announce_sooner:
            self._tracker_wake.set()

    # --- running ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce, connect, time out requests; until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                nursery.start_soon(self._tracker_loop)
                nursery.start_soon(self._ticker)
        finally:
            with trio.CancelScope(shield=True):
                await self._announce_stopped()
                if isinstance(self.source, ChunkStore):
                    await trio.to_thread.run_sync(self.source.flush_state_sync)

    def admit(
        self, stream: Stream, conn: PeerConnection, hello: Hello, *, initiated: bool
    ) -> PeerSession | None:
        """A session for a connection whose handshake is done, or None if it
        is not wanted (a banned route, ourselves, the losing duplicate). The
        caller then runs it with :meth:`run_session`. Sessions and bans are
        per *route*, the proven key at the remote address (docs/PROTOCOL.md)."""
        node = self.node
        session = PeerSession(
            self,
            stream,
            conn,
            hello,
            initiated=initiated,
            turns=node.upload_turns,
            up_limiter=node.up_limiter,
            down_limiter=node.down_limiter,
        )
        verdict, actions = self.engine.attach(
            session,
            session.route,
            initiated=initiated,
            now=trio.current_time(),
            listen=session.listen,
            local_ip=session.local_ip,
        )
        if verdict == "refused":
            return None
        if verdict == "ok":
            self.peers_seen += 1
            log.info("connected to peer %s (%s)", session.name, "out" if initiated else "in")
        # "full": the session runs only to deliver the GOODBYE saying why.
        self.apply(actions)
        return session

    async def run_session(self, session: PeerSession) -> None:
        """Run a session returned by :meth:`admit` until it ends."""
        try:
            await session.run()
        finally:
            self.apply(self.engine.detach(session, trio.current_time()))

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start a task in this content's nursery; False once the content has
        stopped (its sessions may still deliver a payload or two meanwhile)."""
        try:
            self.nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals"
            return False
        return True

    # --- events from sessions --------------------------------------------------
    def on_message(self, session: PeerSession, event: Event) -> None:
        """A message from the remote that the engine decides about."""
        engine, now = self.engine, trio.current_time()
        if isinstance(event, Have):
            self.apply(engine.on_have(session, event.indices, now))
        elif isinstance(event, Request):
            queued, actions = engine.on_request(
                session, (event.index, event.offset, event.length), now
            )
            self.apply(actions)
            if queued:
                session.kick()
        elif isinstance(event, Cancel):
            engine.on_cancel(session, (event.index, event.offset, event.length))
        elif isinstance(event, Bitfield):
            self.apply(engine.on_bitfield(session, event.bits, now))
        elif isinstance(event, Reject):
            req = (event.index, event.offset, event.length)
            self.apply(engine.on_reject(session, req, event.reason, now))
        elif isinstance(event, Pex):
            self.apply(engine.on_pex(session, event.added, now))

    def on_payload(self, session: PeerSession, req: tuple[int, int, int], buf: mmap.mmap) -> None:
        """A DATA payload arrived whole in ``buf`` (which this takes over)."""
        if not self.engine.on_payload(session, req, trio.current_time()):
            self.buffers.release(buf)
            return
        # Verification runs in the content's nursery: a session that ends
        # meanwhile must not throw away a chunk that fully arrived.
        if not self._spawn(self._store_chunk, session, req[0], buf, req[2]):
            self.buffers.release(buf)  # the content has stopped: nothing to store it for

    def _source_ready(self) -> bool:
        src = self.source
        return not isinstance(src, SourceFile) or not (src.suspect or src.moved())

    def segments(
        self, index: int, offset: int, length: int
    ) -> Generator[tuple[int, int, int], None, None]:
        """``(descriptor, position, length)`` pieces of a chunk range, for
        ``sendfile`` (one piece for a file; one per file spanned in a tree)."""
        return self.source.segments(index, offset, length)

    async def _store_chunk(
        self, session: PeerSession, index: int, buf: mmap.mmap, length: int
    ) -> None:
        """Verify a received chunk, write it, and tell the engine."""
        store = self.source
        kept = False
        try:
            if not isinstance(store, ChunkStore) or store.have[index]:
                return
            view = memoryview(buf)[:length]
            # One trip to a worker thread: hash, then (if good) positional write.
            good = await trio.to_thread.run_sync(self._verify_and_write, store, index, view)
            if not good:
                log.warning(
                    "banned peer %s for this download: chunk %d it sent failed its hash",
                    session.name,
                    index,
                )
                now = trio.current_time()
                self.apply(self.engine.chunk_corrupt(session, session.route, index, now))
                return
            if store.have[index]:
                # Another copy (endgame) was stored while this one was hashed:
                # count, announce and finish it once only.
                return
            store.mark_have(index)
            if self._hold_from <= index < self._hold_end:
                self._held[index] = buf  # verified and written: the reader's now
                self.buffers.detach()
                kept = True
        finally:
            if not kept:
                self.buffers.release(buf)
        self.bytes_from[session.name] = self.bytes_from.get(session.name, 0) + length
        self.apply(self.engine.chunk_stored(session, index, length, trio.current_time()))
        stored, self._stored = self._stored, trio.Event()
        stored.set()

    def next_stored(self) -> trio.Event:
        """An event set when the next chunk is verified and written."""
        return self._stored

    def hold(self, start: int, count: int) -> None:
        """Keep chunks ``start .. start + count - 1`` in their receive buffers
        once verified and written, for an in-order reader (``-o -``) to take
        (:meth:`take_held`) instead of reading them back from the disk.

        Held buffers leave the pool (receiving keeps its whole budget);
        ``count`` is capped at :data:`HOLD_BUDGET` bytes of chunks, and those
        held below ``start`` are dropped. ``hold(0, 0)`` ends it.
        """
        count = max(0, min(count, HOLD_BUDGET // self.buffers.size))
        self._hold_from, self._hold_end = start, start + count
        for index in [i for i in self._held if not start <= i < start + count]:
            self.buffers.reattach(self._held.pop(index))

    def take_held(self, index: int) -> mmap.mmap | None:
        """Chunk ``index``'s verified bytes (the first ``chunk_length`` bytes of
        the buffer), if held. The caller owns the buffer: it hands it back
        with :meth:`done_with` once nothing reads it any more (or drops it)."""
        return self._held.pop(index, None)

    def done_with(self, buf: mmap.mmap) -> None:
        """A buffer from :meth:`take_held` is no longer used."""
        self.buffers.reattach(buf)

    def _verify_and_write(self, store: ChunkStore, index: int, view: memoryview) -> bool:
        """Worker thread: hash the chunk; write it only if it matches."""
        if hash_chunk(self.info.algo, view) != self.info.chunk_hash(index):
            return False
        if not store.have[index]:  # another copy may have won the race (endgame)
            store.write_chunk_sync(index, view)
        return True

    async def _ticker(self) -> None:
        """The engine's clock; resume-state flushes."""
        last_flush = trio.current_time()
        while True:
            await trio.sleep(TICK)
            now = trio.current_time()
            self.engine.down_limit = self.node.down_limiter.rate
            self.apply(self.engine.tick(now))
            self._samples.append((now, self.engine.downloaded, self.engine.uploaded))
            while now - self._samples[0][0] > RATE_SPAN:
                self._samples.popleft()
            store = self.source
            if isinstance(store, SourceFile) and not self._rechecking and store.moved():
                self._rechecking = True
                self._spawn(self._recheck_source, store)
            if isinstance(store, ChunkStore) and now - last_flush >= STATE_FLUSH_EVERY:
                last_flush = now
                await trio.to_thread.run_sync(store.flush_state_sync)

    async def _recheck_source(self, source: SourceFile) -> None:
        """The shared file's size or mtime moved: serve again only if its bytes
        still match; else end this content ("source changed")."""
        log.info("%s changed on disk; checking it against the manifest", source.path)
        if await trio.to_thread.run_sync(source.rehash_sync):
            log.info("%s still matches what was shared: serving it again", source.path)
            self._rechecking = False
            return
        raise StorageError(
            f"source changed: {source.path} no longer matches what was shared; "
            "nothing more is served from it (share it again for a new id)"
        )

    # --- tracker -------------------------------------------------------------------
    async def _tracker_loop(self) -> None:
        engine = self.engine
        backoff = 1.0
        while True:
            now = trio.current_time()
            event = engine.announce_due(now)
            if event is None:
                wake = engine.announce_wake(now)
                self._tracker_wake = trio.Event()
                with trio.move_on_after(max(wake - now, 0.0)):
                    await self._tracker_wake.wait()
                continue
            try:
                bits, want = engine.bitfield(), engine.announce_want()
                peers = await self.node.announce(self.content_id, event, bits, want)
                # The tracker that answered (it may have failed over): loopback
                # peers it names are ours to dial only if it is on loopback.
                engine.tracker_local = _is_loopback(self.node.tracker_address[0])
            except TrackerError as exc:
                log.info("tracker announce failed (%s); retrying in %.0f s", exc, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self.apply(engine.announced(event, trio.current_time(), peers))

    def dial(self, ip: str, port: int) -> None:
        """Connect to a peer the user named (``peer get --peer``), key unknown yet."""
        self.apply(self.engine.dial_direct(ip, port))

    async def _connect_one(self, ip: str, port: int, route: tuple[bytes, str]) -> None:
        try:
            await self.node.connect_peer(self, ip, port, route[0])
        except PeerError as exc:
            log.info("could not use peer %s:%d: %s", ip, port, exc)
        finally:
            self.engine.dial_ended(route, trio.current_time())
            self.apply(())

    async def _announce_stopped(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.node.announce(self.content_id, "stopped", self.engine.bitfield())
            except PeerError:
                pass
