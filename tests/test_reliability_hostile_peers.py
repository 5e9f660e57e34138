"""Reliability: peers that lie (scenarios 3 and 4 of issue 6).

The misbehaving peers are :class:`tests.hostile.HostilePeer`, written from
docs/PROTOCOL.md without the reference wire code. The downloads are real
``peer get`` processes. These run on the reactor only: what is tested is the
swarm logic (hash checks, bans, timeouts), which is the same code above either
transport; scenario 9/10 cover both transports at the network edge.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .e2e import Swarm, random_file, swarm
from .hostile import ContentInfo, HostilePeer, Key, TrackerSession

MiB = 1 << 20


def _hostile(s: Swarm, cid: str, src: Path, **kwargs: object) -> HostilePeer:
    tracker = TrackerSession(s.tracker_port, Key())
    try:
        content = ContentInfo.from_manifest(tracker.get_manifest(bytes.fromhex(cid)))
    finally:
        tracker.close()
    peer = HostilePeer(content, src, **kwargs)  # type: ignore[arg-type]
    peer.announce(s.tracker_port)
    return peer


def _get(s: Swarm, name: str, cid: str, out: Path, *extra: str, timeout: float = 90):
    return s.run(name, "get", cid, "-o", str(out), "--json", "-v", *extra, timeout=timeout)


def test_corrupting_peer_is_banned_and_routed_around(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 8 * MiB)
    with swarm(tmp_path, "reactor") as s:
        # Slow honest seeders, so the fast liar gets plenty of requests.
        _, cid = s.share("seed0", src, "--up-limit", "2MiB")
        s.share("seed1", src, "--up-limit", "2MiB")
        honest = {s.key("seed0")[:12], s.key("seed1")[:12]}
        bad = _hostile(s, cid, src, mode="corrupt", corrupt=set(range(0, 64, 2)))
        try:
            out = tmp_path / "got.bin"
            res = _get(s, "leech", cid, out)
        finally:
            bad.close()
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == src.read_bytes()
        assert bad.corrupted, "the hostile peer was never asked for a chunk it corrupts"
        bans = re.findall(
            r"banned peer ([0-9a-f]{12})@127\.0\.0\.1:(\d+) for this download: "
            r"chunk (\d+) it sent failed its hash",
            res.stderr,
        )
        assert len(bans) == 1, res.stderr
        key, port, chunk = bans[0]
        assert key == bad.name and int(port) == bad.port
        assert int(chunk) in bad.corrupted
        assert not honest & {k for k, _, _ in bans}, "an honest peer was banned"
        assert json.loads(res.stdout.splitlines()[-1])["hash_failures"] >= 1
        assert not (tmp_path / "got.bin.part").exists()


@pytest.mark.slow
def test_lying_silent_and_dripping_peers_are_routed_around(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 4 * MiB)
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src, "--up-limit", "4MiB")
        liars = [
            _hostile(s, cid, src, mode="liar", holds={0}),
            _hostile(s, cid, src, mode="silent"),
            _hostile(s, cid, src, mode="drip"),
        ]
        try:
            out = tmp_path / "got.bin"
            t0 = time.monotonic()
            res = _get(s, "leech", cid, out)
            took = time.monotonic() - t0
        finally:
            for p in liars:
                p.close()
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == src.read_bytes()
        for p in liars:
            assert p.handshakes >= 1 and p.requests, f"{p.mode} peer was never tried"
        # 4 MiB at 4 MiB/s is ~1 s; a stuck request costs one request timeout
        # (15 s) at most once per chunk in flight, not once per chunk.
        assert took < 45, f"download took {took:.1f} s"


def test_only_hostile_peers_never_write_a_bad_byte(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 2 * MiB)
    with swarm(tmp_path, "reactor") as s:
        seed, cid = s.share("seed", src)
        bad = _hostile(s, cid, src, mode="corrupt", corrupt=set(range(64)))
        seed.terminate()
        seed.wait(timeout=10)
        try:
            out = tmp_path / "got.bin"
            res = _get(s, "leech", cid, out, "--timeout", "4", timeout=60)
        finally:
            bad.close()
        assert res.returncode != 0
        assert "banned peer " + bad.name in res.stderr
        assert "error:" in res.stderr and "Traceback" not in res.stderr
        assert not out.exists()
        part = tmp_path / "got.bin.part"
        if part.exists():
            data = part.read_bytes()
            wrong = bytes(b ^ 0x5A for b in src.read_bytes()[:64])
            assert wrong not in data, "a corrupted chunk reached the disk"
