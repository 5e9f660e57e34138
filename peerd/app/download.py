"""``peer get``: resolve an id, fetch and verify the manifest, download, finish.

The download itself is a :class:`~peerd.node.driver.Content` with a
:class:`~peerd.content.store.ChunkStore` in a running :class:`~peerd.node.node.Node`; this
module wires the steps together and decides when to give up: when no new
verified byte arrived for ``stall_timeout`` seconds (peers gone, none found),
the download stops with a clear error and keeps its verified chunks for a
later resume. A download that ends any other way than complete (gives up,
fails, is cancelled) stops its content, waits until the content's task has
let go of the store, then closes the store, and removes its part file if not
one verified chunk is in it (a manifest's size alone never leaves disk space
taken).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from peerd.content.manifest import Info, Manifest, parse_content_id
from peerd.content.store import ChunkStore
from peerd.errors import PeerError, TrackerError
from peerd.node.driver import Content
from peerd.node.node import Node

READ_AHEAD_BYTES = 64 * 1024 * 1024  # asked for in order ahead of the reader
READ_AHEAD_MIN = 4  # chunks, whatever their size
WRITE_RUN_BYTES = 16 * 1024 * 1024  # most written out (-o -) in one thread trip
WAITING_SAID_EVERY = 10.0  # seconds between "waiting: ..." lines (-v) while nothing arrives

log = logging.getLogger("peerd.app.download")

__all__ = [
    "DownloadError",
    "DownloadResult",
    "download",
    "ended_error",
    "fetch_manifest",
    "resolve_id",
    "stop_content",
    "tree_not_streamable",
]

# How long a stopped content may take to end (its "stopped" announce takes at
# most 2 s); past that its store is left open rather than closed under it.
STOP_TIMEOUT = 10.0


class DownloadError(PeerError):
    """The download could not finish (no peers, stalled, interrupted)."""


@dataclass
class DownloadResult:
    """What ``peer get --json`` prints."""

    id: str
    path: str
    bytes: int
    seconds: float
    MBps: float
    peers_used: int
    bytes_per_peer: dict[str, int] = field(default_factory=dict)
    hash_failures: int = 0
    resumed_bytes: int = 0


async def resolve_id(node: Node, text: str) -> bytes:
    """A full content id from 64 hex characters or a unique prefix of 16+."""
    parsed = parse_content_id(text)
    if isinstance(parsed, bytes):
        return parsed

    async def call(client):  # type: ignore[no-untyped-def]
        return await client.resolve(parsed)

    return await node.tracker_call(call)  # type: ignore[return-value]


async def fetch_manifest(node: Node, cid: bytes, trust: bytes | None) -> Manifest:
    """The manifest for ``cid`` from the tracker, verified (id, signatures, trust)."""

    async def call(client):  # type: ignore[no-untyped-def]
        return await client.get_manifest(cid)

    manifest: Manifest = await node.tracker_call(call)  # type: ignore[assignment]
    manifest.verify(cid, trust)
    return manifest


async def _publish_quietly(node: Node, manifest: Manifest) -> None:
    """Give the tracker a manifest it lacks (verified, from a peer), so that
    this download can announce and be found; best effort, bounded in time."""

    async def call(client):  # type: ignore[no-untyped-def]
        await client.publish(manifest)

    with trio.move_on_after(5):
        try:
            await node.tracker_call(call)
            log.info("published the manifest to the tracker (it did not have it)")
        except PeerError as exc:
            log.info("could not publish the manifest to the tracker: %s", exc)


async def manifest_from_peers(
    node: Node, cid: bytes, trust: bytes | None, peers: Sequence[tuple[str, int]]
) -> Manifest:
    """The first manifest for ``cid`` that a peer sends and that verifies.

    Raises:
        PeerError: the last reason no peer gave a usable manifest (unreachable,
            no such content, bad signature, untrusted).
    """
    last: PeerError | None = None
    for ip, port in peers:
        try:
            manifest = await node.manifest_from_peer(cid, ip, port)
            manifest.verify(cid, trust)
            return manifest
        except PeerError as exc:
            log.info("no usable manifest from %s:%d: %s", ip, port, exc)
            last = exc
    assert last is not None
    raise last


async def obtain_manifest(
    node: Node,
    cid: bytes,
    trust: bytes | None,
    peers: Sequence[tuple[str, int]] = (),
    *,
    publish: bool = True,
) -> Manifest:
    """The verified manifest of ``cid``: from the tracker, else from ``peers``
    (then, with ``publish``, given to a tracker that did not have it).

    Raises:
        TrackerError / PeerError: nobody gave a usable manifest (the last reason).
        IntegrityError: bad or untrusted manifest.
    """
    try:
        return await fetch_manifest(node, cid, trust)
    except TrackerError as exc:
        if not peers:
            if exc.code == "not-found":
                raise TrackerError(
                    "not-found", f"no content with id {cid.hex()} is known to the tracker"
                ) from None
            raise
        log.info("tracker has no manifest (%s); asking the given peers", exc)
        manifest = await manifest_from_peers(node, cid, trust, peers)
        if exc.code == "not-found" and publish:
            await _publish_quietly(node, manifest)
        return manifest


async def stop_content(node: Node, content: Content, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop ``content`` and wait until its task has ended; False if it did not in time.

    Only then may its store be closed: a session may still be writing a chunk
    to it or sending from its descriptor, and a closed descriptor's number is
    soon another file's. Call it shielded when the caller is being cancelled.
    """
    cid = content.content_id
    node.remove_content(cid)
    with trio.move_on_after(timeout):
        while node.contents.get(cid) is content:
            await trio.sleep(0.01)
        return True
    log.warning("content %s did not stop within %.0f s", cid.hex()[:16], timeout)
    return False


