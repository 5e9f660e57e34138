"""Reliability: processes that die (scenarios 1, 2 and 6 of issue 6).

Real tracker and peer processes on loopback; ``kill -9`` lands at random
moments (the seed is printed so a failure can be replayed) and, for the
finishing steps, at exact points through a fault-injecting wrapper around
the real ``peer`` command. Seeder loss runs on both transports; the others
exercise resume and file handling above the transport and run on the reactor.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from .e2e import Swarm, random_file, swarm

MiB = 1 << 20


def state_chunks(out: Path) -> int:
    """Chunks the resume state of ``out`` claims (0 when there is none yet)."""
    try:
        state = msgpack.unpackb(out.with_name(out.name + ".part.state").read_bytes())
    except (OSError, ValueError):
        return 0
    return sum(bin(b).count("1") for b in state["bits"])


def wait_chunks(out: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while state_chunks(out) < n:
        assert proc.poll() is None, f"download ended before chunk {n}: {Swarm._err(proc)}"
        assert time.monotonic() < deadline, f"no {n} chunks after {timeout} s"
        time.sleep(0.02)


def rng() -> random.Random:
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"random seed: {seed}")
    return random.Random(seed)


@pytest.mark.parametrize("backend", ["reactor", "proactor"])
def test_two_of_three_seeders_killed_mid_download(tmp_path: Path, backend: str) -> None:
    r = rng()
    src = random_file(tmp_path / "f.bin", 24 * MiB)
    with swarm(tmp_path, backend) as s:
        seeders = []
        cid = ""
        for k in range(3):
            proc, cid = s.share(f"seed{k}", src, "--up-limit", "3MiB")
            seeders.append(proc)
        out = tmp_path / "got.bin"
        leech = s.peer("leech", "get", cid, "-o", str(out), "--json")
        victims = r.sample(seeders, 2)
        first, second = sorted(r.sample(range(2, 18), 2))
        wait_chunks(out, first, leech)
        victims[0].send_signal(signal.SIGKILL)
        wait_chunks(out, second, leech)
        victims[1].send_signal(signal.SIGKILL)
        stdout, stderr = leech.communicate(timeout=90)
        assert leech.returncode == 0, stderr.decode()
        result = json.loads(stdout.decode().splitlines()[-1])
        assert out.read_bytes() == src.read_bytes()
        assert result["hash_failures"] == 0
        assert not (tmp_path / "got.bin.part").exists()


def test_everyone_gone_times_out_keeps_chunks_then_resumes(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 16 * MiB)
    with swarm(tmp_path, "reactor") as s:
        seed, cid = s.share("seed", src, "--up-limit", "4MiB")
        out = tmp_path / "got.bin"
        leech = s.peer("leech", "get", cid, "-o", str(out), "--timeout", "3", "-v")
        wait_chunks(out, 4, leech)
        seed.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = leech.communicate(timeout=60)
        stderr = err.decode()
        assert leech.returncode != 0
        assert time.monotonic() - t0 < 30
        assert "peer: error:" in stderr and "run the same command again to resume" in stderr
        assert "Traceback" not in stderr
        assert not out.exists()
        kept = state_chunks(out)
        assert kept >= 4, "verified chunks were not kept"
        s.share("seed", src)
        result = s.get("leech", cid, out)
        assert out.read_bytes() == src.read_bytes()
        assert result["resumed_bytes"] >= kept * MiB


def test_seeder_back_during_the_same_get(tmp_path: Path) -> None:
    """A leecher whose peers all vanished keeps asking the tracker (with backoff)."""
    src = random_file(tmp_path / "f.bin", 12 * MiB)
    with swarm(tmp_path, "reactor") as s:
        seed, cid = s.share("seed", src, "--up-limit", "4MiB")
        out = tmp_path / "got.bin"
        leech = s.peer("leech", "get", cid, "-o", str(out), "--timeout", "40", "--json")
        wait_chunks(out, 3, leech)
        seed.send_signal(signal.SIGKILL)
        seed.wait()
        time.sleep(3)
        assert leech.poll() is None
        t0 = time.monotonic()
        s.share("seed", src)
        _, stderr = leech.communicate(timeout=60)
        assert leech.returncode == 0, stderr.decode()
        assert out.read_bytes() == src.read_bytes()
        # Found again well before the tracker's 60 s periodic interval.
        assert time.monotonic() - t0 < 30


# Fault injection: run the real ``peer`` command with one os function wrapped so
# that the process SIGKILLs itself at an exact point of finishing a download.
CRASH_WRAPPER = """
import os, signal, sys
point = os.environ["CRASH_AT"]
real = {"link": os.link, "unlink": os.unlink, "replace": os.replace, "fsync": os.fsync}
def hook(name):
    def f(*args, **kw):
        target = str(args[0]) if args else ""
        if name == "fsync" and point == "fsync":
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "link" and point == "before-link":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real[name](*args, **kw)
        if name == "link" and point == "after-link":
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "unlink" and point == "after-unlink" and target.endswith(".part"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return f
for name in real:
    setattr(os, name, hook(name))
sys.argv[0] = "peer"
from cli.app import main
main()
"""


def _crash_get(s: Swarm, cid: str, out: Path, point: str) -> int:
    env = s.env(s.home("leech"))
    env["CRASH_AT"] = point
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WRAPPER, "get", cid, "-o", str(out)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    return proc.returncode


@pytest.mark.slow
def test_kill_9_anywhere_always_resumes_byte_identical(tmp_path: Path) -> None:
    r = rng()
    src = random_file(tmp_path / "f.bin", 6 * MiB)
    data = src.read_bytes()
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src, "--up-limit", "4MiB")
        out = tmp_path / "got.bin"
        # Random moments mid-download, three times over.
        for _ in range(3):
            leech = s.peer("leech", "get", cid, "-o", str(out), "--force")
            time.sleep(r.uniform(0.2, 0.9))
            leech.send_signal(signal.SIGKILL)
            leech.wait()
            assert not out.exists(), "a partial file sits at the output path"
        # Exact points of finishing: before the fsync, before and after the
        # link into place, after removing the part file.
        for point in ("fsync", "before-link", "after-link", "after-unlink"):
            if out.exists():
                out.unlink()
            assert _crash_get(s, cid, out, point) == -signal.SIGKILL
            assert not out.exists() or out.read_bytes() == data, f"bad file after {point}"
            if point == "after-unlink":
                # Finished but for the exit: the file is complete, nothing is left
                # over, and running again refuses to overwrite it.
                assert out.read_bytes() == data
                again = s.run("leech", "get", cid, "-o", str(out))
                assert again.returncode != 0 and "already exists" in again.stderr
            else:
                result = s.get("leech", cid, out)
                assert result["bytes"] == len(data)
            assert out.read_bytes() == data, point
            assert not (tmp_path / "got.bin.part").exists(), point
            assert not (tmp_path / "got.bin.part.state").exists(), point
