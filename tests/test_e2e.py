"""End to end: real tracker and peer processes on loopback, both transports."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import msgpack
import pytest

from .e2e import Swarm, content_id_of, listen_port, random_file, swarm

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])
MiB = 1 << 20


def test_three_seeders_one_leecher(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "movie.bin", 24 * MiB)
    with swarm(tmp_path, backend) as s:
        cid = ""
        keys = set()
        for k in range(3):
            _, cid = s.share(f"seed{k}", src)
            keys.add(s.key(f"seed{k}")[:12])
        out = tmp_path / "got.bin"
        result = s.get("leech", cid, out)
        assert out.read_bytes() == src.read_bytes()
        assert result["bytes"] == 24 * MiB
        assert result["hash_failures"] == 0
        senders = {name.split("@")[0] for name, n in result["bytes_per_peer"].items() if n > 0}
        assert senders == keys, "every seeder should have contributed"
        assert result["peers_used"] == 3
        assert not (tmp_path / "got.bin.part").exists()


def test_two_leechers_feed_each_other(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "f.bin", 16 * MiB)
    with swarm(tmp_path, backend) as s:
        # A slow seeder so that the two leechers have reason to trade.
        _, cid = s.share("seed", src, "--up-limit", "4MiB")
        outs = [tmp_path / "a.bin", tmp_path / "b.bin"]
        procs = [
            s.peer(name, "get", cid, "-o", str(out), "--json")
            for name, out in zip(["a", "b"], outs, strict=True)
        ]
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr.decode()
            results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        for out in outs:
            assert out.read_bytes() == src.read_bytes()
        ka, kb = s.key("a")[:12], s.key("b")[:12]
        from_b = sum(n for name, n in results[0]["bytes_per_peer"].items() if name.startswith(kb))
        from_a = sum(n for name, n in results[1]["bytes_per_peer"].items() if name.startswith(ka))
        assert from_a + from_b > 0, f"leechers did not exchange chunks: {results}"


def test_empty_and_single_chunk_files(tmp_path: Path, backend: str) -> None:
    empty = random_file(tmp_path / "empty.bin", 0)
    one = random_file(tmp_path / "one.bin", MiB)
    with swarm(tmp_path, backend) as s:
        _, cid_empty = s.share("seed", empty)
        _, cid_one = s.share("seed2", one)
        r = s.get("leech", cid_empty, tmp_path / "e.out")
        assert (tmp_path / "e.out").read_bytes() == b""
        assert r["bytes"] == 0
        s.get("leech", cid_one[:20], tmp_path / "o.out")  # a unique prefix works too
        assert (tmp_path / "o.out").read_bytes() == one.read_bytes()


def test_unknown_id_and_wrong_trust(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "f.bin", 100_000)
    with swarm(tmp_path, backend) as s:
        _, cid = s.share("seed", src)
        res = s.run("leech", "get", "ab" * 32, "-o", str(tmp_path / "x"))
        assert res.returncode != 0
        assert "error:" in res.stderr and "Traceback" not in res.stderr
        wrong = s.key_cli("someone-else")  # a real `peer id`
        assert wrong == s.key("someone-else")
        res = s.run("leech", "get", cid, "-o", str(tmp_path / "y"), "--trust", wrong)
        assert res.returncode != 0
        assert "not signed" in res.stderr.lower() or "trust" in res.stderr.lower(), res.stderr
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "y").exists() and not (tmp_path / "y.part").exists()
        right = s.key("seed")
        s.get("leech", cid, tmp_path / "z", "--trust", right)
        assert (tmp_path / "z").read_bytes() == src.read_bytes()


def _state_chunks(out: Path) -> int:
    try:
        state = msgpack.unpackb(out.with_name(out.name + ".part.state").read_bytes())
    except (OSError, ValueError):
        return 0
    return sum(bin(b).count("1") for b in state["bits"])


def test_kill_9_then_resume(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "f.bin", 8 * MiB)
    with swarm(tmp_path, backend) as s:
        _, cid = s.share("seed", src)
        out = tmp_path / "got.bin"
        proc = s.peer("leech", "get", cid, "-o", str(out), "--down-limit", "4MiB")
        deadline = time.monotonic() + 60
        while _state_chunks(out) < 3:
            assert proc.poll() is None, "download ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
        result = s.get("leech", cid, out)
        assert out.read_bytes() == src.read_bytes()
        assert result["resumed_bytes"] >= 3 * MiB
        assert result["resumed_bytes"] + sum(result["bytes_per_peer"].values()) >= 8 * MiB


def test_daemon_share_get_status_stop(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "f.bin", 3 * MiB)
    with swarm(tmp_path, backend) as s:
        daemon = s.peer("d", "daemon")
        sock = s.home("d") / "control.sock"
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert daemon.poll() is None, Swarm._err(daemon)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        res = s.run("d", "share", str(src))
        assert res.returncode == 0, res.stderr
        cid = content_id_of(res.stdout.strip().splitlines()[0]) or ""
        assert len(cid) == 64 and time.monotonic() - t0 < 20
        ls = s.run("d", "ls")
        assert cid in ls.stdout and str(src) in ls.stdout
        s.get("other", cid, tmp_path / "copy.bin")
        assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
        status = s.run("d", "status", "--json")
        transfers = json.loads(status.stdout)["transfers"]
        assert any(t["id"] == cid and t["uploaded"] >= 3 * MiB for t in transfers)
        # Rates are over the last seconds (up and down), and an ETA while downloading.
        assert all({"down_MBps", "up_MBps", "eta_s"} <= t.keys() for t in transfers)
        human = s.run("d", "status").stdout
        assert cid[:16] in human and "up MB/s" in human and "ETA" in human
        assert s.run("d", "stop").returncode == 0
        # `peer stop` returns once the daemon has exited (the process is
        # reaped here within a moment, never seconds later).
        assert daemon.wait(timeout=1) == 0
        assert not sock.exists()


def test_chunk_size_option(tmp_path: Path, backend: str) -> None:
    if backend == "proactor":
        pytest.skip("chunk size is not about the transport")
    src = random_file(tmp_path / "f.bin", MiB + 12345)
    with swarm(tmp_path, backend) as s:
        bad = s.run("seed", "share", str(src), "--chunk-size", "3KiB")
        assert bad.returncode != 0 and "power of two" in bad.stderr
        _, cid = s.share("seed", src, "--chunk-size", "64KiB")
        _, default_cid = s.share("seed2", src)
        assert cid != default_cid  # another chunking is another content
        s.get("leech", cid, tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_manifest_and_chunks_from_a_named_peer_without_tracker(
    tmp_path: Path, backend: str
) -> None:
    src = random_file(tmp_path / "f.bin", 3 * MiB)
    with swarm(tmp_path, backend) as s:
        seeder, cid = s.share("seed", src)
        assert seeder.stderr is not None
        line = seeder.stderr.readline().decode()
        port = listen_port(line)
        assert port is not None, line
        assert s.tracker is not None
        s.tracker.send_signal(signal.SIGKILL)
        s.tracker.wait()
        # No tracker at all: without --peer there is nothing to go on ...
        res = s.run("leech", "get", cid, "-o", str(tmp_path / "x"), "--timeout", "5")
        assert res.returncode != 0 and "tracker" in res.stderr and "Traceback" not in res.stderr
        # ... with it, the manifest and the chunks come from that peer.
        result = s.get("leech", cid, tmp_path / "out.bin", "--peer", f"127.0.0.1:{port}")
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        assert result["peers_used"] == 1
        # A peer that does not have the content: one clear line.
        res = s.run(
            "leech", "get", "ab" * 32, "-o", str(tmp_path / "y"), "--peer", f"127.0.0.1:{port}"
        )
        assert res.returncode != 0 and "does not serve this content" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_a_getter_gives_the_tracker_a_manifest_it_lacks(tmp_path: Path, backend: str) -> None:
    """The tracker lost its manifests (a new data directory): ``get --peer``
    fetches the manifest from the peer, verifies it and publishes it, so the
    swarm can announce again and a plain ``get`` works."""
    if backend != "reactor":
        pytest.skip("the publish path is not about the transport")
    src = random_file(tmp_path / "f.bin", 2 * MiB)
    with swarm(tmp_path, backend) as s:
        seeder, cid = s.share("seed", src)
        assert seeder.stderr is not None
        line = seeder.stderr.readline().decode()
        port = listen_port(line)
        assert port is not None, line
        assert s.tracker is not None
        s.tracker.send_signal(signal.SIGKILL)
        s.tracker.wait()
        shutil.rmtree(tmp_path / "tracker")
        s.start_tracker()
        s.get("leech1", cid, tmp_path / "one.bin", "--peer", f"127.0.0.1:{port}")
        result = s.get("leech2", cid, tmp_path / "two.bin", "--timeout", "40", timeout=90)
        assert (tmp_path / "two.bin").read_bytes() == src.read_bytes()
        assert result["peers_used"] >= 1