def ended_error(node: Node, content: Content) -> PeerError | None:
    """Why ``content`` is no longer running in ``node``; None while it runs.

    A content whose task failed (a disk error while storing a chunk, say) is
    listed in ``node.failed`` with its one-line error.
    """
    cid = content.content_id
    if node.contents.get(cid) is content:
        return None
    failed: dict[bytes, str] = getattr(node, "failed", {})
    message = failed.get(cid)
    if message is not None:
        return DownloadError(message)
    return DownloadError("the download stopped")


async def close_store(node: Node, content: Content | None, store: ChunkStore) -> None:
    """Stop the content (if any), close ``store``, remove its files if they hold nothing."""
    with trio.CancelScope(shield=True):
        if content is not None and not await stop_content(node, content):
            return  # still in use: an open descriptor is better than a reused one
        try:
            removed = await trio.to_thread.run_sync(store.discard_if_empty)
        except OSError as exc:
            log.warning("could not close %s: %s", store.part_path, exc)
            return
        if removed:
            log.info("removed %s: it held no verified chunk", store.part_path)


def tree_not_streamable(info: Info) -> str:
    """Why a tree cannot be streamed (to stdout or over HTTP): one line."""
    count = len(info.files or ())
    return (
        f"{info.name} is a directory tree ({count} files, {info.size} bytes); only a single "
        "file can be streamed: download it with -o DIR"
    )


def output_path(output: Path | None, name: str) -> Path:
    if output is None:
        return Path.cwd() / name
    if output.is_dir():
        return output / name
    return output


