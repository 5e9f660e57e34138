"""A peerd node: one listener, one tracker client, many contents.

The node owns the nursery every other task lives in. It accepts connections
(the seed's framework: socket, SO_REUSEADDR, bind, listen, accept, handle,
release — the transport does the first steps), reads the remote HELLO to
learn which content the connection is about, answers with its own HELLO and
hands the connection to that :class:`~peerd.swarm.Content`. Outgoing
connections do the same in the other order.

Limits a remote controls: total inbound connections and connections per
address (excess is closed at once), and a handshake deadline so a connection
that never speaks does not hold a slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import trio

from .errors import PeerError, RemoteProtocolError, TrackerError, TransportError
from .identity import Identity, verify_signature
from .manifest import Manifest
from .ratelimit import RateLimiter
from .scheduling import NEEDY_WINDOW, UploadTurns
from .session import PeerSession
from .store import ChunkStore, SourceFile
from .swarm import Content
from .transport import Stream, Transport
from .wire import (
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
    from .tracker_client import TrackerClient

__all__ = ["Node"]

log = logging.getLogger("peerd.node")

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
MAX_INBOUND = 512
MAX_INBOUND_PER_ADDRESS = 256
UPLOAD_SLOTS = 1  # connections uploading at once (UploadTurns)
TRACKER_PROBE_EVERY = 5.0  # how soon a restarted tracker hears from us again
PROOF_CONTEXT = b"peer-hello-v1\0"


def _turn_progress(session: Hashable) -> float:
    """Upload turns ask each waiting writer's session how far its remote is."""
    assert isinstance(session, PeerSession)
    return session.turn_progress()


def proof_message(nonce: bytes, content_id: bytes) -> bytes:
    """What a PROOF signs: the other side's HELLO nonce and the content id."""
    return PROOF_CONTEXT + nonce + content_id


