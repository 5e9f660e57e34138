"""Where a tracker keeps its state: the storage interface and its two backends.

A tracker's state is (a) its swarm index, who holds which chunks of which
content, with expiry, (b) the published manifests with prefix lookup and
(c) the limits on what one key or address may make it hold. A ``Backend``
gives the server all three:

* ``index``: the ``SwarmIndex`` the hot path answers ANNOUNCE from,
  synchronously. With the memory backend it *is* the state; with Redis it
  is this tracker's local view of the shared state (``_redis.py``).
* ``manifests``: an async ``Manifests`` store (put / get / num_chunks /
  resolve_prefix).
* ``run``: the backend's background work (none for memory; for Redis the
  write-behind flush and the view refresh), started by ``serve_tracker``.

``open_backend(None, ...)`` is the default, today's in-memory index plus
the SQLite manifest store, unchanged: the server's hot path is the same code
with no extra step. ``open_backend("redis://...", ...)`` is the shared one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from peerd.errors import StorageError

from ._backend import Backend, Manifests, SqliteManifests
from ._budget import Budget
from .index import SwarmIndex
from .manifests import ManifestStore

__all__ = ["Backend", "Manifests", "SqliteManifests", "open_backend", "store_url"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def store_url(text: str | None) -> str | None:
    """The ``--store`` value, else ``$PEER_REDIS_URL``; None (or ``memory``) = in memory.

    Raises:
        StorageError: not ``memory`` nor a ``redis://``, ``rediss://``, ``unix://``,
            ``redis+cluster://`` or ``rediss+cluster://`` URL.
    """
    url = text if text is not None else os.environ.get("PEER_REDIS_URL") or None
    if url is None or url == "memory":
        return None
    if not url.startswith(REDIS_SCHEMES):
        raise StorageError(
            f"--store {url}: use memory, redis://[:PASSWORD@]HOST:PORT/DB, rediss://..., "
            "or redis+cluster://HOST:PORT for a Redis Cluster"
        )
    return url


async def open_backend(
    url: str | None,
    data_dir: Path,
    *,
    ttl: float,
    interval: float,
    clock: Callable[[], float],
    max_contents: int,
    max_contents_per_peer: int,
    max_peers_per_content: int,
    memory: Budget,
    max_disk: int,
    entries_per_address: int,
    bytes_per_address: int = 1 << 62,
) -> Backend:
    """The backend named by ``url`` (None: in memory + SQLite under ``data_dir``).

    Raises:
        StorageError: the database cannot be opened, or Redis cannot be reached.
    """
    index_args = {
        "ttl": ttl,
        "interval": interval,
        "max_contents": max_contents,
        "max_contents_per_peer": max_contents_per_peer,
        "max_peers_per_content": max_peers_per_content,
        "memory": memory,
    }
    if url is None:
        store = ManifestStore(
            Path(data_dir),
            max_bytes=max_disk,
            max_bytes_per_key=max_disk // 8,
            max_bytes_per_address=max_disk // 4,
        )
        return Backend(SwarmIndex(**index_args), SqliteManifests(store))  # type: ignore[arg-type]
    from ._redis import open_redis

    return await open_redis(
        url,
        clock=clock,
        index_args=index_args,
        max_disk=max_disk,
        entries_per_address=entries_per_address,
        bytes_per_address=bytes_per_address,
    )
