"""Benchmark: getters one after another against freshly started seeders.

Starts a tracker and ``--seeders`` seeder processes of one random file
together, then runs ``--getters`` getters strictly one after another (each
with a fresh ``PEER_HOME``; the next starts when the previous has exited) and
prints, per getter, when it started (seconds after the seeders were started)
and how long its verified download took. A swarm whose seeders are still
settling must not make a getter wait: every getter should take about as long
as the one before it.

    .venv/bin/python scripts/bench_late_getters.py --size 512MiB --getters 8 --transport reactor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_swarm import free_port, start_tracker  # scripts/ is this script's first path entry

from peerd.units import parse_size

PY = sys.executable


def run(
    work: Path, src: Path, transport: str, seeders: int, getters: int, log: bool
) -> list[tuple[float, float]]:
    port = free_port()
    env = dict(os.environ, PEER_TRACKER=f"127.0.0.1:{port}", PEER_TRANSPORT=transport)
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[float, float]] = []
    try:
        procs.append(start_tracker(work, port, env))
        t0 = time.monotonic()
        cid = ""
        for k in range(seeders):
            home = work / f"seed{k}"
            home.mkdir(exist_ok=True)
            err = (work / f"seed{k}.log").open("wb") if log else subprocess.DEVNULL
            p = subprocess.Popen(
                [PY, "-m", "cli", "share", str(src), "--id-only"] + (["-v"] if log else []),
                env=dict(env, PEER_HOME=str(home)),
                stdout=subprocess.PIPE,
                stderr=err,
            )
            procs.append(p)
            if not isinstance(err, int):
                err.close()  # the child has its own copy
            assert p.stdout is not None
            cid = p.stdout.readline().decode().strip()
        for g in range(getters):
            home = work / f"get{g}"
            home.mkdir()
            out = work / "out.bin"
            out.unlink(missing_ok=True)
            started = time.monotonic() - t0
            leech = subprocess.run(
                [PY, "-m", "cli", "get", cid, "-o", str(out), "--json"] + (["-v"] if log else []),
                env=dict(env, PEER_HOME=str(home)),
                capture_output=True,
                check=False,
            )
            took = time.monotonic() - t0 - started
            if log:
                (work / f"get{g}.log").write_bytes(leech.stderr)
            if leech.returncode != 0:
                raise SystemExit(f"getter {g} failed: {leech.stderr.decode()[-2000:]}")
            json.loads(leech.stdout.decode().strip().splitlines()[-1])
            rows.append((started, took))
            print(f"  getter {g}: started at {started:5.1f} s, took {took:5.2f} s", file=sys.stderr)
            out.unlink()
        return rows
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
            if p.stdout:
                p.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--seeders", type=int, default=4)
    ap.add_argument("--getters", type=int, default=8)
    ap.add_argument("--transport", default="reactor")
    ap.add_argument("--keep", help="keep logs (-v) of every process in this directory")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="peer-late-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "src.bin"
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        rows = run(work, src, args.transport, args.seeders, args.getters, bool(args.keep))
        took = [t for _, t in rows]
        each = " ".join(f"{t:.2f}" for t in took)
        print(
            f"{args.transport}: getters took median {statistics.median(took):.2f} s,"
            f" max {max(took):.2f} s (each: {each})"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
