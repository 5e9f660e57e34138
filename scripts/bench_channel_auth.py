#!/usr/bin/env python3
"""Cost of an authenticated peer channel (issue 14): plaintext vs per-frame AEAD.

One run moves a random file of ``--size`` over loopback TCP (127.0.0.1) from a
seeder process to a leecher process, chunk by chunk (``--chunk-size``), as
DATA frames (13-byte header: type, length, index, offset), the way the node
moves chunk bytes:

* ``plain``: the seeder sends the header, then ``os.sendfile`` of the chunk
  from the page cache. The leecher ``recv_into``s a preallocated page-aligned
  buffer, hashes the chunk with blake3 (the node hashes every chunk anyway),
  checks it against the source's hash and ``pwrite``s it to the output file
  (``O_DIRECT`` where the file system allows it, as ``peerd/content/store.py`` does).
* ``aes-gcm``: AES-256-GCM (``cryptography``'s ``AESGCM``), 12-byte nonce =
  the frame counter, the 13-byte header as associated data (its length field
  counts the 16-byte tag). The seeder ``preadv``s the chunk into a buffer,
  seals it into a second buffer (``encrypt_into``) and sends header +
  ciphertext + tag. The leecher ``recv_into``s the ciphertext, opens it
  (``decrypt_into``, which verifies the tag) straight into the page-aligned
  chunk buffer, then hashes, checks and writes as above.
* ``chacha20``: the same with ChaCha20-Poly1305 (the usual AEAD for CPUs
  without AES instructions).

The key is random per run (a real channel would get it from an X25519
handshake: well under 1 ms per connection, not measured here). The leecher
asks for the whole file with one byte and the seeder streams every chunk (no
per-chunk REQUEST round trips; those cost the same in every variant). Plain
blocking sockets, one thread per side: this measures the crypto and copy
cost, not Trio. Timing is the leecher's, from its request to the last chunk
written (the final fsync and the checks are outside it); CPU is each side's
``getrusage`` (user + system) over the transfer, per GB.

Variants run interleaved (plain, aes-gcm, chacha20, plain, ...), ``--runs``
rounds; reported: median MB/s (MB = 10^6 bytes) with the range, the ratio of
medians to plaintext and the median (range) of the per-round ratios. Every
chunk's blake3 is checked against the source's, and after every run the
output file is compared with the source byte for byte.

    .venv/bin/python scripts/bench_channel_auth.py --size 1GiB --runs 5
    .venv/bin/python scripts/bench_channel_auth.py --size 256MiB --runs 1 --json
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from peerd.units import parse_size

MiB = 1 << 20
TAG = 16
DATA = 5
HEADER = struct.Struct(">BIII")  # type, length (of what follows the 5 bytes), index, offset
assert HEADER.size == 13
ALIGN = 4096
BUFFER_BUDGET = 32 * MiB  # chunk buffers of a pipelined leecher (peerd/node/driver.py)
WORKERS = 4  # its hash + write threads
MODES = ("pipelined", "sequential")
VARIANTS: dict[str, Any] = {"plain": None, "aes-gcm": AESGCM, "chacha20": ChaCha20Poly1305}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def chunk_count(size: int, chunk: int) -> int:
    return (size + chunk - 1) // chunk


def sealer(aead: Any) -> Any:
    """``seal(nonce, src, aad, dst)``: ``encrypt_into`` if this version has it."""
    if hasattr(aead, "encrypt_into"):
        return aead.encrypt_into

    def seal(n: bytes, src: memoryview, aad: bytes, dst: memoryview) -> int:
        out = aead.encrypt(n, bytes(src), aad)
        dst[: len(out)] = out
        return len(out)

    return seal


def opener(aead: Any) -> Any:
    """``open(nonce, src, aad, dst)``: ``decrypt_into`` if this version has it."""
    if hasattr(aead, "decrypt_into"):
        return aead.decrypt_into

    def open_(n: bytes, src: memoryview, aad: bytes, dst: memoryview) -> int:
        out = aead.decrypt(n, bytes(src), aad)
        dst[: len(out)] = out
        return len(out)

    return open_


# --------------------------------------------------------------------- seeder


def seeder(
    listener: socket.socket, src: str, variant: str, key: bytes, size: int, chunk: int, conn: Any
) -> None:
    sock, _ = listener.accept()
    listener.close()
    fd = os.open(src, os.O_RDONLY)
    sfd = sock.fileno()
    cipher = VARIANTS[variant]
    if cipher is not None:
        seal = sealer(cipher(key))
        plain = mmap.mmap(-1, chunk)
        sealed = mmap.mmap(-1, chunk + TAG)
        pview, sview = memoryview(plain), memoryview(sealed)
    assert sock.recv(1) == b"G"
    c0 = cpu_seconds()
    for idx in range(chunk_count(size, chunk)):
        off = idx * chunk
        length = min(chunk, size - off)
        if cipher is None:
            sock.sendall(HEADER.pack(DATA, 8 + length, idx, 0), socket.MSG_MORE)
            sent = 0
            while sent < length:
                n = os.sendfile(sfd, fd, off + sent, length - sent)
                if n == 0:
                    raise RuntimeError("source file ended early")
                sent += n
        else:
            header = HEADER.pack(DATA, 8 + length + TAG, idx, 0)
            got = os.preadv(fd, [pview[:length]], off)
            if got != length:
                raise RuntimeError("short read of the source file")
            n = seal(nonce(idx), pview[:length], header, sview[: length + TAG])
            assert n == length + TAG
            sock.sendall(header, socket.MSG_MORE)
            sock.sendall(sview[: length + TAG])
    assert sock.recv(1) == b"D"  # the leecher has every chunk
    conn.send(cpu_seconds() - c0)
    sock.close()
    os.close(fd)


# -------------------------------------------------------------------- leecher


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
        if n == 0:
            raise RuntimeError("seeder closed the connection early")
        got += n


def open_output(path: str) -> tuple[int, int, bool]:
    """(direct fd or -1, buffered fd, direct?)"""
    buffered = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        direct = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return -1, buffered, False
    return direct, buffered, hasattr(os, "O_DIRECT")


def leecher(
    port: int,
    out: str,
    variant: str,
    key: bytes,
    size: int,
    chunk: int,
    hashes: list[bytes],
    mode: str,
    conn: Any,
) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    direct, buffered, is_direct = open_output(out)
    cipher = VARIANTS[variant]
    if cipher is not None:
        open_ = opener(cipher(key))
        sealed = mmap.mmap(-1, chunk + TAG)
        sview = memoryview(sealed)
    # Page-aligned chunk buffers, like the store's: one (sequential), or a
    # bounded pool (pipelined: BUFFER_BUDGET bytes, as peerd/node/driver.py's pool).
    nbuf = 1 if mode == "sequential" else max(2, BUFFER_BUDGET // chunk)
    free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(nbuf):
        free.put(mmap.mmap(-1, chunk))
    errors: list[BaseException] = []

    def verify_and_write(idx: int, buf: mmap.mmap, length: int) -> None:
        try:
            view = memoryview(buf)[:length]
            if blake3.blake3(view).digest() != hashes[idx]:
                raise RuntimeError(f"chunk {idx} failed its hash")
            fd = direct if direct >= 0 and length % ALIGN == 0 else buffered
            if os.pwrite(fd, view, idx * chunk) != length:
                raise RuntimeError("short write")
            view.release()
        except BaseException as exc:  # reported by the receive loop
            errors.append(exc)
        finally:
            free.put(buf)

    pool = ThreadPoolExecutor(WORKERS) if mode == "pipelined" else None
    hdr = bytearray(HEADER.size)
    hview = memoryview(hdr)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    sock.sendall(b"G")
    for idx in range(chunk_count(size, chunk)):
        length = min(chunk, size - idx * chunk)
        recv_exactly(sock, hview)
        typ, flen, fidx, foff = HEADER.unpack(hdr)
        wire = length + (0 if cipher is None else TAG)
        if (typ, flen, fidx, foff) != (DATA, 8 + wire, idx, 0):
            raise RuntimeError(f"unexpected header {(typ, flen, fidx, foff)} for chunk {idx}")
        buf = free.get()
        view = memoryview(buf)
        if cipher is None:
            recv_exactly(sock, view[:length])
        else:
            # The channel opens each frame as it arrives (tag checked) into the chunk buffer.
            recv_exactly(sock, sview[:wire])
            n = open_(nonce(idx), sview[:wire], bytes(hdr), view[:length])  # raises InvalidTag
            assert n == length
        view.release()
        if pool is None:
            verify_and_write(idx, buf, length)
        else:
            pool.submit(verify_and_write, idx, buf, length)
        if errors:
            raise errors[0]
    if pool is not None:
        pool.shutdown(wait=True)
    if errors:
        raise errors[0]
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    sock.sendall(b"D")
    os.fsync(buffered)
    for fd in (direct, buffered):
        if fd >= 0:
            os.close(fd)
    sock.close()
    conn.send((elapsed, cpu, is_direct))


# --------------------------------------------------------------------- driver


def same_file(a: Path, b: Path) -> bool:
    block = 8 * MiB
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True


def one_run(
    work: Path, src: Path, mode: str, variant: str, size: int, chunk: int, hashes: list[bytes]
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out = work / "out.bin"
    out.unlink(missing_ok=True)
    key = os.urandom(32)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    s_recv, s_send = ctx.Pipe(duplex=False)
    l_recv, l_send = ctx.Pipe(duplex=False)
    seed = ctx.Process(target=seeder, args=(listener, str(src), variant, key, size, chunk, s_send))
    seed.start()
    listener.close()
    leech = ctx.Process(
        target=leecher, args=(port, str(out), variant, key, size, chunk, hashes, mode, l_send)
    )
    leech.start()
    elapsed, l_cpu, direct = l_recv.recv()
    s_cpu = s_recv.recv()
    leech.join()
    seed.join()
    assert leech.exitcode == 0 and seed.exitcode == 0, (leech.exitcode, seed.exitcode)
    assert out.stat().st_size == size
    assert same_file(src, out), "output file differs from the source"
    out.unlink()
    gb = size / 1e9
    return {
        "mode": mode,
        "variant": variant,
        "seconds": elapsed,
        "mbps": size / elapsed / 1e6,
        "seeder_cpu_s_per_gb": s_cpu / gb,
        "leecher_cpu_s_per_gb": l_cpu / gb,
        "o_direct": direct,
    }


def make_source(path: Path, size: int, chunk: int) -> list[bytes]:
    hashes = []
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            f.write(data)
            hashes.append(blake3.blake3(data).digest())
            left -= len(data)
    return hashes


def span(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GiB", help="file size (default 1GiB)")
    ap.add_argument("--chunk-size", default="1MiB", help="chunk size (default 1MiB)")
    ap.add_argument("--runs", type=int, default=5, help="rounds of every variant (default 5)")
    ap.add_argument(
        "--variants",
        default="plain,aes-gcm,chacha20",
        help="comma-separated, from plain, aes-gcm, chacha20 (plain is always run)",
    )
    ap.add_argument(
        "--leecher",
        default="pipelined,sequential",
        help="leecher modes, comma-separated: pipelined (hash + write in worker threads "
        "from a 32 MiB buffer pool, as the node does), sequential (one thread: recv, "
        "hash, write per chunk)",
    )
    ap.add_argument("--dir", default=None, help="directory for the temp files (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead")
    args = ap.parse_args()
    size, chunk = parse_size(args.size), parse_size(args.chunk_size)
    if size <= 0 or chunk <= 0 or chunk % ALIGN:
        ap.error("--size must be > 0 and --chunk-size a multiple of 4096")
    variants = ["plain"] + [v for v in args.variants.split(",") if v and v != "plain"]
    modes = [m for m in args.leecher.split(",") if m]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown leecher mode {m!r}")

    cases = [(m, v) for m in modes for v in variants]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cases}
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="bench-auth-", dir=args.dir) as tmp:
        work = Path(tmp)
        src = work / "source.bin"
        log(f"writing {size / MiB:.0f} MiB of random bytes to {src}")
        hashes = make_source(src, size, chunk)
        for rnd in range(args.runs):
            for m, v in cases:
                r = one_run(work, src, m, v, size, chunk, hashes)
                results[m, v].append(r)
                log(
                    f"round {rnd + 1} {m} {v}: {r['mbps']:.0f} MB/s, CPU s/GB seeder "
                    f"{r['seeder_cpu_s_per_gb']:.2f} leecher {r['leecher_cpu_s_per_gb']:.2f}"
                )
    load_after = os.getloadavg()

    def med(c: tuple[str, str], field: str) -> float:
        return statistics.median(r[field] for r in results[c])

    rows = []
    for m, v in cases:
        base = results[m, "plain"]
        rates = [r["mbps"] for r in results[m, v]]
        per_round = [r["mbps"] / p["mbps"] for r, p in zip(results[m, v], base, strict=True)]
        rows.append(
            {
                "leecher": m,
                "variant": v,
                "mbps_median": med((m, v), "mbps"),
                "mbps_runs": rates,
                "ratio_of_medians": med((m, v), "mbps") / med((m, "plain"), "mbps"),
                "per_round_ratio_median": statistics.median(per_round),
                "per_round_ratio_range": [min(per_round), max(per_round)],
                "seeder_cpu_s_per_gb": med((m, v), "seeder_cpu_s_per_gb"),
                "leecher_cpu_s_per_gb": med((m, v), "leecher_cpu_s_per_gb"),
            }
        )
    meta = {
        "started": started,
        "size": size,
        "chunk_size": chunk,
        "runs": args.runs,
        "cryptography": cryptography.__version__,
        "into_api": hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into"),
        "o_direct": all(r["o_direct"] for rs in results.values() for r in rs),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return 0
    print(
        f"\n{started}: {size / MiB:.0f} MiB in {chunk / MiB:g} MiB chunks, loopback, 1 seeder -> "
        f"1 leecher, median of {args.runs} interleaved rounds; cryptography "
        f"{meta['cryptography']}, *_into API: {meta['into_api']}, O_DIRECT writes: "
        f"{meta['o_direct']}; load {load_before[0]:.2f} -> {load_after[0]:.2f}\n"
    )
    print(
        "| leecher | variant | MB/s (median) | MB/s (range) | / plaintext (medians) "
        "| / plaintext per round: median (range) | seeder CPU s/GB | leecher CPU s/GB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        lo, hi = row["per_round_ratio_range"]
        print(
            f"| {row['leecher']} | {row['variant']} | {row['mbps_median']:.0f} "
            f"| {span(row['mbps_runs'], '.0f')} | {row['ratio_of_medians']:.2f} "
            f"| {row['per_round_ratio_median']:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {row['seeder_cpu_s_per_gb']:.2f} | {row['leecher_cpu_s_per_gb']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
