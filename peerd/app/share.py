"""Sharing a file or a directory tree: build (or reuse) its manifest, sign, publish, seed.

Manifests are cached under ``$PEER_HOME/manifests`` by absolute path, size
and mtime, so sharing the same unchanged file again is instant. A tree's
cache key also covers its layout: every file's path, size and mtime and
every empty directory (the tree is walked each time; only the hashing is
saved), and a cached tree info is used only if its file list is exactly the
one just walked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

import trio

from peerd.content.identity import Identity, peer_home
from peerd.content.manifest import (
    Info,
    Manifest,
    ScannedFile,
    build_manifest,
    build_tree_manifest,
    scan_tree,
)
from peerd.content.store import SourceFile, SourceTree
from peerd.errors import ManifestError, StorageError, TrackerError
from peerd.node.driver import Content
from peerd.node.node import Node

__all__ = ["load_or_build", "load_or_build_info", "share_file"]

log = logging.getLogger("peerd.app.share")

# A tracker short of memory for a large PUBLISH right now answers ``limit``;
# so does one whose disk quota is used up, which no wait cures: a few tries.
_PUBLISH_TRIES = 4
_PUBLISH_PAUSE = 0.5  # doubles per try


def _cache_path(
    home: Path, path: Path, st: os.stat_result, algo: str, chunk_size: int | None
) -> Path:
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{algo}\0{chunk_size}".encode()
    return home / "manifests" / (hashlib.sha256(key).hexdigest() + ".info")


def _tree_key(files: list[ScannedFile], dirs: list[str]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\0".encode("utf-8", "surrogateescape"))
    digest.update(b"\1")
    for d in dirs:
        digest.update(d.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def load_or_build_info(
    path: Path, algo: str = "blake3", home: Path | None = None, chunk_size: int | None = None
) -> Info:
    """The manifest info of ``path`` (a file or a directory), from the cache
    when it is unchanged. Blocking: run it in a worker thread from Trio.

    Raises:
        StorageError: the path cannot be read, is neither a regular file nor a
            directory, or a tree holds a link or a special file.
        ManifestError: it cannot be described (name, path rules, size limits).
    """
    return load_or_build(path, algo, home, chunk_size)[0]


def load_or_build(
    path: Path, algo: str = "blake3", home: Path | None = None, chunk_size: int | None = None
) -> tuple[Info, list[tuple[int, int]] | None]:
    """:func:`load_or_build_info`, and for a tree each file's ``(size,
    mtime_ns)`` as walked (what :class:`SourceTree` checks the files against)."""
    path = path.resolve()
    home = home or peer_home()
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StorageError(f"cannot share {path}: {exc.strerror}") from None
    scanned = None
    if stat.S_ISDIR(st.st_mode):
        scanned = scan_tree(path)
        key = f"tree\0{_tree_key(*scanned)}"
        cache = _cache_path(home, Path(f"{path}\0{key}"), st, algo, chunk_size)
        signatures: list[tuple[int, int]] | None = [(f.size, f.mtime_ns) for f in scanned[0]]
    else:
        cache = _cache_path(home, path, st, algo, chunk_size)
        signatures = None
    try:
        info = Info.decode(cache.read_bytes())
        if info.algo == algo and info.name == path.name:
            if scanned is None and not info.is_tree and info.size == st.st_size:
                return info, None
            if scanned is not None and info.is_tree:
                files, dirs = scanned
                if info.files == tuple((f.path, f.size) for f in files) and info.dirs == tuple(
                    dirs
                ):
                    return info, signatures
    except (OSError, ManifestError):
        pass
    if scanned is not None:
        info = build_tree_manifest(path, algo, chunk_size, scanned=scanned)
    else:
        info = build_manifest(path, algo, chunk_size)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(info.encode())
        os.replace(tmp, cache)
    except OSError as exc:
        log.info("could not cache the manifest of %s: %s", path, exc)
    return info, signatures


async def share_file(
    node: Node,
    identity: Identity,
    path: Path,
    *,
    algo: str = "blake3",
    home: Path | None = None,
    chunk_size: int | None = None,
) -> Content:
    """Describe, sign and publish ``path`` (a file or a directory tree), then
    serve it from ``node``.

    Returns the running :class:`Content` (its ``content_id`` is the id to give out).
    """
    path = await trio.to_thread.run_sync(path.resolve)
    info, signatures = await trio.to_thread.run_sync(load_or_build, path, algo, home, chunk_size)
    manifest = Manifest(info, ()).signed(identity)
    active = node.contents.get(manifest.content_id)
    if active is not None:
        return active  # already shared by this node: same content, same id
    source: SourceFile
    if signatures is not None:
        source = await trio.to_thread.run_sync(SourceTree, path, info, signatures)
    else:
        source = await trio.to_thread.run_sync(SourceFile, path, info)
    try:

        async def publish(client):  # type: ignore[no-untyped-def]
            await client.publish(manifest)

        pause = _PUBLISH_PAUSE
        for tries_left in range(_PUBLISH_TRIES - 1, -1, -1):
            try:
                await node.tracker_call(publish)
                break
            except TrackerError as exc:
                if exc.code == "unreachable":
                    # Seed anyway (peers named directly, or a link's x=, still
                    # work) and publish once the tracker answers.
                    log.warning("%s; seeding anyway, retrying in the background", exc)
                    content = await node.add_content(manifest, source)
                    node.nursery.start_soon(_publish_later, node, content, publish)
                    return content
                if exc.code not in ("limit", "too-many") or not tries_left:
                    raise
                log.info("tracker refused the publish (%s); retrying in %.1f s", exc, pause)
                await trio.sleep(pause)
                pause *= 2
        return await node.add_content(manifest, source)
    except BaseException:
        source.close()  # idempotent: the node closes it too once it runs
        raise


async def _publish_later(node: Node, content: Content, publish: Any) -> None:
    """Publish once the tracker can be reached (backing off, quietly), then
    let the content announce at once. Ends with the content."""
    pause = 2.0
    while not content.ended.is_set():
        with trio.move_on_after(pause):
            await content.ended.wait()
        if content.ended.is_set():
            return
        try:
            await node.tracker_call(publish)
        except TrackerError as exc:
            log.debug("publish still failing: %s", exc)
            pause = min(pause * 2, 60.0)
            continue
        log.warning("the tracker is reachable again: published")
        content.tracker_changed()
        return
