"""ChunkStore on real files: who owns PATH.part, and how much disk a manifest may take.

The manifest is remote input: its size must not turn into allocated disk
before verified data arrives, and a ``PATH.part`` that is not ours (no resume
state of this content beside it) is refused by name, never truncated.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from peerd.content.hashing import hash_chunk, merkle_root
from peerd.content.identity import Identity
from peerd.content.manifest import Info, Manifest
from peerd.content.store import ALLOC_STEP, ChunkStore
from peerd.errors import StorageError

MiB = 1 << 20


def sparse_info(size: int, chunk: int = MiB, name: str = "big.bin") -> Info:
    """A valid Info for ``size`` zero bytes, without hashing them all."""
    n = -(-size // chunk)
    full = hash_chunk("blake3", bytes(chunk))
    last = hash_chunk("blake3", bytes(size - (n - 1) * chunk))
    hashes = full * (n - 1) + last
    return Info(name, size, chunk, "blake3", hashes, merkle_root("blake3", hashes))


def data_info(data: bytes, chunk: int = 64 * 1024, name: str = "f.bin") -> Info:
    hashes = b"".join(hash_chunk("blake3", data[i : i + chunk]) for i in range(0, len(data), chunk))
    return Info(name, len(data), chunk, "blake3", hashes, merkle_root("blake3", hashes))


def cid_of(info: Info) -> bytes:
    return Manifest(info, ()).signed(Identity.generate()).content_id


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_huge_manifest_allocates_one_step_and_grows_with_verified_chunks(
    tmp_path: Path,
) -> None:
    info = sparse_info(4 << 30)  # 4 GiB, 4096 chunks
    out = tmp_path / "big.bin"
    store = await ChunkStore.open(info, cid_of(info), out)
    try:
        part = out.with_name("big.bin.part")
        assert os.stat(part).st_size == info.size  # full length, sparse
        assert allocated(part) <= ALLOC_STEP
        # A chunk near the end allocates its block, not everything before it.
        store.write_chunk_sync(info.num_chunks - 1, bytes(MiB))
        store.write_chunk_sync(info.num_chunks // 2, bytes(MiB))
        assert allocated(part) <= 3 * ALLOC_STEP
        assert store.allocated_bytes <= 3 * ALLOC_STEP
    finally:
        store.close()


async def test_part_with_nothing_verified_is_removed_and_one_with_chunks_kept(
    tmp_path: Path,
) -> None:
    data = os.urandom(256 * 1024)
    info = data_info(data)
    cid = cid_of(info)
    out = tmp_path / "f.bin"
    part, state = tmp_path / "f.bin.part", tmp_path / "f.bin.part.state"
    store = await ChunkStore.open(info, cid, out)
    assert part.exists() and state.exists()
    assert store.discard_if_empty() is True
    assert not part.exists() and not state.exists()

    store = await ChunkStore.open(info, cid, out)
    store.write_chunk_sync(1, data[65536:131072])
    store.mark_have(1)
    assert store.discard_if_empty() is False
    assert part.exists() and state.exists()
    again = await ChunkStore.open(info, cid, out)  # resume keeps working
    try:
        assert again.resumed_bytes == 65536 and again.have[1]
    finally:
        again.close()


async def test_unrelated_part_file_is_refused_untouched(tmp_path: Path) -> None:
    info = data_info(os.urandom(200_000))
    out = tmp_path / "f.bin"
    part = tmp_path / "f.bin.part"
    precious = b"someone's own file, not a download\n" * 100
    part.write_bytes(precious)
    with pytest.raises(StorageError, match=r"f\.bin\.part exists but is not an unfinished"):
        await ChunkStore.open(info, cid_of(info), out)
    with pytest.raises(StorageError, match=r"f\.bin\.part exists"):
        await ChunkStore.open(info, cid_of(info), out, force=True)
    assert part.read_bytes() == precious
    assert not (tmp_path / "f.bin.part.state").exists()


async def test_part_of_another_content_is_refused_untouched(tmp_path: Path) -> None:
    first = data_info(os.urandom(200_000))
    second = data_info(os.urandom(300_000))
    out = tmp_path / "f.bin"
    store = await ChunkStore.open(first, cid_of(first), out)
    store.write_chunk_sync(0, bytes(65536))
    store.mark_have(0)
    store.close()
    part = tmp_path / "f.bin.part"
    before = part.read_bytes()
    state_before = (tmp_path / "f.bin.part.state").read_bytes()
    with pytest.raises(StorageError, match="another content"):
        await ChunkStore.open(second, cid_of(second), out)
    assert part.read_bytes() == before
    assert (tmp_path / "f.bin.part.state").read_bytes() == state_before


async def test_foreign_state_file_is_not_overwritten(tmp_path: Path) -> None:
    info = data_info(os.urandom(100_000))
    state = tmp_path / "f.bin.part.state"
    state.write_bytes(b"not msgpack at all \xc1\xc1")
    with pytest.raises(StorageError, match=r"f\.bin\.part\.state exists and is not"):
        await ChunkStore.open(info, cid_of(info), tmp_path / "f.bin")
    assert state.read_bytes() == b"not msgpack at all \xc1\xc1"
    assert not (tmp_path / "f.bin.part").exists()


async def test_two_stores_on_one_part_file_are_refused(tmp_path: Path) -> None:
    info = data_info(os.urandom(100_000))
    cid = cid_of(info)
    store = await ChunkStore.open(info, cid, tmp_path / "f.bin")
    try:
        with pytest.raises(
            StorageError, match=rf"another `peer get` \(pid {os.getpid()}\) is downloading"
        ):
            await ChunkStore.open(info, cid, tmp_path / "f.bin")
    finally:
        store.close()
    (await ChunkStore.open(info, cid, tmp_path / "f.bin")).close()


async def test_finish_cut_after_the_state_went_resumes_every_chunk(tmp_path: Path) -> None:
    """PATH and PATH.part are one complete file and the state is gone (a crash
    between the two unlinks of finalize): every chunk is re-verified, not fetched."""
    data = os.urandom(200_000)
    info = data_info(data)
    cid = cid_of(info)
    out = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(data)
    os.link(tmp_path / "f.bin.part", out)
    store = await ChunkStore.open(info, cid, out)
    try:
        assert store.complete and store.resumed_bytes == len(data)
    finally:
        store.close()


async def test_state_is_written_before_the_part_file(tmp_path: Path) -> None:
    info = data_info(os.urandom(100_000))
    cid = cid_of(info)
    store = await ChunkStore.open(info, cid, tmp_path / "f.bin")
    store.close()
    state = msgpack.unpackb((tmp_path / "f.bin.part.state").read_bytes())
    assert state["id"] == cid and not any(state["bits"])


@pytest.mark.parametrize("cache", [False, True])
async def test_read_into_reads_back_what_was_written(tmp_path: Path, cache: bool) -> None:
    # A stream's cache reads its chunks back with O_DIRECT into a page-aligned
    # buffer (here tmp_path is on a disk; on tmpfs it falls back to preadv):
    # the bytes are the ones written, the short last chunk and runs included.
    import mmap

    chunk = 64 * 1024
    data = os.urandom(5 * chunk + 1234)
    info = data_info(data, chunk)
    store = await ChunkStore.open(info, cid_of(info), tmp_path / "f.bin", cache=cache)
    try:
        for i in range(info.num_chunks):
            store.write_chunk_sync(i, data[i * chunk : (i + 1) * chunk])
        buf = mmap.mmap(-1, len(data) + chunk)
        view = memoryview(buf)
        assert store.read_into_sync(chunk, view[: 2 * chunk]) == data[chunk : 3 * chunk]
        last = 5 * chunk
        assert store.read_into_sync(last, view[:1234]) == data[last:]
        assert store.read_into_sync(0, view[: len(data)]) == data  # a run, unaligned end
        # Past the end: only what there is.
        assert store.read_into_sync(last, view[: 2 * chunk]) == data[last:]
        unaligned = memoryview(bytearray(chunk + 1))[1:]  # not page-aligned: buffered
        assert store.read_into_sync(chunk, unaligned) == data[chunk : 2 * chunk]
    finally:
        store.close()
