"""One content in the swarm: its sessions, its picker, its tracker announces.

Theory of operation
-------------------
A :class:`Content` is what a node knows and does about one content id: the
signed manifest, where the bytes live (a :class:`~peerd.content.store.SourceFile`
when sharing a complete file, a :class:`~peerd.content.store.ChunkStore` while
downloading), the :class:`~peerd.engine.picker.PiecePicker` while chunks are
missing, and one :class:`~peerd.node.session.PeerSession` per connected peer.

Downloading is event driven: whenever something changes (a bitfield or HAVE
arrives, a chunk is stored, a request is rejected or times out), the picker
tops up each interested session to its pipeline *depth*. The depth follows
the peer's measured rate: enough requests to cover about a quarter second of
transfer at that rate, at least two, at most :data:`MAX_DEPTH`.

A received chunk is hashed in a worker thread (blake3 and hashlib release the
GIL), then written at its offset; only then is it marked as held, announced
to every connected peer (HAVE) and, batched, to the tracker. A chunk that
fails its hash bans the peer that sent it for this download.

The tracker loop announces ``started``, then ``progress`` at most every
:data:`PROGRESS_EVERY` seconds while chunks arrive, ``completed`` once, and
``periodic`` at the interval the tracker asks; every answer may reveal new
peers to connect to. A tracker that is down is retried with backoff while
transfers with known peers go on.
"""

from __future__ import annotations

import logging
import math
import mmap
import random
from typing import TYPE_CHECKING

import trio

from peerd.content.hashing import hash_chunk
from peerd.content.manifest import Manifest
from peerd.content.store import ChunkStore, SourceFile, aligned_buffer
from peerd.engine.picker import PiecePicker, pipeline_depth, swarm_counts
from peerd.engine.scheduling import (
    BUSY_BACKOFF,
    QUEUE_WAIT,
    choose_dials,
    next_announce_delay,
    tracker_want,
)
from peerd.engine.upload_queue import Choker
from peerd.errors import PeerError, RemoteProtocolError, TrackerError
from peerd.node.session import MAX_QUEUED_UPLOADS, PeerSession
from peerd.wire import (
    Bitfield,
    Hello,
    ManifestResponse,
    PeerConnection,
    Reject,
    bits_from_flags,
    encode_message,
    flags_from_bits,
    validate_bits,
)

if TYPE_CHECKING:
    from peerd.node.node import Node
    from peerd.transport import Stream

__all__ = ["BufferPool", "Content"]

log = logging.getLogger("peerd.node.driver")

PROGRESS_EVERY = 2.0
STATE_FLUSH_EVERY = 1.0
REQUEST_TIMEOUT = 15.0
STALL_TIMEOUT = 20.0
MAX_PEERS = 50  # connections a downloader aims for (it dials up to this many)
MAX_SESSIONS = 200  # connections one content takes in all (docs/PROTOCOL.md, "Limits")
EVICTABLE_AFTER = 10.0  # a session that moved no payload this long may make room
MAX_WANT = 200  # the most peers ANNOUNCE may ask for (docs/PROTOCOL.md)
BUFFER_BUDGET = 32 * 1024 * 1024  # bytes of chunk buffers per download


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


