"""The tracker's serve loop: a per-connection owner task, one dispatcher for requests.

Each connection's task owns its stream: admission (connection limits),
the CHALLENGE/AUTH handshake, the idle timeout and the close. Once
authenticated, the stream is lent to the transport's ``Mux``, and one
dispatcher task answers every connection's requests in order without a task
switch per request: ANNOUNCE, SCRAPE and cached GET_MANIFEST on the spot
(``SwarmIndex.announce_frame`` gives a whole PEERS frame); a request over
its rate limit or needing the manifest database waits in a task of its own
while its connection is paused. Everything a client can make the tracker
hold is charged to a budget (``_budget.py``). Why, and the limits in full:
docs/ARCHITECTURE.md, "The tracker's serve loop".

Error codes sent in ERROR frames: ``too-many``, ``auth-failed``,
``handshake-timeout``, ``bad-frame``, ``bad-request``, ``bad-manifest``,
``not-found``, ``ambiguous-prefix``, ``limit``, ``internal``.
"""

from __future__ import annotations

import logging
import secrets
import signal
import sys
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from peerd.content.identity import peer_home, verify_signature
from peerd.content.manifest import Manifest
from peerd.errors import (
    ContentError,
    PeerError,
    ProtocolError,
    RemoteProtocolError,
    StorageError,
    TrackerError,
    TransportError,
)
from peerd.node.ratelimit import TokenBucket
from peerd.transport import Mux, Stream, Transport, get_transport
from peerd.wire import (
    MAX_BODY,
    NEED_DATA,
    PROTOCOL_VERSION,
    Announce,
    Auth,
    Challenge,
    Closed,
    Error,
    Event,
    FrameType,
    GetManifest,
    Ok,
    PeerEntry,
    Peers,
    Publish,
    Resolve,
    Resolved,
    Scrape,
    ScrapeResult,
    ScrapeStat,
    TrackerManifest,
    TrackerServerConnection,
    TrackerState,
)

from ._addresses import recorded_address
from ._budget import Budget, Intake
from .store import Backend, Manifests, open_backend, store_url

__all__ = [
    "AUTH_CONTEXT",
    "DEFAULT_PORT",
    "TrackerLimits",
    "default_data_dir",
    "run_tracker",
    "serve_tracker",
]

log = logging.getLogger("tracker")
COUNTS_EVERY = 60.0  # seconds per INFO line counting publishes and announces

DEFAULT_PORT = 7070
AUTH_CONTEXT = b"peer-tracker-auth-v1\0"
_SWEEP_SECONDS = 5.0
_RECV_SIZE = 65536
_UNSENT_LIMIT = 1 << 20  # replies queued for a client that does not read: stop reading it
_PIECE = 256 * 1024  # a larger reply is queued in pieces of this size as the client drains
_DRAIN_SECONDS = 1.0  # a closing connection's last replies get this long to leave
_DRAIN_POLL = 0.005  # how often a paused client's queue is looked at
# The largest frame a client may send or be sent whole (PUBLISH / MANIFEST): every
# memory share is at least this, so one such message always fits.
_LARGEST_FRAME = 5 + max(MAX_BODY[FrameType.PUBLISH], MAX_BODY[FrameType.TRACKER_MANIFEST])
MiB = 1 << 20


@dataclass(frozen=True)
class TrackerLimits:
    """Everything a client can make the tracker spend, bounded.

    ``max_memory`` is split (see ``_budget.py``): a quarter for request
    frames being received (a sixteenth per address), an eighth for replies
    queued for clients (``_UNSENT_LIMIT`` per connection), a half for the
    swarm index (an eighth per address), an eighth for encoded manifests
    kept for GET_MANIFEST; every share is at least one largest frame.
    ``max_disk`` bounds the published manifests: an eighth of it per
    publishing key, a quarter per address.
    """

    max_connections: int = 4096
    connections_per_address: int = 64
    messages_per_second: float = 2000.0  # per connection (token bucket rate and burst)
    address_messages_per_second: float = 50_000.0  # all connections of one address
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0  # an authenticated connection silent this long is closed
    idle_grace: float = 10.0  # idle this long, it gives way to a newcomer from its address
    send_timeout: float = 30.0  # a client over its reply budget that takes nothing is closed
    max_contents: int = 100_000
    max_contents_per_peer: int = 1_000
    max_peers_per_content: int = 10_000
    max_memory: int = 1 << 30
    max_disk: int = 4 << 30
    # With a shared store (Redis): peer entries one address may have there,
    # counted in Redis over every tracker (0: max_memory / 8 / 256 bytes).
    shared_entries_per_address: int = 0

    def __post_init__(self) -> None:
        if self.max_memory < 64 * MiB:
            raise ValueError("max_memory must be at least 64 MiB")
        if self.max_disk < MiB:
            raise ValueError("max_disk must be at least 1 MiB")


