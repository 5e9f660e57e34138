"""The tracker's serve loop: a per-connection owner task, one dispatcher for requests.

Theory of operation
-------------------
Each accepted connection gets a ``TrackerServerConnection`` (sans-IO) and a
task that *owns* the stream:

1. Admission: a connection over the total or per-address connection limit gets
   ERROR ``too-many`` and is closed.
2. Handshake: the tracker sends CHALLENGE with 32 random bytes; the client
   must answer AUTH, an Ed25519 signature over ``b"peer-tracker-auth-v1\\0" +
   nonce``, within ``handshake_timeout``. A bad signature gets ERROR
   ``auth-failed`` and the connection closes. From then on the connection
   speaks for that one key: announces always use the authenticated key and
   the IP address the connection comes from, never anything the client says.
3. Requests: the owner lends the stream to the transport's ``Mux`` and
   waits; it comes back to close the stream on EOF, error, refusal or the
   idle timeout (letting queued replies drain for up to a second first).

One *dispatcher* task answers the requests of every authenticated
connection. ``Mux.next_batch`` hands it all the input that arrived (the
reactor: one epoll wait for every socket; the proactor: one harvest of RECV
completions), and for each connection it decodes every complete frame and
answers in order, queueing the replies with ``Mux.send``, which writes at
once when the socket has room. So an announce costs no task switch and no
``await``: the index answers synchronously (``SwarmIndex.announce_frame``
returns the PEERS body, usually built from cached entries) and the loop adds
the 5-byte frame header. The per-connection ``recv``/``send`` awaits this
replaced cost ~45 us of the tracker's ~120 us per announce.

A request that must wait goes off the hot path, and its connection is paused
(nothing more is read or answered) until it is done, so replies keep request
order: a client over its token bucket (one per connection, one per address:
an over-eager client is slowed down, not dropped) waits in a task of the
server's nursery; so does a request that needs the manifest database (a
content the index does not know yet, PUBLISH, GET_MANIFEST, RESOLVE), which
runs in one worker thread. SCRAPE, like ANNOUNCE, is answered on the spot. A client that does not read its answers is paused
once 1 MiB of them are queued, and resumed when half has drained: it stalls
only itself. A malformed or oversized frame (``RemoteProtocolError``) gets
ERROR ``bad-frame`` and the connection closes; an unexpected exception while
answering one client is logged and closes that client only.

A background task sweeps expired peer entries every few seconds.

Error codes sent in ERROR frames: ``too-many``, ``auth-failed``,
``handshake-timeout``, ``bad-frame``, ``bad-request``, ``bad-manifest``,
``not-found``, ``ambiguous-prefix``, ``limit``, ``internal``.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from peerd.errors import (
    ContentError,
    PeerError,
    ProtocolError,
    RemoteProtocolError,
    StorageError,
    TrackerError,
    TransportError,
)
from peerd.identity import verify_signature
from peerd.manifest import Manifest
from peerd.transport import Mux, Stream, Transport, get_transport
from peerd.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Announce,
    Auth,
    Challenge,
    Closed,
    Error,
    Event,
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

from .index import SwarmIndex
from .manifests import ManifestStore

__all__ = [
    "AUTH_CONTEXT",
    "DEFAULT_PORT",
    "TrackerLimits",
    "default_data_dir",
    "run_tracker",
    "serve_tracker",
]

log = logging.getLogger("tracker")

DEFAULT_PORT = 7070
AUTH_CONTEXT = b"peer-tracker-auth-v1\0"
_SWEEP_SECONDS = 5.0
_RECV_SIZE = 65536
_UNSENT_LIMIT = 1 << 20  # replies queued for a client that does not read: stop reading it
_DRAIN_SECONDS = 1.0  # a closing connection's last replies get this long to leave


@dataclass(frozen=True)
class TrackerLimits:
    """Everything a client can make the tracker spend, bounded."""

    max_connections: int = 4096
    connections_per_address: int = 64
    messages_per_second: float = 2000.0  # per connection (token bucket rate and burst)
    address_messages_per_second: float = 50_000.0  # all connections of one address
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0  # an authenticated connection silent this long is closed
    max_contents: int = 100_000
    max_contents_per_peer: int = 1_000
    max_peers_per_content: int = 10_000


class _Bucket:
    """Token bucket on the server clock; ``take`` returns seconds to wait (0 = go)."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = now

    def take(self, now: float) -> float:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


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
        "key",
        "last",
        "stream",
        "unchecked",
    )

    def __init__(
        self,
        stream: Stream,
        conn: TrackerServerConnection,
        address: str,
        key: bytes,
        bucket: _Bucket,
        area: _Bucket,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.address = address
        self.key = key
        self.bucket = bucket  # this connection's message rate
        self.area = area  # shared by every connection from the address
        self.busy = False  # a request is being answered off the hot path
        self.closed = False  # the owner took the stream back
        self.done = trio.Event()  # the conversation is over (EOF, error, refusal)
        self.last = trio.current_time()  # last input, for the idle timeout
        self.unchecked = 0  # bytes of replies sent since the mux's queue was checked


def default_data_dir() -> Path:
    """``$PEER_HOME/tracker`` or ``~/.local/share/peer/tracker``."""
    home = os.environ.get("PEER_HOME")
    base = Path(home) if home else Path.home() / ".local" / "share" / "peer"
    return base / "tracker"


def _verify_manifest(data: bytes) -> Manifest:
    manifest = Manifest.decode(data)
    manifest.verify()
    return manifest


class _Tracker:
    """Shared state of one running tracker: index, store, limits, counters."""

    def __init__(
        self,
        store: ManifestStore,
        limits: TrackerLimits,
        clock: Callable[[], float],
        ttl: float,
        interval: float,
    ) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self.index = SwarmIndex(
            ttl=ttl,
            interval=interval,
            max_contents=limits.max_contents,
            max_contents_per_peer=limits.max_contents_per_peer,
            max_peers_per_content=limits.max_peers_per_content,
        )
        self.interval = max(1, round(interval))
        self.db_limiter = trio.CapacityLimiter(1)
        self.connections = 0
        self.per_address: defaultdict[str, int] = defaultdict(int)
        self.address_buckets: dict[str, _Bucket] = {}
        self.mux: Mux | None = None  # set by serve_tracker
        self.nursery: trio.Nursery | None = None  # where off-hot-path answers run
        self.clients: dict[Stream, _Client] = {}

    async def db(self, fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.db_limiter)

    # -- one connection --------------------------------------------------------
    async def handle(self, stream: Stream) -> None:
        address = stream.peer_address[0]
        limits = self.limits
        conn = TrackerServerConnection()
        if (
            self.connections >= limits.max_connections
            or self.per_address[address] >= limits.connections_per_address
        ):
            log.warning("rejected %s: too many connections", address)
            await stream.send_all(conn.send(Error("too-many", "too many connections; retry later")))
            return
        self.connections += 1
        self.per_address[address] += 1
        if address not in self.address_buckets:
            self.address_buckets[address] = _Bucket(
                limits.address_messages_per_second, self.clock()
            )
        try:
            await self._converse(stream, conn, address)
        except (TransportError, ProtocolError, trio.Cancelled):
            raise
        except Exception:
            # A bug must not take the whole tracker down: log it, drop this client.
            log.exception("internal error serving %s; closing that connection", address)
        finally:
            self.connections -= 1
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
                del self.address_buckets[address]

    async def _converse(self, stream: Stream, conn: TrackerServerConnection, address: str) -> None:
        nonce = secrets.token_bytes(32)
        await stream.send_all(conn.send(Challenge(PROTOCOL_VERSION, nonce)))
        try:
            auth: Event | None = None
            with trio.move_on_after(self.limits.handshake_timeout):
                auth = await self._next(stream, conn)
            if auth is None:
                await self._refuse(
                    stream, conn, address, "handshake-timeout", "no AUTH within the time limit"
                )
                return
            if isinstance(auth, Closed):
                return
            assert isinstance(auth, Auth)  # the state machine allows nothing else first
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
        await self._serve_requests(stream, conn, address, auth.key)

    async def _serve_requests(
        self, stream: Stream, conn: TrackerServerConnection, address: str, key: bytes
    ) -> None:
        """Lend the authenticated stream to the mux until the conversation ends.

        The dispatcher (``dispatch``) answers its requests; this task only
        owns the stream: it enforces the idle timeout, lets the last replies
        drain, and takes the stream back from the mux before it is closed.
        """
        assert self.mux is not None
        # Once READY the tracker conversation never leaves READY and every
        # reply type is allowed, so PEERS frames built by the dispatcher need
        # no state-machine step.
        assert conn.state is TrackerState.READY
        client = _Client(
            stream,
            conn,
            address,
            key,
            _Bucket(self.limits.messages_per_second, self.clock()),
            self.address_buckets[address],
        )
        self.clients[stream] = client
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
                while self.mux.unsent(stream):
                    await trio.sleep(0.01)
        finally:
            client.closed = True
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
                    client.conn.receive_data(data)
                except ProtocolError:  # input after EOF: the mux reports EOF once
                    log.exception("internal error serving %s", client.address)
                    client.done.set()
                    continue
                self._pump(client, tick)

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
        while not c.busy and not c.done.is_set():
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                out.append(self._refusal(conn, c.address, "bad-frame", str(exc)))
                c.done.set()
                break
            if event is NEED_DATA:
                break
            if type(event) is Closed:
                c.done.set()
                break
            wait = max(c.bucket.take(now), c.area.take(now))
            reply = None if wait > 0 else self._answer_now(event, c, now)
            if reply is None:  # rate-limited, or a request that needs an await
                c.busy = True
                mux.pause(stream)
                assert self.nursery is not None
                self.nursery.start_soon(self._answer_later, c, event, wait)
                break
            out.append(reply)
            c.unchecked += len(reply)
            if conn.drained:
                break
            if len(out) >= 64:  # bounded batches: a few dozen small replies
                mux.send(stream, b"".join(out))
                out.clear()
        if out:
            mux.send(stream, b"".join(out))
        if c.unchecked <= _UNSENT_LIMIT // 4:
            return  # the queue cannot have grown past the limit since the last look
        c.unchecked = 0
        if not c.busy and mux.unsent(stream) > _UNSENT_LIMIT and not c.done.is_set():
            # The client does not read its answers: stop reading its requests.
            c.busy = True
            mux.pause(stream)
            assert self.nursery is not None
            self.nursery.start_soon(self._drained, c)

    def _answer_now(self, event: Event, c: _Client, now: float) -> bytes | None:
        """The encoded reply if it needs no ``await`` (the hot path), else None."""
        if type(event) is Announce and (frame := self._announce_now(event, c.key, c.address, now)):
            return frame
        if type(event) is Scrape:
            return c.conn.send(self._scrape(event))
        return None

    async def _answer_later(self, c: _Client, event: Event, wait: float) -> None:
        """Rate-limit wait and/or the general path for one request, then resume ``c``."""
        try:
            if wait > 0:
                await trio.sleep(wait)
            if c.closed:
                return
            reply = self._answer_now(event, c, self.clock())
            if reply is None:
                reply = c.conn.send(await self._answer(event, c.key, c.address))
            if c.closed:
                return
            assert self.mux is not None
            self.mux.send(c.stream, reply)
        except Exception:
            log.exception("internal error serving %s; closing that connection", c.address)
            c.done.set()
        finally:
            self._resume(c)

    async def _drained(self, c: _Client) -> None:
        assert self.mux is not None
        while not c.closed and self.mux.unsent(c.stream) > _UNSENT_LIMIT // 2:
            await trio.sleep(0.02)
        self._resume(c)

    def _resume(self, c: _Client) -> None:
        c.busy = False
        if not c.closed and self.mux is not None:
            self.mux.resume(c.stream)
            self._pump(c)

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
            )
        except TrackerError:
            return None

    async def _next(self, stream: Stream, conn: TrackerServerConnection) -> Event:
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(_RECV_SIZE))

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
                return await self._publish(ev)
            if isinstance(ev, GetManifest):
                data = await self.db(self.store.get, ev.content_id)
                if data is None:
                    raise TrackerError(
                        "not-found", f"no manifest published for {ev.content_id.hex()}"
                    )
                assert isinstance(data, bytes)
                return TrackerManifest(data)
            if isinstance(ev, Resolve):
                cid = await self.db(self.store.resolve_prefix, ev.prefix)
                assert isinstance(cid, bytes)
                return Resolved(cid)
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
            known = await self.db(self.store.num_chunks, cid)
            num_chunks = known if isinstance(known, int) else None
        peers, avail = self.index.announce(
            cid, key, address, ev.port, ev.event, ev.bits, num_chunks, ev.want, self.clock()
        )
        if ev.event == "stopped":
            return Ok()
        return Peers(cid, self.interval, tuple(PeerEntry(*p) for p in peers), avail)

    async def _publish(self, ev: Publish) -> Event:
        manifest = await self.db(_verify_manifest, ev.manifest)
        assert isinstance(manifest, Manifest)
        num_chunks = manifest.info.num_chunks
        await self.db(self.store.put, manifest.content_id, ev.manifest, num_chunks)
        self.index.set_num_chunks(manifest.content_id, num_chunks)
        return Ok()

    async def sweep(self) -> None:
        while True:
            await trio.sleep(_SWEEP_SECONDS)
            self.index.expire(self.clock())


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
        limits: connection, rate and size limits.

    Raises:
        TransportError: the address cannot be bound.
        TransportUnavailable: the chosen transport cannot run here.
        StorageError: the database cannot be opened.

    Cancelling closes the listener, every connection and the database.
    """
    if not isinstance(transport, Transport):
        transport = get_transport(transport)
    store = ManifestStore(Path(data_dir))
    tracker = _Tracker(store, limits or TrackerLimits(), clock, ttl, interval)
    try:
        async with transport.open_mux() as tracker.mux, trio.open_nursery() as nursery:
            nursery.start_soon(tracker.dispatch, nursery)
            listener = await nursery.start(transport.serve, host, port, tracker.handle)
            nursery.start_soon(tracker.sweep)
            log.info(
                "tracker started on %s:%d (%s), %d manifests in %s",
                listener.host,
                listener.port,
                transport.name,
                len(store),
                store.path,
            )
            task_status.started(listener.port)
    finally:
        store.close()
        log.info("tracker stopped")


def run_tracker(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    transport_name: str | None = None,
    data_dir: Path | str | None = None,
) -> int:
    """Run a tracker in the foreground until Ctrl-C or SIGTERM; returns the exit code.

    Prints ``tracker listening on HOST:PORT (transport)`` to stderr once
    listening; a startup failure is one line on stderr and exit code 1.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = Path(data_dir) if data_dir is not None else default_data_dir()

    async def main() -> None:
        transport = get_transport(transport_name)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(serve_tracker, host, port, data, transport)
                print(f"tracker listening on {host}:{bound} ({transport.name})", file=sys.stderr)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except PeerError as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        return 1
    return 0
