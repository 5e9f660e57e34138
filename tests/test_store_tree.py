"""Trees on disk (peerd/content/store.py, "Trees"): the part tree a download
assembles, resume, what a planted link or hard link cannot do, and the
shared side's descriptors and change detection. Real files throughout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from peerd.content import store as store_module
from peerd.content.identity import Identity
from peerd.content.manifest import Info, Manifest, build_tree_manifest, scan_tree
from peerd.content.store import ChunkStore, SourceTree, TreeStore
from peerd.errors import StorageError

CS = 16 * 1024


def make_tree(root: Path, many: int = 0) -> Path:
    top = root / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "empty" / "inner").mkdir(parents=True)
    (top / "a" / "b" / "x.bin").write_bytes(os.urandom(CS + 100))  # spans chunks
    (top / "a" / "zero").write_bytes(b"")
    (top / "a" / "y.bin").write_bytes(os.urandom(3 * CS - 7))
    (top / "n").mkdir()
    for i in range(many):
        (top / "n" / f"{i:05}").write_bytes(os.urandom(1 + (i * 131) % 700))  # chunks span files
    (top / "z").write_bytes(b"")
    return top


def tree_bytes(top: Path, info: Info) -> bytes:
    return b"".join((top / p).read_bytes() for p, _s in info.files or ())


def snapshot(top: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        out[rel + "/"] = sorted(dirnames)
        for name in filenames:
            out[os.path.join(rel, name)] = (Path(dirpath) / name).read_bytes()
    return out


def cid_of(info: Info) -> bytes:
    return Manifest(info, ()).signed(Identity.from_seed(b"s" * 32)).content_id


def write_chunks(store: ChunkStore, data: bytes, indices: range | list[int]) -> None:
    for i in indices:
        off, length = store.chunk_range(i)
        store.write_chunk_sync(i, data[off : off + length])
        store.mark_have(i)


async def test_a_tree_is_assembled_beside_the_target_and_renamed_into_place(
    tmp_path: Path,
) -> None:
    top = make_tree(tmp_path / "src", many=60)
    info = build_tree_manifest(top, chunk_size=CS)
    data = tree_bytes(top, info)
    out = tmp_path / "out"
    out.mkdir()
    store = await ChunkStore.open(info, cid_of(info), out / "top")
    assert isinstance(store, TreeStore)
    part = out / "top.part"
    # Every file and empty directory exists at once, at full size, sparse.
    assert (part / "empty" / "inner").is_dir() and (part / "z").stat().st_size == 0
    assert (part / "a" / "b" / "x.bin").stat().st_size == CS + 100
    assert (part / "a" / "b" / "x.bin").stat().st_blocks == 0
    assert not (out / "top").exists()
    spanning = [i for i in range(info.num_chunks) if len(list(info.segments(i * CS, CS))) > 1]
    assert spanning, "the tree should have chunks that span files"
    write_chunks(store, data, range(info.num_chunks))
    assert store.complete
    assert store.finalize_sync() == out / "top"
    store.close()
    assert snapshot(out / "top") == snapshot(top)
    assert sorted(os.listdir(out)) == ["top"]


async def test_resume_after_an_interrupted_download_reverifies_each_chunk(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src", many=30)
    info = build_tree_manifest(top, chunk_size=CS)
    data = tree_bytes(top, info)
    cid = cid_of(info)
    out = tmp_path / "out"
    out.mkdir()
    store = await ChunkStore.open(info, cid, out / "top")
    half = list(range(0, info.num_chunks, 2))
    write_chunks(store, data, half)
    store.close()  # the state names the chunks written
    # One claimed chunk is damaged on disk meanwhile (its first byte's file).
    bad = half[1]
    i, pos, _n = next(info.segments(bad * CS, CS))
    victim = out / "top.part" / (info.files or ())[i][0]
    raw = bytearray(victim.read_bytes())
    raw[pos] ^= 0xFF
    victim.write_bytes(raw)
    again = await ChunkStore.open(info, cid, out / "top")
    assert [j for j in range(info.num_chunks) if again.have[j]] == [j for j in half if j != bad]
    assert again.resumed_bytes == sum(again.chunk_range(j)[1] for j in half if j != bad)
    write_chunks(again, data, [j for j in range(info.num_chunks) if not again.have[j]])
    again.finalize_sync()
    again.close()
    assert snapshot(out / "top") == snapshot(top)


async def test_nothing_verified_leaves_nothing_behind(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    store = await ChunkStore.open(info, cid_of(info), tmp_path / "top")
    assert store.discard_if_empty()
    assert not (tmp_path / "top.part").exists() and not (tmp_path / "top.part.state").exists()


async def test_a_second_store_on_the_same_output_is_refused_naming_the_holder(
    tmp_path: Path,
) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    cid = cid_of(info)
    store = await ChunkStore.open(info, cid, tmp_path / "top")
    try:
        with pytest.raises(StorageError, match=rf"another `peer get` \(pid {os.getpid()}\)"):
            await ChunkStore.open(info, cid, tmp_path / "top")
        assert (tmp_path / "top.part").is_dir()  # the refused one removed nothing
    finally:
        store.close()


async def test_an_existing_target_is_refused_and_replaced_with_force(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    data = tree_bytes(top, info)
    target = tmp_path / "top"
    target.mkdir()
    (target / "old").write_bytes(b"old")
    with pytest.raises(StorageError, match="already exists; use --force"):
        await ChunkStore.open(info, cid_of(info), target)
    store = await ChunkStore.open(info, cid_of(info), target, force=True)
    write_chunks(store, data, range(info.num_chunks))
    store.finalize_sync()
    store.close()
    assert snapshot(target) == snapshot(top)
    assert sorted(os.listdir(tmp_path)) == ["src", "top"]


@pytest.mark.parametrize("where", ["a", "a/b", "a/b/x.bin", "empty/inner"])
async def test_a_link_planted_in_the_part_tree_is_refused_and_never_followed(
    tmp_path: Path, where: str
) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    data = tree_bytes(top, info)
    cid = cid_of(info)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"precious")
    (outside / "b").mkdir()
    store = await ChunkStore.open(info, cid, tmp_path / "top")
    write_chunks(store, data, [0])
    store.close()
    planted = tmp_path / "top.part" / where
    if planted.is_dir():
        import shutil

        shutil.rmtree(planted)
    else:
        planted.unlink()
    planted.symlink_to(outside / Path(where).name if where != "a" else outside)
    before = snapshot(outside)
    with pytest.raises(StorageError, match="symbolic link or another kind of file"):
        await ChunkStore.open(info, cid, tmp_path / "top")
    assert snapshot(outside) == before
    assert planted.is_symlink()  # refused, left as it is for the user to see


async def test_a_hard_link_planted_in_the_part_tree_is_refused(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    cid = cid_of(info)
    store = await ChunkStore.open(info, cid, tmp_path / "top")
    write_chunks(store, tree_bytes(top, info), [0])
    store.close()
    outside = tmp_path / "precious"
    outside.write_bytes(b"x" * (3 * CS - 7))
    victim = tmp_path / "top.part" / "a" / "y.bin"
    victim.unlink()
    os.link(outside, victim)
    with pytest.raises(StorageError, match="hard link"):
        await ChunkStore.open(info, cid, tmp_path / "top")
    assert outside.read_bytes() == b"x" * (3 * CS - 7)


async def test_a_part_path_that_is_a_link_is_refused(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "top.part").symlink_to(elsewhere)
    (tmp_path / "top.part.state").write_bytes(b"")
    with pytest.raises(StorageError):
        await ChunkStore.open(info, cid_of(info), tmp_path / "top")
    assert os.listdir(elsewhere) == []


# --- the shared side ----------------------------------------------------------------
def source_of(top: Path, info: Info) -> SourceTree:
    files, _dirs = scan_tree(top)
    return SourceTree(top, info, [(f.size, f.mtime_ns) for f in files])


def read_via_segments(source: SourceTree | ChunkStore, info: Info) -> bytes:
    out = bytearray()
    for i in range(info.num_chunks):
        for fd, position, n in source.segments(i, 0, info.chunk_length(i)):
            out += os.pread(fd, n, position)
    return bytes(out)


def test_a_shared_tree_serves_every_chunk_with_bounded_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SOURCE_FDS", 8)
    top = make_tree(tmp_path / "src", many=300)
    info = build_tree_manifest(top, chunk_size=CS)
    source = source_of(top, info)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        assert read_via_segments(source, info) == tree_bytes(top, info)
        assert len(source._cache) <= 8
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 8
        # A chunk part-way through: offsets inside a chunk map too.
        pieces = list(source.segments(2, 100, 500))
        got = b"".join(os.pread(fd, n, pos) for fd, pos, n in pieces)
        assert got == tree_bytes(top, info)[2 * CS + 100 : 2 * CS + 600]
    finally:
        source.close()


def test_a_shared_tree_notices_a_change_and_rehash_decides(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src", many=20)
    info = build_tree_manifest(top, chunk_size=CS)
    source = source_of(top, info)
    try:
        read_via_segments(source, info)  # opens (and caches) files
        assert not source.moved()
        x = top / "a" / "b" / "x.bin"
        stamp = time.time() + 5
        os.utime(x, (stamp, stamp))  # touched: same bytes
        assert source.moved() and not source.servable
        assert source.rehash_sync() and source.servable
        assert read_via_segments(source, info) == tree_bytes(top, info)
        raw = bytearray(x.read_bytes())
        raw[10] ^= 1
        x.write_bytes(raw)  # changed bytes, same size
        assert source.moved()
        assert not source.rehash_sync()
    finally:
        source.close()


def test_a_file_changed_before_it_is_first_opened_is_not_served(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    source = source_of(top, info)
    try:
        (top / "z").write_bytes(b"")  # same size, new mtime; not opened yet
        stamp = time.time() + 5
        os.utime(top / "a" / "y.bin", (stamp, stamp))
        with pytest.raises(StorageError, match="source changed"):
            read_via_segments(source, info)
        assert source.moved()
    finally:
        source.close()


async def test_a_tree_of_only_empty_files_and_directories(tmp_path: Path) -> None:
    top = tmp_path / "src" / "hollow"
    (top / "d" / "e").mkdir(parents=True)
    (top / "f").write_bytes(b"")
    (top / "d" / "g").write_bytes(b"")
    info = build_tree_manifest(top)
    assert info.num_chunks == 0 and info.dirs == ("d/e",)
    store = await ChunkStore.open(info, cid_of(info), tmp_path / "hollow")
    assert store.complete
    store.finalize_sync()
    store.close()
    assert snapshot(tmp_path / "hollow") == snapshot(top)


@pytest.mark.parametrize("kind", ["file", "tree"])
def test_gets_racing_to_start_on_one_output_leave_one_running_and_its_state(
    tmp_path: Path, kind: str
) -> None:
    """Eight stores opened at once on one output (the race of two `peer get`
    started together): one wins; every other says another get holds it, and
    none removes the winner's state or part."""
    import threading

    from peerd.content.hashing import hash_chunk, merkle_root

    if kind == "tree":
        info = build_tree_manifest(make_tree(tmp_path / "src"), chunk_size=CS)
    else:
        data = os.urandom(5 * CS)
        hashes = b"".join(hash_chunk("blake3", data[i : i + CS]) for i in range(0, len(data), CS))
        info = Info("top", len(data), CS, "blake3", hashes, merkle_root("blake3", hashes))
    cid = cid_of(info)
    for _round in range(5):
        stores = [
            (TreeStore if kind == "tree" else ChunkStore)(info, cid, tmp_path / "top", False)
            for _ in range(8)
        ]
        go = threading.Barrier(len(stores))
        outcomes: list[object] = [None] * len(stores)

        def open_one(
            k: int,
            go: threading.Barrier = go,
            stores: list[ChunkStore] = stores,
            outcomes: list[object] = outcomes,
        ) -> None:
            go.wait()
            try:
                stores[k]._open_sync()
                outcomes[k] = "ok"
            except StorageError as exc:
                outcomes[k] = str(exc)

        threads = [threading.Thread(target=open_one, args=(k,)) for k in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("ok") == 1, outcomes
        for outcome in outcomes:
            assert outcome == "ok" or "is downloading into" in str(outcome), outcome
        assert (tmp_path / "top.part").exists() and (tmp_path / "top.part.state").exists()
        winner = stores[outcomes.index("ok")]
        assert winner.discard_if_empty()
        assert sorted(os.listdir(tmp_path)) == (["src"] if kind == "tree" else [])


async def test_something_put_into_the_part_tree_is_never_moved_into_place(
    tmp_path: Path,
) -> None:
    top = make_tree(tmp_path / "src")
    info = build_tree_manifest(top, chunk_size=CS)
    store = await ChunkStore.open(info, cid_of(info), tmp_path / "top")
    try:
        write_chunks(store, tree_bytes(top, info), range(info.num_chunks))
        (tmp_path / "top.part" / "a" / "b" / "extra").write_bytes(b"planted")
        with pytest.raises(StorageError, match=r"a/b/extra is not part of this download"):
            store.finalize_sync()
        assert not (tmp_path / "top").exists()
        os.unlink(tmp_path / "top.part" / "a" / "b" / "extra")
        store.finalize_sync()
    finally:
        store.close()
    assert snapshot(tmp_path / "top") == snapshot(top)
