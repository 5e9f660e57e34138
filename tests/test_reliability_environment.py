"""Reliability: the world around a download changes (scenarios 5, 7 and 8 of issue 6).

Tracker restart, a full disk, a shared file modified under the seeder. Real
processes on loopback, reactor only: none of this depends on the transport.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .e2e import Swarm, random_file, swarm
from .test_reliability_crashes import state_chunks, wait_chunks

MiB = 1 << 20


# How often a node probes its tracker connection (peerd.node.node, 5 s),
# shortened in every peer: that a restart is noticed is under test, not when.
FAST_PROBE = {"peerd.node.node.TRACKER_PROBE_EVERY": 1.0}


@pytest.mark.slow
def test_tracker_restart_mid_download(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 12 * MiB)
    with swarm(tmp_path, "reactor", patch=FAST_PROBE) as s:
        _, cid = s.share("seed", src, "--up-limit", "3MiB")
        out = tmp_path / "a.bin"
        leech = s.peer("a", "get", cid, "-o", str(out), "--json", "--timeout", "30")
        wait_chunks(out, 3, leech)
        assert s.tracker is not None
        s.tracker.send_signal(signal.SIGKILL)
        s.tracker.wait()
        # Down for a while: the transfer with the known seeder goes on meanwhile.
        before = state_chunks(out)
        time.sleep(2.5)
        # Progress, or done: the rest may take less than the wait on a
        # machine that was slow to read `before` (the state file is gone then).
        assert leech.poll() in (None, 0), Swarm._err(leech)
        done = out.exists()  # PATH appears only once complete (a link to the part file)
        assert done or state_chunks(out) > before, "the transfer stopped with the tracker"
        s.start_tracker()  # same port, same data directory
        stdout, stderr = leech.communicate(timeout=60)
        assert leech.returncode == 0, stderr.decode()
        assert out.read_bytes() == src.read_bytes()
        assert json.loads(stdout.decode().splitlines()[-1])["hash_failures"] == 0
        # A peer that joins after the restart (and after the first leecher left)
        # finds the seeder: it noticed the restart and announced again.
        t0 = time.monotonic()
        late = s.get("b", cid, tmp_path / "b.bin", "--timeout", "25", timeout=60)
        assert time.monotonic() - t0 < 30
        assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()
        assert late["bytes"] == 12 * MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (root only); skipped with the reason when it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_clear_error_then_resume(tmp_path: Path, small_disk: Path) -> None:
    src = random_file(tmp_path / "f.bin", 6 * MiB)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (4 * MiB))
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src)
        out = small_disk / "got.bin"
        res = s.run("leech", "get", cid, "-o", str(out), timeout=60)
        assert res.returncode != 0
        assert "disk full" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not out.exists()
        assert state_chunks(out) == 0
        filler.unlink()  # free the space: the same command now succeeds
        s.get("leech", cid, out)
        assert out.read_bytes() == src.read_bytes()
        assert not (small_disk / "got.bin.part").exists()


def test_disk_full_mid_download_keeps_state_consistent(tmp_path: Path, small_disk: Path) -> None:
    """The disk fills up after the part file was preallocated: only the state file
    still needs space; the download must fail clearly or finish, never lie."""
    src = random_file(tmp_path / "f.bin", 6 * MiB)
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src, "--up-limit", "2MiB")
        out = small_disk / "got.bin"
        leech = s.peer("leech", "get", cid, "-o", str(out), "--timeout", "3")
        wait_chunks(out, 1, leech)
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, b"\0" * 65536):
                pass
        except OSError:
            pass  # the disk is full now
        finally:
            os.close(fd)
        _, err = leech.communicate(timeout=60)
        stderr = err.decode()
        assert "Traceback" not in stderr, stderr
        if leech.returncode != 0:
            assert "disk full" in stderr, stderr
            assert not out.exists()
        filler.unlink()
        # Whatever the state file claims must be true: resume re-verifies it and
        # the result is byte-identical.
        s.get("leech", cid, out, "--force" if out.exists() else "--json")
        assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("change", ["modify", "truncate"])
def test_changed_source_is_not_served(tmp_path: Path, change: str) -> None:
    src = random_file(tmp_path / "f.bin", 6 * MiB)
    original = src.read_bytes()
    with swarm(tmp_path, "reactor") as s:
        seed, cid = s.share("seed", src, "--up-limit", "2MiB")
        out = tmp_path / "got.bin"
        leech = s.peer("leech", "get", cid, "-o", str(out), "--timeout", "3")
        wait_chunks(out, 2, leech)
        if change == "modify":
            with open(src, "r+b") as f:  # same size, new bytes everywhere
                f.write(os.urandom(len(original)))
        else:
            os.truncate(src, 3 * MiB + 5)
        _, err = leech.communicate(timeout=60)
        stderr = err.decode()
        # Nothing more can come from this seeder: the download stalls and gives
        # up cleanly, without a hash failure (the seeder refuses, it does not lie).
        assert leech.returncode != 0, "download finished from a changed file"
        assert "Traceback" not in stderr and "peer: error:" in stderr
        assert "failed its hash" not in stderr
        # The seeder noticed, re-hashed, said so once and stopped sharing it.
        seed.wait(timeout=30)
        said = Swarm._err(seed)
        assert seed.returncode == 1 and "Traceback" not in said, said
        assert said.count("source changed:") == 1, said
        part = (tmp_path / "got.bin.part").read_bytes()
        got = state_chunks(out)
        assert got >= 2
        # Every chunk the state claims holds the original bytes.
        src.write_bytes(original)
        s.share("seed2", src)
        result = s.get("leech", cid, out, timeout=60)
        assert out.read_bytes() == original
        assert result["hash_failures"] == 0
        assert result["resumed_bytes"] >= got * MiB
        assert len(part) == len(original)


def test_a_touched_source_is_rehashed_and_served_again(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 3 * MiB)
    with swarm(tmp_path, "reactor") as s:
        seed, cid = s.share("seed", src)
        os.utime(src, ns=(1, 1))  # mtime moves, the bytes do not
        out = tmp_path / "got.bin"
        s.get("leech", cid, out, timeout=60)
        assert out.read_bytes() == src.read_bytes()
        assert seed.poll() is None, Swarm._err(seed)
