"""Benchmark: a verified download of one file from 4 seeder processes, per transport.

For each transport, ``--runs`` times (median reported): start a tracker and
``--seeders`` seeder processes sharing a random file of ``--size``, then one
leecher ``peer get --json``; the MB/s is the leecher's own figure for a
verified, fsynced download. The leecher's peak RSS comes from ``wait4``.
Beside it, in the same run, the machine's ceilings: loopback TCP copy rate
(one stream, two processes) and the chunk hash rates (blake3, sha256).

    .venv/bin/python scripts/bench_swarm.py --size 1GiB --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peerd.units import parse_size
from tests.e2e import free_port, wait_port  # ports outside the ephemeral range

PY = sys.executable
MiB = 1 << 20


def start_tracker(work: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A tracker on ``port`` (every interface), listening when this returns;
    if it exits first, the benchmark stops and says why (its log)."""
    log = work / "tracker.log"
    with log.open("wb") as to_log:
        tracker = subprocess.Popen(
            [PY, "-m", "cli", "tracker", "--port", str(port), "--data", str(work / "tracker")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=to_log,
        )
    try:
        wait_port(port, tracker)
    except AssertionError as exc:
        tracker.kill()
        tracker.wait()
        raise SystemExit(f"tracker: {exc}: {log.read_text(errors='replace')[-2000:]}") from None
    return tracker


def one_run(work: Path, src: Path, transport: str, seeders: int) -> tuple[float, int]:
    port = free_port()
    env = dict(os.environ, PEER_TRACKER=f"127.0.0.1:{port}", PEER_TRANSPORT=transport)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_tracker(work, port, env))
        cid = ""
        for k in range(seeders):
            home = work / f"seed{k}"
            home.mkdir(exist_ok=True)
            p = subprocess.Popen(
                [PY, "-m", "cli", "share", str(src), "--id-only"],
                env=dict(env, PEER_HOME=str(home)),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p)
            assert p.stdout is not None
            cid = p.stdout.readline().decode().strip()
        home = work / "leech"
        home.mkdir(exist_ok=True)
        out = work / "out.bin"
        out.unlink(missing_ok=True)
        leech = subprocess.Popen(
            [PY, "-m", "cli", "get", cid, "-o", str(out), "--json"],
            env=dict(env, PEER_HOME=str(home)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(leech.pid, 0)
        leech.returncode = os.waitstatus_to_exitcode(status)
        assert leech.stdout is not None and leech.stderr is not None
        if leech.returncode != 0:
            raise SystemExit(f"leecher failed: {leech.stderr.read().decode()}")
        result = json.loads(leech.stdout.read().decode().strip().splitlines()[-1])
        leech.stdout.close()
        leech.stderr.close()
        out.unlink()
        return float(result["MBps"]), usage.ru_maxrss * 1024
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


def loopback_ceiling(total: int) -> float:
    """One TCP stream over loopback between two processes, 4 MiB sends, MB/s."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1',{port}))\n"
        f"b=bytes({4 * MiB})\nn={total}\n"
        "while n>0:\n s.sendall(b); n-=len(b)\n"
        "s.close()\n"
    )
    child = subprocess.Popen([PY, "-c", code])
    conn, _ = lsock.accept()
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    got = 0
    t0 = time.perf_counter()
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    conn.close()
    lsock.close()
    child.wait()
    return got / dt / 1e6


def hash_rate(algo: str) -> float:
    data = os.urandom(MiB)
    n = 512
    t0 = time.perf_counter()
    for _ in range(n):
        if algo == "blake3":
            blake3.blake3(data).digest()
        else:
            hashlib.sha256(data).digest()
    return n * MiB / (time.perf_counter() - t0) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--seeders", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transports", default="reactor,proactor")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    try:
        src = work / "source.bin"
        with open(src, "wb") as f:
            for _ in range(0, size, 8 * MiB):
                f.write(os.urandom(min(8 * MiB, size - f.tell())))
        transports = args.transports.split(",")
        rates: dict[str, list[float]] = {t: [] for t in transports}
        rss: dict[str, int] = dict.fromkeys(transports, 0)
        for run in range(args.runs):
            for t in transports:  # alternate transports run by run
                mbps, peak = one_run(work, src, t, args.seeders)
                rates[t].append(mbps)
                rss[t] = max(rss[t], peak)
                print(
                    f"run {run + 1} {t}: {mbps:.0f} MB/s, leecher peak RSS {peak / MiB:.0f} MiB",
                    file=sys.stderr,
                )
        loop = loopback_ceiling(min(size, 2 << 30))
        print(
            f"\n{size / MiB:.0f} MiB from {args.seeders} seeders, 1 leecher, median of {args.runs}\n"
        )
        print("| case | MB/s (median) | runs | leecher peak RSS |")
        print("|---|---|---|---|")
        for t in transports:
            runs = ", ".join(f"{r:.0f}" for r in rates[t])
            print(
                f"| verified download, {t} | {statistics.median(rates[t]):.0f} | {runs} | {rss[t] / MiB:.0f} MiB |"
            )
        print(f"| ceiling: loopback TCP, 1 stream | {loop:.0f} | | |")
        print(f"| ceiling: blake3, 1 MiB chunks, 1 core | {hash_rate('blake3'):.0f} | | |")
        print(f"| ceiling: sha256, 1 MiB chunks, 1 core | {hash_rate('sha256'):.0f} | | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
