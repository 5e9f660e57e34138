"""The peer's side of the tracker protocol: one authenticated connection.

``TrackerClient.connect`` opens the stream, answers the tracker's challenge
with a signature by this node's key and waits for OK. After that each method
sends one request and waits for its one reply, one request at a time (a lock),
so replies can never be matched to the wrong request.

Failures map to ``TrackerError``: an ERROR frame keeps the tracker's code; a
transport failure, a timeout or a protocol violation by the tracker is
``unreachable`` and leaves the client closed (the caller reconnects). A
CHALLENGE of another protocol version is ``unsupported-version``. A tracker
that refuses the connection as ``too-many`` (its per-address cap: slots free
as idle connections time out) is asked again with backoff for up to
``busy_wait`` seconds before that refusal is raised.
"""

from __future__ import annotations

import math
import random
from types import TracebackType
from typing import Any, TypeVar

import trio

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest
from peerd.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    TrackerError,
    TransportError,
)
from peerd.transport import Stream, Transport
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
    Peers,
    Publish,
    Resolve,
    Resolved,
    Scrape,
    ScrapeResult,
    ScrapeStat,
    TrackerClientConnection,
    TrackerManifest,
    TrackerState,
)

__all__ = ["AUTH_CONTEXT", "TrackerClient"]

AUTH_CONTEXT = b"peer-tracker-auth-v1\0"
_RECV_SIZE = 65536
_BUSY_FIRST = 0.25  # first wait after a too-many refusal; doubles up to _BUSY_MAX
_BUSY_MAX = 4.0
_E = TypeVar("_E", bound=Event)


def _make(kind: type[_E], *args: Any) -> _E:
    """Build a request event; a bad argument is the caller's error, said clearly."""
    try:
        return kind(*args)
    except LocalProtocolError as exc:
        raise TrackerError("bad-request", str(exc)) from exc


