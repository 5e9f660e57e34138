#!/usr/bin/env python3
"""Loopback throughput of the transports against plain blocking sockets.

Cases: 1 and 4 connections, 4 MiB messages; plain, with every received chunk
hashed (blake3, sha256; hashing in a worker thread overlapped with receiving,
two buffers per connection), and file serving (sendfile / splice from a file
in the page cache). Each run moves ``--gib`` GiB; the three models (blocking
threads, reactor, proactor) run alternately, ``--repeat`` times, and the
median is reported. The receiver runs in this process, the sender in a child
process; the clock runs from the last accept to the last byte (hashed).

    python scripts/bench_transports.py                # full run, writes docs/bench_transports.md
    python scripts/bench_transports.py --gib 0.25 --repeat 1 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import trio

from peerd.transport import Stream, get_transport

MiB = 1 << 20
MSG = 4 * MiB
MODELS = ("blocking", "reactor", "proactor")
FILE_SIZE = 256 * MiB


def new_hasher(name: str) -> Any:
    return blake3.blake3() if name == "blake3" else hashlib.sha256()


# --- sender (child process) ---------------------------------------------------------


def send_blocking(port: int, conns: int, per_conn: int, path: str | None) -> None:
    block = os.urandom(MSG)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]

    def run(i: int, s: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY) if path else -1
        sent = 0
        offset = (i * 64 * MiB) % FILE_SIZE
        while sent < per_conn:
            if path:
                n = min(MSG, per_conn - sent)
                done = 0
                while done < n:
                    done += os.sendfile(s.fileno(), fd, offset + done, n - done)
                offset = (offset + n) % FILE_SIZE
            else:
                n = min(MSG, per_conn - sent)
                s.sendall(memoryview(block)[:n])
            sent += n
        s.close()
        if path:
            os.close(fd)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def send_trio(model: str, port: int, conns: int, per_conn: int, path: str | None) -> None:
    transport = get_transport(model)
    block = bytearray(os.urandom(MSG))
    streams = [await transport.connect("127.0.0.1", port) for _ in range(conns)]

    async def run(i: int, s: Stream) -> None:
        fd = os.open(path, os.O_RDONLY) if path else -1
        sent = 0
        offset = (i * 64 * MiB) % FILE_SIZE
        async with s:
            while sent < per_conn:
                n = min(MSG, per_conn - sent)
                if path:
                    await s.sendfile(fd, offset, n)
                    offset = (offset + n) % FILE_SIZE
                else:
                    await s.send_all(block if n == MSG else memoryview(block)[:n])
                sent += n
        if path:
            os.close(fd)

    async with trio.open_nursery() as nursery:
        for i, s in enumerate(streams):
            nursery.start_soon(run, i, s)


# --- receiver (this process) ----------------------------------------------------------


def sender_cmd(model: str, port: int, conns: int, per_conn: int, path: str | None) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--send",
        model,
        str(port),
        str(conns),
        str(per_conn),
        path or "-",
    ]


def recv_blocking(conns: int, per_conn: int, hash_name: str | None, path: str | None) -> float:
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    proc = subprocess.Popen(sender_cmd("blocking", lsock.getsockname()[1], conns, per_conn, path))
    socks = [lsock.accept()[0] for _ in range(conns)]
    lsock.close()

    def run(s: socket.socket) -> None:
        free: queue.Queue[bytearray] = queue.Queue()
        full: queue.Queue[bytearray | None] = queue.Queue()
        for _ in range(2):
            free.put(bytearray(MSG))
        hasher: Any = new_hasher(hash_name) if hash_name else None

        def hash_loop() -> None:
            while (buf := full.get()) is not None:
                hasher.update(buf)
                free.put(buf)

        ht = threading.Thread(target=hash_loop) if hasher else None
        if ht:
            ht.start()
        got = 0
        while got < per_conn:
            buf = free.get()
            view = memoryview(buf)[: min(MSG, per_conn - got)]
            n = 0
            while n < len(view):
                k = s.recv_into(view[n:])
                if k == 0:
                    raise RuntimeError("early EOF")
                n += k
            got += n
            if ht:
                full.put(buf)
            else:
                free.put(buf)
        if ht:
            full.put(None)
            ht.join()
        s.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if proc.wait() != 0:
        raise RuntimeError("sender failed")
    return elapsed


async def recv_trio(
    model: str, conns: int, per_conn: int, hash_name: str | None, path: str | None
) -> float:
    transport = get_transport(model)
    listener = await transport.open_listener("127.0.0.1", 0)
    proc = await trio.lowlevel.open_process(sender_cmd(model, listener.port, conns, per_conn, path))
    streams = [await listener.accept() for _ in range(conns)]
    await listener.aclose()

    async def run(s: Stream) -> None:
        hasher: Any = new_hasher(hash_name) if hash_name else None
        free_send, free_recv = trio.open_memory_channel[bytearray](2)
        full_send, full_recv = trio.open_memory_channel[bytearray](2)
        for _ in range(2):
            free_send.send_nowait(bytearray(MSG))

        async def hash_loop() -> None:
            async for buf in full_recv:
                await trio.to_thread.run_sync(hasher.update, buf)
                await free_send.send(buf)

        async with s, trio.open_nursery() as nursery:
            if hasher:
                nursery.start_soon(hash_loop)
            got = 0
            async with full_send:
                while got < per_conn:
                    buf = await free_recv.receive()
                    n = min(MSG, per_conn - got)
                    await s.recv_exactly_into(buf if n == MSG else memoryview(buf)[:n])
                    got += n
                    if hasher:
                        await full_send.send(buf)
                    else:
                        free_send.send_nowait(buf)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(run, s)
    elapsed = time.perf_counter() - start
    if await proc.wait() != 0:
        raise RuntimeError("sender failed")
    return elapsed


def measure(model: str, conns: int, total: int, hash_name: str | None, path: str | None) -> float:
    per_conn = total // conns
    if model == "blocking":
        elapsed = recv_blocking(conns, per_conn, hash_name, path)
    else:
        elapsed = trio.run(recv_trio, model, conns, per_conn, hash_name, path)
    return per_conn * conns / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB moved per run (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per model and case (median)")
    parser.add_argument("--cases", default="plain,blake3,sha256,file", help="comma list")
    parser.add_argument("--no-write", action="store_true", help="do not write the docs table")
    parser.add_argument("--send", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        model, port, conns, per_conn, path = args.send
        p = None if path == "-" else path
        if model == "blocking":
            send_blocking(int(port), int(conns), int(per_conn), p)
        else:
            trio.run(send_trio, model, int(port), int(conns), int(per_conn), p)
        return

    total = int(args.gib * (1 << 30)) // MSG * MSG
    kinds = args.cases.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if "file" in kinds:
            path = os.path.join(tmp, "serve.bin")
            with open(path, "wb") as f:
                for _ in range(FILE_SIZE // MSG):
                    f.write(os.urandom(MSG))
            with open(path, "rb") as f:  # warm the page cache
                while f.read(MSG):
                    pass
        rows = []
        for kind in kinds:
            for conns in (1, 4):
                results: dict[str, list[float]] = {m: [] for m in MODELS}
                for _ in range(args.repeat):
                    for model in MODELS:
                        results[model].append(
                            measure(
                                model,
                                conns,
                                total,
                                kind if kind in ("blake3", "sha256") else None,
                                path if kind == "file" else None,
                            )
                        )
                med = {m: statistics.median(v) for m, v in results.items()}
                name = f"{kind}, {conns} conn{'s' if conns > 1 else ''}"
                rows.append((name, med))
                print(
                    f"{name:18} blocking {med['blocking']:7.0f}  reactor {med['reactor']:7.0f} "
                    f"({med['reactor'] / med['blocking']:.2f}x)  proactor {med['proactor']:7.0f} "
                    f"({med['proactor'] / med['blocking']:.2f}x, "
                    f"{med['proactor'] / med['reactor']:.2f}x reactor)",
                    flush=True,
                )
    if not args.no_write:
        write_table(rows, args)


def write_table(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> None:
    lines = [
        "# Transport benchmark (loopback)",
        "",
        f"Command: `python scripts/bench_transports.py --gib {args.gib:g} --repeat {args.repeat}`",
        f"({args.gib:g} GiB per run, 4 MiB messages, median of {args.repeat}; sender and receiver "
        "in separate processes; MB/s = 10^6 bytes/s; machine: "
        f"{os.cpu_count()} cores, Linux {os.uname().release}).",
        "",
        "| case | blocking MB/s | reactor MB/s | reactor / blocking | proactor MB/s "
        "| proactor / blocking | proactor / reactor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, med in rows:
        b, r, p = med["blocking"], med["reactor"], med["proactor"]
        lines.append(
            f"| {name} | {b:.0f} | {r:.0f} | {r / b:.2f} | {p:.0f} | {p / b:.2f} | {p / r:.2f} |"
        )
    out = Path(__file__).resolve().parent.parent / "docs" / "bench_transports.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
