"""Streaming (issue 16, part 5): ``peer get LINK -o -`` writes the content to
stdout in order as chunks are verified; a closed pipe ends it cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PY = sys.executable
MiB = 1 << 20


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """A tracker and a seeder of a 6 MiB file (256 KiB chunks): (file, link, env)."""
    src = tmp_path / "film.mkv"
    src.write_bytes(os.urandom(6 * MiB + 123))
    env = dict(os.environ, PEER_TRANSPORT="reactor")
    env.pop("PEER_TRACKER", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tracker = subprocess.Popen(
            [
                PY,
                "-m",
                "cli",
                "tracker",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data",
                str(tmp_path / "t"),
            ],
            env=dict(env, PEER_HOME=str(tmp_path / "th")),
            stderr=subprocess.PIPE,
        )
        procs.append(tracker)
        assert tracker.stderr is not None
        port = 0
        while not port:
            line = tracker.stderr.readline().decode()
            assert line, "the tracker exited"
            if "tracker listening on" in line:
                port = int(line.split()[3].rsplit(":", 1)[1])
        seed = subprocess.Popen(
            [
                PY,
                "-m",
                "cli",
                "share",
                str(src),
                "--tracker",
                f"127.0.0.1:{port}",
                "--chunk-size",
                "256KiB",
                "--host",
                "127.0.0.1",
            ],
            env=dict(env, PEER_HOME=str(tmp_path / "seed")),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(seed)
        assert seed.stdout is not None
        link = seed.stdout.readline().decode().strip()
        assert link.startswith("peer:"), link
        yield src, link, dict(env, PEER_HOME=str(tmp_path / "getter"))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


def test_stdout_gets_the_content_in_order_and_nothing_else(
    shared: tuple[Path, str, dict[str, str]],
) -> None:
    src, link, env = shared
    started = time.monotonic()
    proc = subprocess.Popen(
        [PY, "-m", "cli", "get", link, "-o", "-", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.read(1)
    ttfb = time.monotonic() - started
    rest = proc.stdout.read()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    proc.stdout.close()
    proc.stderr.close()
    assert first + rest == src.read_bytes()
    assert '"path": "-"' in err  # the summary goes to stderr: stdout is the content
    # The verified copy kept for resuming is gone once streamed.
    assert not list((Path(env["PEER_HOME"]) / "streams").iterdir())
    print(f"time to first byte on stdout from process start: {ttfb:.2f} s")


def test_a_closed_pipe_ends_the_download_cleanly(
    shared: tuple[Path, str, dict[str, str]],
) -> None:
    _src, link, env = shared
    proc = subprocess.Popen(
        [PY, "-m", "cli", "get", link, "-o", "-", "--down-limit", "1MiB"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(1000)) == 1000
    proc.stdout.close()  # as `| head -c 1000` does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "the output was closed after" in err and "Traceback" not in err, err


def test_sequential_file_download(shared: tuple[Path, str, dict[str, str]], tmp_path: Path) -> None:
    src, link, env = shared
    out = tmp_path / "got.mkv"
    res = subprocess.run(
        [PY, "-m", "cli", "get", link, "-o", str(out), "--sequential"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr.decode()
    assert out.read_bytes() == src.read_bytes()


def test_a_stream_cut_short_resumes_from_its_cache(
    shared: tuple[Path, str, dict[str, str]],
) -> None:
    # The second run finds verified chunks in the stream's cache: those are
    # read back from the disk (not held in memory, as fresh ones are) and
    # must come out exactly as the fresh ones do, the short last one included.
    src, link, env = shared
    cut = subprocess.Popen(
        [PY, "-m", "cli", "get", link, "-o", "-", "--down-limit", "2MiB"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert cut.stdout is not None
    assert len(cut.stdout.read(3 * MiB)) == 3 * MiB
    cut.stdout.close()
    assert cut.wait(timeout=60) == 0
    res = subprocess.run(
        [PY, "-m", "cli", "get", link, "-o", "-", "-v"], env=env, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr.decode()
    assert "resuming:" in res.stderr.decode()
    assert res.stdout == src.read_bytes()
