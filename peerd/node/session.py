"""One connection to one remote peer about one content: the thin I/O glue.

A :class:`PeerSession` pumps bytes between a transport stream and a sans-IO
:class:`~peerd.wire.PeerConnection` in two tasks. The reader hands messages
to its owner (the content's driver, which asks the engine) and receives DATA
payloads straight into pooled buffers. The writer coalesces control frames
ahead of uploads and sends a chunk as ``sendfile`` with its 13-byte header
corked in front (one segment, one push), one at a time across the node (:class:`~peerd.engine.scheduling.UploadTurns`).
A watchdog sends KEEPALIVE, closes an idle connection and aborts a send that
makes no progress. The limits and why: docs/ARCHITECTURE.md, "Limits a
remote controls" and "How the real node uses them".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import socket
import sys
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Protocol

import trio

from peerd.engine.content_engine import ContentEngine
from peerd.engine.scheduling import UploadTurns
from peerd.errors import LocalProtocolError, PeerError, RemoteProtocolError
from peerd.node.ratelimit import RateLimiter
from peerd.wire import (
    NEED_DATA,
    Bitfield,
    Cancel,
    Closed,
    DataHeader,
    DataPayload,
    Event,
    Goodbye,
    Have,
    Hello,
    KeepAlive,
    ManifestRequest,
    ManifestResponse,
    PeerConnection,
    Pex,
    Reject,
    Request,
)

if TYPE_CHECKING:
    from peerd.transport import Stream

__all__ = ["PeerSession", "SessionOwner"]

log = logging.getLogger("peerd.node.session")

RECV_SIZE = 64 * 1024  # control reads; payloads bypass this
MAX_HAVE_PER_FRAME = 4096
# Control bytes (mostly REJECTs) queued for a remote that does not read: past
# this the reader stops reading its requests until the writer has taken them.
MAX_QUEUED_CONTROL_BYTES = 256 * 1024
SIOCOUTQNSD = 0x894B  # Linux ioctl: bytes in a socket's send queue not yet sent
TURN_POLL = 0.005  # seconds between looks at the kernel's send queue during a turn
KEEPALIVE_EVERY = 20.0  # send KEEPALIVE after this long with nothing sent
IDLE_TIMEOUT = 60.0  # close a connection we received nothing on for this long
SEND_STALL_TIMEOUT = 30.0  # close when a send makes no progress for this long
DRAIN_POLL = 0.05  # seconds between looks at a clogged socket before asking for a turn
BLOCKED_POLL = 0.05  # seconds between a waiting writer's looks at the turn holder's receiver


# Offsets in Linux's struct tcp_info (linux/tcp.h; tcpi_snd_wnd since 5.4).
_TCP_INFO_LAST_DATA_RECV = 52  # u32, ms since the last data segment arrived
_TCP_INFO_SND_WND = 228  # u32, the receive window the remote last advertised
_TCP_INFO_SIZE = _TCP_INFO_SND_WND + 4


def _tcp_info_u32(fd: int, offset: int) -> int | None:
    """One u32 field of the socket's TCP_INFO, or None if the OS cannot say."""
    sock = socket.socket(fileno=fd)  # a view of the session's descriptor ...
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    finally:
        sock.detach()  # ... that must not close it
    if len(raw) < offset + 4:
        return None
    return int.from_bytes(raw[offset : offset + 4], sys.byteorder)


def local_host(fd: int) -> str | None:
    """The local address of a connected socket (None: no socket, or the OS
    cannot say)."""
    if fd < 0:
        return None
    sock = socket.socket(fileno=fd)  # a view of the session's descriptor ...
    try:
        return str(sock.getsockname()[0])
    except (OSError, IndexError):
        return None
    finally:
        sock.detach()  # ... that must not close it


def receiver_window(fd: int) -> int | None:
    """The receive window the remote last advertised (0: it is taking no
    bytes), or None if the OS cannot say."""
    return _tcp_info_u32(fd, _TCP_INFO_SND_WND)


def silent_for(fd: int) -> float | None:
    """Seconds since the kernel last received data on this socket (whether
    or not we have read it yet), or None if the OS cannot say."""
    ms = _tcp_info_u32(fd, _TCP_INFO_LAST_DATA_RECV)
    return None if ms is None else ms / 1000


def receiver_blocked(fd: int) -> bool:
    """True if bytes wait to be sent and the remote's window is closed."""
    return unsent_bytes(fd) > 0 and receiver_window(fd) == 0


def turn_blocked(session: object) -> bool:
    """Upload turns ask whether a holder's receiver stopped taking bytes."""
    fd = getattr(session, "_fd", -1)
    return fd >= 0 and receiver_blocked(fd)


