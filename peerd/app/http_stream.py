"""``peer stream``: a content served over HTTP while it downloads, with Range.

HTTP/1.1 by h11 (sans-IO, like our wire) over the node's transport. One
resource, the content itself (``GET /`` or ``GET /<name>``; ``HEAD`` too).
A Range request for a part not fetched yet moves that part to the front of
the download (the engine's read-ahead window), so a player can seek. Only
verified bytes are ever sent.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
from urllib.parse import quote, unquote

import h11
import trio

from peerd.content.store import ChunkStore
from peerd.errors import PeerError
from peerd.node.driver import Content
from peerd.transport import Stream

__all__ = ["MAX_CONNECTIONS", "HttpStreamer", "parse_range"]

log = logging.getLogger("peerd.app.http_stream")

MAX_CONNECTIONS = 16  # players and browsers open a few each
IDLE_TIMEOUT = 60.0  # seconds a connection may wait between requests
MAX_HEADER_BYTES = 16 * 1024
SEND_PIECE = 256 * 1024  # bytes per send, so a seek elsewhere is not held up by a chunk
READ_AHEAD_BYTES = 16 * 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """The one byte range a ``Range`` header asks for, as (first, last)
    inclusive; None to send the whole content (no usable range: several
    ranges, another unit); ``"unsatisfiable"`` for a range outside it."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None  # not a single bytes range: RFC 9110 lets us ignore it
    first_text, last_text = m.groups()
    if not first_text:
        if not last_text or int(last_text) == 0:
            return "unsatisfiable"
        suffix = int(last_text)
        return (max(0, size - suffix), size - 1) if size else "unsatisfiable"
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, min(last, size - 1)


class HttpStreamer:
    """Serves one content over HTTP from its chunk store."""

    def __init__(self, content: Content, store: ChunkStore) -> None:
        self.content = content
        self.store = store
        info = content.info
        self.name = info.name
        self.size = info.size
        self.type = mimetypes.guess_type(info.name)[0] or "application/octet-stream"
        self._window = max(4, READ_AHEAD_BYTES // max(info.chunk_size, 1))
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, stream: Stream) -> None:
        """One HTTP connection (the transport's ``serve`` handler)."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._refuse(stream)
            return
        try:
            await self._serve(stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            PeerError,
            OSError,  # the store closed under a reader as the command stops
        ) as exc:
            log.debug("http connection ended: %s", exc)
        finally:
            self._slots.release()

    async def _refuse(self, stream: Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b"too many connections\n"
        headers = [("content-length", str(len(body))), ("connection", "close")]
        try:
            with trio.move_on_after(5):
                await _next_request(conn, stream)
                await stream.send_all(conn.send(h11.Response(status_code=503, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass

    async def _serve(self, stream: Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            with trio.move_on_after(IDLE_TIMEOUT):
                try:
                    request = await _next_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    await self._simple(stream, conn, exc.error_status_hint, "bad request\n")
                    return
            if request is None:
                return  # closed, or idle too long
            await self._respond(stream, conn, request)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _simple(self, stream: Stream, conn: h11.Connection, status: int, text: str) -> None:
        body = text.encode()
        headers = [("content-length", str(len(body))), ("content-type", "text/plain")]
        if conn.our_state is not h11.SEND_RESPONSE:
            return
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _respond(self, stream: Stream, conn: h11.Connection, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        path = unquote(request.target.decode("ascii", "replace").split("?", 1)[0])
        if method not in ("GET", "HEAD"):
            await self._simple(stream, conn, 405, "only GET and HEAD\n")
            return
        if path not in ("/", "/" + self.name):
            await self._simple(stream, conn, 404, f"try / or /{quote(self.name)}\n")
            return
        headers = {
            name.decode().lower(): value.decode("latin-1") for name, value in request.headers
        }
        first, last, status = 0, self.size - 1, 200
        wanted = parse_range(headers["range"], self.size) if "range" in headers else None
        if wanted == "unsatisfiable":
            out = [("content-range", f"bytes */{self.size}"), ("content-length", "0")]
            await stream.send_all(conn.send(h11.Response(status_code=416, headers=out)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return
        if isinstance(wanted, tuple):
            first, last = wanted
            status = 206
        length = max(0, last - first + 1)
        out = [
            ("content-type", self.type),
            ("content-length", str(length)),
            ("accept-ranges", "bytes"),
        ]
        if status == 206:
            out.append(("content-range", f"bytes {first}-{last}/{self.size}"))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)))
        if method == "GET" and length:
            await self._send_range(stream, conn, first, last)
        await stream.send_all(conn.send(h11.EndOfMessage()))

    async def _send_range(
        self, stream: Stream, conn: h11.Connection, first: int, last: int
    ) -> None:
        """Bytes first..last, each chunk once verified; the part asked for goes first."""
        content, store, info = self.content, self.store, self.content.info
        position = first
        while position <= last:
            index = position // info.chunk_size
            if not store.have[index]:
                now = trio.current_time()
                content.apply(content.engine.read_ahead(index, self._window, now))
                while not store.have[index]:
                    stored = content.next_stored()
                    if store.have[index]:
                        break
                    if content.ended.is_set():
                        raise trio.ClosedResourceError("the download ended")
                    with trio.move_on_after(1.0):
                        await stored.wait()
            end = min(last + 1, (index + 1) * info.chunk_size, position + SEND_PIECE)
            data = await trio.to_thread.run_sync(os.pread, store.fd, end - position, position)
            await stream.send_all(conn.send(h11.Data(data=data)))
            position = end


async def _next_request(conn: h11.Connection, stream: Stream) -> h11.Request | None:
    """The next request's head (its body, if any, is read and dropped); None on close."""
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