class _Slot:
    """One admitted connection's place in the per-address count."""

    __slots__ = ("address", "client", "released")

    def __init__(self, address: str) -> None:
        self.address = address
        self.client: _Client | None = None  # once authenticated
        self.released = False


class _Client:
    """One authenticated connection, as the dispatcher sees it."""

    __slots__ = (
        "address",
        "area",
        "bucket",
        "busy",
        "closed",
        "conn",
        "done",
        "intake",
        "key",
        "last",
        "queued",
        "stream",
        "tail",
        "tail_cost",
        "unchecked",
    )

    def __init__(
        self,
        stream: Stream,
        conn: TrackerServerConnection,
        address: str,
        key: bytes,
        bucket: TokenBucket,
        area: TokenBucket,
        intake: Intake,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.address = address
        self.key = key
        self.bucket = bucket  # this connection's message rate
        self.area = area  # shared by every connection from the address
        self.intake = intake  # its input, charged frame by frame
        self.busy = False  # paused: a request is being answered off the hot path, or draining
        self.closed = False  # the owner took the stream back
        self.done = trio.Event()  # the conversation is over (EOF, error, refusal)
        self.last = trio.current_time()  # last input, for the idle timeout
        self.unchecked = 0  # bytes of replies sent since the queue was last looked at
        self.queued = 0  # its replies' charge to the reply budget, as last looked at
        self.tail: memoryview | None = None  # the rest of a large reply, queued as it drains
        self.tail_cost = 0  # what the object behind `tail` costs (0: a shared frame)


class _ManifestFrames:
    """Encoded MANIFEST (38) frames by content id, least recently used out, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._frames: OrderedDict[bytes, bytes] = OrderedDict()
        self._ids: set[int] = set()

    def get(self, content_id: bytes) -> bytes | None:
        frame = self._frames.get(content_id)
        if frame is not None:
            self._frames.move_to_end(content_id)
        return frame

    def put(self, content_id: bytes, frame: bytes) -> None:
        if len(frame) > self.capacity or content_id in self._frames:
            return
        while self.used + len(frame) > self.capacity:
            _, old = self._frames.popitem(last=False)
            self.used -= len(old)
            self._ids.discard(id(old))
        self._frames[content_id] = frame
        self._ids.add(id(frame))
        self.used += len(frame)

    def shares(self, frame: bytes) -> bool:
        """Whether ``frame`` is a cached frame (so queueing it costs no copy)."""
        return id(frame) in self._ids


def default_data_dir() -> Path:
    """``tracker`` in the peer state directory (:func:`peerd.content.identity.peer_home`)."""
    return peer_home() / "tracker"


def _verify_manifest(data: bytes) -> Manifest:
    manifest = Manifest.decode(data)
    manifest.verify()
    return manifest


class _Tracker:
    """Shared state of one running tracker: index, store, limits, budgets, counters."""

    def __init__(
        self,
        backend: Backend,
        limits: TrackerLimits,
        clock: Callable[[], float],
        ttl: float,
        interval: float,
    ) -> None:
        self.store: Manifests = backend.manifests
        self.limits = limits
        self.clock = clock
        memory = limits.max_memory
        self.intake = Budget(max(memory // 4, _LARGEST_FRAME), max(memory // 16, _LARGEST_FRAME))
        self.replies = Budget(max(memory // 8, _LARGEST_FRAME), _UNSENT_LIMIT)
        self.index = backend.index
        self.manifest_frames = _ManifestFrames(max(memory // 8, _LARGEST_FRAME))
        self.interval = max(1, round(interval))
        self.verify_limiter = trio.CapacityLimiter(1)
        self.connections = 0
        self.per_address: defaultdict[str, list[_Slot]] = defaultdict(list)
        self.address_buckets: dict[str, TokenBucket] = {}
        self.mux: Mux | None = None  # set by serve_tracker
        self.nursery: trio.Nursery | None = None  # where off-hot-path answers run
        self.clients: dict[Stream, _Client] = {}
        self._settled_all = -1.0  # when every client's reply charge was last looked at
        # Publishes and announces answered since the last INFO line (_log_counts).
        self.counts = {"announce": 0, "publish": 0}
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- one connection --------------------------------------------------------
    async def handle(self, stream: Stream) -> None:
        address = stream.peer_address[0]
        limits = self.limits
        conn = TrackerServerConnection()
        if len(self.per_address[address]) >= limits.connections_per_address:
            await self._evict_idle(address)
        if (
            self.connections >= limits.max_connections
            or len(self.per_address[address]) >= limits.connections_per_address
        ):
            if not self.per_address[address]:
                del self.per_address[address]
            log.warning("rejected %s: too many connections", address)
            await stream.send_all(conn.send(Error("too-many", "too many connections; retry later")))
            return
        slot = _Slot(address)
        self.connections += 1
        self.per_address[address].append(slot)
        if address not in self.address_buckets:
            rate = limits.address_messages_per_second
            self.address_buckets[address] = TokenBucket(rate, rate, self.clock())
        intake = Intake(self.intake, address)
        try:
            await self._converse(stream, conn, slot, intake)
        except (TransportError, ProtocolError, trio.Cancelled):
            raise
        except Exception:
            # A bug must not take the whole tracker down: log it, drop this client.
            log.exception("internal error serving %s; closing that connection", address)
        finally:
            intake.close()
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.connections -= 1
        slots = self.per_address[slot.address]
        slots.remove(slot)
        if not slots:
            del self.per_address[slot.address]
            del self.address_buckets[slot.address]

    async def _evict_idle(self, address: str) -> None:
        """Make room for a newcomer at the per-address cap: close the longest idle
        authenticated connection of ``address`` if it has been idle ``idle_grace``."""
        now = trio.current_time()
        idle = [
            c
            for s in self.per_address[address]
            if (c := s.client) is not None and not c.done.is_set()
        ]
        if not idle:
            return
        victim = min(idle, key=lambda c: c.last)
        if now - victim.last < self.limits.idle_grace:
            return
        log.info("closing an idle connection from %s to admit a new one", address)
        assert self.mux is not None
        frame = self._refusal(
            victim.conn, address, "too-many", "closed: idle, and a new connection needed the slot"
        )
        if frame and not victim.closed:
            self.mux.send(victim.stream, frame)
        victim.done.set()
        for s in self.per_address[address]:
            if s.client is victim:
                self._release(s)  # its owner task is on its way out
                break
        await trio.lowlevel.checkpoint()

    async def _converse(
        self, stream: Stream, conn: TrackerServerConnection, slot: _Slot, intake: Intake
    ) -> None:
        address = slot.address
        nonce = secrets.token_bytes(32)
        await stream.send_all(conn.send(Challenge(PROTOCOL_VERSION, nonce)))
        try:
            auth: Event | None = None
            with trio.move_on_after(self.limits.handshake_timeout):
                auth = await self._next(stream, conn, intake)
            if auth is None:
                await self._refuse(
                    stream, conn, address, "handshake-timeout", "no AUTH within the time limit"
                )
                return
            if isinstance(auth, Closed):
                return
            assert isinstance(auth, Auth)  # the state machine allows nothing else first
            intake.release(intake.consumed())
            if not verify_signature(auth.key, auth.signature, AUTH_CONTEXT + nonce):
                await self._refuse(
                    stream,
                    conn,
                    address,
                    "auth-failed",
                    "the signature over the challenge does not verify",
                )
                return
            await stream.send_all(conn.send(Ok()))
        except RemoteProtocolError as exc:
            await self._refuse(stream, conn, address, "bad-frame", str(exc))
            return
        await self._serve_requests(stream, conn, slot, auth.key, intake)

    async def _serve_requests(
        self,
        stream: Stream,
        conn: TrackerServerConnection,
        slot: _Slot,
        key: bytes,
        intake: Intake,
    ) -> None:
        """Lend the authenticated stream to the mux until the conversation ends.

        The dispatcher (``dispatch``) answers its requests; this task only
        owns the stream: it enforces the idle timeout, lets the last replies
        drain, and takes the stream back from the mux before it is closed.
        """
        assert self.mux is not None
        address = slot.address
        # Once READY the tracker conversation never leaves READY and every
        # reply type is allowed, so PEERS frames built by the dispatcher need
        # no state-machine step.
        assert conn.state is TrackerState.READY
        rate = self.limits.messages_per_second  # burst: one second's worth
        client = _Client(
            stream,
            conn,
            address,
            key,
            TokenBucket(rate, rate, self.clock()),
            self.address_buckets[address],
            intake,
        )
        self.clients[stream] = client
        slot.client = client
        try:
            self.mux.add(stream)
            self._pump(client)  # AUTH may have come with pipelined requests
            idle = self.limits.idle_timeout
            while not client.done.is_set():
                with trio.move_on_at(client.last + idle):
                    await client.done.wait()
                if not client.done.is_set() and trio.current_time() >= client.last + idle:
                    log.info("closed idle connection from %s", address)
                    return
            # Replies (or the ERROR) queued before the end still go out.
            with trio.move_on_after(_DRAIN_SECONDS):
                while self.mux.unsent(stream) or client.tail is not None:
                    self._top_up(client)
                    await trio.sleep(0.01)
        finally:
            client.closed = True
            client.tail = None
            self.replies.give(client.queued, client)
            client.queued = 0
            del self.clients[stream]
            with trio.CancelScope(shield=True):
                await self.mux.remove(stream)

    # -- the dispatcher: every authenticated connection, one task ---------------
    async def dispatch(self, nursery: trio.Nursery) -> None:
        """Answer every lent stream's requests; slow ones in tasks of ``nursery``."""
        assert self.mux is not None
        self.nursery = nursery
        mux, clients = self.mux, self.clients
        while True:
            batch = await mux.next_batch()
            now = trio.current_time()
            tick = self.clock()  # one reading per batch serves the rate limits
            for stream, data in batch:
                client = clients.get(stream)
                if client is None or client.closed:
                    continue
                client.last = now
                if type(data) is not bytes:
                    client.done.set()  # the connection failed: nothing to answer
                    continue
                try:
                    self._feed(client.conn, client.intake, data)
                except ProtocolError:  # input after EOF: the mux reports EOF once
                    log.exception("internal error serving %s", client.address)
                    client.done.set()
                    continue
                if client.intake.refused:
                    mux.pause(stream)  # nothing after the refused frame is read
                self._pump(client, tick)

    @staticmethod
    def _feed(conn: TrackerServerConnection, intake: Intake, data: bytes) -> None:
        """Give ``conn`` the part of ``data`` that ``intake`` admits (EOF as is)."""
        if not data:  # EOF (never while a refusal holds input: the stream is paused)
            conn.receive_data(data)
            return
        feed = intake.admit(data)
        if feed:
            conn.receive_data(feed)

    def _pump(self, c: _Client, now: float | None = None) -> None:
        """Answer ``c``'s buffered requests until one needs to wait (or none is left).

        ``now`` is the server clock, read if not given.
        """
        try:
            self._pump_unguarded(c, self.clock() if now is None else now)
        except Exception:
            # A bug must not take the whole tracker down: log it, drop this client.
            log.exception("internal error serving %s; closing that connection", c.address)
            c.done.set()

    def _pump_unguarded(self, c: _Client, now: float) -> None:
        mux, conn, stream = self.mux, c.conn, c.stream
        assert mux is not None
        out: list[bytes] = []
        replies = self.replies
        while not c.busy and not c.done.is_set():
            if c.unchecked > _UNSENT_LIMIT // 4 or replies.used > replies.total:
                if out:
                    mux.send(stream, b"".join(out))
                    out.clear()
                if self._must_wait(c):
                    self._stall(c)
                    break
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                out.append(self._refusal(conn, c.address, "bad-frame", str(exc)))
                c.done.set()
                break
            if event is NEED_DATA:
                if not c.intake.refused:
                    break
                # Every request before the refused one is answered: now it.
                out.append(
                    self._refusal(
                        conn,
                        c.address,
                        "limit",
                        f"a {c.intake.refused}-byte request does not fit the tracker's "
                        "memory for requests now; retry later",
                    )
                )
                feed = c.intake.after_refusal()  # its body is dropped as it comes
                if feed:
                    conn.receive_data(feed)
                if not c.intake.refused:
                    mux.resume(stream)
                continue
            if type(event) is Closed:
                c.done.set()
                break
            charge = c.intake.consumed()
            wait = max(c.bucket.take(1.0, now), c.area.take(1.0, now))
            reply = None if wait > 0 else self._answer_now(event, c, now)
            if reply is None:  # rate-limited, or a request that needs an await
                c.busy = True
                mux.pause(stream)
                assert self.nursery is not None
                self.nursery.start_soon(self._answer_later, c, event, wait, charge)
                break
            c.intake.release(charge)
            c.unchecked += len(reply)
            if len(reply) > _PIECE:
                if out:
                    mux.send(stream, b"".join(out))
                    out.clear()
                self._send(c, reply)
                continue  # the next turn finds the tail and stalls
            out.append(reply)
            if conn.drained:
                break
            if len(out) >= 64:  # bounded batches: a few dozen small replies
                mux.send(stream, b"".join(out))
                out.clear()
        if out:
            mux.send(stream, b"".join(out))
        if c.unchecked > _UNSENT_LIMIT // 4 and not c.busy and not c.done.is_set():
            if self._must_wait(c):
                self._stall(c)

    # -- replies: charged, queued in pieces, paused when over budget -----------
    def _send(self, c: _Client, frame: bytes) -> None:
        """Queue one reply for ``c``; a large one goes in pieces as ``c`` drains."""
        assert self.mux is not None
        if len(frame) <= _PIECE:
            self.mux.send(c.stream, frame)
        else:
            c.tail = memoryview(frame)
            c.tail_cost = 0 if self.manifest_frames.shares(frame) else len(frame)
            self._top_up(c)
        self._settle(c)

    def _top_up(self, c: _Client) -> None:
        """Queue more of ``c``'s large reply while its queue is under the limit."""
        tail, mux = c.tail, self.mux
        if tail is None or mux is None or c.closed:
            return
        room = _UNSENT_LIMIT - mux.unsent(c.stream)
        while room > 0 and len(tail):
            piece = bytes(tail[:_PIECE])
            tail = tail[len(piece) :]
            mux.send(c.stream, piece)
            room -= len(piece)
        if len(tail):
            c.tail = tail
        else:
            c.tail = None
            c.tail_cost = 0

    def _settle(self, c: _Client) -> int:
        """Bring ``c``'s charge to the reply budget up to date; returns its unsent bytes."""
        assert self.mux is not None
        unsent = 0 if c.closed else self.mux.unsent(c.stream)
        now = unsent + c.tail_cost
        if now != c.queued:
            self.replies.give(c.queued, c)
            self.replies.force(now, c)
            c.queued = now
        return unsent

    def _must_wait(self, c: _Client) -> bool:
        """Whether ``c`` must stop being read: its replies, or everyone's, are over budget."""
        c.unchecked = 0
        unsent = self._settle(c)
        if c.tail is not None or unsent > _UNSENT_LIMIT:
            return True
        replies = self.replies
        if replies.used <= replies.total:
            return False
        now = trio.current_time()
        if now - self._settled_all > 0.01:  # others' queues may have drained unseen
            self._settled_all = now
            for other in list(self.clients.values()):
                self._settle(other)
        return replies.used > replies.total

    def _stall(self, c: _Client) -> None:
        """Stop reading ``c`` until its replies (and everyone's) are back under budget."""
        assert self.mux is not None and self.nursery is not None
        c.busy = True
        self.mux.pause(c.stream)
        self.nursery.start_soon(self._drained, c)

    async def _drained(self, c: _Client) -> None:
        assert self.mux is not None
        deadline = trio.current_time() + self.limits.send_timeout
        low = self.mux.unsent(c.stream)
        try:
            while not c.closed:
                self._top_up(c)
                unsent = self._settle(c)
                if unsent < low:  # it is reading: the send deadline starts again
                    low = unsent
                    deadline = trio.current_time() + self.limits.send_timeout
                if c.tail is None and unsent <= _UNSENT_LIMIT // 2 and not self._must_wait(c):
                    break
                if trio.current_time() > deadline:
                    log.warning(
                        "closed %s: took none of its %d queued bytes for %g s",
                        c.address,
                        unsent,
                        self.limits.send_timeout,
                    )
                    c.done.set()
                    break
                await trio.sleep(_DRAIN_POLL)
        finally:
            self._resume(c)

    def _resume(self, c: _Client) -> None:
        c.busy = False
        if not c.closed and self.mux is not None:
            if not c.intake.refused:
                self.mux.resume(c.stream)
            self._pump(c)

    # -- answers ---------------------------------------------------------------
    def _answer_now(self, event: Event, c: _Client, now: float) -> bytes | None:
        """The encoded reply if it needs no ``await`` (the hot path), else None."""
        kind = type(event)
        if kind is Announce:
            frame = self._announce_now(event, c.key, c.address, now)  # type: ignore[arg-type]
            if frame is not None:
                self._count("announce", event, c.address)
            return frame
        if kind is Scrape:
            return c.conn.send(self._scrape(event))  # type: ignore[arg-type]
        if kind is GetManifest:
            return self.manifest_frames.get(event.content_id)  # type: ignore[attr-defined]
        return None

    async def _answer_later(self, c: _Client, event: Event, wait: float, charge: int) -> None:
        """Rate-limit wait and/or the general path for one request, then resume ``c``."""
        try:
            if wait > 0:
                await trio.sleep(wait)
            if c.closed:
                return
            reply = self._answer_now(event, c, self.clock())
            if reply is None:
                if type(event) is GetManifest:
                    reply = await self._manifest_frame(c, event)
                else:
                    reply = c.conn.send(await self._answer(event, c.key, c.address))
            c.intake.release(charge)
            charge = 0
            if c.closed:
                return
            c.unchecked += len(reply)
            self._send(c, reply)
        except Exception:
            log.exception("internal error serving %s; closing that connection", c.address)
            c.done.set()
        finally:
            c.intake.release(charge)
            self._resume(c)

    async def _manifest_frame(self, c: _Client, ev: GetManifest) -> bytes:
        """The MANIFEST frame for ``ev`` (encoded once, then shared), or an ERROR frame."""
        try:
            data = await self.store.get(ev.content_id)
        except StorageError as exc:
            log.error("manifest database: %s", exc)
            return c.conn.send(Error("internal", "the tracker's database failed; try again later"))
        if data is None:
            message = f"no manifest published for {ev.content_id.hex()}"
            return c.conn.send(Error("not-found", message))
        frame = self.manifest_frames.get(ev.content_id)
        if frame is None:
            assert isinstance(data, bytes)
            frame = c.conn.send(TrackerManifest(data))
            del data
            self.manifest_frames.put(ev.content_id, frame)
        return frame

    def _announce_now(self, ev: Announce, key: bytes, address: str, now: float) -> bytes | None:
        """The synchronous fast path: a PEERS frame, or None to take the general path.

        None when the announce needs the database (a content the index does
        not know yet), is a ``stopped`` (answered by OK) or is refused
        (the general path turns the refusal into ERROR).
        """
        num_chunks = self.index.num_chunks(ev.content_id)
        if num_chunks is None or ev.event == "stopped":
            return None
        try:
            return self.index.announce_frame(
                ev.content_id,
                key,
                address,
                ev.port,
                ev.event,
                ev.bits,
                num_chunks,
                ev.want,
                now,
                self.interval,
                at=recorded_address(ev.ip, address) if ev.ip else "",
            )
        except TrackerError:
            return None

    async def _next(self, stream: Stream, conn: TrackerServerConnection, intake: Intake) -> Event:
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                return event
            if intake.refused:  # a large frame pipelined behind a missing AUTH
                raise RemoteProtocolError("a large request before AUTH completed")
            self._feed(conn, intake, await stream.receive_some(_RECV_SIZE))

    def _refusal(
        self, conn: TrackerServerConnection, address: str, code: str, message: str
    ) -> bytes:
        log.warning("rejected %s: %s: %s", address, code, message)
        try:
            return conn.send(Error(code, message[:1000]))
        except ProtocolError:
            return b""  # the state machine is past the point of replying

    async def _refuse(
        self, stream: Stream, conn: TrackerServerConnection, address: str, code: str, message: str
    ) -> None:
        log.warning("rejected %s: %s: %s", address, code, message)
        try:
            data = conn.send(Error(code, message[:1000]))
        except ProtocolError:
            return  # the state machine is past the point of replying
        try:
            with trio.move_on_after(1.0):
                await stream.send_all(data)
        except TransportError:
            pass  # it is being dropped anyway

    # -- requests --------------------------------------------------------------
    async def _answer(self, ev: Event, key: bytes, address: str) -> Event:
        """One reply per request; request-level failures become ERROR replies."""
        try:
            if isinstance(ev, Announce):
                return await self._announce(ev, key, address)
            if isinstance(ev, Publish):
                return await self._publish(ev, key, address)
            if isinstance(ev, Resolve):
                return Resolved(await self.store.resolve_prefix(ev.prefix))
            if isinstance(ev, Scrape):
                return self._scrape(ev)
            raise TrackerError("bad-request", f"unexpected {type(ev).__name__}")
        except TrackerError as exc:
            return Error(exc.code, str(exc)[:1000])
        except ContentError as exc:
            return Error("bad-manifest", str(exc)[:1000])
        except StorageError as exc:
            log.error("manifest database: %s", exc)
            return Error("internal", "the tracker's database failed; try again later")

    def _scrape(self, ev: Scrape) -> ScrapeResult:
        ids = list(dict.fromkeys(ev.content_ids))
        stats = self.index.scrape(ids, self.clock())
        return ScrapeResult(
            tuple(ScrapeStat(s.content_id, s.seeders, s.leechers, s.completed) for s in stats)
        )

    async def _announce(self, ev: Announce, key: bytes, address: str) -> Event:
        cid = ev.content_id
        num_chunks = self.index.num_chunks(cid)
        if num_chunks is None and ev.event != "stopped":
            num_chunks = await self.store.num_chunks(cid)
            if num_chunks is None:
                raise TrackerError(
                    "not-found",
                    f"no manifest published for {cid.hex()}: PUBLISH it before announcing",
                )
        peers, avail = self.index.announce(
            cid,
            key,
            address,
            ev.port,
            ev.event,
            ev.bits,
            num_chunks,
            ev.want,
            self.clock(),
            at=recorded_address(ev.ip, address) if ev.ip else "",
        )
        self._count("announce", ev, address)
        if ev.event == "stopped":
            return Ok()
        return Peers(cid, self.interval, tuple(PeerEntry(*p) for p in peers), avail)

    async def _publish(self, ev: Publish, key: bytes, address: str) -> Event:
        manifest = await trio.to_thread.run_sync(
            _verify_manifest, ev.manifest, limiter=self.verify_limiter
        )
        num_chunks = manifest.info.num_chunks
        await self.store.put(manifest.content_id, ev.manifest, num_chunks, key, address)
        self.index.set_num_chunks(manifest.content_id, num_chunks)
        self.counts["publish"] += 1
        log.debug(
            "publish %s (%s, %d bytes) from %s",
            manifest.content_id.hex()[:16],
            manifest.info.name,
            manifest.info.size,
            address,
        )
        return Ok()

    def _count(self, what: str, ev: Event, address: str) -> None:
        """Count an answered request; each one is a DEBUG line (``peer tracker -v``)."""
        self.counts[what] += 1
        if self._debug:
            cid = getattr(ev, "content_id", b"")
            log.debug("%s %s %s from %s", what, getattr(ev, "event", ""), cid.hex()[:16], address)

    async def log_counts(self) -> None:
        """One INFO line per COUNTS_EVERY seconds in which anything was answered,
        and one for the last part of an interval when the tracker stops."""
        since = trio.current_time()
        try:
            while True:
                await trio.sleep(COUNTS_EVERY)
                self._log_counts(COUNTS_EVERY)
                since = trio.current_time()
        finally:
            self._log_counts(trio.current_time() - since)

    def _log_counts(self, seconds: float) -> None:
        counts = self.counts
        if any(counts.values()):
            log.info(
                "last %g s: %d announces, %d publishes; %d connections",
                round(seconds, 1),
                counts["announce"],
                counts["publish"],
                self.connections,
            )
            self.counts = {k: 0 for k in counts}

    async def sweep(self) -> None:
        while True:
            await trio.sleep(_SWEEP_SECONDS)
            self.index.expire(self.clock())
            for c in list(self.clients.values()):
                self._settle(c)


async def serve_tracker(
    host: str,
    port: int,
    data_dir: Path | str,
    transport: Transport | str | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    clock: Callable[[], float] = time.monotonic,
    ttl: float = 180.0,
    interval: float = 60.0,
    limits: TrackerLimits | None = None,
    store: str | None = None,
) -> None:
    """Run a tracker until cancelled.

    Args:
        host, port: where to listen (port 0 picks a free port).
        data_dir: directory of the manifest database (created if missing).
        transport: a Transport, or a backend name (None: ``$PEER_TRANSPORT``).
        task_status: ``started(port)`` reports the real listening port.
        clock: monotonic seconds; the index's notion of now.
        ttl: seconds a peer entry lives without an announce.
        interval: seconds between periodic announces asked of clients.
        limits: connection, rate, size, memory and disk limits.
        store: None or ``memory``: the index in memory, manifests in SQLite
            under ``data_dir``; ``redis://...`` / ``rediss://...``: shared
            state in Redis (``tracker/_redis.py``), ``data_dir`` unused.

    Raises:
        TransportError: the address cannot be bound.
        TransportUnavailable: the chosen transport cannot run here.
        StorageError: the database cannot be opened, or Redis not reached.

    Cancelling closes the listener, every connection and the database.
    """
    if not isinstance(transport, Transport):
        transport = get_transport(transport)
    limits = limits or TrackerLimits()
    memory = limits.max_memory
    backend = await open_backend(
        store_url(store) if store is not None else None,
        Path(data_dir),
        ttl=ttl,
        interval=interval,
        clock=clock,
        max_contents=limits.max_contents,
        max_contents_per_peer=limits.max_contents_per_peer,
        max_peers_per_content=limits.max_peers_per_content,
        memory=Budget(memory // 2, memory // 8),
        max_disk=limits.max_disk,
        entries_per_address=limits.shared_entries_per_address or memory // 8 // 256,
        bytes_per_address=memory // 8,
    )
    tracker = _Tracker(backend, limits, clock, ttl, interval)
    started = False
    try:
        async with transport.open_mux() as tracker.mux, trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            nursery.start_soon(tracker.dispatch, nursery)
            listener = await nursery.start(transport.serve, host, port, tracker.handle)
            nursery.start_soon(tracker.sweep)
            nursery.start_soon(tracker.log_counts)
            log.info(
                "tracker started on %s:%d (%s), %s",
                f"[{listener.host}]" if ":" in listener.host else listener.host,
                listener.port,
                transport.name,
                backend.manifests.describe(),
            )
            task_status.started(listener.port)
            started = True
    finally:
        backend.close()
        if started:  # a start that failed says why, once, as an error
            log.info("tracker stopped")


def run_tracker(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    transport_name: str | None = None,
    data_dir: Path | str | None = None,
    limits: TrackerLimits | None = None,
    store: str | None = None,
) -> int:
    """Run a tracker in the foreground until Ctrl-C or SIGTERM; returns the exit code.

    Prints ``tracker listening on HOST:PORT (transport)`` to stderr once
    listening; a startup failure is one line on stderr and exit code 1.
    ``limits`` defaults to ``TrackerLimits()`` (1 GiB of memory, 4 GiB of disk).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = Path(data_dir) if data_dir is not None else default_data_dir()

    async def main() -> None:
        transport = get_transport(transport_name)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    lambda task_status: serve_tracker(
                        host,
                        port,
                        data,
                        transport,
                        limits=limits,
                        store=store,
                        task_status=task_status,
                    )
                )
                shown = f"[{host or '::'}]" if ":" in host or not host else host
                print(f"tracker listening on {shown}:{bound} ({transport.name})", file=sys.stderr)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except (PeerError, OSError, BaseExceptionGroup) as exc:
        first: BaseException = exc
        while isinstance(first, BaseExceptionGroup) and first.exceptions:
            first = first.exceptions[0]
        if not isinstance(first, PeerError | OSError):
            raise
        # One line, as every other `peer` command says a failure.
        print(f"peer: error: {first}", file=sys.stderr)
        return 1
    return 0
