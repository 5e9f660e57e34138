"""Tree infos (docs/PROTOCOL.md, "Trees"): layout, path rules on both sides,
canonical encoding, building from real directories."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.content import manifest as manifest_module
from peerd.content.hashing import hash_chunk, merkle_root
from peerd.content.identity import Identity
from peerd.content.manifest import (
    MAX_COMPONENT_BYTES,
    MAX_DEPTH,
    MAX_PATH_BYTES,
    SIGNATURE_CONTEXT,
    Info,
    Manifest,
    build_manifest,
    build_tree_manifest,
    scan_tree,
)
from peerd.errors import ManifestError, StorageError

CS = 16 * 1024
ALICE = Identity.from_seed(b"a" * 32)


def hashes_of(data: bytes, algo: str = "blake3") -> tuple[bytes, bytes]:
    hashes = b"".join(hash_chunk(algo, data[i : i + CS]) for i in range(0, len(data), CS))
    return hashes, merkle_root(algo, hashes)


def tree_info(files: list[tuple[str, int]], dirs: list[str] = (), name: str = "top") -> Info:  # type: ignore[assignment]
    size = sum(s for _p, s in files)
    hashes, root = hashes_of(bytes(max(size, 0)))
    return Info(name, size, CS, "blake3", hashes, root, tuple(files), tuple(dirs))


def signed_manifest_bytes(body: dict[str, Any]) -> bytes:
    """A manifest around a hand-made info map, signed for real: what a
    hostile publisher can send."""
    info = msgpack.packb(body, use_bin_type=True)
    cid = hashlib.sha256(info).digest()
    sig = ALICE.sign(SIGNATURE_CONTEXT + cid)
    return msgpack.packb({"info": info, "sigs": [[ALICE.public_key, sig]]}, use_bin_type=True)


def raw_tree(files: list[list[Any]], dirs: list[Any], size: int | None = None) -> dict[str, Any]:
    if size is None:
        size = sum(f[1] for f in files if len(f) == 2 and type(f[1]) is int)
    hashes, root = hashes_of(bytes(max(size, 0)))
    return {
        "v": 1,
        "name": "top",
        "size": size,
        "chunk_size": CS,
        "algo": "blake3",
        "hashes": hashes,
        "root": root,
        "files": files,
        "dirs": dirs,
    }


# --- a single file's info is unchanged ----------------------------------------------
def test_a_single_file_info_is_byte_for_byte_what_it_was() -> None:
    """The same ids as before trees existed (computed with the code before them)."""
    data = bytes(range(256)) * 300
    expected = {
        "blake3": "1b6401b6c3c82e59e112c254669b796be9f16c6887e0df0d199dae9001bc279f",
        "sha256": "d174bb87a0a667adb4b2d5d3c850a5371e779b93f06437267f90d8dad489e350",
    }
    for algo, cid in expected.items():
        hashes, root = hashes_of(data, algo)
        info = Info("f.bin", len(data), CS, algo, hashes, root)
        assert info.content_id.hex() == cid
        assert not info.is_tree
        assert list(msgpack.unpackb(info.encode())) == [
            "v", "name", "size", "chunk_size", "algo", "hashes", "root"
        ]  # fmt: skip


# --- hostile paths, decoded from signed manifests ----------------------------------
HOSTILE: list[tuple[list[list[Any]], list[Any], str]] = [
    ([["/etc/passwd", 1]], [], "empty component"),
    ([["../escape", 1]], [], "'..' component"),
    ([["a/../../b", 1]], [], "'..' component"),
    ([["a//b", 1]], [], "empty component"),
    ([["a/", 1]], [], "empty component"),
    ([["./a", 1]], [], "'.' component"),
    ([["", 1]], [], "is empty"),
    ([["a\\b", 1]], [], "backslash"),
    ([["..\\..\\x", 1]], [], "backslash"),
    ([["a\x00b", 1]], [], "NUL or control"),
    ([["a\nb", 1]], [], "NUL or control"),
    ([["\x1b[2Jx", 1]], [], "NUL or control"),
    ([["a\x85", 1]], [], "NUL or control"),
    ([["a\x7f", 1]], [], "NUL or control"),
    ([["a", 1], ["a", 1]], [], "listed twice"),
    ([["b", 1], ["a", 1]], [], "canonical order"),
    ([["a", 1], ["a/b", 1]], [], "listed as a file but 'a/b' is inside it"),
    ([["a/b/c", 1]], ["a"], "listed as an empty directory but 'a/b/c' is inside it"),
    ([["a", 1]], ["a"], "listed twice"),
    ([], ["d", "d"], "listed twice"),
    ([], ["e", "d"], "canonical order"),
    ([["A", 1], ["a", 1]], [], "differ only in case"),
    ([["A/x", 1], ["a/y", 1]], [], "differ only in case"),
    ([["Dir/x", 1]], ["dir"], "differ only in case"),
    ([["cafe\u0301", 1], ["caf\u00e9", 1]], [], "Unicode normalization"),
    ([["STRASSE", 1], ["stra\u00dfe", 1]], [], "differ only in case"),
    ([["x" * (MAX_COMPONENT_BYTES + 1), 1]], [], f"longer than {MAX_COMPONENT_BYTES}"),
    ([["/".join(["d"] * (MAX_DEPTH + 1)), 1]], [], f"the limit is {MAX_DEPTH}"),
    ([["a", -1]], [], "out of range"),
    ([["a", True]], [], "must be an integer"),
    ([["a", 1, 2]], [], "a [path, size] pair"),
    ([["a"]], [], "a [path, size] pair"),
    ([[b"a", 1]], [], "must be a string"),
    ([], [7], "must be a string"),
]


@pytest.mark.parametrize(("files", "dirs", "says"), HOSTILE)
def test_a_hostile_tree_is_refused_on_decode(
    files: list[list[Any]], dirs: list[Any], says: str
) -> None:
    data = signed_manifest_bytes(raw_tree(files, dirs))
    with pytest.raises(ManifestError, match=says.replace("(", r"\(").replace("[", r"\[")):
        Manifest.decode(data)


@pytest.mark.parametrize(("files", "dirs", "says"), HOSTILE[:-4])
def test_a_hostile_tree_is_refused_when_built(
    files: list[list[Any]], dirs: list[Any], says: str
) -> None:
    with pytest.raises(ManifestError):
        tree_info([(p, s) for p, s in files], dirs)


def test_an_over_long_path_is_refused() -> None:
    path = "/".join(["p" * 200] * 21)  # 4220 bytes, 21 levels
    assert len(path) > MAX_PATH_BYTES
    with pytest.raises(ManifestError, match=f"the limit is {MAX_PATH_BYTES}"):
        tree_info([(path, 1)])
    with pytest.raises(ManifestError):  # msgpack's own string limit, on decode
        Manifest.decode(signed_manifest_bytes(raw_tree([[path, 1]], [])))


def test_size_must_be_the_sum_of_the_files() -> None:
    with pytest.raises(ManifestError, match="not the sum"):
        Manifest.decode(signed_manifest_bytes(raw_tree([["a", 5]], [], size=6)))


def test_the_entry_count_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "MAX_ENTRIES", 3)
    ok = signed_manifest_bytes(raw_tree([["a", 1], ["b", 1]], ["c"]))
    Manifest.decode(ok)
    too_many = signed_manifest_bytes(raw_tree([["a", 1], ["b", 1], ["c", 1]], ["d"]))
    with pytest.raises(ManifestError):
        Manifest.decode(too_many)


def test_keys_of_a_tree_are_exact() -> None:
    body = raw_tree([["a", 1]], [])
    swapped = dict(body)
    swapped["dirs"] = swapped.pop("files")
    swapped["files"] = [["a", 1]]
    for bad in (
        {k: v for k, v in body.items() if k != "dirs"},  # files without dirs
        {k: v for k, v in body.items() if k != "files"},  # dirs without files
        swapped,  # dirs before files
        {**body, "extra": 1},
    ):
        with pytest.raises(ManifestError, match=r"keys|max_map_len"):
            Manifest.decode(signed_manifest_bytes(bad))


def test_a_tree_in_a_non_canonical_encoding_is_refused() -> None:
    info = tree_info([("a", 3), ("b/c", 4)], ["d"])
    Info.decode(info.encode())
    # The same values with a size written as a 64-bit integer.
    body = msgpack.unpackb(info.encode())
    packer = msgpack.Packer(use_bin_type=True)
    parts = [b"\x89"]
    for key, value in body.items():
        parts.append(packer.pack(key))
        if key == "files":
            parts.append(b"\x92" + b"\x92" + packer.pack("a") + b"\xcf" + (3).to_bytes(8, "big"))
            parts.append(b"\x92" + packer.pack("b/c") + packer.pack(4))
        else:
            parts.append(packer.pack(value))
    with pytest.raises(ManifestError, match="canonical"):
        Info.decode(b"".join(parts))


# --- layout and segments -------------------------------------------------------------
def test_segments_map_the_stream_onto_files() -> None:
    info = tree_info([("a", 5), ("b", 0), ("c", 10), ("d", 0), ("e", 1)], ["x"])
    assert list(info.segments(0, 16)) == [(0, 0, 5), (2, 0, 10), (4, 0, 1)]
    assert list(info.segments(3, 4)) == [(0, 3, 2), (2, 0, 2)]
    assert list(info.segments(5, 10)) == [(2, 0, 10)]
    assert list(info.segments(15, 1)) == [(4, 0, 1)]
    assert list(info.segments(7, 0)) == []


PATH_PART = st.text(alphabet="abcXYZ0é日-_ .", min_size=1, max_size=6).filter(
    lambda p: p not in (".", "..")
)


@st.composite
def trees(draw: st.DrawFn) -> Info:
    paths = draw(st.lists(st.lists(PATH_PART, min_size=1, max_size=4).map("/".join), max_size=25))
    files: dict[str, int] = {}
    dirs: list[str] = []
    taken: set[str] = set()

    def folded(p: str) -> str:
        return manifest_module._fold(p)

    for path in paths:
        parts = path.split("/")
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        all_nodes = {folded(p) for p in prefixes} | {folded(path)}
        if any(folded(p) in taken for p in [path]) or any(
            folded(f) in {folded(x) for x in prefixes} for f in [*files, *dirs]
        ):
            continue
        if any(folded(f).startswith(folded(path) + "\x00") for f in [*files, *dirs]):
            continue
        if draw(st.booleans()):
            files[path] = draw(st.integers(0, 3 * CS))
        else:
            dirs.append(path)
        taken |= all_nodes
    try:
        return tree_info(
            sorted(files.items(), key=lambda kv: kv[0].encode()),
            sorted(dirs, key=lambda d: d.encode()),
        )
    except ManifestError:
        from hypothesis import assume

        assume(False)
        raise


@given(trees(), st.integers(0, 10 * CS), st.integers(0, 10 * CS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_tree_round_trips_and_its_segments_cover_each_range(
    info: Info, offset: int, length: int
) -> None:
    assert Info.decode(info.encode()) == info
    assert Manifest.decode(Manifest(info).signed(ALICE).encode()).info == info
    offset = min(offset, info.size)
    length = min(length, info.size - offset)
    pieces = list(info.segments(offset, length))
    assert sum(n for _i, _o, n in pieces) == length
    at = offset
    starts = [sum(s for _p, s in (info.files or ())[:i]) for i in range(len(info.files or ()))]
    for i, file_offset, n in pieces:
        assert n > 0 and starts[i] + file_offset == at
        assert file_offset + n <= (info.files or ())[i][1]
        at += n


# --- building from real directories ---------------------------------------------------
def make_tree(root: Path) -> Path:
    top = root / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "empty").mkdir()
    (top / "a" / "b" / "x.bin").write_bytes(os.urandom(CS + 100))
    (top / "a" / "zero").write_bytes(b"")
    (top / "a" / "y.bin").write_bytes(os.urandom(3 * CS - 7))
    (top / "ü.txt").write_bytes(b"u" * 1000)
    return top


@pytest.mark.parametrize("threads", [1, 3])
def test_a_built_tree_hashes_like_its_files_concatenated(tmp_path: Path, threads: int) -> None:
    top = make_tree(tmp_path)
    info = build_tree_manifest(top, chunk_size=CS, threads=threads)
    assert info.name == "top" and info.is_tree
    assert info.files == (
        ("a/b/x.bin", CS + 100),
        ("a/y.bin", 3 * CS - 7),
        ("a/zero", 0),
        ("ü.txt", 1000),
    )
    assert info.dirs == ("empty",)
    whole = tmp_path / "whole"
    whole.write_bytes(b"".join((top / p).read_bytes() for p, _s in info.files or ()))
    flat = build_manifest(whole, chunk_size=CS)
    assert (info.hashes, info.root, info.size) == (flat.hashes, flat.root, flat.size)
    assert Info.decode(info.encode()) == info


def test_an_empty_directory_is_a_tree_of_nothing(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    info = build_tree_manifest(tmp_path / "nothing")
    assert (info.files, info.dirs, info.size, info.num_chunks) == ((), (), 0, 0)
    assert Info.decode(info.encode()) == info


def test_a_symbolic_link_in_the_tree_is_refused_by_name(tmp_path: Path) -> None:
    top = make_tree(tmp_path)
    (top / "a" / "link").symlink_to("/etc/passwd")
    with pytest.raises(StorageError, match=r"a/link is a symbolic link"):
        scan_tree(top)
    (top / "a" / "link").unlink()
    (top / "a" / "dirlink").symlink_to(top / "empty")
    with pytest.raises(StorageError, match=r"a/dirlink is a symbolic link"):
        build_tree_manifest(top)


def test_special_files_are_refused_by_name(tmp_path: Path) -> None:
    top = make_tree(tmp_path)
    os.mkfifo(top / "a" / "fifo")
    with pytest.raises(StorageError, match=r"a/fifo is not a regular file or directory"):
        scan_tree(top)
    os.unlink(top / "a" / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(top / "sock"))
        with pytest.raises(StorageError, match=r"sock is not a regular file or directory"):
            scan_tree(top)


def test_paths_that_would_collide_or_are_not_utf8_are_refused_at_build(tmp_path: Path) -> None:
    top = make_tree(tmp_path)
    (top / "A").mkdir()
    (top / "A" / "q").write_bytes(b"1")
    (top / "a" / "q").write_bytes(b"2")
    with pytest.raises(ManifestError, match="differ only in case"):
        scan_tree(top)
    for p in (top / "A" / "q", top / "A"):
        p.unlink() if p.is_file() else p.rmdir()
    bad = os.path.join(os.fsencode(top), b"bad\xffname")
    with open(bad, "wb"):
        pass
    with pytest.raises(ManifestError, match="not valid UTF-8"):
        scan_tree(top)
    os.unlink(bad)
    (top / "new\nline").write_bytes(b"")
    with pytest.raises(ManifestError, match="control character"):
        scan_tree(top)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_damaged_tree_info_is_refused_or_valid(data: st.DataObject) -> None:
    """Any byte flipped, cut or appended: a ManifestError or a valid info,
    never another exception."""
    info = tree_info([("a/b", 3), ("a/c", 0), ("d", CS + 1)], ["e/f"])
    raw = bytearray(info.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        got = Info.decode(bytes(raw))
    except ManifestError:
        return
    assert got.encode() == bytes(raw)
