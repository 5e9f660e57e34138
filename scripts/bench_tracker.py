"""Tracker benchmark: announce throughput, latency and memory per peer entry.

    python scripts/bench_tracker.py [--transport reactor|proactor|both]
        [--conns 1,16,256] [--seconds 10] [--contents 1000] [--entries 100000]
        [--chunks 256] [--workers 2]

1. Starts a tracker *process* (this script with ``--serve``; limits raised so
   the per-connection rate limit does not cap a single benchmark connection).
2. Preloads ``entries`` peer entries across ``contents`` contents: 1,000
   identities, each announcing ``entries / 1000`` contents from its own
   loopback address (127.0.1.x), half as seeders and half with random bits.
   Preload announces are pipelined with ``want=0``.
3. Reads the tracker's RSS before and after the preload: bytes per entry.
4. For each C in ``conns``: C connections (spread over ``workers`` client
   processes), each authenticated as one of the preloaded identities, announce
   ``periodic`` with that identity's bits for a random one of its contents,
   ``want=50``, one request at a time, for ``seconds``. Prints announces/s
   and p50 / p99 latency. The clients do not decode PEERS bodies (they read
   the frame header and skip the body) so they spend little CPU of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from peerd.identity import Identity
from peerd.tracker_client import AUTH_CONTEXT
from peerd.transport import Stream, get_transport
from peerd.wire import NEED_DATA, Announce, Auth, Challenge, TrackerClientConnection

IDENTITIES = 1000


def plan(contents: int, entries: int, chunks: int) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """Deterministic preload: per identity, its (content id, bits) pairs."""
    rng = random.Random(1)
    cids = [rng.randbytes(32) for _ in range(contents)]
    per = entries // IDENTITIES
    nbytes = (chunks + 7) // 8
    full = (((1 << chunks) - 1) << (nbytes * 8 - chunks)).to_bytes(nbytes, "big")
    out = []
    for i in range(IDENTITIES):
        mine = rng.sample(cids, per)
        items = []
        for cid in mine:
            if rng.random() < 0.5:
                items.append((cid, full))
            else:
                b = int.from_bytes(rng.randbytes(nbytes), "big") & int.from_bytes(full, "big")
                items.append((cid, b.to_bytes(nbytes, "big")))
        out.append((i, items))
    return out


def identity(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(32, "big"))


def source(i: int) -> str:
    return f"127.0.1.{i % 16 + 1}"


async def read_frame(stream: Stream, buf: bytearray) -> tuple[int, int]:
    """Read one frame off the stream (skipping its body); returns (type, length)."""
    while len(buf) < 5:
        data = await stream.receive_some(262144)
        if not data:
            raise EOFError
        buf += data
    ftype, length = struct.unpack_from(">BI", buf)
    while len(buf) < 5 + length:
        data = await stream.receive_some(262144)
        if not data:
            raise EOFError
        buf += data
    del buf[: 5 + length]
    return ftype, length


async def login(transport_name: str, port: int, i: int) -> tuple[Stream, TrackerClientConnection]:
    transport = get_transport(transport_name)
    stream = await transport.connect("127.0.0.1", port, source_host=source(i))
    conn = TrackerClientConnection()
    who = identity(i)
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        break
    assert isinstance(ev, Challenge)
    await stream.send_all(conn.send(Auth(who.public_key, who.sign(AUTH_CONTEXT + ev.nonce))))
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    assert type(ev).__name__ == "Ok", ev
    return stream, conn


async def preload(transport_name: str, port: int, items_of: list) -> None:
    sem = trio.Semaphore(32)

    async def one(i: int, items: list) -> None:
        async with sem:
            stream, conn = await login(transport_name, port, i)
            frames = b"".join(conn.send(Announce(c, 7000 + i, "started", b, 0)) for c, b in items)
            await stream.send_all(frames)
            buf = bytearray()
            for _ in items:
                ftype, _ = await read_frame(stream, buf)
                assert ftype == 35, ftype
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i, items in items_of:
            nursery.start_soon(one, i, items)


async def load(
    transport_name: str, port: int, ids: list[int], items_of: list, seconds: float
) -> dict:
    lat: list[float] = []
    count = 0
    start_at = time.monotonic() + 1.0
    stop_at = start_at + seconds

    async def one(i: int) -> None:
        nonlocal count
        stream, conn = await login(transport_name, port, i)
        items = items_of[i][1]
        frames = [conn.send(Announce(c, 7000 + i, "periodic", b, 50)) for c, b in items]
        rng = random.Random(i)
        buf = bytearray()
        await trio.sleep_until(trio.current_time() + (start_at - time.monotonic()))
        while (t0 := time.monotonic()) < stop_at:
            await stream.send_all(rng.choice(frames))
            ftype, _ = await read_frame(stream, buf)
            assert ftype == 35, ftype
            lat.append(time.monotonic() - t0)
            count += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in ids:
            nursery.start_soon(one, i)
    return {"count": count, "lat": lat[:: max(1, len(lat) // 20000)]}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(args: argparse.Namespace) -> None:
    from tracker.server import TrackerLimits, serve_tracker

    limits = TrackerLimits(
        messages_per_second=1e6,  # do not cap one benchmark connection
        address_messages_per_second=1e7,
        max_contents_per_peer=10_000,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_tracker(
                    "127.0.0.1",
                    0,
                    args.data,
                    args.transport,
                    limits=limits,
                    ttl=3600.0,
                    task_status=task_status,
                )
            )
            print(port, flush=True)

    profile_for = float(os.environ.get("BENCH_PROFILE_SECONDS", "0"))
    if not profile_for:
        trio.run(main)
        return
    import cProfile

    async def profiled() -> None:
        with trio.move_on_after(profile_for):
            await main()

    cProfile.runctx("trio.run(profiled)", globals(), locals(), "/tmp/bench_tracker.prof")


def run_one(transport: str, args: argparse.Namespace) -> list[dict]:
    items_of = plan(args.contents, args.entries, args.chunks)
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--transport", transport, "--data", data],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            time.sleep(0.3)
            before = rss(proc.pid)
            t = time.monotonic()
            trio.run(preload, "reactor", port, items_of)
            took = time.monotonic() - t
            time.sleep(0.5)
            after = rss(proc.pid)
            per_entry = (after - before) / args.entries
            print(
                f"[{transport}] preloaded {args.entries} entries in {took:.1f} s; RSS "
                f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB = {per_entry:.0f} B/entry",
                flush=True,
            )
            rows = []
            for c in args.conns:
                ids = list(range(c))
                shards = [ids[w :: args.workers] for w in range(min(args.workers, c))]
                cpu0 = cpu_seconds(proc.pid)
                workers = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            json.dumps([port, s, args.seconds]),
                            "--contents",
                            str(args.contents),
                            "--entries",
                            str(args.entries),
                            "--chunks",
                            str(args.chunks),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for s in shards
                ]
                results = [json.loads(w.communicate()[0]) for w in workers]
                cpu = (cpu_seconds(proc.pid) - cpu0) / (args.seconds + 1.5)
                total = sum(r["count"] for r in results)
                lat = sorted(x for r in results for x in r["lat"])
                row = {
                    "transport": transport,
                    "conns": c,
                    "rate": total / args.seconds,
                    "p50_ms": 1000 * lat[len(lat) // 2],
                    "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                    "rss_mib": rss(proc.pid) / 2**20,
                    "bytes_per_entry": per_entry,
                    "cpu": cpu,
                }
                rows.append(row)
                print(
                    f"[{transport}] C={c:4d}: {row['rate']:8.0f} announces/s  "
                    f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                    f"tracker RSS {row['rss_mib']:.1f} MiB, tracker CPU ~{100 * cpu:.0f}%",
                    flush=True,
                )
            return rows
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", default="both")
    parser.add_argument("--conns", default="1,16,256")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--contents", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.worker:
        port, ids, seconds = json.loads(args.worker)
        items_of = plan(args.contents, args.entries, args.chunks)
        print(json.dumps(trio.run(load, "reactor", port, ids, items_of, seconds)))
        return
    args.conns = [int(c) for c in args.conns.split(",")]
    names = ["reactor", "proactor"] if args.transport == "both" else [args.transport]
    rows = []
    for name in names:
        rows += run_one(name, args)
    print("\n| transport | C | announces/s | p50 ms | p99 ms | tracker RSS MiB | B/entry |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['transport']} | {r['conns']} | {r['rate']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['rss_mib']:.1f} | {r['bytes_per_entry']:.0f} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
