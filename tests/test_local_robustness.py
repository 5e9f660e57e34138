"""Local robustness against remote input (issue 14, findings 9 and 11).

Disk a remote party controls (a huge valid manifest from nowhere), names
rendered as markup, and file descriptors that failing downloads must not
leave open. Reactor only: none of this is about the transport.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from rich.console import Console

from peerd.app import progress
from peerd.app.download import DownloadError, download
from peerd.app.progress import ProgressView
from peerd.content.identity import Identity
from peerd.content.manifest import Manifest
from peerd.content.store import ALLOC_STEP
from peerd.node.node import Node
from peerd.transport import get_transport

from .hostile import HostileTracker
from .test_daemon import HOSTILE_NAMES
from .test_store import sparse_info

GiB = 1 << 30


def test_huge_manifest_from_nowhere_takes_no_disk(tmp_path: Path) -> None:
    """A valid 16 GiB manifest and no peer with data: a bounded allocation while
    the get runs, and nothing left on disk when it gives up."""
    manifest = Manifest(sparse_info(16 * GiB, 4 << 20), ()).signed(Identity.generate())
    tracker = HostileTracker(manifest.encode())
    out = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    env = dict(os.environ, PEER_HOME=str(tmp_path / "home"), PEER_TRANSPORT="reactor")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "get",
                manifest.content_id.hex(),
                "-o",
                str(out),
                "--timeout",
                "1",
                "--tracker",
                f"127.0.0.1:{tracker.port}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        most = 0
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, "get did not give up"
            try:
                most = max(most, os.stat(part).st_blocks * 512)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        _, err = proc.communicate()
    finally:
        tracker.close()
    stderr = err.decode()
    assert proc.returncode != 0
    assert "no peer has this content" in stderr and "Traceback" not in stderr, stderr
    assert "nothing was verified" in stderr, stderr
    assert most <= ALLOC_STEP, f"{most} bytes allocated for a download with no data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"], "files left behind"


async def test_progress_bar_shows_remote_names_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HOSTILE_NAMES:
        out = io.StringIO()
        monkeypatch.setattr(
            progress,
            "Console",
            lambda out=out, **_: Console(file=out, width=200, color_system=None),
        )
        view = ProgressView(enabled=True)
        done = trio.Event()
        done.set()
        content = SimpleNamespace(
            info=SimpleNamespace(name=name, size=100), have_bytes=100, sessions={}, completed=done
        )
        with view:
            async with trio.open_nursery() as nursery:
                view.track(nursery, content)  # type: ignore[arg-type]
        assert name in out.getvalue(), out.getvalue()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_failing_gets_leak_no_file_descriptors(tmp_path: Path) -> None:
    """Gets that give up (no peers) or are cancelled, many times in one node:
    the process's descriptor count does not grow and nothing is left on disk."""
    manifest = Manifest(sparse_info(64 << 20), ()).signed(Identity.generate())
    tracker = HostileTracker(manifest.encode())
    cid = manifest.content_id.hex()
    node = Node(Identity.generate(), get_transport("reactor"), tracker=("127.0.0.1", tracker.port))
    counts = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            for round_ in range(3):
                out = tmp_path / f"got{round_}.bin"
                with pytest.raises(DownloadError, match="no peer has this content"):
                    await download(node, cid, out, stall_timeout=0)
                with trio.move_on_after(0.3) as scope:
                    await download(node, cid, out, stall_timeout=60)
                assert scope.cancelled_caught
                assert not node.contents
                counts.append(open_fds())
                assert os.listdir(tmp_path) == []
            nursery.cancel_scope.cancel()
    finally:
        tracker.close()
    # The first round opens what stays open (the tracker connection); after that
    # every get closes all it opened.
    assert counts[1:] == [counts[1]] * 2, counts
    assert counts[-1] <= counts[0], counts


def test_a_stall_says_what_happened() -> None:
    """No peer, peers but no chunk, a down-limit too low: three messages."""
    from types import SimpleNamespace

    from peerd.app.download import _stall_message

    def says(limit: float | None, seen: int, named: int, sessions: int, got: int) -> str:
        node = SimpleNamespace(down_limiter=SimpleNamespace(rate=limit))
        content = SimpleNamespace(
            info=SimpleNamespace(chunk_size=1 << 20),
            sessions=[object()] * sessions,
            peers_seen=seen,
            tracker_peers=named,
            bytes_from={"p": got} if got else {},
            downloaded=got,
        )
        store = SimpleNamespace(resumed_bytes=0, part_path=Path("/x/f.bin.part"))
        return _stall_message(node, content, store, 60.0)  # type: ignore[arg-type]

    assert says(None, 0, 0, 0, 0).startswith("no peer has this content: the tracker knows none")
    assert "the tracker named 3, none could be used" in says(None, 0, 3, 0, 0)
    assert says(None, 2, 2, 2, 0).startswith("2 peer(s) connected, but no chunk arrived")
    assert says(100.0, 2, 2, 2, 0).startswith("the down-limit of 100 bytes/s is probably too low")
    stopped = says(None, 2, 2, 1, 5000)
    assert stopped.startswith("all peers stopped sending (1 connected)")
    assert "5000 verified bytes are kept in /x/f.bin.part" in stopped
