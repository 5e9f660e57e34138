"""Links (docs/PROTOCOL.md, "Links"): what share prints, what get and info read."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerd.app.link import Link, LinkError, parse_link
from peerd.errors import PeerError

from .e2e import free_port

PY = sys.executable
CID = bytes(range(32))
KEY = bytes(range(32, 64))


def test_a_link_reads_back_as_written() -> None:
    link = Link(CID, KEY, (("192.0.2.10", 7070),), (("2001:db8::7", 6881), ("h.example", 1)))
    text = str(link)
    assert text == (
        f"peer:{CID.hex()}?pk={KEY.hex()}&tr=192.0.2.10:7070&x=[2001:db8::7]:6881&x=h.example:1"
    )
    assert parse_link(text) == link
    assert parse_link(f"  PEER:{CID.hex().upper()}  ") == Link(CID)
    assert parse_link(f"peer:{CID.hex()}?x=%5B::1%5D:9&future=1") == Link(CID, peers=(("::1", 9),))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("magnet:?xt=1", "not a peer link"),
        ("peer:abc", "content id is not 64 hex"),
        (f"peer:{CID.hex()}?pk=zz", "publisher key"),
        (f"peer:{CID.hex()}?pk={KEY.hex()}&pk={KEY.hex()}", "two publisher keys"),
        (f"peer:{CID.hex()}?tr=host", "HOST:PORT"),
        (f"peer:{CID.hex()}?tr=host:0", "HOST:PORT"),
        (f"peer:{CID.hex()}?x=[::1:80", "HOST:PORT"),
        (f"peer:{CID.hex()}?tr", "has no value"),
        (f"peer:{CID.hex()}?" + "&".join(f"x=10.0.0.{i}:1" for i in range(17)), "at most"),
        ("peer:" + "0" * 3000, "at most 2048"),
    ],
)
def test_a_bad_link_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(PeerError, match=says):
        parse_link(text)


@given(st.text(max_size=300))
def test_any_text_is_a_link_or_a_link_error(text: str) -> None:
    try:
        link = parse_link("peer:" + CID.hex() + "?" + text)
    except LinkError:
        return
    except PeerError:
        return
    assert parse_link(str(link)) == link


def test_hosts_are_names_or_addresses_only() -> None:
    for host in ("a&b", "a b", "a/b", "a%26b", "\x00"):
        with pytest.raises(PeerError, match="HOST:PORT"):
            parse_link(f"peer:{CID.hex()}?tr={host}:7070")


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_share_prints_a_link_that_get_and_info_need_nothing_else_for(tmp_path: Path) -> None:
    src = tmp_path / "clip.mp4"
    src.write_bytes(os.urandom(700_000))
    env = dict(os.environ, PEER_TRANSPORT="reactor")
    env.pop("PEER_TRACKER", None)
    procs = []
    try:
        data = ["--data", str(tmp_path / "trk")]
        tracker = _start(
            [PY, "-m", "cli", "tracker", "--host", "127.0.0.1", "--port", "0", *data],
            dict(env, PEER_HOME=str(tmp_path / "t")),
        )
        procs.append(tracker)
        assert tracker.stderr is not None
        port = 0
        while not port:
            line = tracker.stderr.readline().decode()
            assert line, "the tracker exited"
            if "tracker listening on" in line:
                port = int(line.split()[3].rsplit(":", 1)[1])
        share_env = dict(env, PEER_HOME=str(tmp_path / "a"))
        loopback = ["--host", "127.0.0.1"]
        share = _start(
            [PY, "-m", "cli", "share", str(src), "--tracker", f"127.0.0.1:{port}", *loopback],
            share_env,
        )
        procs.append(share)
        assert share.stdout is not None
        link = parse_link(share.stdout.readline().decode())
        publisher = subprocess.run(
            [PY, "-m", "cli", "id"], env=share_env, capture_output=True, text=True, check=True
        )
        assert link.key == bytes.fromhex(publisher.stdout.strip())
        assert link.trackers == (("127.0.0.1", port),)
        assert len(link.peers) == 1 and link.peers[0][0] == "127.0.0.1"  # --host is specific
        getter = dict(env, PEER_HOME=str(tmp_path / "b"))
        info = subprocess.run(
            [PY, "-m", "cli", "info", str(link), "--json"],
            env=getter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert info.returncode == 0, info.stderr
        facts = json.loads(info.stdout)
        human = subprocess.run(
            [PY, "-m", "cli", "info", link.content_id.hex()[:20], "--tracker", f"127.0.0.1:{port}"],
            env=getter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert human.returncode == 0, human.stderr
        assert f"signed by:  {link.key.hex()}" in human.stdout  # type: ignore[union-attr]
        assert "name:       clip.mp4" in human.stdout
        assert facts["id"] == link.content_id.hex() and facts["name"] == "clip.mp4"
        assert facts["size"] == 700_000 and facts["signers"] == [link.key.hex()]  # type: ignore[union-attr]
        out = tmp_path / "got.mp4"
        got = subprocess.run(
            [PY, "-m", "cli", "get", str(link), "-o", str(out)],
            env=getter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == src.read_bytes()
        # -o DIR/ (a directory that does not exist yet): the file goes inside.
        into = subprocess.run(
            [PY, "-m", "cli", "get", str(link), "-o", f"{tmp_path / 'dl'}/"],
            env=getter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert into.returncode == 0, into.stderr
        assert (tmp_path / "dl" / "clip.mp4").read_bytes() == src.read_bytes()
        # The link's key is enforced: another --trust key is refused up front.
        other = subprocess.run(
            [PY, "-m", "cli", "get", str(link), "--trust", "ab" * 32, "-o", str(tmp_path / "x")],
            env=getter,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 1
        assert "--trust names another key than the link's publisher key" in other.stderr
        # --id-only keeps the old contract: the bare id.
        bare = _start(
            [PY, "-m", "cli", "share", str(src), "--id-only", "--tracker", f"127.0.0.1:{port}"],
            dict(env, PEER_HOME=str(tmp_path / "c")),
        )
        procs.append(bare)
        assert bare.stdout is not None
        assert bare.stdout.readline().decode().strip() == link.content_id.hex()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


def test_an_unreachable_tracker_does_not_stop_sharing(tmp_path: Path) -> None:
    """The tracker is down: `peer share` says so once and seeds anyway; a getter
    with the link gets the file from the link's peer; once the tracker is up,
    the sharer publishes in the background."""
    port = free_port()  # nothing behind it (for now)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    env = dict(os.environ, PEER_TRANSPORT="reactor")
    env.pop("PEER_TRACKER", None)
    share = _start(
        [
            PY,
            "-m",
            "cli",
            "share",
            str(src),
            "--tracker",
            f"127.0.0.1:{port}",
            "--host",
            "127.0.0.1",
        ],
        dict(env, PEER_HOME=str(tmp_path / "a")),
    )
    procs = [share]
    try:
        assert share.stdout is not None and share.stderr is not None
        link = parse_link(share.stdout.readline().decode())
        assert link.peers and link.trackers == (("127.0.0.1", port),)
        warned = share.stderr.readline().decode()
        assert "cannot reach tracker" in warned and "seeding anyway" in warned, warned
        out = tmp_path / "got.bin"
        got = subprocess.run(
            [PY, "-m", "cli", "get", str(link), "-o", str(out)],
            env=dict(env, PEER_HOME=str(tmp_path / "b")),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == src.read_bytes()
        tracker = _start(
            [
                PY,
                "-m",
                "cli",
                "tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data",
                str(tmp_path / "t"),
            ],
            dict(env, PEER_HOME=str(tmp_path / "t")),
        )
        procs.append(tracker)
        said = ""
        deadline = time.monotonic() + 30
        while "reachable again" not in said and time.monotonic() < deadline:
            ready, _, _ = select.select([share.stderr], [], [], 1.0)
            if ready:
                said += share.stderr.readline().decode()
        assert "the tracker is reachable again: published" in said, said
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
