"""Trees through the daemon: `peer share DIR` handed to a running daemon, and
a daemon download of a tree (real processes on loopback)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from peerd.app.daemon import control_request

from .e2e import swarm
from .test_tree_e2e import make_tree, snapshot


def _wait_socket(sock: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)


def test_a_daemon_shares_and_downloads_a_tree(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "src")
    with swarm(tmp_path, "reactor") as s:
        seed_home = s.home("seed")
        seeder = s.peer("seed", "daemon", "--host", "127.0.0.1")
        _wait_socket(seed_home / "control.sock")
        shared = s.run("seed", "share", str(top), "--id-only")
        assert shared.returncode == 0, shared.stderr
        cid = shared.stdout.strip()
        assert "shared by the running daemon" in shared.stderr
        out = tmp_path / "out"
        out.mkdir()
        got = s.get("leech", cid, out)
        assert snapshot(out / top.name) == snapshot(top)
        assert got["path"] == str(out / top.name)
        # A daemon's own download of a tree.
        home = s.home("d")
        daemon = s.peer("d", "daemon", "--host", "127.0.0.1")
        _wait_socket(home / "control.sock")
        out2 = tmp_path / "out2"
        out2.mkdir()
        reply = control_request(home, {"cmd": "get", "id": cid, "output": str(out2)}, timeout=20)
        assert reply is not None and reply["ok"], reply
        deadline = time.monotonic() + 60
        while not (out2 / top.name).exists():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.1)
        assert snapshot(out2 / top.name) == snapshot(top)
        assert sorted(os.listdir(out2)) == [top.name]
        for name, proc in (("d", daemon), ("seed", seeder)):
            assert s.run(name, "stop").returncode == 0
            assert proc.wait(timeout=15) == 0
        # Restarted, the daemon serves the tree it downloaded under its
        # publisher's id (the kept manifest; the files as they are now).
        daemon = s.peer("d", "daemon", "--host", "127.0.0.1")
        _wait_socket(home / "control.sock")
        deadline = time.monotonic() + 30
        while True:
            status = control_request(home, {"cmd": "status"}, timeout=20)
            assert status is not None
            rows = [t for t in status["transfers"] if t["id"] == cid]
            if rows and rows[0]["state"] == "seeding":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        # rm --delete removes what it downloaded, and keeps what the user
        # put there since (with the directories leading to it).
        mine = out2 / top.name / "notes-of-mine.txt"
        mine.write_text("mine")
        rm = s.run("d", "rm", cid, "--delete")
        assert rm.returncode == 0, rm.stderr
        assert f"{mine} is not part of the download" in rm.stderr, rm.stderr
        left = sorted(str(p.relative_to(out2)) for p in out2.rglob("*"))
        assert left == [top.name, f"{top.name}/notes-of-mine.txt"], left
        assert s.run("d", "stop").returncode == 0
        assert daemon.wait(timeout=15) == 0
