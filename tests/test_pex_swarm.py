"""Peer exchange end to end (issue 16, part 3): a no-tracker sharer and four
getters started together, real ``peer`` processes on loopback, both transports.

The getters are given a link that names the sharer alone (``x=``, no ``tr=``)
and a tracker address where nothing listens: the sharer's PEX is the only way
they learn of each other. The sharer's upload is limited, and so is each
getter's, so they must trade; the sharer is killed as soon as every chunk is
held by some getter (read from their files), and every getter must still
finish, with bytes from other getters in its ``bytes_per_peer``.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from peerd.app.link import Link, parse_link

from .e2e import Swarm

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])

CHUNK = 32 * 1024
SIZE = 1536 * 1024 + 1000  # 49 chunks, the last one short
# The sharer pushes one copy in ~6 s, longer than the getters' start-up skew.
# The getters' own, lower limit keeps them from completing as soon as it has:
# at half its rate each getter holds 32-37 of the 49 chunks when the last one
# leaves the sharer (measured); at its rate, 48-49, a race lost under load.
RATE = "256KiB"
GETTER_RATE = "128KiB"
GETTERS = 4
# Short PEX timers (the product's are 3 s and 60 s): every real process.
PATCH = {"peerd.engine.pex.PEX_FIRST_DELAY": 0.3, "peerd.engine.pex.PEX_INTERVAL": 2.0}


def _chunks_held(path: Path, source: bytes) -> set[int]:
    """Chunks whose bytes in ``path`` (a part file or the finished file) match
    the source: the getter verified them (nothing unverified is written)."""
    for candidate in (path, path.with_name(path.name + ".part")):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        return {
            i
            for i in range(-(-len(source) // CHUNK))
            if data[i * CHUNK : (i + 1) * CHUNK] == source[i * CHUNK : (i + 1) * CHUNK]
        }
    return set()


def _log_file(path: Path) -> int:
    """A descriptor for a child's stderr (closed here once the child has its copy)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def _neighbours(log: Path, sharer_key: str) -> set[str]:
    """The getters a getter has connected to (its ``-v`` log names each one)."""
    text = log.read_text() if log.exists() else ""
    keys = set(re.findall(r"connected to peer ([0-9a-f]{12})@", text))
    return keys - {sharer_key}


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("*.log")))


def _json_line(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """The ``--json`` summary a ``get --seed`` prints on completion (it then seeds on)."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            assert line, f"a getter exited ({proc.poll()}) with nothing printed"
            return json.loads(line)  # type: ignore[no-any-return]
    raise AssertionError("a getter did not finish in time")


def start_sharer(s: Swarm, src: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``peer share SRC --host 127.0.0.1 ARGS`` with no tracker configured (it
    runs its own), logging to ``sharer.log``; and a link to it that names the
    sharer alone (its ``x=``, no ``tr=``)."""
    env = s._env("sharer", None)
    del env["PEER_TRACKER"]
    log = _log_file(s.root / "sharer.log")
    sharer = subprocess.Popen(
        s.command("share", "-v", str(src), "--host", "127.0.0.1", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    os.close(log)
    s.procs.append(sharer)
    assert sharer.stdout is not None
    link = parse_link(sharer.stdout.readline().decode())
    assert link.trackers and link.peers == (("127.0.0.1", link.peers[0][1]),)
    only_x = str(Link(link.content_id, link.key, (), link.peers))
    assert "tr=" not in only_x
    return sharer, only_x


def test_getters_find_each_other_by_pex_and_outlive_the_sharer(
    tmp_path: Path, backend: str
) -> None:
    source = os.urandom(SIZE)
    src = tmp_path / "clip.bin"
    src.write_bytes(source)
    s = Swarm(tmp_path, backend, PATCH)  # no tracker is started: its port stays dead
    try:
        sharer, only_x = start_sharer(s, src, "--chunk-size", "32KiB", "--up-limit", RATE)
        sharer_key = s.key("sharer")[:12]
        outs = [tmp_path / f"got{k}" / "clip.bin" for k in range(GETTERS)]
        getters = []
        for k, out in enumerate(outs):
            out.parent.mkdir()
            log = _log_file(tmp_path / f"getter{k}.log")
            getters.append(
                s.peer(
                    f"getter{k}",
                    "get",
                    "-v",
                    only_x,
                    "-o",
                    str(out),
                    "--json",
                    "--seed",
                    "--host",
                    "127.0.0.1",
                    "--up-limit",
                    GETTER_RATE,
                    "--timeout",
                    "20",
                    stderr=log,
                )
            )
            os.close(log)
        # Kill the sharer once every chunk is held by some getter, and each
        # getter has found the three others (PEX is the only way it can).
        deadline = time.monotonic() + 30
        everything = set(range(-(-SIZE // CHUNK)))
        logs = [tmp_path / f"getter{k}.log" for k in range(GETTERS)]
        while True:
            held = [_chunks_held(out, source) for out in outs]
            meshed = all(len(_neighbours(path, sharer_key)) == GETTERS - 1 for path in logs)
            if set().union(*held) == everything and meshed:
                break
            assert time.monotonic() < deadline, (
                f"getters hold {[len(h) for h in held]}",
                _logs(tmp_path),
            )
            assert sharer.poll() is None, _logs(tmp_path)
            time.sleep(0.1)
        sharer.send_signal(signal.SIGKILL)
        sharer.wait()
        assert any(h != everything for h in held), "every getter finished before the sharer left"
        deadline = time.monotonic() + 30
        results = [_json_line(g, deadline) for g in getters]
        for out, result in zip(outs, results, strict=True):
            assert result.get("path") == str(out), (result, _logs(tmp_path))
            assert out.read_bytes() == source
            from_getters = {
                name: n
                for name, n in result["bytes_per_peer"].items()
                if n and not name.startswith(sharer_key)
            }
            assert from_getters, f"{out.parent.name} got bytes from the sharer only: {result}"
    finally:
        s.close()