class TrackerClient:
    """An authenticated connection to a tracker. Use ``await TrackerClient.connect(...)``."""

    def __init__(
        self, stream: Stream, conn: TrackerClientConnection, where: str, timeout: float
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._where = where
        self._timeout = timeout
        self._lock = trio.Lock()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        transport: Transport,
        host: str,
        port: int,
        identity: Identity,
        *,
        timeout: float = 10.0,
        source_host: str | None = None,
        busy_wait: float = 20.0,
    ) -> TrackerClient:
        """Connect and authenticate as ``identity``.

        Args:
            transport: the backend to connect with.
            host, port: the tracker.
            identity: the key this connection speaks for.
            timeout: seconds for connecting and for each request.
            source_host: local address to connect from (tests, benchmarks).
            busy_wait: seconds to keep retrying, with backoff, while the
                tracker refuses the connection as ``too-many`` (0: never).

        Raises:
            TrackerError: ``unreachable`` (cannot connect, no answer, broken
                protocol), ``unsupported-version`` (the tracker speaks another
                protocol version) or the tracker's refusal (``auth-failed``,
                ``too-many`` after ``busy_wait``).
        """
        deadline = trio.current_time() + busy_wait
        pause = _BUSY_FIRST
        while True:
            try:
                return await cls._connect_once(
                    transport, host, port, identity, timeout, source_host
                )
            except TrackerError as exc:
                if exc.code != "too-many" or trio.current_time() + pause > deadline:
                    raise
            # Jittered, so that refused clients do not all come back together.
            await trio.sleep(pause * (0.5 + random.random() / 2))
            pause = min(pause * 2, _BUSY_MAX)

    @classmethod
    async def _connect_once(
        cls,
        transport: Transport,
        host: str,
        port: int,
        identity: Identity,
        timeout: float,
        source_host: str | None,
    ) -> TrackerClient:
        where = f"{host}:{port}"
        try:
            stream = await transport.connect(host, port, timeout=timeout, source_host=source_host)
        except TransportError as exc:
            detail = str(exc).removeprefix(f"cannot connect to {where}: ")
            hint = " (is a tracker running there? `peer tracker` starts one)"
            if "refused" not in detail:
                hint = ""
            raise TrackerError(
                "unreachable", f"cannot reach tracker {where}: {detail}{hint}"
            ) from exc
        client = cls(stream, TrackerClientConnection(), where, timeout)
        try:
            challenge = await client._receive()
            if not isinstance(challenge, Challenge):
                raise TrackerError("unreachable", f"tracker {where} did not send a challenge")
            if challenge.version != PROTOCOL_VERSION:
                raise TrackerError(
                    "unsupported-version",
                    f"tracker {where} speaks protocol version {challenge.version}; "
                    f"this peer speaks version {PROTOCOL_VERSION}: upgrade the older one",
                )
            signature = identity.sign(AUTH_CONTEXT + challenge.nonce)
            await client._send(Auth(identity.public_key, signature))
            reply = await client._receive()
            if not isinstance(reply, Ok):
                raise TrackerError("unreachable", f"tracker {where} did not accept or refuse AUTH")
        except BaseException:
            await client.aclose()
            raise
        return client

    # -- requests ---------------------------------------------------------------
    async def announce(
        self,
        content_id: bytes,
        port: int,
        event: str,
        bits: bytes,
        want: int = 50,
        *,
        ip: str = "",
    ) -> Peers | None:
        """Announce this node in a swarm; returns the PEERS answer (None for ``stopped``).

        ``ip``: the address others should dial ("" = the one we connect from)."""
        reply = await self._request(_make(Announce, content_id, port, event, bits, want, ip))
        if event == "stopped":
            self._expect(reply, Ok)
            return None
        return self._expect(reply, Peers)

    async def publish(self, manifest: Manifest) -> None:
        """Store a signed manifest on the tracker (idempotent)."""
        self._expect(await self._request(_make(Publish, manifest.encode())), Ok)

    async def get_manifest(self, content_id: bytes) -> Manifest:
        """Fetch a manifest and check it hashes to ``content_id`` and its signatures verify.

        Raises:
            TrackerError: ``not-found`` or a transport failure.
            ContentError: the tracker's manifest is malformed or does not match.
        """
        reply = self._expect(await self._request(_make(GetManifest, content_id)), TrackerManifest)
        manifest = Manifest.decode(reply.manifest, expected_id=content_id)
        manifest.verify(expected_id=content_id)
        return manifest

    async def resolve(self, prefix: str) -> bytes:
        """Expand a unique hex prefix (16+ characters) to the full content id.

        Raises:
            TrackerError: ``not-found``, ``ambiguous-prefix`` or ``bad-request``.
        """
        return self._expect(await self._request(_make(Resolve, prefix)), Resolved).content_id

    async def scrape(self, content_ids: list[bytes]) -> list[ScrapeStat]:
        """Seeders, leechers and completed downloads of each content id."""
        reply = await self._request(_make(Scrape, tuple(content_ids)))
        return list(self._expect(reply, ScrapeResult).stats)

    # -- lifetime ---------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals --------------------------------------------------------------
    async def _request(self, event: Event) -> Event:
        async with self._lock:
            if self._closed:
                raise TrackerError(
                    "unreachable", f"the connection to tracker {self._where} is closed"
                )
            ok = False
            try:
                await self._send(event)
                reply = await self._receive()
                ok = True
            finally:
                if not ok:
                    # Cancelled or failed mid-request: a late reply would be
                    # taken for the next request's, so this connection is done.
                    await self.aclose()
            return reply

    def _expect(self, reply: Event, kind: type[_E]) -> _E:
        if isinstance(reply, Error):
            raise TrackerError(reply.code, f"tracker {self._where}: {reply.message}")
        if not isinstance(reply, kind):
            raise TrackerError(
                "unreachable",
                f"tracker {self._where} answered {type(reply).__name__}, expected {kind.__name__}",
            )
        return reply

    async def _send(self, event: Event) -> None:
        try:
            data = self._conn.send(event)
        except LocalProtocolError as exc:
            raise TrackerError("bad-request", str(exc)) from exc
        try:
            with trio.fail_after(self._timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise TrackerError(
                "unreachable",
                f"tracker {self._where} did not take a request in {self._timeout:g} s",
            ) from None
        except TransportError as exc:
            raise TrackerError("unreachable", f"lost tracker {self._where}: {exc}") from exc

    async def _receive(self) -> Event:
        """The next event from the tracker; an ERROR frame is returned, not raised."""
        deadline = trio.current_time() + (self._timeout if math.isfinite(self._timeout) else 1e9)
        try:
            with trio.fail_at(deadline):
                while True:
                    event = self._conn.next_event()
                    if event is not NEED_DATA:
                        break
                    self._conn.receive_data(await self._stream.receive_some(_RECV_SIZE))
        except trio.TooSlowError:
            raise TrackerError(
                "unreachable", f"tracker {self._where} did not answer within {self._timeout:g} s"
            ) from None
        except TransportError as exc:
            raise TrackerError("unreachable", f"lost tracker {self._where}: {exc}") from exc
        except RemoteProtocolError as exc:
            raise TrackerError(
                "unreachable", f"tracker {self._where} broke the protocol: {exc}"
            ) from exc
        if isinstance(event, Closed):
            raise TrackerError("unreachable", f"tracker {self._where} closed the connection")
        if isinstance(event, Error) and self._conn.state is TrackerState.CLOSED:
            # ERROR instead of CHALLENGE or OK: the tracker refused this client.
            raise TrackerError(event.code, f"tracker {self._where}: {event.message}")
        return event