def unsent_bytes(fd: int) -> int:
    """Bytes a TCP socket holds that it has not sent yet (0 if the OS cannot say)."""
    if fd < 0:
        return 0  # no socket (an in-memory stream): nothing is held by a kernel
    try:
        return int.from_bytes(fcntl.ioctl(fd, SIOCOUTQNSD, b"\0\0\0\0"), sys.byteorder)
    except OSError:
        return 0


class _Buffers(Protocol):
    async def acquire(self) -> mmap.mmap: ...
    def release(self, buf: mmap.mmap) -> None: ...


class SessionOwner(Protocol):
    """What a session needs from the content it belongs to (the driver)."""

    @property
    def engine(self) -> ContentEngine: ...
    @property
    def buffers(self) -> _Buffers: ...
    @property
    def manifest_frame(self) -> bytes: ...

    def on_message(self, session: PeerSession, event: Event) -> None: ...
    def on_payload(
        self, session: PeerSession, req: tuple[int, int, int], buf: mmap.mmap
    ) -> None: ...
    def segments(
        self, index: int, offset: int, length: int
    ) -> Generator[tuple[int, int, int], None, None]: ...


class PeerSession:
    """A live connection with a remote peer, after both HELLOs."""

    def __init__(
        self,
        content: SessionOwner,
        stream: Stream,
        conn: PeerConnection,
        hello: Hello,
        *,
        initiated: bool,
        turns: UploadTurns,
        up_limiter: RateLimiter,
        down_limiter: RateLimiter,
    ) -> None:
        self.content = content
        self.engine = content.engine
        self.turns = turns
        self.up_limiter = up_limiter
        self.down_limiter = down_limiter
        self.stream = stream
        self._fd = stream.fileno()
        self.conn = conn
        self.remote_key: bytes = hello.key
        self.remote_port: int = hello.port
        self.initiated = initiated
        host, _port = stream.peer_address
        self.address = (host, hello.port)
        # Where the remote listens, for peer exchange: the address we dialled,
        # or its IP with the port its HELLO gave (0: it does not listen).
        self.listen: tuple[str, int] | None = (
            stream.peer_address if initiated else (host, hello.port) if hello.port else None
        )
        self.local_ip = local_host(self._fd)
        # The route: the proven key at this address (sessions and bans are per route).
        self.route: tuple[bytes, str] = (hello.key, host)
        self.name = f"{hello.key.hex()[:12]}@{host}:{hello.port}"
        now = trio.current_time()
        self._created_at = now
        self.last_received_at = now
        self.last_sent_at = now
        self._send_since: float | None = None  # a send is in progress since
        self._control: list[bytes] = []
        self._control_bytes = 0
        self._drained = trio.Event()
        self._haves: list[int] = []
        self._wake = trio.Event()
        self._closing = False
        self._local_close = False
        self._eof_sent = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self._draining = False  # our upload turn: waiting for the kernel to pass it on
        self._turn_left = 0  # unsent bytes of that chunk at the last look

    def turn_progress(self) -> float:
        """How far the remote is, for the node's upload turns (furthest behind first)."""
        return self.engine.remote_share(self)

    @property
    def last_useful_at(self) -> float:
        """Last time the connection moved payload or got a request to serve."""
        st = self.engine.peers.get(self)
        return st.last_useful_at if st is not None else self._created_at

    @property
    def closing(self) -> bool:
        """True once the session is closing: it queues nothing more."""
        return self._closing

    # --- queueing (called by the owner, never blocks) -------------------------
    def kick(self) -> None:
        """Wake the writer: there may be an upload to send."""
        self._wake.set()

    def send_control(self, event: Event) -> None:
        if self._closing:
            return
        try:
            data = self.conn.send(event)
        except LocalProtocolError as exc:
            # The wire refuses a message this side may not send now: a bug
            # here, not the remote's doing. It ends this connection only.
            log.error("closing peer %s: refused to send %s: %s", self.name, event, exc)
            self.abort()
            return
        self._control.append(data)
        self._control_bytes += len(data)
        self.kick()

    def send_frame(self, data: bytes) -> None:
        """Queue an already encoded frame (the wire accepted it)."""
        if not self._closing:
            self._control.append(data)
            self._control_bytes += len(data)
            self.kick()

    def announce_have(self, index: int) -> None:
        if not self._closing:
            self._haves.append(index)
            self.kick()

    def close(self, reason: str = "") -> None:
        """Say goodbye (best effort) and stop both tasks."""
        if not self._closing:
            if reason:
                try:
                    self._control.append(self.conn.send(Goodbye(reason[:200])))
                except PeerError:
                    pass
            self._closing = True
            self._local_close = True
            self.kick()

    # --- running ---------------------------------------------------------------
    async def run(self) -> None:
        """Run until either side closes; always leaves the stream closed."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._watchdog)
                    await self._reader()
                    if self._local_close:
                        # We are closing (a ban, a bad bitfield): let the writer
                        # deliver what is queued and the GOODBYE saying why,
                        # then discard what the remote still sends until it
                        # closes too: closing a socket with unread input sends
                        # a reset, which destroys the GOODBYE in flight.
                        with trio.move_on_after(2):
                            await self._eof_sent.wait()
                            while await self.stream.receive_some(RECV_SIZE):
                                pass
                    # Otherwise the remote is gone or said goodbye: nothing to send.
                    nursery.cancel_scope.cancel()
        except* RemoteProtocolError as group:
            log.warning("peer %s violated the protocol: %s", self.name, group.exceptions[0])
            await self._goodbye_after_error(f"protocol-error: {group.exceptions[0]}")
        except* (PeerError, trio.BrokenResourceError) as group:
            log.debug("session %s ended: %s", self.name, group.exceptions[0])
        finally:
            self._closing = True
            self._draining = False
            self._release_turn()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _goodbye_after_error(self, reason: str) -> None:
        """Best effort: tell the remote why we close (bounded by a short wait).
        Only when no send was cut short: a partial frame must not precede it."""
        if self._send_since is not None or self._closing:
            return
        with trio.move_on_after(1), contextlib.suppress(PeerError, trio.BrokenResourceError):
            frame = self.conn.send(Goodbye(reason[:200]))
            await self.stream.send_all(b"".join(self._control) + frame)

    def abort(self) -> None:
        self._closing = True
        self._cancel_scope.cancel()

    async def _reader(self) -> None:
        conn, stream, content = self.conn, self.stream, self.content
        while not self._closing:
            event = conn.next_event()
            if event is NEED_DATA:
                while self._control_bytes > MAX_QUEUED_CONTROL_BYTES and not self._closing:
                    self._drained = trio.Event()
                    await self._drained.wait()
                data = await stream.receive_some(RECV_SIZE)
                self.last_received_at = trio.current_time()
                conn.receive_data(data)
                continue
            if isinstance(event, Closed):
                return
            if isinstance(event, DataHeader):
                await self._receive_payload(event)
            elif isinstance(event, Request | Cancel | Have | Bitfield | Reject | Pex):
                content.on_message(self, event)
            elif isinstance(event, ManifestRequest):
                # Once per connection (the wire refuses a second), and the
                # content's one encoded frame, shared by every connection.
                self.send_frame(conn.send_prepared(content.manifest_frame))
            elif isinstance(event, KeepAlive):
                pass
            elif isinstance(event, Goodbye):
                if event.reason:
                    log.debug("peer %s said goodbye: %s", self.name, event.reason[:200])
                return
            elif isinstance(event, DataPayload | ManifestResponse | Hello):
                # DataPayload cannot appear: payloads are taken directly.
                raise RemoteProtocolError(f"unexpected {type(event).__name__} from {self.name}")

    async def _send(self, op: Awaitable[object]) -> None:
        """Await one send, visible to the watchdog (which ends a stuck one)."""
        self._send_since = trio.current_time()
        try:
            await op
        finally:
            self._send_since = None
            self.last_sent_at = trio.current_time()

    async def _watchdog(self) -> None:
        """Keep-alive, idle timeout, and the send deadline."""
        last_left = -1
        progress_at = trio.current_time()
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            # Silence as the kernel sees it: a payload we receive slowly, or
            # input we do not read while our replies drain, is not silence.
            silent = silent_for(self._fd) if self._fd >= 0 else None
            if silent is None:
                silent = now - self.last_received_at
            if silent >= IDLE_TIMEOUT:
                log.info("closing peer %s: nothing received for %.0f s", self.name, IDLE_TIMEOUT)
                self.close("idle: nothing received for a while")
                return
            left = unsent_bytes(self._fd) if self._fd >= 0 else 0
            if self._send_since is None and left == 0:
                last_left, progress_at = -1, now
            elif last_left < 0 or left < last_left:
                # The remote took bytes (or unsent bytes appeared): progress.
                last_left, progress_at = left, now
            elif left > last_left:
                # Grown by what we queued since (KEEPALIVE, REJECTs, HAVEs):
                # not progress; a later fall from this level is.
                last_left = left
            if last_left >= 0 and now - progress_at >= SEND_STALL_TIMEOUT:
                log.info("dropping peer %s: it stopped reading (%d bytes unsent)", self.name, left)
                self.abort()
                return
            idle_out = now - self.last_sent_at >= KEEPALIVE_EVERY
            if idle_out and self._send_since is None and left == 0:
                self.send_control(KeepAlive())
                self.last_sent_at = now

    async def _receive_payload(self, header: DataHeader) -> None:
        # The wire let it through: it answers a request of ours, outstanding
        # or cancelled (the engine then drops it).
        req = (header.index, header.offset, header.length)
        self.engine.on_data_header(self, req)
        pool = self.content.buffers
        buf = await pool.acquire()
        try:
            view = memoryview(buf)[: header.length]
            n = self.conn.take_payload_into(view)
            if n < header.length:
                await self.stream.recv_exactly_into(view[n:])
                self.conn.payload_consumed_externally(header.length - n)
            await self.down_limiter.consume(header.length)
        except BaseException:
            pool.release(buf)
            raise
        self.content.on_payload(self, req, buf)

    def _release_turn(self) -> None:
        turns = self.turns
        if turns.at_once:
            for session in turns.release(self, trio.current_time()):
                session.kick()  # type: ignore[attr-defined]

    async def _writer(self) -> None:
        stream, engine = self.stream, self.engine
        while True:
            if self._haves:
                haves, self._haves = self._haves, []
                for k in range(0, len(haves), MAX_HAVE_PER_FRAME):
                    self._control.append(
                        self.conn.send(Have(tuple(haves[k : k + MAX_HAVE_PER_FRAME])))
                    )
            if self._control:
                frames, self._control = self._control, []
                self._control_bytes = 0
                self._drained.set()
                await self._send(stream.send_all(b"".join(frames)))
                continue
            if self._closing:
                # No more uploads here: give up our place in the turns now, not
                # when the session's task ends (seconds later, after the EOF).
                self._release_turn()
                await stream.send_eof()
                self._eof_sent.set()
                # Give the remote a moment to read our goodbye and close.
                await trio.sleep(5)
                self._cancel_scope.cancel()
                return
            turns = self.turns
            if self._draining:
                # Our turn lasts until the kernel has sent the chunk's last
                # byte on (UploadTurns); control frames still go out meanwhile.
                now = trio.current_time()
                left = unsent_bytes(self._fd)
                if left < self._turn_left:
                    self._turn_left = left
                    turns.touch(self, now)
                if left > 0 and turns.holds(self) and receiver_window(self._fd) == 0:
                    self._release_turn()  # not reading: let the others go now
                if left > 0 and turns.holds(self):
                    self._wake = trio.Event()
                    with trio.move_on_after(TURN_POLL):
                        await self._wake.wait()
                    continue
                self._draining = False
                self._release_turn()
                continue
            upload = None
            if engine.queued(self) and unsent_bytes(self._fd) > 0:
                # Our socket still holds bytes the remote has not taken: no
                # turn until they leave, so a remote that stops reading cannot
                # hold the node's uploads (the watchdog closes it eventually).
                self._wake = trio.Event()
                with trio.move_on_after(DRAIN_POLL):
                    await self._wake.wait()
                continue
            if engine.queued(self):
                now = trio.current_time()
                if not turns.request(self, now):
                    # The turn may have moved on (a holder whose receiver
                    # closed its window): wake whoever holds one now.
                    for holder in turns.holders():
                        holder.kick()  # type: ignore[attr-defined]
                    # Wait for our turn, until the holder's turn counts as
                    # stalled, or for the next look at its receiver.
                    wait = min(turns.deadline() - now, BLOCKED_POLL)
                    self._wake = trio.Event()
                    with trio.move_on_after(max(wait, TURN_POLL)):
                        await self._wake.wait()
                    continue
                upload = engine.next_upload(self)
                if upload is None:
                    self._release_turn()
            else:
                self._release_turn()  # a turn granted after our request was cancelled
            if upload is not None:
                index, offset, length = upload
                await self.up_limiter.consume(length)
                if not self.conn.owes(index, offset, length):
                    self._release_turn()  # cancelled long ago (see MAX_CANCELLED)
                    continue
                # Checked after the rate-limit wait, right before the bytes go out:
                # the shared file may have changed while we waited.
                refusal = engine.serve_refusal(index)
                if refusal is not None:
                    self.send_control(Reject(index, offset, length, refusal))
                    self._release_turn()
                    continue
                # The 13-byte header goes out corked with the payload's first
                # bytes (Stream.sendfile's ``header``): one segment, one push.
                header = self.conn.send(DataHeader(index, offset, length))
                pieces = self.content.segments(index, offset, length)
                try:
                    for fd, position, n in pieces:  # one per file a tree's chunk spans
                        await self._send(stream.sendfile(fd, position, n, header=header))
                        header = b""
                    if header:  # no file piece (an empty range): the header alone
                        await self._send(stream.send_all(header))
                finally:
                    pieces.close()
                engine.on_uploaded(self, upload, trio.current_time())
                self._draining = turns.at_once > 0
                self._turn_left = length
                turns.touch(self, trio.current_time())
                continue
            self._wake = trio.Event()
            await self._wake.wait()
