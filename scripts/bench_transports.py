#!/usr/bin/env python3
"""Loopback throughput of the transports against plain blocking sockets.

Cases: 1 and 4 connections, 4 MiB messages; plain, with every received chunk
hashed (blake3, sha256), and file serving (``Stream.sendfile`` from a file in
the page cache; the baseline uses ``os.sendfile`` on a blocking socket). Each
run moves ``--gib`` GiB. The three models (blocking threads, reactor,
proactor) run alternately, ``--repeat`` rounds, the order rotated every round
so that no model always runs first after a case change; the median is
reported with the spread (min-max) of the rounds.

Like with like: the receiver runs in this process and the sender in a child
process, both using the model under test. When hashing, every model hashes in
one dedicated thread per connection fed by a queue (two 4 MiB buffers per
connection: one is hashed while the other is filled), so only the way bytes
are moved differs. ``--hash-mode to_thread`` instead hands each chunk to
``trio.to_thread.run_sync`` in the Trio models (what the product's swarm
does); the baseline keeps its dedicated thread.

CPU: user+system seconds of receiver and sender per GB moved (each side's
getrusage over its transfer, all threads, interpreter start-up excluded), a
cost figure much less sensitive to other load on a shared machine than MB/s.

    python scripts/bench_transports.py                # full run, writes its table into docs/BENCHMARKS.md
    python scripts/bench_transports.py --gib 0.25 --repeat 1 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import queue
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import trio

from peerd.transport import Stream, get_transport

MiB = 1 << 20
MSG = 4 * MiB
MODELS = ("blocking", "reactor", "proactor")
FILE_SIZE = 256 * MiB
BUFFERS = 2  # per connection
TABLE_START = "<!-- table: written by scripts/bench_transports.py -->"
TABLE_END = "<!-- end of table -->"


def new_hasher(name: str) -> Any:
    return blake3.blake3() if name == "blake3" else hashlib.sha256()


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class HashThread:
    """One dedicated hashing thread per connection; ``done(buf)`` returns a buffer."""

    def __init__(self, name: str, done: Callable[[bytearray], object]) -> None:
        self._hasher = new_hasher(name)
        self._done = done
        self._q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (view := self._q.get()) is not None:
            self._hasher.update(view)  # releases the GIL for large buffers
            self._done(view.obj)  # type: ignore[arg-type]

    def put(self, view: memoryview) -> None:
        self._q.put(view)

    def close(self) -> bytes:
        self._q.put(None)
        self._thread.join()
        return bytes(self._hasher.digest())


# --- sender (child process) ---------------------------------------------------------


def send_blocking(port: int, conns: int, per_conn: int, path: str | None) -> None:
    block = os.urandom(MSG)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]

    def run(i: int, s: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY) if path else -1
        sent = 0
        offset = (i * 64 * MiB) % FILE_SIZE
        while sent < per_conn:
            n = min(MSG, per_conn - sent)
            if path:
                done = 0
                while done < n:
                    done += os.sendfile(s.fileno(), fd, offset + done, n - done)
                offset = (offset + n) % FILE_SIZE
            else:
                s.sendall(memoryview(block)[:n])
            sent += n
        s.close()
        if path:
            os.close(fd)

    cpu0 = _cpu(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(_cpu(resource.RUSAGE_SELF) - cpu0, flush=True)


async def sendfile_copy(s: Stream, fd: int, offset: int, count: int) -> None:
    """Alternative file->socket path, for comparison: ring READV into memory, then ring SEND."""
    from peerd.transport import _ring

    buf = COPY_BUFS.setdefault(id(s), bytearray(count))
    view = memoryview(buf)[:count]
    iov = _ring.L.Iovec([view])
    got = await _ring.current_ring().perform1(
        _ring.L.io_uring_prep_readv, (fd, iov, offset), (view, iov)
    )
    if got != count:
        raise RuntimeError(f"short read: {got}")
    await s.send_all(buf if count == len(buf) else view)


async def sendfile_splice(s: Any, fd: int, offset: int, count: int) -> None:
    """Alternative, for comparison: splice file -> pipe -> socket as linked ring ops."""
    from peerd.transport import _ring

    if id(s) not in PIPES:
        s._sock.setblocking(True)  # a splice into a non-blocking socket is not retried
        r, w = os.pipe()
        for want in (MSG, MiB):  # as large as the system allows
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                break
            except OSError:
                pass
        PIPES[id(s)] = (r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ))
    r, w, size = PIPES[id(s)]
    splice = _ring.L.io_uring_prep_splice
    end = offset + count
    while offset < end:
        n = min(end - offset, size - 4096)
        steps = [(splice, (fd, offset, w, -1, n, 0)), (splice, (r, -1, s.fileno(), -1, n, 0))]
        filled, sent = await s._ring.perform(steps, None)
        if filled <= 0 or sent != filled:
            raise RuntimeError(f"splice: {filled} {sent}")
        offset += n


COPY_BUFS: dict[int, bytearray] = {}
PIPES: dict[int, tuple[int, int, int]] = {}
SENDFILE_VARIANTS = {"proactor-copy": sendfile_copy, "proactor-splice": sendfile_splice}


async def send_trio(model: str, port: int, conns: int, per_conn: int, path: str | None) -> None:
    variant = SENDFILE_VARIANTS.get(model)
    transport = get_transport("proactor" if variant else model)
    block = bytearray(os.urandom(MSG))
    streams = [await transport.connect("127.0.0.1", port) for _ in range(conns)]

    async def run(i: int, s: Stream) -> None:
        fd = os.open(path, os.O_RDONLY) if path else -1
        sent = 0
        offset = (i * 64 * MiB) % FILE_SIZE
        async with s:
            while sent < per_conn:
                n = min(MSG, per_conn - sent)
                if path and variant:
                    await variant(s, fd, offset, n)
                    offset = (offset + n) % FILE_SIZE
                elif path:
                    await s.sendfile(fd, offset, n)
                    offset = (offset + n) % FILE_SIZE
                else:
                    await s.send_all(block if n == MSG else memoryview(block)[:n])
                sent += n
        if path:
            os.close(fd)

    cpu0 = _cpu(resource.RUSAGE_SELF)
    async with trio.open_nursery() as nursery:
        for i, s in enumerate(streams):
            nursery.start_soon(run, i, s)
    print(_cpu(resource.RUSAGE_SELF) - cpu0, flush=True)


# --- receiver (this process) ----------------------------------------------------------


def sender_cmd(model: str, port: int, conns: int, per_conn: int, path: str | None) -> list[str]:
    args = [model, str(port), str(conns), str(per_conn), path or "-"]
    return [sys.executable, __file__, "--send", *args]


def recv_blocking(
    conns: int, per_conn: int, hash_name: str | None, path: str | None
) -> tuple[float, float]:
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    cmd = sender_cmd("blocking", lsock.getsockname()[1], conns, per_conn, path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    socks = [lsock.accept()[0] for _ in range(conns)]
    lsock.close()

    def run(s: socket.socket) -> None:
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            free.put(bytearray(MSG))
        hasher = HashThread(hash_name, free.put) if hash_name else None
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
            if hasher:
                hasher.put(view)
            else:
                free.put(buf)
        if hasher:
            hasher.close()
        s.close()

    start, cpu0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=run, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - cpu0
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("sender failed")
    return elapsed, cpu + float(out)


async def recv_trio(
    model: str, conns: int, per_conn: int, hash_name: str | None, path: str | None, mode: str
) -> tuple[float, float]:
    transport = get_transport("proactor" if model in SENDFILE_VARIANTS else model)
    listener = await transport.open_listener("127.0.0.1", 0)
    cmd = sender_cmd(model, listener.port, conns, per_conn, path)
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
    streams = [await listener.accept() for _ in range(conns)]
    await listener.aclose()
    token = trio.lowlevel.current_trio_token()

    async def run(s: Stream) -> None:
        free_send, free_recv = trio.open_memory_channel[bytearray](BUFFERS)
        for _ in range(BUFFERS):
            free_send.send_nowait(bytearray(MSG))
        hasher: HashThread | None = None
        full_send, full_recv = trio.open_memory_channel[memoryview](BUFFERS)
        if hash_name and mode == "thread":
            hasher = HashThread(
                hash_name, lambda buf: token.run_sync_soon(free_send.send_nowait, buf)
            )

        async def hash_loop() -> None:  # --hash-mode to_thread: one worker trip per chunk
            assert hash_name is not None
            h = new_hasher(hash_name)
            async for view in full_recv:
                await trio.to_thread.run_sync(h.update, view)
                free_send.send_nowait(view.obj)  # type: ignore[arg-type]

        async with s, trio.open_nursery() as nursery:
            if hash_name and not hasher:
                nursery.start_soon(hash_loop)
            got = 0
            async with full_send:
                while got < per_conn:
                    buf = await free_recv.receive()
                    n = min(MSG, per_conn - got)
                    view = memoryview(buf)[:n]
                    await s.recv_exactly_into(buf if n == MSG else view)
                    got += n
                    if hasher:
                        hasher.put(view)
                    elif hash_name:
                        full_send.send_nowait(view)
                    else:
                        free_send.send_nowait(buf)
        if hasher:
            await trio.to_thread.run_sync(hasher.close)

    start, cpu0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(run, s)
    elapsed, cpu = time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - cpu0
    assert proc.stdout is not None
    out = b""
    while chunk := await proc.stdout.receive_some():
        out += chunk
    if await proc.wait() != 0:
        raise RuntimeError("sender failed")
    return elapsed, cpu + float(out)


def measure(
    model: str, conns: int, total: int, hash_name: str | None, path: str | None, mode: str
) -> tuple[float, float]:
    """One run: (MB/s, CPU seconds of receiver + sender per GB)."""
    per_conn = total // conns
    if model == "blocking":
        elapsed, cpu = recv_blocking(conns, per_conn, hash_name, path)
    else:
        elapsed, cpu = trio.run(recv_trio, model, conns, per_conn, hash_name, path, mode)
    moved = per_conn * conns
    return moved / elapsed / 1e6, cpu / (moved / 1e9)


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{100 * (max(values) - min(values)) / med:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB moved per run (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per case (median)")
    parser.add_argument(
        "--cases",
        default="plain,blake3,sha256,file",
        help="comma list",
    )
    parser.add_argument("--conns", default="1,4", help="comma list of connection counts")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma list, first = base; for the file case also proactor-splice and "
        "proactor-copy (the proactor receiving; the sender uses that file->socket method)",
    )
    parser.add_argument(
        "--hash-mode",
        choices=("thread", "to_thread"),
        default="thread",
        help="Trio models: dedicated hash thread (as the baseline) or to_thread per chunk",
    )
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
    models = args.models.split(",")
    rows = []
    load0 = os.getloadavg()[0]
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
        for kind in kinds:
            for conns in map(int, args.conns.split(",")):
                rate: dict[str, list[float]] = {m: [] for m in models}
                cpu: dict[str, list[float]] = {m: [] for m in models}
                for r in range(args.repeat):
                    for model in models[r % len(models) :] + models[: r % len(models)]:
                        mbps, cpu_gb = measure(
                            model,
                            conns,
                            total,
                            kind if kind in ("blake3", "sha256") else None,
                            path if kind == "file" else None,
                            args.hash_mode,
                        )
                        rate[model].append(mbps)
                        cpu[model].append(cpu_gb)
                name = f"{kind}, {conns} conn{'s' if conns > 1 else ''}"
                rows.append((name, rate, cpu))
                print_row(name, models, rate, cpu)
    if not args.no_write:
        write_table(rows, models, args, (load0, os.getloadavg()[0]))


def ratio(rate: dict[str, list[float]], num: str, den: str) -> str:
    """Median of the per-round ratios (paired: the two runs were neighbours in time)."""
    pairs = [a / b for a, b in zip(rate[num], rate[den], strict=True)]
    return f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"


def print_row(
    name: str, models: list[str], rate: dict[str, list[float]], cpu: dict[str, list[float]]
) -> None:
    med = {m: statistics.median(v) for m, v in rate.items()}
    parts = [f"{name:16}"]
    for m in models:
        parts.append(
            f"{m} {med[m]:5.0f} MB/s ±{spread(rate[m]):>4} {ratio(rate, m, models[0])} "
            f"cpu {statistics.median(cpu[m]):.2f}s/GB"
        )
    if "reactor" in med and "proactor" in med:
        parts.append(f"p/r {ratio(rate, 'proactor', 'reactor')}")
    print(" | ".join(parts), f"load {os.getloadavg()[0]:.1f}", flush=True)


def write_table(
    rows: list[tuple[str, dict[str, list[float]], dict[str, list[float]]]],
    models: list[str],
    args: argparse.Namespace,
    loads: tuple[float, float],
) -> None:
    if models != list(MODELS):
        print("not writing the docs table: it needs all three models")
        return
    cmd = f"python scripts/bench_transports.py --gib {args.gib:g} --repeat {args.repeat}"
    lines = [
        "| case | blocking MB/s | reactor MB/s | proactor MB/s | reactor / blocking "
        "| proactor / blocking | proactor / reactor | CPU s/GB b / r / p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rate, cpu in rows:
        med = {m: statistics.median(v) for m, v in rate.items()}
        c = {m: statistics.median(v) for m, v in cpu.items()}
        cells = [f"{med[m]:.0f} ±{spread(rate[m])}" for m in MODELS]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {ratio(rate, 'reactor', 'blocking')} "
            f"| {ratio(rate, 'proactor', 'blocking')} | {ratio(rate, 'proactor', 'reactor')} "
            f"| {c['blocking']:.2f} / {c['reactor']:.2f} / {c['proactor']:.2f} |"
        )
    out = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
    header = (
        f"Command: `{cmd}` (hash mode {args.hash_mode}; {args.gib:g} GiB per run, "
        f"4 MiB messages, {args.repeat} alternating rounds; MB/s: median, ± = (max-min)/median; "
        "ratios: median of the per-round ratios (min-max); CPU: both ends, median; "
        f"{os.cpu_count()} cores, Linux {os.uname().release}; 1-minute load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end).\n\n"
    )
    table = TABLE_START + "\n" + header + "\n".join(lines) + "\n" + TABLE_END
    text = out.read_text() if out.exists() else "# Transport benchmark (loopback)\n\n"
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + table + rest.split(TABLE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