class Content:
    """Everything one node does about one content id."""

    def __init__(self, node: Node, manifest: Manifest, source: SourceFile | ChunkStore) -> None:
        self.node = node
        self.manifest = manifest
        self.manifest_bytes = manifest.encode()
        # The MANIFEST frame, encoded once for every connection that asks.
        self.manifest_frame = encode_message(ManifestResponse(self.manifest_bytes))
        self.info = manifest.info
        self.content_id = manifest.content_id
        self.source = source
        n = self.info.num_chunks
        self.picker: PiecePicker | None = None
        if isinstance(source, ChunkStore) and not source.complete:
            self.picker = PiecePicker(n, source.have)
        chunk = max(1, min(self.info.chunk_size, self.info.size or 1))
        self.buffers = BufferPool(chunk, max(2, BUFFER_BUDGET // chunk))
        # Upload policy: queue bounds, fresh-first order, and — when we publish
        # a complete file — super-seeding (every chunk out once before any twice).
        origin = isinstance(source, SourceFile)
        self.origin = origin
        # A leecher refuses (busy) what waited QUEUE_WAIT in its queue, so the
        # requester asks a neighbour that got the chunk since (scheduling.py).
        self.choker = Choker(
            max_queued=MAX_QUEUED_UPLOADS,
            super_seed=n if origin else 0,
            max_wait=0.0 if origin else QUEUE_WAIT,
        )
        # Routes (proven key, remote address): connections, dials, bans.
        self.sessions: dict[tuple[bytes, str], PeerSession] = {}
        self.connecting: set[tuple[bytes, str]] = set()
        self.banned: set[tuple[bytes, str]] = set()
        self.bytes_from: dict[str, int] = {}
        self.hash_failures = 0
        self.uploaded = 0
        self.downloaded = 0
        self.completed = trio.Event()
        if self.picker is None:
            self.completed.set()
        self.nursery: trio.Nursery
        self._progress_pending = False
        self._tracker_wake = trio.Event()
        self.tracker_peers = 0
        self.started_at = trio.current_time()
        self._rng = random.Random()

    # --- state helpers ---------------------------------------------------------
    @property
    def have(self) -> bytearray:
        return self.source.have

    @property
    def have_bytes(self) -> int:
        info, have = self.info, self.have
        full = sum(have) * info.chunk_size
        if info.num_chunks and have[-1]:
            full -= info.num_chunks * info.chunk_size - info.size
        return full

    def bitfield(self) -> bytes:
        return bits_from_flags(self.have)

    def wake_tracker_loop(self) -> None:
        """Let the tracker loop look again now (e.g. the tracker connection is new)."""
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
        """Register a session for a connection whose handshake is done, or None
        if it is not wanted (a banned route, ourselves, the losing duplicate).
        The caller then runs it with :meth:`run_session`.

        Sessions, bans and duplicates are per *route*: the proven key at the
        remote address. A ban never lands on a key wherever it connects from:
        the bytes that failed came over a channel only the handshake
        authenticated, so a relay in the middle could have changed them.
        """
        key = hello.key
        route = (key, stream.peer_address[0])
        if route in self.banned or key == self.node.identity.public_key:
            return None
        session = PeerSession(self, stream, conn, hello, initiated=initiated)
        old = self.sessions.get(route)
        if old is not None:
            # Both sides connected to each other: keep the connection opened by
            # the smaller key, so both ends make the same choice; two opened by
            # the same side: the newer (the opener gave the old one up).
            mine = self.node.identity.public_key
            opener_new = mine if initiated else key
            opener_old = mine if old.initiated else key
            if opener_new > opener_old:
                return None
            old.close("duplicate: a newer connection replaces this one")
        elif len(self.sessions) >= MAX_SESSIONS and not self._evict_idle():
            session.close("too-many: this content has all the peers it can take")
            return session  # runs only to deliver the GOODBYE; never registered
        log.info("connected to peer %s (%s)", session.name, "out" if initiated else "in")
        self.sessions[route] = session
        self.choker.add_peer(session)
        session.send_control(Bitfield(self.bitfield()))
        return session

    def _evict_idle(self) -> bool:
        """Close the session idle longest, if idle long enough to be evicted."""
        now = trio.current_time()
        idle = [s for s in self.sessions.values() if now - s.last_useful_at >= EVICTABLE_AFTER]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_useful_at)
        log.info("evicting idle peer %s for a newcomer", victim.name)
        self._forget(victim)
        victim.close("too-many: evicted for a newcomer")
        return True

    def _forget(self, session: PeerSession) -> None:
        if self.sessions.get(session.route) is session:
            del self.sessions[session.route]

    async def run_session(self, session: PeerSession) -> None:
        """Run a session returned by :meth:`admit` until it ends."""
        registered = self.sessions.get(session.route) is session
        try:
            await session.run()
        finally:
            if registered:
                self.choker.remove_peer(session)
                self._forget(session)
                if self.picker is not None:
                    self.picker.remove_peer(session)
                    session.requests.clear()
                    self._fill_all()

    # --- events from sessions --------------------------------------------------
    def on_bitfield(self, session: PeerSession, bits: bytes) -> None:
        """The remote's one BITFIELD (the wire refuses a second)."""
        n = self.info.num_chunks
        try:
            validate_bits(n, bits)
        except RemoteProtocolError as exc:
            session.close(f"protocol-error: {exc}")
            return
        session.remote.set_bitfield(bits)
        if self.picker is not None:
            self.picker.add_peer(session, flags_from_bits(bits, n))
            self._fill(session)

    def on_have(self, session: PeerSession, indices: tuple[int, ...]) -> None:
        n = self.info.num_chunks
        if max(indices) >= n:
            session.close(f"protocol-error: HAVE of chunk {max(indices)}, the content has {n}")
            return
        valid = indices
        session.remote.add(valid)
        if self.picker is None:
            return
        for i in valid:
            self.picker.peer_has(session, i)
        self._fill(session)

    def on_reject(self, session: PeerSession, index: int, reason: str) -> None:
        if self.picker is None:
            return
        if reason == "busy":
            # Ask someone else now, this peer not again for a while. The
            # released chunk is news only to connections whose remote holds
            # it (this one included); the others top up on their own events.
            self.picker.refuse(session, index, trio.current_time() + BUSY_BACKOFF)
            for s in self.picker.holding(list(self.sessions.values()), index):
                assert isinstance(s, PeerSession)
                self._fill(s)
            return
        self.picker.cancel(session, index)
        flags = self.picker.peer_flags(session)
        if reason == "missing" and flags is not None and flags[index]:
            # It advertised a chunk it does not have: stop asking it for that one.
            self.picker.remove_peer(session)
            flags[index] = 0
            self.picker.add_peer(session, flags)
        self._fill_all()

    def check_request(
        self, session: PeerSession, index: int, offset: int, length: int
    ) -> str | None:
        """Why a remote's request cannot be served, or None."""
        if session.route in self.banned:
            return "banned"
        if not 0 <= index < self.info.num_chunks:
            return "invalid"
        chunk_len = min(self.info.chunk_size, self.info.size - index * self.info.chunk_size)
        if length < 1 or offset + length > chunk_len:
            return "invalid"
        if not self.can_serve(index):
            return "missing"
        return None

    def can_serve(self, index: int) -> bool:
        src = self.source
        if isinstance(src, SourceFile) and not src.unchanged():
            return False
        return bool(src.have[index])

    def on_uploaded(self, session: PeerSession, nbytes: int) -> None:
        self.uploaded += nbytes

    async def store_chunk(
        self, session: PeerSession, index: int, buf: mmap.mmap, length: int
    ) -> None:
        """Verify a received chunk, write it, and tell everyone (runs in our nursery)."""
        picker, store = self.picker, self.source
        try:
            if picker is None or not isinstance(store, ChunkStore) or store.have[index]:
                return
            view = memoryview(buf)[:length]
            # One trip to a worker thread: hash, then (if good) positional write.
            good = await trio.to_thread.run_sync(self._verify_and_write, store, index, view)
            if not good:
                self._on_hash_failure(session, index)
                return
            if store.have[index]:
                # Another copy (endgame) was stored while this one was hashed:
                # count, announce and finish it once only.
                return
            store.mark_have(index)
        finally:
            self.buffers.release(buf)
        self.downloaded += length
        self.bytes_from[session.name] = self.bytes_from.get(session.name, 0) + length
        losers = picker.chunk_received(session, index)
        for other in losers:
            assert isinstance(other, PeerSession)
            off, ln = 0, length
            other.cancel_request(index, off, ln)
        for s in picker.lacking(self.sessions.values(), index):  # no HAVE to a holder
            assert isinstance(s, PeerSession)
            s.announce_have(index)
        self._progress_pending = True
        if picker.complete:
            await self._finish()
        else:
            self._fill_all()

    def _verify_and_write(self, store: ChunkStore, index: int, view: memoryview) -> bool:
        """Worker thread: hash the chunk; write it only if it matches."""
        if hash_chunk(self.info.algo, view) != self.info.chunk_hash(index):
            return False
        if not store.have[index]:  # another copy may have won the race (endgame)
            store.write_chunk_sync(index, view)
        return True

    def _on_hash_failure(self, session: PeerSession, index: int) -> None:
        self.hash_failures += 1
        self.banned.add(session.route)
        log.warning(
            "banned peer %s for this download: chunk %d it sent failed its hash",
            session.name,
            index,
        )
        if self.picker is not None:
            self.picker.cancel(session, index)
            self.picker.remove_peer(session)
        session.close(f"bad-data: chunk {index} failed its hash")
        self._fill_all()

    async def _finish(self) -> None:
        store = self.source
        assert isinstance(store, ChunkStore)
        self.picker = None
        for s in self.sessions.values():
            for req in list(s.requests):
                s.cancel_request(*req)
        self.completed.set()
        self._tracker_wake.set()

    # --- requesting --------------------------------------------------------------
    def _timeout(self) -> float:
        limit = self.node.down_limiter.rate
        if limit is None:
            return REQUEST_TIMEOUT
        inflight = sum(len(s.requests) for s in self.sessions.values()) * self.info.chunk_size
        return REQUEST_TIMEOUT + inflight / limit

    def _fill(self, session: PeerSession) -> None:
        picker = self.picker
        if picker is None or session.closing:
            return
        chunk = self.info.chunk_size
        session.depth = pipeline_depth(session.rate, chunk)
        want = session.depth - len(session.requests)
        if want <= 0:
            return
        now = trio.current_time()
        picker.set_rate(session, session.rate)  # the tail prefers fast holders
        for index in picker.pick(session, want, now, self._timeout()):
            off = index * chunk
            session.request(index, 0, min(chunk, self.info.size - off))

    def _fill_all(self) -> None:
        for s in list(self.sessions.values()):
            self._fill(s)

    async def _ticker(self) -> None:
        """Request timeouts, stalled peers, resume-state flushes."""
        last_flush = trio.current_time()
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            for peer, req in self.choker.overdue(now):
                if isinstance(peer, PeerSession):
                    peer.send_control(Reject(*req, "busy"))
            picker = self.picker
            if picker is not None:
                by_name = {id(s): s for s in self.sessions.values()}
                # A chunk only this peer has is not re-asked of it: renewed.
                for peer, index in picker.expired(now, self._timeout()):
                    picker.cancel(peer, index)
                    s = by_name.get(id(peer))
                    if s is not None:
                        s.timeouts += 1
                        s.cancel_request(index, 0, self._chunk_len(index))
                for s in list(self.sessions.values()):
                    if s.requests and now - s.last_payload_at > STALL_TIMEOUT:
                        log.info("dropping peer %s: no data for %.0f s", s.name, STALL_TIMEOUT)
                        s.abort()
                self._fill_all()
            store = self.source
            if isinstance(store, ChunkStore) and now - last_flush >= STATE_FLUSH_EVERY:
                last_flush = now
                await trio.to_thread.run_sync(store.flush_state_sync)

    def _chunk_len(self, index: int) -> int:
        return min(self.info.chunk_size, self.info.size - index * self.info.chunk_size)

    # --- tracker -------------------------------------------------------------------
    async def _tracker_loop(self) -> None:
        event = "started"
        backoff = 1.0
        interval = 30.0
        last = -math.inf
        completed_sent = self.picker is None
        # Downloading with no peer at all (none known yet, or all gone): ask the
        # tracker again soon, backing off, instead of waiting a whole interval.
        lonely_retry = 1.0
        while True:
            try:
                room = MAX_PEERS - len(self.sessions) - len(self.connecting)
                want = min(MAX_WANT, tracker_want(max(room, 1)))
                peers = await self.node.announce(self.content_id, event, self.bitfield(), want)
            except TrackerError as exc:
                log.info("tracker announce failed (%s); retrying in %.0f s", exc, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            epoch = self.node.tracker_epoch
            last = trio.current_time()
            self._progress_pending = False
            if peers is not None:
                interval = max(1.0, float(peers.interval))
                self.tracker_peers = len(peers.peers)
                if self.picker is not None and peers.availability:
                    self.picker.set_swarm_availability(swarm_counts(peers.availability))
                self._connect_to(peers.peers)
            if event == "completed":
                completed_sent = True
            # Wait for: the interval, batched progress, or completion.
            event = "periodic"
            deadline = last + next_announce_delay(
                len(self.sessions), MAX_PEERS, interval, downloading=self.picker is not None
            )
            while True:
                now = trio.current_time()
                if self.picker is None and not completed_sent:
                    event = "completed"
                    break
                if self._progress_pending and now - last >= PROGRESS_EVERY:
                    event = "progress"
                    break
                if now >= deadline:
                    break
                if self.node.tracker_epoch != epoch:
                    event = "started"  # a new tracker connection: maybe a new tracker
                    break
                alone = self.picker is not None and not self.sessions and not self.connecting
                if alone and now - last >= lonely_retry:
                    lonely_retry = min(lonely_retry * 2, interval, 30.0)
                    break
                if not alone:
                    lonely_retry = 1.0
                wait = min(deadline - now, PROGRESS_EVERY)
                if alone:
                    wait = min(wait, last + lonely_retry - now)
                self._tracker_wake = trio.Event()
                with trio.move_on_after(max(wait, 0.0)):
                    await self._tracker_wake.wait()

    def _connect_to(self, entries: tuple) -> None:  # type: ignore[type-arg]
        if self.picker is None:
            return  # seeders wait for leechers to connect
        mine = self.node.identity.public_key
        candidates = [
            entry
            for entry in entries
            if entry.key != mine
            and (entry.key, entry.ip) not in self.sessions
            and (entry.key, entry.ip) not in self.connecting
            and (entry.key, entry.ip) not in self.banned
            and entry.port != 0
        ]
        room = MAX_PEERS - len(self.sessions) - len(self.connecting)
        # A random subset: in a flash crowd everyone is told the same first
        # peers, and dialling them all would make a few hubs.
        for entry in choose_dials(candidates, room, self._rng):
            route = (entry.key, entry.ip)
            self.connecting.add(route)
            self.nursery.start_soon(self._connect_one, entry.ip, entry.port, route)

    def dial(self, ip: str, port: int) -> None:
        """Connect to a peer the user named (``peer get --peer``), key unknown yet."""
        placeholder = (f"direct:{port}".encode(), ip)
        if placeholder not in self.connecting:
            self.connecting.add(placeholder)
            self.nursery.start_soon(self._connect_one, ip, port, placeholder)

    async def _connect_one(self, ip: str, port: int, route: tuple[bytes, str]) -> None:
        try:
            await self.node.connect_peer(self, ip, port, route[0])
        except PeerError as exc:
            log.info("could not use peer %s:%d: %s", ip, port, exc)
        finally:
            self.connecting.discard(route)

    async def _announce_stopped(self) -> None:
        with trio.move_on_after(2):
            try:
                await self.node.announce(self.content_id, "stopped", self.bitfield())
            except PeerError:
                pass
