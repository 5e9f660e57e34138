"""The storage interface a tracker backend implements (see ``store.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from .index import SwarmIndex
from .manifests import ManifestStore

__all__ = ["Backend", "Manifests", "SqliteManifests"]


class Manifests(Protocol):
    """Published manifests by content id (see ``manifests.ManifestStore`` for the rules)."""

    async def put(
        self, content_id: bytes, data: bytes, num_chunks: int, key: bytes, address: str
    ) -> bool: ...

    async def get(self, content_id: bytes) -> bytes | None: ...

    async def num_chunks(self, content_id: bytes) -> int | None: ...

    async def resolve_prefix(self, prefix: str) -> bytes: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class SqliteManifests:
    """``ManifestStore`` (SQLite) behind the async interface: one worker thread."""

    def __init__(self, store: ManifestStore) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def put(
        self, content_id: bytes, data: bytes, num_chunks: int, key: bytes, address: str
    ) -> bool:
        return bool(await self._run(self.store.put, content_id, data, num_chunks, key, address))

    async def get(self, content_id: bytes) -> bytes | None:
        data = await self._run(self.store.get, content_id)
        assert data is None or isinstance(data, bytes)
        return data

    async def num_chunks(self, content_id: bytes) -> int | None:
        n = await self._run(self.store.num_chunks, content_id)
        return n if isinstance(n, int) else None

    async def resolve_prefix(self, prefix: str) -> bytes:
        cid = await self._run(self.store.resolve_prefix, prefix)
        assert isinstance(cid, bytes)
        return cid

    def describe(self) -> str:
        return f"{len(self.store)} manifests in {self.store.path}"

    def close(self) -> None:
        self.store.close()


class Backend:
    """One tracker's state: its index, its manifests, its background work."""

    def __init__(self, index: SwarmIndex, manifests: Manifests) -> None:
        self.index = index
        self.manifests = manifests

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work until cancelled (the memory backend has none)."""
        task_status.started()

    def close(self) -> None:
        self.manifests.close()
