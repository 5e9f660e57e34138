"""The daemon's local robustness: one daemon per home, its socket, its state file, status.

Real ``peer daemon`` processes where the behaviour is about processes (two
daemons racing for one ``$PEER_HOME``, a daemon whose state file cannot be
written); in-process where it is about one function (the umask, the status
of a failed content, the status table).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from rich.console import Console

from cli.app import status_table
from peerd.app.daemon import Daemon, control_request
from peerd.content.identity import Identity
from peerd.errors import PeerError

from .e2e import Swarm, random_file, swarm

HOSTILE_NAMES = ["[bold red]x[/]", "[link=https://example.com]click[/link]", "a\\[b]"]


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        assert proc.poll() is None, Swarm._err(proc)
        assert time.monotonic() < deadline, "the daemon did not create its socket"
        time.sleep(0.05)


def _status(s: Swarm, name: str) -> dict[str, Any]:
    res = s.run(name, "status", "--json", timeout=20)
    assert res.returncode == 0, res.stderr
    reply: dict[str, Any] = json.loads(res.stdout)
    return reply


def test_second_daemon_refuses_and_never_orphans_the_first(tmp_path: Path) -> None:
    with swarm(tmp_path, "reactor") as s:
        # Started together: both pass any check-then-bind at the same moment.
        a = s.peer("d", "daemon")
        b = s.peer("d", "daemon")
        sock = s.home("d") / "control.sock"
        deadline = time.monotonic() + 20
        while a.poll() is None and b.poll() is None:
            assert time.monotonic() < deadline, "both daemons are still running"
            time.sleep(0.05)
        loser, winner = (a, b) if a.poll() is not None else (b, a)
        _, err = loser.communicate(timeout=10)
        assert loser.returncode != 0
        assert f"a daemon is already running (pid {winner.pid})" in err.decode(), err.decode()
        assert "Traceback" not in err.decode()
        _wait_socket(sock, winner)
        inode = os.stat(sock).st_ino
        # A third one, once the first is fully up: same answer, socket untouched.
        late = s.run("d", "daemon", timeout=30)
        assert late.returncode != 0
        assert f"already running (pid {winner.pid})" in late.stderr, late.stderr
        assert os.stat(sock).st_ino == inode
        assert _status(s, "d")["ok"] is True  # the survivor still answers
        assert s.run("d", "stop").returncode == 0
        assert winner.wait(timeout=15) == 0
        assert not sock.exists()
        # Its lock went with it: a new daemon starts.
        again = s.peer("d", "daemon")
        _wait_socket(sock, again)
        assert s.run("d", "stop").returncode == 0
        assert again.wait(timeout=15) == 0


def test_daemon_survives_an_os_error_saving_its_state(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 100_000)
    with swarm(tmp_path, "reactor") as s:
        home = s.home("d")
        (home / "daemon.tmp").mkdir()  # where daemon.json is written first: now an OSError
        daemon = s.peer("d", "daemon")
        _wait_socket(home / "control.sock", daemon)
        res = s.run("d", "share", str(src))
        assert res.returncode == 0, res.stderr
        assert daemon.poll() is None, Swarm._err(daemon)
        status = _status(s, "d")
        assert "daemon.json" in status["state_error"]
        human = s.run("d", "status")
        assert "warning:" in human.stderr and "daemon.json" in human.stderr
        (home / "daemon.tmp").rmdir()
        assert s.run("d", "share", str(src)).returncode == 0
        assert "state_error" not in _status(s, "d")  # written again: the warning goes
        assert json.loads((home / "daemon.json").read_text())["shared"]
        assert s.run("d", "stop").returncode == 0
        assert daemon.wait(timeout=15) == 0


def _fake_node(**fields: Any) -> Any:
    return SimpleNamespace(contents={}, **fields)


async def test_daemon_binds_its_socket_without_touching_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_umask = os.umask

    def spy(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)

    monkeypatch.setattr(os, "umask", spy)
    daemon = Daemon(tmp_path, _fake_node(), Identity.generate())
    sock = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run)
        with trio.fail_after(5):
            while not sock.exists():
                await trio.sleep(0.01)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert [n for n in os.listdir(tmp_path) if n.startswith(".control")] == []
        reply = await trio.to_thread.run_sync(_ask, sock, {"cmd": "ls"})
        assert reply == {"ok": True, "shared": []}
        daemon._stop.set()
    assert not sock.exists()
    assert calls == [], "the daemon changed the process-wide umask"


def _ask(sock: Path, request: dict[str, Any]) -> dict[str, Any]:
    from peerd.app.daemon import control_request

    reply = control_request(sock.parent, request, timeout=5)
    assert reply is not None
    return reply


async def test_status_lists_a_content_that_failed(tmp_path: Path) -> None:
    cid = bytes(range(32))
    node = _fake_node(failed={cid: "disk full while writing /x/f.bin.part: free some space"})
    daemon = Daemon(tmp_path, node, Identity.generate())
    daemon.names[cid.hex()] = ("f.bin", 1000)
    reply = await daemon._handle({"cmd": "status"})
    (row,) = reply["transfers"]
    assert row["id"] == cid.hex() and row["name"] == "f.bin" and row["size"] == 1000
    assert row["state"] == "failed: disk full while writing /x/f.bin.part: free some space"
    # Before the node reports such failures, status still works.
    assert (await Daemon(tmp_path, _fake_node(), Identity.generate())._handle({"cmd": "status"}))[
        "transfers"
    ] == []


def _render(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_status_table_shows_remote_names_literally(name: str) -> None:
    reply = {
        "transfers": [
            {
                "id": "ab" * 32,
                "name": name,
                "size": 10,
                "have": 5,
                "state": f"failed: cannot write {name}",
                "peers": 1,
                "down_MBps": 0.0,
                "uploaded": 0,
            }
        ]
    }
    text = _render(status_table(reply))
    assert name in text, text
    assert f"failed: cannot write {name}" in text, text


def test_status_shows_a_download_that_failed(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 200_000)
    with swarm(tmp_path, "reactor") as s:
        _, cid = s.share("seed", src)
        home = s.home("d")
        out = tmp_path / "out"
        out.mkdir()
        foreign = out / "f.bin.part"
        foreign.write_bytes(b"not a download")  # someone's file: refused, never touched
        # A get handed over now is refused at once, in the request's reply ...
        daemon = s.peer("d", "daemon")
        _wait_socket(home / "control.sock", daemon)
        with pytest.raises(PeerError, match=r"f\.bin\.part exists but is not an unfinished"):
            control_request(home, {"cmd": "get", "id": cid, "output": str(out)}, timeout=20)
        assert s.run("d", "stop").returncode == 0
        assert daemon.wait(timeout=15) == 0
        # ... one restored from daemon.json fails in the background: status says why.
        state = {"shared": {}, "downloads": {cid: {"path": str(out / "f.bin")}}}
        (home / "daemon.json").write_text(json.dumps(state))
        daemon = s.peer("d", "daemon")
        _wait_socket(home / "control.sock", daemon)
        deadline = time.monotonic() + 15
        while True:
            rows = [t for t in _status(s, "d")["transfers"] if t["id"] == cid]
            if rows and rows[0]["state"].startswith("failed: "):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
        assert "f.bin.part exists but is not an unfinished download" in rows[0]["state"]
        assert rows[0]["name"] == "f.bin"
        human = s.run("d", "status")
        assert "failed:" in human.stdout and "f.bin" in human.stdout, human.stdout
        assert foreign.read_bytes() == b"not a download"
        assert daemon.poll() is None
        assert s.run("d", "stop").returncode == 0
        assert daemon.wait(timeout=15) == 0


async def test_control_errors_are_one_line_replies(tmp_path: Path) -> None:
    """Malformed or refused requests get {"ok": false, "error": ...}; the daemon goes on."""
    from peerd.node.ratelimit import RateLimiter

    node = _fake_node(failed={}, up_limiter=RateLimiter(None), down_limiter=RateLimiter(None))
    daemon = Daemon(tmp_path, node, Identity.generate())
    daemon.shared = {"ab" * 32: {"path": "/x/a"}, "ab" * 31 + "cd": {"path": "/x/b"}}
    sock = tmp_path / "control.sock"

    def raw(line: bytes) -> dict[str, Any]:
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(line)
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
            return reply

    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run)
        with trio.fail_after(5):
            while not sock.exists():
                await trio.sleep(0.01)
        cases = [
            (b"garbage\n", "bad control request"),
            (b"[1, 2]\n", "bad control request: not an object"),
            (b'{"cmd": "nope"}\n', "bad control request: unknown command 'nope'"),
            (b'{"cmd": "limit", "up": "fast"}\n', "up must be bytes per second"),
            (b'{"cmd": "limit", "down": -1}\n', "down must be bytes per second"),
            (b'{"cmd": "pause", "id": "zz"}\n', "'zz' is not a content id"),
            (b'{"cmd": "rm", "id": "abab"}\n', "abab names 2 contents; give more of the id"),
            (b'{"cmd": "resume", "id": "ffff"}\n', "the daemon has no content ffff"),
        ]
        for line, said in cases:
            reply = await trio.to_thread.run_sync(raw, line)
            assert reply["ok"] is False and said in reply["error"], (line, reply)
            assert "\n" not in reply["error"]
        ok = await trio.to_thread.run_sync(raw, b'{"cmd": "limit", "up": 1000}\n')
        assert ok == {"ok": True, "up": 1000, "down": None}
        assert node.up_limiter.rate == 1000
        daemon._stop.set()
