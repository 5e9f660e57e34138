"""Streaming from a warm swarm: time to first byte and throughput of ``-o -``,
against a file download of the same content in the same run, and an HTTP
seek to 90 % with ``peer stream``.

A real tracker and ``--seeders`` seeders (``peer`` processes on loopback)
share one file; then, ``--runs`` times interleaved: ``peer get ID -o -``
(stdout read by this script: time to the first byte from process start, and
the whole transfer), ``peer get ID -o FILE`` (the same content to a file,
then again with ``--sequential``),
and ``peer stream ID`` with a Range request at 90 % (time to its first byte
from the request). Medians are printed.

    .venv/bin/python scripts/bench_stream.py --size 1GiB --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import random_file, swarm

MiB = 1 << 20


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * {None: 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}[m.group(2)]


def stdout_run(s, cid: str, size: int, name: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds to the first byte, seconds to the last) of `peer get ID -o -`."""
    started = time.monotonic()
    proc = s.peer(name, "get", cid, "-o", "-", stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # raw reads, as a player does: no Python buffering
    first = os.read(fd, 1)
    ttfb = time.monotonic() - started
    got = len(first)
    # Into one reused buffer, as a player reads: os.read(fd, n) would allocate
    # n bytes per call, and at 4 MiB per call that, not the getter, was the
    # limit (about 400 MB/s).
    buf = bytearray(4 * MiB)
    while n := os.readv(fd, [buf]):
        got += n
    total = time.monotonic() - started
    assert proc.wait(timeout=60) == 0 and got == size, f"got {got} of {size} bytes"
    proc.stdout.close()
    return ttfb, total


def file_run(s, cid: str, out: Path, name: str, *extra: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    s.get(name, cid, out, *extra, timeout=600)
    took = time.monotonic() - started
    out.unlink()
    return took


def seek_run(s, cid: str, size: int, name: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds from a Range request at 90 % to its first byte, `peer stream` fresh."""
    proc = s.peer(name, "stream", cid, "--host", "127.0.0.1", stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        start = size * 9 // 10
        with httpx.Client(timeout=60) as client:
            t0 = time.monotonic()
            headers = {"Range": f"bytes={start}-{start + MiB - 1}"}
            with client.stream("GET", url, headers=headers) as r:
                assert r.status_code == 206, r.status_code
                next(r.iter_raw())
                return time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=_size, default=256 * MiB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seeders", type=int, default=2)
    ap.add_argument("--transport", default="reactor", choices=("reactor", "proactor"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peer-bench-stream-") as tmp:
        root = Path(tmp)
        src = random_file(root / "film.mkv", args.size)
        with swarm(root, args.transport) as s:
            cid = ""
            for k in range(args.seeders):
                _proc, cid = s.share(f"seed{k}", src)
            time.sleep(1.0)  # a warm swarm: the seeders have announced
            ttfbs, streams, files, seqs, seeks = [], [], [], [], []
            for run in range(args.runs):
                ttfb, whole = stdout_run(s, cid, args.size, f"out{run}")
                ttfbs.append(ttfb)
                streams.append(whole)
                files.append(file_run(s, cid, root / "copy.mkv", f"file{run}"))
                seqs.append(file_run(s, cid, root / "copy.mkv", f"seq{run}", "--sequential"))
                seeks.append(seek_run(s, cid, args.size, f"http{run}"))
    size_mb = args.size / 1e6
    ttfb, stream, file_, seq, seek = map(statistics.median, (ttfbs, streams, files, seqs, seeks))
    print(
        f"{args.size // MiB} MiB, {args.seeders} seeders, {args.transport}, "
        f"medians of {args.runs} interleaved runs:"
    )
    print(f"  -o -: first byte {ttfb:.2f} s after process start; {size_mb / stream:.0f} MB/s")
    print(f"  -o FILE: {size_mb / file_:.0f} MB/s; stdout / file throughput {file_ / stream:.2f}")
    print(f"  -o FILE --sequential: {size_mb / seq:.0f} MB/s")
    print(f"  peer stream, Range at 90 %: first byte {seek:.2f} s after the request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
