"""Directory trees end to end (issue 16 part 4): real ``peer share DIR`` and
``peer get LINK -o OUT`` processes on loopback, on both transports."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import msgpack
import pytest

from .e2e import Swarm, swarm

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])
KiB = 1024
MANY = 1000


def make_tree(root: Path) -> Path:
    """A tree with nested dirs, empty files, empty dirs, unicode names, and a
    file larger than a chunk, so chunks span files and files span chunks."""
    top = root / "Ünïcode tree"
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "empty dir" / "inner empty").mkdir(parents=True)
    (top / "only-empty").mkdir()
    (top / "a" / "b" / "c" / "deep.bin").write_bytes(os.urandom(70 * KiB))
    (top / "a" / "zero").write_bytes(b"")
    (top / "a" / "b" / "日本語.txt").write_bytes("こんにちは".encode() * 1000)
    (top / "z-empty").write_bytes(b"")
    (top / "big.bin").write_bytes(os.urandom(300 * KiB))
    for i in range(MANY):  # small files: most chunks span many of them
        (top / "many" / f"{i // 100}").mkdir(parents=True, exist_ok=True)
        (top / "many" / f"{i // 100}" / f"{i:04}").write_bytes(os.urandom(1 + (i * 97) % 3000))
    return top


def snapshot(top: Path) -> dict[str, object]:
    """Every file's bytes and every directory, by relative path."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        out[rel + "/"] = sorted(dirnames)
        for name in filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink()
            out[os.path.join(rel, name)] = path.read_bytes()
    return out


def share_tree(s: Swarm, name: str, top: Path) -> tuple[object, str]:
    proc = s.peer(name, "share", str(top), "--chunk-size", "16KiB", "--host", "127.0.0.1")
    assert proc.stdout is not None
    link = proc.stdout.readline().decode().strip()
    assert link.startswith("peer:"), (link, proc.stderr.read().decode() if proc.poll() else "")
    return proc, link


def test_share_dir_and_get_recreate_the_tree_byte_for_byte(tmp_path: Path, backend: str) -> None:
    top = make_tree(tmp_path / "src")
    with swarm(tmp_path, backend) as s:
        _proc, link = share_tree(s, "seed", top)
        info = s.run("leech", "info", link, "--json")
        assert info.returncode == 0, info.stderr
        facts = json.loads(info.stdout)
        assert facts["tree"] is True and facts["name"] == top.name
        assert len(facts["files"]) == MANY + 5
        assert facts["dirs"] == ["empty dir/inner empty", "only-empty"]
        assert facts["size"] == sum(f["size"] for f in facts["files"])
        human = s.run("leech", "info", link)
        assert f"files:      {MANY + 5} (" in human.stdout, human.stdout
        out = tmp_path / "out"
        out.mkdir()
        result = s.get("leech", link, out)
        got = out / top.name
        assert result["path"] == str(got)
        assert snapshot(got) == snapshot(top)
        assert sorted(os.listdir(out)) == [top.name]  # no .part, no state left
        # Again into the same place: refused without --force, replaced with it.
        again = s.run("leech", "get", link, "-o", str(out))
        assert again.returncode == 1 and "already exists; use --force" in again.stderr
        (got / "a" / "zero").write_bytes(b"local change")
        s.get("leech", link, out, "--force")
        assert snapshot(got) == snapshot(top)
        assert sorted(os.listdir(out)) == [top.name]
        # -o - and peer stream refuse a tree in one line.
        piped = s.run("leech", "get", link, "-o", "-")
        assert piped.returncode == 1
        assert piped.stderr.strip().splitlines()[-1].startswith("peer: error: ")
        assert "is a directory tree" in piped.stderr and "Traceback" not in piped.stderr
        streamed = s.run("leech", "stream", link)
        assert streamed.returncode == 1 and "is a directory tree" in streamed.stderr


def test_a_second_get_into_the_same_output_is_refused_and_resume_works(
    tmp_path: Path, backend: str
) -> None:
    top = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    with swarm(tmp_path, backend) as s:
        seed, link = share_tree(s, "seed", top)
        # The first get is slowed down so that it is still running.
        first = s.peer("leech", "get", link, "-o", str(out), "--down-limit", "64KiB")
        part = out / (top.name + ".part")
        deadline = time.monotonic() + 30
        while not (out / (top.name + ".part.state")).exists() or not part.is_dir():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = s.run("other", "get", link, "-o", str(out), timeout=30)
        assert second.returncode == 1
        assert f"another `peer get` (pid {first.pid}) is downloading into {part}" in second.stderr
        # kill -9 the first once its state claims chunks: the part tree and
        # the state stay; the next get resumes.
        state = out / (top.name + ".part.state")
        while not any(msgpack.unpackb(state.read_bytes())["bits"]):
            assert time.monotonic() < deadline + 30 and first.poll() is None
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert part.is_dir()
        result = s.get("leech", link, out)
        assert result["resumed_bytes"] > 0
        assert snapshot(out / top.name) == snapshot(top)
        assert sorted(os.listdir(out)) == [top.name]
        seed.send_signal(signal.SIGTERM)


def test_sharing_a_tree_with_a_link_or_a_fifo_says_which_in_one_line(
    tmp_path: Path, backend: str
) -> None:
    top = tmp_path / "src"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "f").write_bytes(b"x")
    (top / "sub" / "link").symlink_to("/etc/hostname")
    with swarm(tmp_path, backend) as s:
        res = s.run("seed", "share", str(top), "--host", "127.0.0.1", timeout=30)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"peer: error: {top}/sub/link is a symbolic link; a shared tree holds only regular "
            "files and directories (links are not followed): remove or replace it"
        ]
        (top / "sub" / "link").unlink()
        os.mkfifo(top / "sub" / "fifo")
        res = s.run("seed", "share", str(top), "--host", "127.0.0.1", timeout=30)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
        assert f"{top}/sub/fifo is not a regular file or directory" in res.stderr