class Node:
    """A peer: serves what it holds, fetches what it lacks.

    Args:
        identity: this peer's key pair.
        transport: the reactor or proactor transport.
        host: address to listen on (also the source address of outgoing
            connections when it is a specific address).
        port: port to listen on, 0 = any free port.
        tracker: ``(host, port)`` of the tracker.
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
    ) -> None:
        self.identity = identity
        self.transport = transport
        self.host = host
        self.port = port
        self.tracker_address = tracker
        self.up_limiter = RateLimiter(up_limit)
        self.down_limiter = RateLimiter(down_limit)
        # One upload link: one connection uploads at a time (scheduling.py).
        self.upload_turns = UploadTurns(
            UPLOAD_SLOTS, needy_window=NEEDY_WINDOW, progress=_turn_progress
        )
        self.contents: dict[bytes, Content] = {}
        self._scopes: dict[bytes, trio.CancelScope] = {}
        self._tracker: TrackerClient | None = None
        self._tracker_lock = trio.Lock()
        # Counts tracker connections made; a content that announced on an older
        # one announces again (a restarted tracker has forgotten every peer).
        self.tracker_epoch = 0
        self._inbound = 0
        self._per_address: Counter[str] = Counter()
        self.nursery: trio.Nursery

    @property
    def source_host(self) -> str | None:
        return None if self.host in ("", "0.0.0.0", "::") else self.host

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
                for content in self.contents.values():
                    content.source.close()

    async def add_content(self, manifest: Manifest, source: SourceFile | ChunkStore) -> Content:
        """Start serving (and, for an incomplete store, downloading) a content."""
        cid = manifest.content_id
        if cid in self.contents:
            raise PeerError(f"content {cid.hex()} is already active in this node")
        content = Content(self, manifest, source)
        self.contents[cid] = content
        scope = trio.CancelScope()
        self._scopes[cid] = scope

        async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await content.run(task_status=task_status)
            finally:
                self.contents.pop(cid, None)
                self._scopes.pop(cid, None)

        await self.nursery.start(runner)
        return content

    def remove_content(self, cid: bytes) -> None:
        """Stop a content (announces ``stopped``); its files stay as they are."""
        scope = self._scopes.get(cid)
        if scope is not None:
            scope.cancel()

    # --- tracker ---------------------------------------------------------------------
    async def tracker_call(self, fn: Callable[[TrackerClient], object]) -> object:
        """Run ``await fn(client)`` on a live tracker connection (reconnecting)."""
        async with self._tracker_lock:
            if self._tracker is None:
                from .tracker_client import TrackerClient

                host, port = self.tracker_address
                # From our own address, so the tracker records where we listen.
                self._tracker = await TrackerClient.connect(
                    self.transport,
                    host,
                    port,
                    self.identity,
                    timeout=CONNECT_TIMEOUT,
                    source_host=self.source_host,
                )
                self.tracker_epoch += 1
                for content in self.contents.values():
                    content.wake_tracker_loop()
            client = self._tracker
        try:
            return await fn(client)  # type: ignore[misc]
        except TrackerError as exc:
            if exc.code == "unreachable":
                await self._drop_tracker(client)
            raise
        except TransportError as exc:
            await self._drop_tracker(client)
            raise TrackerError("unreachable", f"lost the tracker connection: {exc}") from exc

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

    async def _drop_tracker(self, client: TrackerClient) -> None:
        if self._tracker is client:
            self._tracker = None
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def announce(self, cid: bytes, event: str, bits: bytes, want: int = 50) -> Peers | None:
        async def call(client: TrackerClient) -> Peers | None:
            return await client.announce(cid, self.port, event, bits, want)

        return await self.tracker_call(call)  # type: ignore[return-value]

    # --- connections -------------------------------------------------------------------
    def _hello(self, cid: bytes, nonce: bytes) -> Hello:
        return Hello(PROTOCOL_VERSION, self.identity.public_key, self.port, cid, nonce)

    def _proof(self, their_hello: Hello) -> Proof:
        return Proof(self.identity.sign(proof_message(their_hello.nonce, their_hello.content_id)))

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
                reason = getattr(event, "reason", "closed")
                raise RemoteProtocolError(f"peer left during the handshake ({reason})")
            raise RemoteProtocolError(f"expected {want.__name__}, got {type(event).__name__}")

    async def _check_proof(
        self, stream: Stream, conn: PeerConnection, hello: Hello, nonce: bytes
    ) -> None:
        """Read the remote PROOF: its HELLO key must have signed our nonce."""
        proof = await self._read_handshake(stream, conn, Proof)
        assert isinstance(proof, Proof)
        if hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"peer speaks protocol version {hello.version}, we speak {PROTOCOL_VERSION}"
            )
        if not verify_signature(hello.key, proof.signature, proof_message(nonce, hello.content_id)):
            raise RemoteProtocolError(
                "peer's PROOF does not verify: it does not hold the key it claims"
            )

    async def _handle_inbound(self, stream: Stream) -> None:
        address = stream.peer_address[0]
        if self._inbound >= MAX_INBOUND or self._per_address[address] >= MAX_INBOUND_PER_ADDRESS:
            log.info("refusing connection from %s: too many connections", address)
            return
        self._inbound += 1
        self._per_address[address] += 1
        hello: Hello | None = None
        content: Content | None = None
        try:
            conn = PeerConnection()
            nonce = os.urandom(32)
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                first = await self._read_handshake(stream, conn, Hello)
                assert isinstance(first, Hello)
                content = self.contents.get(first.content_id)
                reply = conn.send(self._hello(first.content_id, nonce)) + conn.send(
                    self._proof(first)
                )
                if content is None:
                    await stream.send_all(reply + conn.send(Goodbye("unknown content")))
                    return
                await stream.send_all(reply)
                await self._check_proof(stream, conn, first, nonce)
                hello = first
            if handshake.cancelled_caught or content is None or hello is None:
                return
            await content.attach(stream, conn, hello, initiated=False)
        except PeerError as exc:
            log.debug("inbound connection from %s ended: %s", address, exc)
        finally:
            self._inbound -= 1
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]

    async def _dial(self, cid: bytes, ip: str, port: int) -> tuple[Stream, PeerConnection, Hello]:
        """Connect and complete HELLO + PROOF about ``cid``; the caller closes the stream."""
        stream = await self.transport.connect(
            ip, port, timeout=CONNECT_TIMEOUT, source_host=self.source_host
        )
        try:
            conn = PeerConnection()
            nonce = os.urandom(32)
            await stream.send_all(conn.send(self._hello(cid, nonce)))
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                hello = await self._read_handshake(stream, conn, Hello)
                assert isinstance(hello, Hello)
                if hello.content_id != cid:
                    raise RemoteProtocolError("peer answered about another content")
                # The accepting side sends its PROOF at once (and a GOODBYE
                # right after when it does not serve this content): read them
                # before our PROOF, so that refusal is reported as such.
                await self._check_proof(stream, conn, hello, nonce)
                refusal = conn.next_event()
                if isinstance(refusal, Goodbye | Closed):
                    reason = getattr(refusal, "reason", "") or "closed"
                    raise RemoteProtocolError(
                        f"peer {ip}:{port} does not serve this content ({reason})"
                    )
                if refusal is not NEED_DATA:
                    raise RemoteProtocolError(
                        f"peer sent {type(refusal).__name__} before our PROOF"
                    )
                await stream.send_all(conn.send(self._proof(hello)))
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
            await content.attach(stream, conn, hello, initiated=True)
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
                    # BITFIELD, HAVE: not needed for the manifest.
                with contextlib.suppress(PeerError):
                    await stream.send_all(conn.send(Goodbye("got the manifest")))
        except trio.TooSlowError:
            raise TransportError(f"peer {ip}:{port} did not send the manifest in time") from None
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return Manifest.decode(data)
