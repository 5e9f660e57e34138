#!/usr/bin/env python3
"""Benchmark build_manifest against the standard hashing tools.

Creates (or takes with --file) a file of random bytes, reads it once so it
sits in the page cache, then times, median of --runs each:

- ``build_manifest`` with blake3 and sha256 (default chunk size and threads);
- ``b3sum`` and ``sha256sum`` on the same file, when installed;
- single-threaded Python references (``blake3`` with max_threads=1 over an
  mmap, ``hashlib.file_digest`` for sha256), which bound what one core does.

Usage:
    .venv/bin/python scripts/bench_manifest.py [--size-mib 1024] [--file PATH]
        [--runs 3] [--out FILE.md]   (the figures live in docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3

from peerd.content.manifest import build_manifest

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    """Write ``size`` random bytes to ``path`` in large blocks."""
    block = 64 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def warm(path: Path) -> None:
    """Read the whole file once so every run hashes from the page cache."""
    buf = bytearray(16 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def median_times(cases: list[tuple[str, Callable[[], object]]], runs: int) -> list[float]:
    """Median seconds per case. Cases run round-robin so that load from other
    processes on a shared machine spreads over all of them, not one."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(runs):
        for i, (_, fn) in enumerate(cases):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run_tool(argv: list[str]) -> Callable[[], object]:
    def go() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    return go


def b3_single(path: Path) -> bytes:
    return blake3.blake3(max_threads=1).update_mmap(path).digest()  # type: ignore[no-any-return]


def sha_single(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, help="hash this file instead of a random one")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the random file")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="build_manifest threads")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "scripts/bench_manifest.py", *sys.argv[1:]])

    tmpdir = None
    if args.file is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="peer-bench-")
        path = Path(tmpdir.name) / "random.bin"
        print(f"writing {args.size_mib} MiB of random data to {path} ...", file=sys.stderr)
        make_file(path, args.size_mib * MiB)
    else:
        path = args.file
    try:
        size = path.stat().st_size
        warm(path)
        load = os.getloadavg()[0]
        cases: list[tuple[str, Callable[[], object]]] = [
            (
                "build_manifest blake3",
                lambda: build_manifest(path, "blake3", threads=args.threads),
            ),
            (
                "build_manifest sha256",
                lambda: build_manifest(path, "sha256", threads=args.threads),
            ),
        ]
        notes = []
        for tool, argv in (
            ("b3sum", ["b3sum", "--no-names", str(path)]),
            ("b3sum --num-threads 1", ["b3sum", "--num-threads", "1", "--no-names", str(path)]),
            ("sha256sum", ["sha256sum", str(path)]),
        ):
            if shutil.which(argv[0]):
                cases.append((tool, run_tool(argv)))
            else:
                notes.append(f"`{argv[0]}` is not installed; its row is missing.")
        cases.append(("python blake3, 1 thread (mmap)", lambda: b3_single(path)))
        cases.append(("python hashlib sha256, 1 thread", lambda: sha_single(path)))

        info = build_manifest(path, "blake3", threads=args.threads)
        rows = []
        for (label, _), seconds in zip(cases, median_times(cases, args.runs), strict=True):
            rows.append((label, seconds, size / seconds / 1e9))
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()

    threads = args.threads or min(os.cpu_count() or 1, 8)
    lines = [
        "## build_manifest throughput",
        "",
        f"Command: `{command}`",
        "",
        f"File: {size / MiB:.0f} MiB of random bytes, in the page cache; "
        f"chunk size {info.chunk_size // MiB} MiB ({info.num_chunks} chunks); "
        f"build_manifest threads: {threads}; median of {args.runs} runs, taken round-robin.",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, blake3 {blake3.__version__}; "
        f"1-minute load average before the run: {load:.2f} (the machine is shared).",
        "",
        "| what | seconds | GB/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {seconds:.3f} | {rate:.2f} |" for label, seconds, rate in rows]
    if notes:
        lines += ["", *notes]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
