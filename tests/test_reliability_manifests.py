"""Reliability: hostile manifests (scenario 11 of issue 6).

A hostile tracker (tests.hostile, written from docs/PROTOCOL.md) hands
``peer get`` a crafted manifest whose content id matches its info bytes, so
only the manifest checks stand between it and the disk. Each must be refused
with its own message, and nothing may be written. Reactor only: the
transport plays no part in manifest checks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from .e2e import random_file, swarm
from .hostile import (
    PUBLISH,
    HostileTracker,
    Key,
    TrackerSession,
    info_bytes,
    manifest_bytes,
    message,
    signed,
)

CASES = {
    "dotdot": (info_bytes(name=".."), "contains '..'"),
    "dotdot-path": (info_bytes(name="../../etc/x"), "name"),
    "slash": (info_bytes(name="a/b"), "contains a '/'"),
    "nul": (info_bytes(name="a\x00b"), "NUL"),
    "control": (info_bytes(name="a\x1bb"), "control character"),
    "absurd-size": (info_bytes(size=2**51), "size"),
    "absurd-count": (info_bytes(size=(2**20 + 1) * 16384, hashes=b""), "chunks is more than"),
    "chunk-not-pow2": (info_bytes(chunk_size=100_000), "not a power of two"),
    "hashes-mismatch": (info_bytes(size=40_000), "hash list is 32 bytes; 3 chunks need 96"),
}


def _get(
    tracker_port: int, home: Path, cid: str, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PEER_HOME=str(home), PEER_TRANSPORT="reactor")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "get",
            cid,
            "-o",
            str(out),
            "--timeout",
            "5",
            *extra,
            "--tracker",
            f"127.0.0.1:{tracker_port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_manifest_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    info, expected = CASES[case]
    cid = hashlib.sha256(info).hexdigest()
    tracker = HostileTracker(manifest_bytes(info, [signed(info, Key())]))
    outdir = tmp_path / "out"
    outdir.mkdir()
    try:
        res = _get(tracker.port, tmp_path / "home", cid, outdir)
    finally:
        tracker.close()
    assert tracker.served >= 1, "the hostile manifest was never asked for"
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peer: error:"), res.stderr
    assert expected in lines[0], lines[0]
    assert list(outdir.iterdir()) == [], "something was written for a refused manifest"
    assert not (tmp_path / "etc").exists()


def test_every_hostile_manifest_has_its_own_message(tmp_path: Path) -> None:
    from peerd.content.manifest import Manifest
    from peerd.errors import ManifestError

    messages = set()
    for info, _ in CASES.values():
        with pytest.raises(ManifestError) as exc:
            Manifest.decode(manifest_bytes(info))
        messages.add(str(exc.value))
    assert len(messages) == len(CASES)


@pytest.mark.parametrize("sigs", ["missing", "bad", "other-key"])
def test_trust_refuses_a_bad_or_missing_signature(tmp_path: Path, sigs: str) -> None:
    src = random_file(tmp_path / "f.bin", 100_000)
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src)
        session = TrackerSession(s.tracker_port, Key())
        real = msgpack.unpackb(session.get_manifest(bytes.fromhex(cid)), raw=False)
        session.close()
        key, sig = real["sigs"][0]
        if sigs == "missing":
            hostile = manifest_bytes(real["info"])
        elif sigs == "bad":
            hostile = manifest_bytes(real["info"], [(key, bytes([sig[0] ^ 1]) + sig[1:])])
        else:
            hostile = manifest_bytes(real["info"], [signed(real["info"], Key())])
        tracker = HostileTracker(hostile)
        out = tmp_path / "got.bin"
        try:
            res = _get(tracker.port, s.home("leech"), cid, out, "--trust", key.hex())
        finally:
            tracker.close()
        assert res.returncode != 0
        assert res.stderr.startswith("peer: error:") and "Traceback" not in res.stderr
        text = res.stderr.lower()
        assert "sign" in text or "trust" in text, res.stderr
        assert not out.exists() and not (tmp_path / "got.bin.part").exists()
        # And the honest manifest from the real tracker is accepted with the same --trust.
        s.get("leech", cid, out, "--trust", key.hex())
        assert out.read_bytes() == src.read_bytes()


def test_tracker_refuses_hostile_manifests(tmp_path: Path) -> None:
    with swarm(tmp_path, "reactor") as s:
        key = Key()
        session = TrackerSession(s.tracker_port, key)
        try:
            for info, _ in CASES.values():
                kind, body = session.request(
                    message(PUBLISH, manifest=manifest_bytes(info, [signed(info, key)]))
                )
                assert kind == 44 and body["code"] == "bad-manifest", body
        finally:
            session.close()
        assert s.tracker is not None and s.tracker.poll() is None
