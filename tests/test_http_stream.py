"""``peer stream``: HTTP with Range over a content while it downloads (h11 on
the node's transport), checked with a real client (httpx)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peerd.app.http_stream import parse_range

PY = sys.executable
MiB = 1 << 20


def test_parse_range() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=900-", 1000) == (900, 999)
    assert parse_range("bytes=-100", 1000) == (900, 999)
    assert parse_range("bytes=990-5000", 1000) == (990, 999)
    assert parse_range("bytes=1000-", 1000) == "unsatisfiable"
    assert parse_range("bytes=5-4", 1000) == "unsatisfiable"
    assert parse_range("bytes=-0", 1000) == "unsatisfiable"
    assert parse_range("bytes=0-1,5-6", 1000) is None  # several ranges: the whole thing
    assert parse_range("items=0-1", 1000) is None


@pytest.fixture(params=["reactor", "proactor"])
def streaming(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[bytes, str]]:
    """A tracker, a seeder of 8 MiB (256 KiB chunks) capped at 4 MiB/s, and
    ``peer stream`` of it: (the file's bytes, the stream's URL)."""
    transport = request.param
    data = os.urandom(8 * MiB + 321)
    src = tmp_path / "film.mp4"
    src.write_bytes(data)
    env = dict(os.environ, PEER_TRANSPORT=transport)
    env.pop("PEER_TRACKER", None)
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [PY, "-m", "cli", *args],
            env=dict(env, PEER_HOME=str(tmp_path / name)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        return p

    try:
        tracker = start(
            "t", "tracker", "--host", "127.0.0.1", "--port", "0", "--data", str(tmp_path / "td")
        )
        assert tracker.stderr is not None
        port = 0
        while not port:
            line = tracker.stderr.readline().decode()
            assert line, "the tracker exited"
            if "tracker listening on" in line:
                port = int(line.split()[3].rsplit(":", 1)[1])
        trk = f"127.0.0.1:{port}"
        seed = start(
            "s", "share", str(src), "--tracker", trk, "--chunk-size", "256KiB", "--up-limit", "4MiB"
        )
        assert seed.stdout is not None
        link = seed.stdout.readline().decode().strip()
        stream = start("g", "stream", link, "--host", "127.0.0.1")
        assert stream.stdout is not None
        url = stream.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield data, url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()


def test_range_requests_return_verified_bytes_and_a_seek_jumps_ahead(
    streaming: tuple[bytes, str],
) -> None:
    data, url = streaming
    size = len(data)
    with httpx.Client(timeout=30) as client:
        head = client.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(size)
        assert head.headers["accept-ranges"] == "bytes"
        assert head.headers["content-type"] == "video/mp4"
        # A seek to 90 %: the region goes to the front of the download.
        start = size * 9 // 10
        t0 = time.monotonic()
        with client.stream("GET", url, headers={"Range": f"bytes={start}-{start + 99_999}"}) as r:
            assert r.status_code == 206
            assert r.headers["content-range"] == f"bytes {start}-{start + 99_999}/{size}"
            pieces = r.iter_raw()
            first = next(pieces)
            seek_ttfb = time.monotonic() - t0
            body = first + b"".join(pieces)
        assert body == data[start : start + 100_000]
        print(f"seek to 90 %: first byte after {seek_ttfb:.2f} s (the whole file takes ~2 s)")
        tail = client.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        bad = client.get(url, headers={"Range": f"bytes={size}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        assert client.get(url + "nothing-here").status_code == 404
        assert client.post(url).status_code == 405
        whole = client.get(url)
        assert whole.status_code == 200 and whole.content == data
