"""A peerd node: one listener, one tracker client, many contents.

The node owns the nursery every other task lives in. It accepts connections
(the seed's framework: socket, SO_REUSEADDR, bind, listen, accept, handle,
release — the transport does the first steps), reads the remote HELLO to
learn which content the connection is about, runs the handshake and hands
the connection to that :class:`~peerd.node.driver.Content`. Outgoing connections
do the same in the other order. The handshake (HELLO each way, then a PROOF
each way that signs both HELLOs and the signer's role, so it is good for one
connection between two keys): docs/PROTOCOL.md, "Handshake".

Limits a remote controls: total inbound connections and connections per
address, and a handshake deadline so a connection that never speaks does not
hold a slot. When a cap is reached, the least useful connection in a
newcomer's way (a handshake still pending, else the session idle longest)
makes room for it (:class:`InboundSlots`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import trio

from peerd.content.identity import Identity, verify_signature
from peerd.content.manifest import Manifest
from peerd.content.store import ChunkStore, SourceFile
from peerd.engine.content_engine import EVICTABLE_AFTER
from peerd.engine.scheduling import NEEDY_WINDOW, UploadTurns
from peerd.errors import PeerError, RemoteProtocolError, TrackerError, TransportError
from peerd.node.driver import Content
from peerd.node.ratelimit import RateLimiter
from peerd.node.session import PeerSession, turn_blocked
from peerd.transport import Stream, Transport
from peerd.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Closed,
    Goodbye,
    Hello,
    ManifestRequest,
    ManifestResponse,
    PeerConnection,
    Peers,
    Proof,
)

if TYPE_CHECKING:
    from peerd.node.tracker_client import TrackerClient

__all__ = ["Node", "stated_ip"]


def stated_ip(public: str, tracker_host: str) -> str:
    """What an ANNOUNCE states as our address ("" = none: the tracker takes
    the one it sees): ``public`` (``--public-addr``'s host) when it is an IP
    address others could dial. Never a host name, an unspecified or
    multicast address, nor a loopback one to a tracker that is not itself
    on loopback (it would hand it to other machines)."""
    try:
        address = ipaddress.ip_address(public)
    except ValueError:
        return ""
    if address.is_unspecified or address.is_multicast:
        return ""
    if address.is_loopback:
        try:
            if not ipaddress.ip_address(tracker_host).is_loopback:
                return ""
        except ValueError:
            if tracker_host != "localhost":
                return ""  # a tracker by name is another machine's
    return public


log = logging.getLogger("peerd.node.node")

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
# With several trackers: how long one may take to connect or answer before the
# next one is asked (docs/ARCHITECTURE.md, "Several trackers").
FAILOVER_TIMEOUT = 2.0
MAX_INBOUND = 512
MAX_INBOUND_PER_ADDRESS = 64
UPLOADS_AT_ONCE = 1  # connections uploading at once (UploadTurns)
TRACKER_PROBE_EVERY = 5.0  # how soon a restarted tracker hears from us again


def _turn_progress(session: Hashable) -> float:
    """Upload turns ask each waiting writer's session how far its remote is."""
    assert isinstance(session, PeerSession)
    return session.turn_progress()


class _Slot:
    """One inbound connection holding a slot."""

    __slots__ = ("address", "scope", "session", "since")

    def __init__(self, address: str, since: float) -> None:
        self.address = address
        self.since = since
        self.scope = trio.CancelScope()
        self.session: PeerSession | None = None  # set once the handshake is done


class InboundSlots:
    """Inbound connection slots: at most ``total``, at most ``per_address``
    from one address. A newcomer that finds its way blocked takes the slot of
    the least useful connection in the way: the oldest pending handshake (of
    its own address when that address is full, else of the address holding
    the most slots), else the session that moved no payload for longest, if
    that is over ``EVICTABLE_AFTER`` seconds. Otherwise the newcomer is
    refused."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self._slots: set[_Slot] = set()
        self._by_address: dict[str, set[_Slot]] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def count(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def admit(self, address: str, now: float) -> _Slot | None:
        """A slot for a new connection from ``address`` (evicting if needed), or None."""
        if self.count(address) >= self.per_address:
            if not self._evict(self._by_address[address], now):
                return None
        if len(self._slots) >= self.total:
            crowded = max(self._by_address.values(), key=len)
            if not self._evict(crowded, now) and not self._evict(self._slots, now):
                return None
        slot = _Slot(address, now)
        self._slots.add(slot)
        self._by_address.setdefault(address, set()).add(slot)
        return slot

    def release(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.discard(slot)
            peers = self._by_address[slot.address]
            peers.discard(slot)
            if not peers:
                del self._by_address[slot.address]

    def _evict(self, candidates: set[_Slot], now: float) -> bool:
        pending = [s for s in candidates if s.session is None]
        if pending:
            victim = min(pending, key=lambda s: s.since)
        else:
            idle = [
                s
                for s in candidates
                if s.session is not None and now - s.session.last_useful_at >= EVICTABLE_AFTER
            ]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.session.last_useful_at)  # type: ignore[union-attr]
            log.info("evicting idle peer %s for a newcomer", victim.session.name)  # type: ignore[union-attr]
        self.release(victim)
        if victim.session is not None:
            victim.session.close("too-many: evicted for a newcomer")
        else:
            victim.scope.cancel()
        return True


def _one_line(exc: BaseException) -> str:
    """A failure as one line a user can act on (an exception group: its first)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, PeerError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


async def _linger(stream: Stream) -> None:
    """After a refusal: half-close, then read until the remote closes too (a
    close with unread input would reset the connection and lose the GOODBYE)."""
    with contextlib.suppress(PeerError, trio.BrokenResourceError), trio.move_on_after(2):
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass


class Node:
    """A peer: serves what it holds, fetches what it lacks.

    Args:
        identity: this peer's key pair.
        transport: the reactor or proactor transport.
        host: address to listen on ("::": every interface, IPv6 and IPv4).
        port: port to listen on, 0 = any free port.
        bind: the source address of outgoing connections (None: the
            system's choice, which is what reaches another machine).
        tracker: ``(host, port)`` of the tracker.
        trackers: several trackers (overrides ``tracker``): one is used at a
            time, the first listed first; when it cannot be reached or stops
            answering (``FAILOVER_TIMEOUT``), the next one, and so on round.
        up_limit / down_limit: payload bytes per second, None = unlimited.
    """

    def __init__(
        self,
        identity: Identity,
        transport: Transport,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tracker: tuple[str, int] = ("127.0.0.1", 7070),
        up_limit: int | None = None,
        down_limit: int | None = None,
        bind: str | None = None,
        public: tuple[str, int] | None = None,
        trackers: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.identity = identity
        # Where others reach us (--public-addr): stated in every ANNOUNCE when
        # it is an IP address (the tracker decides whether to believe it).
        self.public = public
        self.transport = transport
        self.host = host
        self.bind = bind
        self.port = port
        self.trackers: tuple[tuple[str, int], ...] = tuple(trackers) or (tracker,)
        self._current = 0  # the tracker in use: an index into self.trackers
        self.up_limiter = RateLimiter(up_limit)
        self.down_limiter = RateLimiter(down_limit)
        # One upload link: one connection uploads at a time (scheduling.py).
        self.upload_turns = UploadTurns(
            UPLOADS_AT_ONCE,
            needy_window=NEEDY_WINDOW,
            progress=_turn_progress,
            blocked=turn_blocked,
        )
        self.contents: dict[bytes, Content] = {}
        # Contents that ended with an error: content id -> one line saying why.
        self.failed: dict[bytes, str] = {}
        self._scopes: dict[bytes, trio.CancelScope] = {}
        self._tracker: TrackerClient | None = None
        self._tracker_lock = trio.Lock()
        self.inbound = InboundSlots(MAX_INBOUND, MAX_INBOUND_PER_ADDRESS)
        self.nursery: trio.Nursery

    @property
    def source_host(self) -> str | None:
        return self.bind

    # --- lifecycle -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; then release everything."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                listener = await nursery.start(
                    self.transport.serve, self.host, self.port, self._handle_inbound
                )
                self.port = listener.port
                nursery.start_soon(self._tracker_watch)
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                if self._tracker is not None:
                    await self._tracker.aclose()
                    self._tracker = None

    async def add_content(self, manifest: Manifest, source: SourceFile | ChunkStore) -> Content:
        """Start serving (and, for an incomplete store, downloading) a content."""
        cid = manifest.content_id
        if cid in self.contents:
            raise PeerError(f"content {cid.hex()} is already active in this node")
        content = Content(self, manifest, source)
        self.failed.pop(cid, None)
        self.contents[cid] = content
        scope = trio.CancelScope()
        self._scopes[cid] = scope

        async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # A failure of one content (a disk error while storing a chunk,
            # say) ends that content with its error; every other download and
            # seed in this node goes on.
            try:
                with scope:
                    await content.run(task_status=task_status)
            except* Exception as group:  # contained per content, reported
                message = _one_line(group)
                self.failed[cid] = message
                log.info("content %s failed: %s", cid.hex()[:16], message)  # the app says it
            finally:
                self.contents.pop(cid, None)
                self._scopes.pop(cid, None)
                content.source.close()  # its state is flushed (Content.run); idempotent
                content.ended.set()

        await self.nursery.start(runner)
        return content

    def remove_content(self, cid: bytes) -> None:
        """Stop a content (announces ``stopped``); its files stay as they are."""
        scope = self._scopes.get(cid)
        if scope is not None:
            scope.cancel()

    # --- tracker ---------------------------------------------------------------------
    @property
    def tracker_address(self) -> tuple[str, int]:
        """The tracker in use (the first listed until it fails)."""
        return self.trackers[self._current]

    @tracker_address.setter
    def tracker_address(self, address: tuple[str, int]) -> None:
        self.trackers, self._current = (address,), 0

    async def tracker_call(self, fn: Callable[[TrackerClient], object]) -> object:
        """Run ``await fn(client)`` on a live tracker connection (reconnecting).

        With several trackers, a call whose tracker cannot be reached or
        stops answering is made again on the next one (every tracker request
        is idempotent), each tracker at most once per call.
        """
        error: TrackerError | None = None
        for _ in range(len(self.trackers)):
            client = await self._tracker_client()
            try:
                return await fn(client)  # type: ignore[misc]
            except TrackerError as exc:
                if exc.code != "unreachable":
                    raise
                error = exc
            except TransportError as exc:
                error = TrackerError("unreachable", f"lost the tracker connection: {exc}")
                error.__cause__ = exc
            await self._drop_tracker(client, failed=True)
        assert error is not None
        raise error

    async def _tracker_client(self) -> TrackerClient:
        """The live tracker connection, made if there is none (failing over)."""
        async with self._tracker_lock:
            if self._tracker is not None:
                return self._tracker
            from peerd.node.tracker_client import TrackerClient

            several = len(self.trackers) > 1
            timeout = FAILOVER_TIMEOUT if several else CONNECT_TIMEOUT
            error: TrackerError | None = None
            for _ in range(len(self.trackers)):
                host, port = self.tracker_address
                try:
                    # From our own address, so the tracker records where we listen.
                    self._tracker = await TrackerClient.connect(
                        self.transport,
                        host,
                        port,
                        self.identity,
                        timeout=timeout,
                        source_host=self.source_host,
                        busy_wait=FAILOVER_TIMEOUT if several else 20.0,
                    )
                    break
                except TrackerError as exc:
                    if not several:
                        raise
                    log.info("tracker %s port %d: %s; trying the next one", host, port, exc)
                    error = exc
                    self._current = (self._current + 1) % len(self.trackers)
            if self._tracker is None:
                assert error is not None
                raise error
            # A new connection (maybe a restarted tracker that forgot every
            # peer, or another tracker): every content announces again.
            for content in self.contents.values():
                content.tracker_changed()
            return self._tracker

    async def _tracker_watch(self) -> None:
        """Notice a lost tracker connection even when nothing else talks to it.

        A seeder only announces every interval (a minute), so a tracker that
        restarted would not know it for that long. A tiny SCRAPE every few
        seconds finds the dead connection; the next probe reconnects, and the
        new epoch makes every content announce again.
        """
        while True:
            await trio.sleep(TRACKER_PROBE_EVERY)
            if not self.contents:
                continue
            cid = next(iter(self.contents))

            async def probe(client: TrackerClient, cid: bytes = cid) -> object:
                return await client.scrape([cid])

            try:
                await self.tracker_call(probe)
            except PeerError as exc:
                log.debug("tracker probe failed: %s", exc)

    async def _drop_tracker(self, client: TrackerClient, *, failed: bool = False) -> None:
        if self._tracker is client:
            self._tracker = None
            if failed and len(self.trackers) > 1:
                self._current = (self._current + 1) % len(self.trackers)
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def announce(self, cid: bytes, event: str, bits: bytes, want: int = 50) -> Peers | None:
        public = self.public
        port, ip = self.port, ""
        if public is not None:
            port = public[1]
            ip = stated_ip(public[0], self.tracker_address[0])

        async def call(client: TrackerClient) -> Peers | None:
            return await client.announce(cid, port, event, bits, want, ip=ip)

        return await self.tracker_call(call)  # type: ignore[return-value]

    # --- connections -------------------------------------------------------------------
    def _hello(self, cid: bytes, nonce: bytes) -> Hello:
        return Hello(PROTOCOL_VERSION, self.identity.public_key, self.port, cid, nonce)

    def _proof(self, conn: PeerConnection) -> Proof:
        return Proof(self.identity.sign(conn.proof_message(ours=True)))

    @staticmethod
    async def _read_handshake(stream: Stream, conn: PeerConnection, want: type) -> Hello | Proof:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, want):
                return event  # type: ignore[return-value]
            if isinstance(event, Closed | Goodbye):
                reason = getattr(event, "reason", "") or "closed"
                raise RemoteProtocolError(f"peer left during the handshake ({reason})")
            raise RemoteProtocolError(f"expected {want.__name__}, got {type(event).__name__}")

    @staticmethod
    async def _check_proof(stream: Stream, conn: PeerConnection, hello: Hello) -> None:
        """Read the remote PROOF: its HELLO key must have signed this transcript."""
        proof = await Node._read_handshake(stream, conn, Proof)
        assert isinstance(proof, Proof)
        message = conn.proof_message(ours=False)
        if not verify_signature(hello.key, proof.signature, message):
            raise RemoteProtocolError(
                "peer's PROOF does not verify: it does not hold the key it claims"
            )

    async def _handle_inbound(self, stream: Stream) -> None:
        address = stream.peer_address[0]
        slot = self.inbound.admit(address, trio.current_time())
        if slot is None:
            log.info("refusing connection from %s: too many connections", address)
            return
        try:
            with slot.scope:
                await self._serve_inbound(stream, slot)
        except PeerError as exc:
            log.debug("inbound connection from %s ended: %s", address, exc)
        finally:
            self.inbound.release(slot)

    async def _serve_inbound(self, stream: Stream, slot: _Slot) -> None:
        conn = PeerConnection(initiator=False)
        nonce = os.urandom(32)
        content: Content | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            first = await self._read_handshake(stream, conn, Hello)
            assert isinstance(first, Hello)
            reply = conn.send(self._hello(first.content_id, nonce))
            if first.version != PROTOCOL_VERSION:
                goodbye = Goodbye(
                    f"unsupported-version: this peer speaks version {PROTOCOL_VERSION}"
                )
                await stream.send_all(reply + conn.send(goodbye))
                await _linger(stream)
                return
            content = self.contents.get(first.content_id)
            if content is None:
                await stream.send_all(reply + conn.send(Goodbye("wrong-content")))
                await _linger(stream)
                return
            await stream.send_all(reply + conn.send(self._proof(conn)))
            await self._check_proof(stream, conn, first)
            session = content.admit(stream, conn, first, initiated=False)
            if session is None:
                return
            slot.session = session
        if slot.session is None or content is None:
            return  # the handshake timed out
        await content.run_session(slot.session)

    async def _dial(self, cid: bytes, ip: str, port: int) -> tuple[Stream, PeerConnection, Hello]:
        """Connect and complete the handshake about ``cid``; the caller closes the stream."""
        stream = await self.transport.connect(
            ip, port, timeout=CONNECT_TIMEOUT, source_host=self.source_host
        )
        try:
            conn = PeerConnection(initiator=True)
            nonce = os.urandom(32)
            await stream.send_all(conn.send(self._hello(cid, nonce)))
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                hello = await self._read_handshake(stream, conn, Hello)
                assert isinstance(hello, Hello)
                if hello.version != PROTOCOL_VERSION:
                    with contextlib.suppress(PeerError):
                        await stream.send_all(
                            conn.send(Goodbye(f"unsupported-version: we speak {PROTOCOL_VERSION}"))
                        )
                    raise RemoteProtocolError(
                        f"peer {ip}:{port} speaks protocol version {hello.version}, "
                        f"we speak {PROTOCOL_VERSION}"
                    )
                if hello.content_id != cid:
                    raise RemoteProtocolError("peer answered about another content")
                try:
                    await self._check_proof(stream, conn, hello)
                except RemoteProtocolError as exc:
                    if "handshake (" in str(exc):  # GOODBYE instead of PROOF
                        raise RemoteProtocolError(
                            f"peer {ip}:{port} does not serve this content: {exc}"
                        ) from None
                    raise
                await stream.send_all(conn.send(self._proof(conn)))
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            if isinstance(exc, trio.TooSlowError):
                raise TransportError(f"peer {ip}:{port} did not complete the handshake") from None
            raise
        return stream, conn, hello

    async def connect_peer(self, content: Content, ip: str, port: int, key: bytes) -> None:
        """Open a connection to a peer (named by the tracker or the user) and run it."""
        stream, conn, hello = await self._dial(content.content_id, ip, port)
        try:
            session = content.admit(stream, conn, hello, initiated=True)
            if session is not None:
                await content.run_session(session)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def manifest_from_peer(self, cid: bytes, ip: str, port: int) -> Manifest:
        """Ask a peer for the signed manifest of ``cid`` (MANIFEST_REQUEST).

        The manifest is decoded, not verified: the caller checks it against
        ``cid`` (and a trusted key) before using it.

        Raises:
            TransportError / RemoteProtocolError: the peer cannot be used.
            ManifestError: what it sent is not a manifest.
        """
        stream, conn, _hello = await self._dial(cid, ip, port)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.send_all(conn.send(ManifestRequest()))
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, ManifestResponse):
                        data = event.manifest
                        break
                    elif isinstance(event, Closed | Goodbye):
                        reason = getattr(event, "reason", "") or "it closed the connection"
                        raise RemoteProtocolError(
                            f"peer {ip}:{port} has no manifest for this content ({reason})"
                        )
                    # BITFIELD, HAVE, KEEPALIVE: not needed for the manifest.
                with contextlib.suppress(PeerError):
                    await stream.send_all(conn.send(Goodbye("done: got the manifest")))
        except trio.TooSlowError:
            raise TransportError(f"peer {ip}:{port} did not send the manifest in time") from None
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return Manifest.decode(data, expected_id=cid)
