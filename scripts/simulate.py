#!/usr/bin/env python3
"""Simulated swarms at scale: T / T_min for 1 seeder and N leechers.

Runs the :mod:`sim` package at the top of the repository (the node's own
content engine, wire state machines, upload turns and the tracker's index,
on a virtual clock; outside the product, which never imports it) for each N, homogeneous (every leecher
uploads at the seeder's rate) and heterogeneous (half the leechers at a
quarter of it), and prints T, the lower bound T_min, their ratio, the
client/server time N F / u_s and the wall time of the simulation itself.

    python scripts/simulate.py                      # N = 10, 100, 1000
    python scripts/simulate.py --n 10 100 --chunks 128 --delay 0.05 --loss 0.01
    python scripts/simulate.py --n 1000 --no-verify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the sim package (not installed: not part of the product)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000], help="leecher counts")
    ap.add_argument("--chunks", type=int, default=256, help="chunks in the file")
    ap.add_argument("--chunk-kib", type=int, default=256, help="chunk size in KiB")
    ap.add_argument("--rate-mib", type=float, default=1.0, help="seeder upload rate, MiB/s")
    ap.add_argument("--delay", type=float, default=0.025, help="one-way access delay per node, s")
    ap.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    ap.add_argument("--max-peers", type=int, default=16, help="connections a node dials")
    ap.add_argument(
        "--no-verify", action="store_true", help="skip Ed25519 in handshakes (framing kept)"
    )
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument(
        "--only", choices=("homogeneous", "heterogeneous"), help="run one rate mix only"
    )
    args = ap.parse_args(argv)
    from sim import MiB, SimConfig, run

    mixes = [False, True]
    if args.only:
        mixes = [args.only == "heterogeneous"]
    try:
        configs = [
            SimConfig(
                n=n,
                chunks=args.chunks,
                chunk_size=args.chunk_kib * 1024,
                seed_rate=args.rate_mib * MiB,
                heterogeneous=hetero,
                delay=args.delay,
                loss=args.loss,
                max_peers=args.max_peers,
                max_inbound=4 * args.max_peers,
                verify=not args.no_verify,
                seed=args.seed,
            )
            for n in args.n
            for hetero in mixes
        ]
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    first = configs[0]
    print(
        f"F = {first.chunks} chunks x {first.chunk_size // 1024} KiB = "
        f"{first.chunks * first.chunk_size / MiB:g} MiB; u_s = {first.seed_rate / MiB:g} MiB/s; "
        f"delay {first.delay * 1000:g} ms per node; loss {first.loss:g}; "
        f"max_peers {first.max_peers}; Ed25519 {first.verify}"
    )
    print(
        f"| {'N':>5} | {'rates':<13} | {'T (s)':>8} | {'T_min (s)':>9} | {'T/T_min':>7} "
        f"| {'N*F/u_s (s)':>11} | {'wall (s)':>8} | {'dups':>5} |"
    )
    print(f"|{'-' * 7}|{'-' * 15}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 13}|{'-' * 10}|{'-' * 7}|")
    for cfg in configs:
        r = run(cfg)
        mix = "heterogeneous" if cfg.heterogeneous else "homogeneous"
        print(
            f"| {cfg.n:>5} | {mix:<13} | {r.T:>8.1f} | {r.T_min:>9.1f} | {r.ratio:>7.3f} "
            f"| {r.client_server:>11.0f} | {r.wall:>8.1f} | {r.duplicates:>5} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
