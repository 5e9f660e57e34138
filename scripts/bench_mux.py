#!/usr/bin/env python3
"""The Mux alone: a request/response echo server on each transport's mux.

One process serves ``--conns`` loopback connections with one dispatcher task
(``Transport.open_mux``): every 200-byte request is answered with 200
bytes. The clients run in a child process (one epoll loop, each connection
sending its next request as soon as its reply is in), so the server always
has work and the figure is the server's own cost. Per run, after a 0.5 s
warm-up: requests/s and the server's CPU per request (user and system
split), and the mean batch ``next_batch`` returned. The transports run
alternately, ``--runs`` rounds; medians are printed.

    .venv/bin/python scripts/bench_mux.py --conns 8,256 --runs 3
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import statistics
import sys
import time

import trio

from peerd.transport import get_transport

REQUEST = 200


def clients(port: int, conns: int, seconds: float) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    owed = dict.fromkeys(by_fd, 0)  # bytes of the next reply already in
    msg = b"q" * REQUEST
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        s.send(msg)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fd, _ in ep.poll(0.1):
            try:
                data = by_fd[fd].recv(65536)
            except (BlockingIOError, ConnectionError):
                continue
            owed[fd] += len(data)
            while owed[fd] >= REQUEST:
                owed[fd] -= REQUEST
                by_fd[fd].send(msg)
    for s in socks:
        s.close()


async def serve(name: str, conns: int, seconds: float) -> dict[str, float]:
    transport = get_transport(name)
    listener = await transport.open_listener("127.0.0.1", 0)
    cmd = [sys.executable, __file__, "--clients", str(listener.port), str(conns), str(seconds + 1)]
    child = await trio.lowlevel.open_process(cmd)
    streams = [await listener.accept() for _ in range(conns)]
    await listener.aclose()
    done = 0
    batches = 0
    async with transport.open_mux() as mux:
        for s in streams:
            mux.add(s)
        partial = dict.fromkeys(streams, 0)
        start = time.perf_counter()
        t0 = r0 = None
        while True:
            batch = await mux.next_batch()
            now = time.perf_counter()
            if t0 is None and now - start >= 0.5:
                t0, r0, done, batches = now, resource.getrusage(resource.RUSAGE_SELF), 0, 0
            if now - start >= seconds + 0.5:
                break
            batches += 1
            for stream, data in batch:
                if type(data) is not bytes or not data:
                    continue
                whole, partial[stream] = divmod(partial[stream] + len(data), REQUEST)
                if whole:
                    mux.send(stream, b"r" * (REQUEST * whole))
                    done += whole
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for s in streams:
            await mux.remove(s)
    for s in streams:
        await s.aclose()
    await child.wait()
    assert r0 is not None and t0 is not None
    return {
        "req/s": done / (t1 - t0),
        "us/req": 1e6 * (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / done,
        "user": 1e6 * (r1.ru_utime - r0.ru_utime) / done,
        "sys": 1e6 * (r1.ru_stime - r0.ru_stime) / done,
        "batch": done / max(batches, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", default="8,256", help="comma list of connection counts")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transports", default="reactor,proactor")
    parser.add_argument("--clients", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        clients(int(args.clients[0]), int(args.clients[1]), float(args.clients[2]))
        return 0
    names = args.transports.split(",")
    print("| C | transport | req/s | server us/req | user | sys | requests per batch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for conns in (int(c) for c in args.conns.split(",")):
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.runs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(trio.run(serve, name, conns, args.seconds))
        for name in names:
            med = {k: statistics.median(x[k] for x in results[name]) for k in results[name][0]}
            print(
                f"| {conns} | {name} | {med['req/s']:.0f} | {med['us/req']:.1f} | "
                f"{med['user']:.1f} | {med['sys']:.1f} | {med['batch']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
