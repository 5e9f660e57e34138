"""Endgame: two copies of one chunk arrive together (issue 14, finding 11).

In endgame the same chunk is asked of several peers. Two copies can be
hashed at the same time on worker threads; the "already have it" check must
hold after the thread hop too, so the chunk is counted (and announced) once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import trio

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest, build_manifest
from peerd.content.store import ChunkStore
from peerd.node.driver import Content
from peerd.node.node import Node
from peerd.transport import get_transport

CHUNK = 256 * 1024


async def test_two_copies_hashed_together_count_once(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    data = os.urandom(2 * CHUNK)
    src.write_bytes(data)
    ident = Identity.generate()
    manifest = Manifest(build_manifest(src, chunk_size=CHUNK), ()).signed(ident)
    node = Node(ident, get_transport("reactor"), tracker=("127.0.0.1", 9))
    store = await ChunkStore.open(manifest.info, manifest.content_id, tmp_path / "out.bin")
    try:
        content = Content(node, manifest, store)
        both_hashed = threading.Barrier(2, timeout=10)
        verify = content._verify_and_write

        def verify_together(store: ChunkStore, index: int, view: memoryview) -> bool:
            both_hashed.wait()  # neither copy is marked held before both are hashed
            return verify(store, index, view)

        content._verify_and_write = verify_together  # type: ignore[method-assign]
        peers = [
            SimpleNamespace(name=f"peer{k}", route=(bytes(32), f"127.0.0.{k}")) for k in range(2)
        ]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    buf = await content.buffers.acquire()
                    buf[:CHUNK] = data[:CHUNK]
                    nursery.start_soon(content._store_chunk, peer, 0, buf, CHUNK)
        assert store.have[0] and not store.have[1]
        assert content.downloaded == CHUNK  # not twice
        assert sum(content.bytes_from.values()) == CHUNK
        assert content.engine.picker is not None and content.engine.picker.missing == 1
    finally:
        store.close()


async def test_rates_are_over_the_last_seconds(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(CHUNK))
    ident = Identity.generate()
    manifest = Manifest(build_manifest(src, chunk_size=CHUNK), ()).signed(ident)
    node = Node(ident, get_transport("reactor"), tracker=("127.0.0.1", 9))
    store = await ChunkStore.open(manifest.info, manifest.content_id, tmp_path / "out.bin")
    try:
        content = Content(node, manifest, store)
        assert content.rates() == (0.0, 0.0)
        # (time, downloaded, uploaded), as the ticker records them
        content._samples.extend([(10.0, 0, 0), (12.0, 4_000_000, 1_000_000)])
        assert content.rates() == (2_000_000.0, 500_000.0)
    finally:
        store.close()
