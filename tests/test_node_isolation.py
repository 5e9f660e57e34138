"""One content's failure stays in that content (issue 14, finding 6).

Two real nodes on loopback, in-process: a seeder with two files, a leecher
downloading both. The leecher's disk "fills" while it stores a chunk of the
first (the store's positional write raises ENOSPC, as a full disk makes it
do): that download ends with its error in ``node.failed``; the other
download completes and the node keeps running.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest, build_manifest
from peerd.content.store import ChunkStore, SourceFile
from peerd.node.node import Node
from peerd.transport import Transport

MiB = 1 << 20


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def test_a_failing_content_does_not_end_the_others(
    tmp_path: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [_file(tmp_path / f"f{k}.bin", 2 * MiB) for k in range(2)]
    seeder_id, leecher_id = Identity.generate(), Identity.generate()
    manifests = [
        Manifest(build_manifest(f, chunk_size=256 * 1024), ()).signed(seeder_id) for f in files
    ]
    bad_cid = manifests[0].content_id
    real_write = ChunkStore.write_chunk_sync

    def write(self: ChunkStore, index: int, data: memoryview | bytes) -> None:
        if self.content_id == bad_cid and index >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, index, data)

    monkeypatch.setattr(ChunkStore, "write_chunk_sync", write)
    # No tracker: the port is closed, announces fail and are retried quietly.
    tracker = ("127.0.0.1", 9)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            seeder = await nursery.start(Node(seeder_id, transport, tracker=tracker).run)
            leecher = await nursery.start(Node(leecher_id, transport, tracker=tracker).run)
            for m, f in zip(manifests, files, strict=True):
                await seeder.add_content(m, SourceFile(f, m.info))
            contents = []
            for k, m in enumerate(manifests):
                store = await ChunkStore.open(m.info, m.content_id, tmp_path / f"out{k}.bin")
                content = await leecher.add_content(m, store)
                content.dial("127.0.0.1", seeder.port)
                contents.append(content)
            while bad_cid not in leecher.failed:
                await trio.sleep(0.05)
            assert "No space left on device" in leecher.failed[bad_cid]
            good = contents[1]
            await good.completed.wait()
            assert leecher.contents.get(good.content_id) is good  # still running
            assert bad_cid not in leecher.contents
            # The node is alive: the seeder side is untouched, the leecher's
            # listener still accepts.
            assert set(seeder.contents) == {m.content_id for m in manifests}
            stream = await transport.connect("127.0.0.1", leecher.port, timeout=5)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    out = tmp_path / "out1.bin.part"
    assert out.read_bytes()[: 2 * MiB] == files[1].read_bytes()
