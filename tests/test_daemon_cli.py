"""The daemon as the centre: the real ``peer`` command against a detached daemon.

Every test drives ``peer`` in subprocesses and reads its output and exit
code: ``peer daemon --detach``, then share / get / status / pause / resume /
rm / limit through it, the flags it refuses, its log, SIGHUP, a restored
share whose tracker comes up later, and ``config.toml``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .e2e import PY, Swarm, content_id_of, free_port, random_file, swarm

KiB = 1024


@contextlib.contextmanager
def daemons(s: Swarm) -> Iterator[Callable[..., int]]:
    """``start(name, *flags)`` runs ``peer daemon --detach`` for NAME and returns
    its pid; every daemon started is stopped at the end (killed if it must be)."""
    pids: dict[str, int] = {}

    def start(name: str, *flags: str, env: dict[str, str] | None = None) -> int:
        res = subprocess.run(
            [PY, "-m", "cli", "daemon", "--detach", *flags],
            env=env or s.env(s.home(name)),
            capture_output=True,
            text=True,
            timeout=40,
        )
        assert res.returncode == 0, res.stderr
        m = re.search(r"started \(pid (\d+)\): listening on port (\d+), tracker (\S+);", res.stderr)
        assert m, res.stderr
        pids[name] = int(m.group(1))
        return pids[name]

    try:
        yield start
    finally:
        for name, pid in pids.items():
            s.run(name, "stop", timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def status(s: Swarm, name: str, *args: str) -> dict[str, Any]:
    res = s.run(name, "status", "--json", *args, timeout=30)
    assert res.returncode == 0, res.stderr
    reply: dict[str, Any] = json.loads(res.stdout)
    return reply


def row_of(s: Swarm, name: str, cid: str) -> dict[str, Any]:
    rows = [t for t in status(s, name)["transfers"] if t["id"] == cid]
    assert len(rows) == 1, rows
    return rows[0]


def wait_for(what: Callable[[], bool], timeout: float = 20, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message or "timed out"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: its /proc status says so.
    with contextlib.suppress(OSError):
        if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
            return False
    return True


@pytest.mark.parametrize("backend", ["reactor", "proactor"])
def test_share_get_status_pause_resume_limit_rm_through_daemons(
    tmp_path: Path, backend: str
) -> None:
    src = random_file(tmp_path / "f.bin", 2048 * KiB)
    out = tmp_path / "out"
    with swarm(tmp_path, backend) as s, daemons(s) as start:
        seed_pid = start("seed")
        start("leech")
        log = (s.home("seed") / "daemon.log").read_text()
        assert re.search(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO .*daemon for .* started", log, re.M
        )
        shared = s.run("seed", "share", str(src), "--chunk-size", "16KiB")
        assert shared.returncode == 0, shared.stderr
        cid = content_id_of(shared.stdout.splitlines()[0]) or ""
        assert f"tr=127.0.0.1:{s.tracker_port}" in shared.stdout  # the daemon's tracker
        ls = json.loads(s.run("seed", "ls", "--json").stdout)
        assert ls == [
            {"id": cid, "path": str(src), "name": "f.bin", "size": 2048 * KiB, "state": "seeding"}
        ]
        assert re.fullmatch(rf"{cid} +2\.1 MB  {src}\n", s.run("seed", "ls").stdout)

        # A link's key is the trust the daemon checks; its other tracker is a note.
        wrong = s.key("leech")
        link = f"peer:{cid}?pk={wrong}&tr=127.0.0.1:9"
        refused = s.run("leech", "get", link, "-o", f"{out}/")
        assert refused.returncode == 1, refused.stderr
        note, error = refused.stderr.strip().splitlines()
        assert note.startswith("peer: note: the link names tracker 127.0.0.1:9"), note
        assert error.startswith("peer: error: manifest") and f"trusted key {wrong}" in error
        assert not out.exists() or not any(out.iterdir())

        # A slow download (a live limit: 64 s at least), handed over and left running.
        limit = s.run("leech", "limit", "--down", "32KiB")
        assert limit.returncode == 0 and "down: 32768 bytes/s" in limit.stdout, limit.stderr
        got = s.run("leech", "get", cid, "-o", f"{out}/", "--detach", "--json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == {"id": cid, "path": str(out / "f.bin"), "detached": True}
        reply = status(s, "leech", cid[:8])
        assert reply["daemon"]["down"] == 32 * KiB
        (row,) = reply["transfers"]
        assert row["state"] == "downloading" and row["have"] < row["size"]
        wait_for(lambda: bool(status(s, "leech", cid)["peers"]), message="no peer connected")
        (peer,) = status(s, "leech", cid)["peers"]
        assert peer["key"] == s.key("seed") and peer["address"].startswith("127.0.0.1:")
        wait_for(lambda: status(s, "leech", cid)["peers"][0]["received"] > 0)
        human = s.run("leech", "status", cid[:16]).stdout
        assert "peers" in human and s.key("seed")[:16] in human, human

        # Pause keeps what is verified; resume goes on.
        wait_for(lambda: row_of(s, "leech", cid)["have"] > 0)
        assert s.run("leech", "pause", cid[:8]).returncode == 0
        paused = row_of(s, "leech", cid)
        assert paused["state"] == "paused" and 0 < paused["have"] < paused["size"]
        assert (out / "f.bin.part").exists()
        resumed = s.run("leech", "resume", cid[:8])
        assert resumed.returncode == 0, resumed.stderr
        assert row_of(s, "leech", cid)["state"] in ("downloading", "seeding")

        # Unlimited again; a plain get follows the daemon's download to its end.
        assert "down: unlimited" in s.run("leech", "limit", "--down", "0").stdout
        follow = s.run("leech", "get", cid, "-o", f"{out}/", "--json", timeout=60)
        assert follow.returncode == 0, follow.stderr
        result = json.loads(follow.stdout.splitlines()[-1])
        assert result["id"] == cid and result["path"] == str(out / "f.bin")
        assert (out / "f.bin").read_bytes() == src.read_bytes()
        assert row_of(s, "leech", cid)["state"] == "seeding"
        assert row_of(s, "seed", cid)["uploaded"] > 0

        # rm --delete removes a downloaded file; never a shared source.
        rm = s.run("leech", "rm", cid, "--delete")
        assert rm.returncode == 0 and f"deleted {out / 'f.bin'}" in rm.stderr, rm.stderr
        assert not (out / "f.bin").exists()
        assert cid not in json.dumps(status(s, "leech")["transfers"])
        rm = s.run("seed", "rm", cid[:10], "--delete")
        assert rm.returncode == 0 and "is the file you shared" in rm.stderr, rm.stderr
        assert src.exists() and s.run("seed", "ls", "--json").stdout.strip() == "[]"
        assert alive(seed_pid)


def test_ctrl_c_leaves_the_download_in_the_daemon_or_cancels_it(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 1024 * KiB)  # 32 s at the limit below
    out = tmp_path / "out"
    with swarm(tmp_path, "reactor") as s, daemons(s) as start:
        start("leech")
        _, cid = s.share("other", src, "--chunk-size", "16KiB")
        assert s.run("leech", "limit", "--down", "32KiB").returncode == 0
        # Not a terminal: Ctrl-C leaves it running, and says so.
        get = subprocess.Popen(
            s.command("get", cid, "-o", f"{out}/"),
            env=s.env(s.home("leech")),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: any(t["id"] == cid for t in status(s, "leech")["transfers"]))
        get.send_signal(signal.SIGINT)
        _, err = get.communicate(timeout=20)
        assert get.returncode == 130, err
        assert b"left downloading in the daemon" in err and b"Traceback" not in err, err
        assert row_of(s, "leech", cid)["state"] == "downloading"
        # On a terminal it asks; "n" cancels (the verified chunks stay for a resume).
        leader, follower = os.openpty()
        try:
            get = subprocess.Popen(
                s.command("get", cid, "-o", f"{out}/"),
                env=s.env(s.home("leech")),
                stdin=follower,
                stdout=subprocess.PIPE,
                stderr=follower,
            )
            os.close(follower)
            seen = _read_until(leader, b"peers", 20)  # the progress bar, on the terminal
            assert b"f.bin" in seen, seen
            get.send_signal(signal.SIGINT)
            seen = _read_until(leader, b"[Y/n]", 20)
            assert b"leave it downloading in the daemon?" in seen, seen
            os.write(leader, b"n\n")
            assert get.wait(timeout=20) == 130
            seen += _read_until(leader, b"resumes", 10)
            assert b"cancelled" in seen, seen
        finally:
            os.close(leader)
            assert get.stdout is not None
            get.stdout.close()
        assert all(t["id"] != cid for t in status(s, "leech")["transfers"])


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} never came: {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_node_flags_are_refused_while_a_daemon_runs(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 10 * KiB)
    with swarm(tmp_path, "reactor") as s:
        nobody = s.run("d", "get", "0" * 64, "--detach")
        assert nobody.returncode == 1 and "start one with `peer daemon --detach`" in nobody.stderr
        with daemons(s) as start:
            start("d")
            cases = [
                (("share", str(src), "--port", "5555"), "it has its own --port; stop it"),
                (("share", str(src), "--transport", "foo"), "it has its own --transport"),
                (("share", str(src), "--up-limit", "1KiB"), "`peer limit --up RATE`"),
                (("share", str(src), "--tracker", "127.0.0.1:1"), "runs with tracker 127.0.0"),
                (("get", "0" * 64, "--host", "::1"), "it has its own --host"),
                (("get", "0" * 64, "--down-limit", "1MB"), "`peer limit --down RATE`"),
                (("pause", "zz"), "is not a content id"),
                (("rm", "abcd"), "the daemon has no content abcd"),
                (("limit", "--up", "fast"), "--up: cannot read 'fast' as a size"),
            ]
            for args, said in cases:
                res = s.run("d", *args)
                assert res.returncode == 1, (args, res.stderr)
                (line,) = res.stderr.strip().splitlines()
                assert line.startswith("peer: error: ") and said in line, (args, line)
            assert s.run("d", "ls", "--json").stdout.strip() == "[]"  # nothing was shared


def test_detached_daemon_ignores_sighup_and_logs(tmp_path: Path) -> None:
    with swarm(tmp_path, "reactor") as s, daemons(s) as start:
        pid = start("d", "-v")
        again = s.run("d", "daemon", "--detach")
        assert again.returncode == 1
        assert f"a daemon is already running (pid {pid})" in again.stderr
        bad = s.run("e", "daemon", "--detach", "--port", "99999")
        assert bad.returncode == 1
        assert (
            bad.stderr
            == "peer: error: --port 99999 is not a port: use 1-65535, or 0 for any free port\n"
        )
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.3)
        assert alive(pid) and status(s, "d")["daemon"]["pid"] == pid
        assert os.getsid(pid) == pid  # its own session: no terminal's hangup reaches it
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == s.home("d")  # pins no other directory
        stop = s.run("d", "stop")
        assert stop.returncode == 0 and not alive(pid)
        log = (s.home("d") / "daemon.log").read_text()
        assert "started (pid" in log, log


def test_restored_share_is_published_once_the_tracker_comes_up(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 64 * KiB)
    with swarm(tmp_path, "reactor") as s, daemons(s) as start:
        start("d")
        res = s.run("d", "share", str(src))
        assert res.returncode == 0, res.stderr
        cid = content_id_of(res.stdout.splitlines()[0]) or ""
        assert s.run("d", "stop").returncode == 0
        # The tracker goes away (and forgets everything); the daemon comes back first.
        assert s.tracker is not None
        s.tracker.terminate()
        s.tracker.wait(timeout=10)
        for f in (tmp_path / "tracker").iterdir():
            f.unlink()
        start("d")
        assert row_of(s, "d", cid)["state"] == "seeding"  # served meanwhile
        s.start_tracker()
        # Published by the daemon's retry (this tracker never heard of it) ...
        wait_for(
            lambda: s.run("leech", "info", cid).returncode == 0,
            timeout=60,  # its retries back off: 2, 6, 14, 30 s after the start
            message="the restored share was never published",
        )
        # ... and announced: a get finds the daemon as a peer.
        out = tmp_path / "copy.bin"
        got = s.run("leech", "get", cid, "-o", str(out), "--json", timeout=60)
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == src.read_bytes()


def _write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_config_file_values_and_their_precedence(tmp_path: Path) -> None:
    src = random_file(tmp_path / "f.bin", 40 * KiB)
    with swarm(tmp_path, "reactor") as s, daemons(s) as start:
        home = s.home("d")
        port = free_port()
        downloads = tmp_path / "dl"
        _write_config(
            home,
            f'tracker = ["127.0.0.1:{s.tracker_port}"]\nport = {port}\nup_limit = "3MiB"\n'
            f'download_dir = "{downloads}"\ntransport = "reactor"\n',
        )
        env = s.env(home)
        del env["PEER_TRACKER"]  # the config's tracker, then
        start("d", env=env)
        info = status(s, "d")["daemon"]
        assert info["port"] == port and info["up"] == 3 * 1024 * 1024
        assert info["tracker"] == f"127.0.0.1:{s.tracker_port}"
        # A flag beats the config; an environment variable beats it too.
        assert s.run("d", "stop").returncode == 0
        other = free_port()
        env["PEER_TRACKER"] = "127.0.0.1:9"
        start("d", "--port", str(other), "--up-limit", "0", env=env)
        info = status(s, "d")["daemon"]
        assert info["port"] == other and info["up"] is None and info["tracker"] == "127.0.0.1:9"
        assert s.run("d", "stop").returncode == 0
        # download_dir: where a get without -o puts the file.
        _, cid = s.share("seed", src)
        got = s.run("d", "get", cid, "--json")
        assert got.returncode == 0, got.stderr
        assert (downloads / "f.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('port = "x"\n', "config.toml: port: 'x' is not a port"),
        ("colour = 1\n", "config.toml: colour: unknown key"),
        ('up_limit = "fast"\n', "config.toml: up_limit: cannot read 'fast'"),
        ('tracker = "nohost"\n', "config.toml: tracker:"),
        ('transport = "carrier-pigeon"\n', "config.toml: transport: 'carrier-pigeon'"),
        ("port = \n", "config.toml: not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path: Path, text: str, said: str) -> None:
    home = tmp_path / "home"
    _write_config(home, text)
    env = dict(os.environ, PEER_HOME=str(home))
    res = subprocess.run(
        [PY, "-m", "cli", "ls"], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"peer: error: {home / 'config.toml'}") and said in line, line


def test_a_restarted_daemon_seeds_a_download_under_its_publishers_id(tmp_path: Path) -> None:
    # The download was saved under another name: hashing it anew would give
    # another id (the name is in the manifest). The daemon keeps the
    # manifest it fetched and serves the file under the publisher's id.
    src = random_file(tmp_path / "f.bin", 256 * KiB)
    out = tmp_path / "renamed.bin"
    with swarm(tmp_path, "reactor") as s, daemons(s) as start:
        start("seed")
        start("leech")
        shared = s.run("seed", "share", str(src), "--id-only")
        assert shared.returncode == 0, shared.stderr
        cid = shared.stdout.strip()
        got = s.run("leech", "get", cid, "-o", str(out), "--json", timeout=60)
        assert got.returncode == 0, got.stderr
        assert s.run("leech", "stop", timeout=30).returncode == 0
        start("leech")
        wait_for(
            lambda: row_of(s, "leech", cid)["state"] == "seeding",
            message=f"not seeding {cid[:16]} again: {status(s, 'leech')}",
        )
        assert [row["id"] for row in status(s, "leech")["transfers"]] == [cid]
        # And it serves it: a third peer gets it from the leech alone.
        assert s.run("seed", "rm", cid).returncode == 0
        third = s.get("third", cid, tmp_path / "third.bin")
        assert (tmp_path / "third.bin").read_bytes() == src.read_bytes()
        assert third["peers_used"] == 1