async def download(
    node: Node,
    text_id: str,
    output: Path | None,
    *,
    trust: bytes | None = None,
    force: bool = False,
    stall_timeout: float = 60.0,
    on_start: Callable[[Content], None] | None = None,
    peers: Sequence[tuple[str, int]] = (),
    sequential: bool = False,
    write: Callable[[ChunkStore, list[Piece]], Awaitable[object]] | None = None,
) -> tuple[Content, DownloadResult]:
    """Download a content into ``output`` and return the running content and a summary.

    With ``sequential``, chunks are asked for in order within a read-ahead
    window (rarest first beyond it); with ``write``, the content is also
    written in order as chunks are verified (and ``sequential`` holds):
    ``write(store, pieces)`` copies a run of verified chunks out, each
    ``(offset, length, held)``: its bytes in ``held`` when the node kept
    them in memory, else in the part file (:meth:`ChunkStore.read_into_sync`
    reads them back without the page cache); a broken pipe raises
    :class:`OutputClosed`.

    The content keeps serving (seeding) in ``node`` until the node stops or
    the caller removes it.

    Raises:
        TrackerError: unknown id, ambiguous prefix, tracker unreachable.
        IntegrityError: bad or untrusted manifest.
        StorageError: output exists, not writable, disk full.
        DownloadError: no peers / no progress for ``stall_timeout`` seconds.

    ``peers`` are addresses to connect to besides those the tracker names;
    when the tracker is unreachable or does not know the manifest, it is
    asked from them (MANIFEST_REQUEST) and verified the same way.
    """
    started = trio.current_time()
    cid = await resolve_id(node, text_id)
    manifest = await obtain_manifest(node, cid, trust, peers)
    name = manifest.info.name
    if write is not None and manifest.info.is_tree:
        raise DownloadError(tree_not_streamable(manifest.info))
    if write is not None:
        name = f"{cid.hex()[:16]}-{name}"  # a cache of streams: one file per content
    path = output_path(output, name)
    log.info(
        "manifest of %s verified: %s, %d bytes, %d chunks%s",
        cid.hex()[:16],
        manifest.info.name,
        manifest.info.size,
        manifest.info.num_chunks,
        f", a tree of {len(manifest.info.files)} files" if manifest.info.files is not None else "",
    )
    # Written out as it fills (-o -): a stream's cache (page cache, no fsync).
    store = await ChunkStore.open(manifest.info, cid, path, force=force, cache=write is not None)
    if store.resumed_bytes:
        log.info("resuming: %d bytes already verified in %s", store.resumed_bytes, store.part_path)
    content: Content | None = None
    finished = False
    try:
        content = await node.add_content(manifest, store)
        for ip, port in peers:
            content.dial(ip, port)
        if on_start is not None:
            on_start(content)
        if sequential or write is not None:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_complete, node, content, store, stall_timeout)
                    await _in_order(content, store, write)
            except* PeerError as group:  # one failure, said as itself
                raise group.exceptions[0] from None
        else:
            await _until_complete(node, content, store, stall_timeout)
        final = await trio.to_thread.run_sync(store.finalize_sync)
        finished = True
    finally:
        if not finished:
            await close_store(node, content, store)
    seconds = max(trio.current_time() - started, 1e-9)
    assert content is not None
    got = content.downloaded
    result = DownloadResult(
        id=cid.hex(),
        path=os.fspath(final),
        bytes=manifest.info.size,
        seconds=round(seconds, 3),
        MBps=round(got / seconds / 1e6, 1),
        peers_used=sum(1 for v in content.bytes_from.values() if v),
        bytes_per_peer=dict(content.bytes_from),
        hash_failures=content.hash_failures,
        resumed_bytes=store.resumed_bytes,
    )
    return content, result


# A verified range of a streamed content: (offset, length, the buffer that
# holds its bytes from offset 0 if the node kept it in memory, else None).
Piece = tuple[int, int, mmap.mmap | None]


class OutputClosed(PeerError):
    """The reader of a streamed download went away (a closed pipe)."""


