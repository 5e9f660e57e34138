"""Sharing and downloading a tree of many small files (issue 16, part 4).

Makes a tree of ``--files`` files of 1-8 KiB (random sizes and bytes, 100
files per directory, two levels deep), then, with real processes on loopback
(a tracker, ``peer share DIR``, ``peer get LINK -o OUT``):

- build+share: from starting ``peer share DIR`` (fresh ``PEER_HOME``: no
  cached manifest, so the tree is walked and hashed) to its link on stdout;
- get: the wall time of ``peer get LINK -o OUT`` from process start to exit
  (manifest fetch, creating every file, downloading, verifying, syncing and
  renaming into place); the result is compared with the source byte for byte;
- build alone: ``build_tree_manifest`` in this process (walk + hash).

Each is reported as files/s and MB/s (median of ``--runs``)::

    .venv/bin/python scripts/bench_tree.py --files 10000 --runs 3
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peerd.content.manifest import build_tree_manifest
from tests.e2e import swarm


def make_tree(top: Path, files: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        path = top / f"d{i // 1000:02}" / f"e{(i // 100) % 10}" / f"file-{i:06}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 8192)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _match, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transport", default="reactor", choices=["reactor", "proactor"])
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        top = root / "tree"
        size = make_tree(top, args.files)
        print(
            f"{args.files} files, {size / 1e6:.1f} MB in {top} "
            f"({args.transport}, {os.cpu_count()} cores)",
            file=sys.stderr,
        )
        builds, shares, gets = [], [], []
        for run in range(args.runs):
            started = time.monotonic()
            build_tree_manifest(top)
            builds.append(time.monotonic() - started)
            with swarm(root / f"run{run}", args.transport) as s:
                started = time.monotonic()
                proc = s.peer("seed", "share", str(top), "--host", "127.0.0.1")
                assert proc.stdout is not None
                link = proc.stdout.readline().decode().strip()
                shares.append(time.monotonic() - started)
                assert link.startswith("peer:"), link
                out = root / f"out{run}"
                out.mkdir()
                started = time.monotonic()
                got = s.run("leech", "get", link, "-o", str(out), "--json", timeout=600)
                gets.append(time.monotonic() - started)
                assert got.returncode == 0, got.stderr
                assert same_tree(top, out / "tree"), "the downloaded tree differs"
            print(
                f"run {run + 1}: build {builds[-1]:.2f} s, share {shares[-1]:.2f} s, "
                f"get {gets[-1]:.2f} s",
                file=sys.stderr,
            )
        for what, times in (
            ("build (walk + hash, in process)", builds),
            ("peer share DIR: start to link", shares),
            ("peer get LINK -o OUT: start to exit", gets),
        ):
            t = statistics.median(times)
            print(
                f"{what:<38} {t:6.2f} s  {args.files / t:8.0f} files/s  {size / t / 1e6:6.1f} MB/s"
            )


if __name__ == "__main__":
    main()
