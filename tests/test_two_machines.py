"""Two machines, for real: README's "Share with another machine", as written.

Two network namespaces joined by a veth pair stand in for two machines
(10.77.0.1 and 10.77.0.2; the traffic never leaves them). Machine A runs
``peer tracker`` and ``peer share`` listening on their default (every interface);
machine B runs ``peer get LINK`` with the link A printed, which names the
tracker. Both sides reach the tracker at the same address, so the tracker
sees A's sharer at A's address. Before issue 16
every command listened on and connected from 127.0.0.1, so this failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)
PY = sys.executable
A, B = "10.77.0.1", "10.77.0.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def machines() -> Iterator[tuple[list[str], list[str]]]:
    """Two namespaces with a link between them: (prefix for A, prefix for B)."""
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"peerA{tag}", f"peerB{tag}"
    _ip("netns", "add", ns_a)
    try:
        _ip("netns", "add", ns_b)
        try:
            _ip(
                "link",
                "add",
                f"va{tag}",
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                f"vb{tag}",
                "netns",
                ns_b,
            )
            for ns, dev, addr in ((ns_a, f"va{tag}", A), (ns_b, f"vb{tag}", B)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            yield ["ip", "netns", "exec", ns_a], ["ip", "netns", "exec", ns_b]
        finally:
            subprocess.run(["ip", "netns", "del", ns_b], capture_output=True, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", ns_a], capture_output=True, check=False)


def _env(home: Path, transport: str) -> dict[str, str]:
    env = dict(os.environ, PEER_HOME=str(home), PEER_TRANSPORT=transport)
    env.pop("PEER_TRACKER", None)
    return env


@needs_root
@pytest.mark.parametrize("transport", ["reactor", "proactor"])
def test_share_on_one_machine_get_on_another(
    machines: tuple[list[str], list[str]], tmp_path: Path, transport: str
) -> None:
    on_a, on_b = machines
    src = tmp_path / "movie.mp4"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Machine A: `peer tracker &` then `peer share movie.mp4 --tracker A:7070`
        # (the address everyone uses: the tracker records the one it sees).
        tracker = subprocess.Popen(
            [*on_a, PY, "-m", "cli", "tracker", "--data", str(tmp_path / "trk")],
            env=_env(tmp_path / "a", transport),
            stderr=subprocess.PIPE,
        )
        procs.append(tracker)
        assert tracker.stderr is not None
        lines = [tracker.stderr.readline().decode() for _ in range(2)]
        assert any("tracker listening on [::]:7070" in line for line in lines), lines
        share = subprocess.Popen(
            [*on_a, PY, "-m", "cli", "share", str(src), "--tracker", f"{A}:7070"],
            env=_env(tmp_path / "a", transport),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(share)
        assert share.stdout is not None
        link = share.stdout.readline().decode().strip()
        assert link.startswith("peer:") and f"&tr={A}:7070" in link, link
        # Machine B: `peer get LINK -o movie.mp4` (the link names the tracker).
        out = tmp_path / "got.mp4"
        got = subprocess.run(
            [*on_b, PY, "-m", "cli", "get", link, "-o", str(out), "-v"],
            env=_env(tmp_path / "b", transport),
            capture_output=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr.decode()
        assert out.read_bytes() == src.read_bytes()
        # B reached A's seeder at A's own address, as the tracker saw it.
        assert "connected to peer " in got.stderr.decode()
        assert f"@{A}:" in got.stderr.decode(), got.stderr.decode()
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


@needs_root
def test_no_tracker_at_all(machines: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """`peer share` with no tracker configured runs one itself; the link names
    it, and `peer get LINK` on the other machine needs nothing else."""
    on_a, on_b = machines
    src = tmp_path / "notes.pdf"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    share = subprocess.Popen(
        [*on_a, PY, "-m", "cli", "share", str(src), "--host", A],
        env=_env(tmp_path / "a", "reactor"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert share.stdout is not None
        link = share.stdout.readline().decode().strip()
        assert f"&tr={A}:" in link and f"&x={A}:" in link, link
        out = tmp_path / "got.pdf"
        got = subprocess.run(
            [*on_b, PY, "-m", "cli", "get", link, "-o", str(out)],
            env=_env(tmp_path / "b", "reactor"),
            capture_output=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr.decode()
        assert out.read_bytes() == src.read_bytes()
    finally:
        share.terminate()
        share.wait(timeout=10)
        for pipe in (share.stdout, share.stderr):
            if pipe is not None:
                pipe.close()


@needs_root
def test_a_sharer_beside_the_tracker_states_its_public_address(
    machines: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    """A sharer on the tracker's own machine reaches it over loopback, so the
    tracker would see 127.0.0.1, which means nothing to machine B. With
    ``--public-addr`` the sharer states where others reach it, and the
    tracker (seeing a loopback source) records that address instead."""
    on_a, on_b = machines
    src = tmp_path / "talk.webm"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 9))
    procs: list[subprocess.Popen[bytes]] = []
    port = 7171
    try:
        tracker = subprocess.Popen(
            [*on_a, PY, "-m", "cli", "tracker", "--data", str(tmp_path / "trk")],
            env=_env(tmp_path / "a", "reactor"),
            stderr=subprocess.PIPE,
        )
        procs.append(tracker)
        assert tracker.stderr is not None
        lines = [tracker.stderr.readline().decode() for _ in range(2)]
        assert any("tracker listening on" in line for line in lines), lines
        share = subprocess.Popen(
            [
                *on_a,
                *(PY, "-m", "cli", "share", str(src), "--id-only"),
                *("--tracker", "127.0.0.1:7070", "--port", str(port)),
                *("--public-addr", f"{A}:{port}"),
            ],
            env=_env(tmp_path / "a", "reactor"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(share)
        assert share.stdout is not None
        cid = share.stdout.readline().decode().strip()
        assert len(cid) == 64, cid
        # B knows only the id and the tracker's address: every peer it learns
        # of comes from the tracker's answer.
        out = tmp_path / "got.webm"
        got = subprocess.run(
            [*on_b, PY, "-m", "cli", "get", cid, "--tracker", f"{A}:7070", "-o", str(out), "-v"],
            env=_env(tmp_path / "b", "reactor"),
            capture_output=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr.decode()
        assert out.read_bytes() == src.read_bytes()
        assert "connected to peer " in got.stderr.decode()
        assert f"@{A}:{port}" in got.stderr.decode(), got.stderr.decode()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


@needs_root
def test_a_remote_getter_is_not_handed_the_loopback_entry(
    machines: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    """A sharer beside the tracker that announces over loopback, without
    ``--public-addr``, is recorded at 127.0.0.1. The tracker hands that entry
    only to askers on loopback: a getter on machine B is told of no peer at
    all (before, it was told of one it would not dial), and a getter on A's
    loopback still finds it."""
    on_a, on_b = machines
    src = tmp_path / "clip.ogv"
    src.write_bytes(os.urandom(1024 * 1024 + 3))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tracker = subprocess.Popen(
            [*on_a, PY, "-m", "cli", "tracker", "--data", str(tmp_path / "trk")],
            env=_env(tmp_path / "a", "reactor"),
            stderr=subprocess.PIPE,
        )
        procs.append(tracker)
        assert tracker.stderr is not None
        lines = [tracker.stderr.readline().decode() for _ in range(2)]
        assert any("tracker listening on" in line for line in lines), lines
        share = subprocess.Popen(
            [
                *on_a,
                *(PY, "-m", "cli", "share", str(src), "--id-only"),
                *("--tracker", "127.0.0.1:7070"),
            ],
            env=_env(tmp_path / "a", "reactor"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(share)
        assert share.stdout is not None
        cid = share.stdout.readline().decode().strip()
        assert len(cid) == 64, cid
        far = subprocess.run(
            [
                *on_b,
                *(PY, "-m", "cli", "get", cid, "--tracker", f"{A}:7070"),
                *("-o", str(tmp_path / "far.ogv"), "--timeout", "3"),
            ],
            env=_env(tmp_path / "b", "reactor"),
            capture_output=True,
            timeout=60,
        )
        said = far.stderr.decode()
        assert far.returncode != 0, said
        assert "the tracker knows none" in said, said  # not "named 1, none could be used"
        near = subprocess.run(
            [
                *on_a,
                *(PY, "-m", "cli", "get", cid, "--tracker", "127.0.0.1:7070"),
                *("-o", str(tmp_path / "near.ogv")),
            ],
            env=_env(tmp_path / "c", "reactor"),
            capture_output=True,
            timeout=60,
        )
        assert near.returncode == 0, near.stderr.decode()
        assert (tmp_path / "near.ogv").read_bytes() == src.read_bytes()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