async def _in_order(
    content: Content,
    store: ChunkStore,
    write: Callable[[ChunkStore, list[Piece]], Awaitable[object]] | None,
) -> None:
    """Follow the content from its first chunk to its last as chunks are
    verified: keep the read-ahead window just past what is consumed and, with
    ``write``, write each chunk once verified (never before).

    With ``write``, the node keeps the window's chunks in their receive
    buffers once verified (``Content.hold``), and ``write`` gets that copy
    when there is one: then no byte of the stream is read back from disk.
    """
    info = content.info
    window = max(READ_AHEAD_MIN, READ_AHEAD_BYTES // max(info.chunk_size, 1))
    run = max(1, WRITE_RUN_BYTES // max(info.chunk_size, 1))
    index = written = 0
    try:
        while index < info.num_chunks:
            now = trio.current_time()
            content.apply(content.engine.read_ahead(index, window, now))
            if write is not None:
                content.hold(index, window)
            while not store.have[index]:
                stored = content.next_stored()
                if store.have[index]:
                    break
                if content.ended.is_set():
                    return  # _until_complete says why
                with trio.move_on_after(1.0):
                    await stored.wait()
            if write is None:
                index += 1
                continue
            # Every verified chunk from here on in one write (one thread trip).
            end = index + 1
            while end < min(info.num_chunks, index + run) and store.have[end]:
                end += 1
            pieces: list[Piece] = []
            for i in range(index, end):
                pieces.append((i * info.chunk_size, info.chunk_length(i), content.take_held(i)))
            # What follows the run is what the reader needs next, while it is written.
            content.apply(content.engine.read_ahead(end, window, trio.current_time()))
            content.hold(end, window)
            try:
                await write(store, pieces)
            except (BrokenPipeError, trio.BrokenResourceError, trio.ClosedResourceError):
                raise OutputClosed(
                    f"the output was closed after {written} of {info.size} bytes; stopped "
                    "(the verified chunks are kept: the same command resumes)"
                ) from None
            # Back to the pool only once written: a write cut short by
            # cancellation may still be reading them in its thread.
            for _offset, length, held in pieces:
                if held is not None:
                    content.done_with(held)
                written += length
            index = end
        content.apply(content.engine.read_ahead(0, 0, trio.current_time()))
    finally:
        if write is not None:
            content.hold(0, 0)


async def _until_complete(
    node: Node, content: Content, store: ChunkStore, stall_timeout: float
) -> None:
    """Return once ``content`` is complete.

    Raises:
        DownloadError: no new verified byte for ``stall_timeout`` seconds, or
            the content ended without completing (its error, if it failed).
    """
    last_bytes = -1
    last_progress = last_said = trio.current_time()
    while not content.completed.is_set():
        with trio.move_on_after(1.0):
            await content.completed.wait()
        if content.completed.is_set():
            return
        ended = ended_error(node, content)
        if ended is not None:
            raise ended
        now = trio.current_time()
        if content.downloaded != last_bytes:
            last_bytes = content.downloaded
            last_progress = now
        elif now - last_progress > stall_timeout:
            raise DownloadError(_stall_message(node, content, store, stall_timeout))
        elif now - last_said >= WAITING_SAID_EVERY and now - last_progress >= WAITING_SAID_EVERY:
            last_said = now
            log.info(
                "waiting: %d peer(s) connected, the tracker named %d; no new chunk for %.0f s "
                "(giving up after %.0f s)",
                len(content.sessions),
                content.tracker_peers,
                now - last_progress,
                stall_timeout,
            )


def _stall_message(node: Node, content: Content, store: ChunkStore, stall_timeout: float) -> str:
    """Say what happened when a download made no progress, and what is kept."""
    limit = node.down_limiter.rate
    chunk = content.info.chunk_size
    connected = len(content.sessions)
    if limit is not None and chunk / limit > stall_timeout / 2:
        what = (
            f"the down-limit of {limit:.0f} bytes/s is probably too low: one {chunk}-byte "
            f"chunk takes {chunk / limit:.0f} s"
        )
    elif content.peers_seen == 0:
        named = content.tracker_peers
        what = (
            "no peer has this content: the tracker knows none"
            if not named
            else f"no peer has this content: the tracker named {named}, none could be used"
        )
    elif not content.bytes_from:
        what = f"{connected} peer(s) connected, but no chunk arrived"
    else:
        what = f"all peers stopped sending ({connected} connected)"
    verified = store.resumed_bytes + content.downloaded
    kept = (
        f"{verified} verified bytes are kept in {store.part_path}: "
        "run the same command again to resume"
        if verified
        else "nothing was verified, so nothing is kept"
    )
    return f"{what} (no progress for {stall_timeout:.0f} s); {kept}"
