#!/usr/bin/env python3
"""Simulated swarms at scale: T / T_min for 1 seeder and N leechers.

Runs the :mod:`sim` package at the top of the repository (the real picker,
wire state machines, choker and tracker index, on a virtual clock; outside
the product, which never imports it) for each N, homogeneous (every leecher
uploads at the seeder's rate) and heterogeneous (half the leechers at a
quarter of it), and prints T, the lower bound T_min, their ratio, the
client/server time N F / u_s and the wall time of the simulation itself.

    python scripts/simulate.py                      # N = 10, 100, 1000
    python scripts/simulate.py --n 10 100 --chunks 128 --delay 0.05 --loss 0.01
    python scripts/simulate.py --n 1000 --no-verify --native

``--native`` runs the same modules compiled by mypyc (see scripts/_native.py):
the same decisions and results, in less wall time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # _native
sys.path.insert(1, str(ROOT))  # the sim package (not installed: not part of the product)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000], help="leecher counts")
    ap.add_argument("--chunks", type=int, default=256, help="chunks in the file")
    ap.add_argument("--chunk-kib", type=int, default=256, help="chunk size in KiB")
    ap.add_argument("--rate-mib", type=float, default=1.0, help="seeder upload rate, MiB/s")
    ap.add_argument("--delay", type=float, default=0.025, help="one-way access delay per node, s")
    ap.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    ap.add_argument("--max-peers", type=int, default=16, help="connections a node dials")
    ap.add_argument("--slots", type=int, default=0, help="choker slots (0 = fair share)")
    ap.add_argument("--no-fresh-first", action="store_true", help="plain round robin uploads")
    ap.add_argument("--no-super-seed", action="store_true", help="seeder serves duplicates too")
    ap.add_argument("--no-suppress-haves", action="store_true", help="HAVE to every peer")
    ap.add_argument("--no-spread", action="store_true", help="dial the tracker's first peers")
    ap.add_argument("--busy-backoff", type=float, default=5.0, help="s before a refusal is retried")
    ap.add_argument("--backlog", type=int, default=0, help="leecher upload queue bound (0 = none)")
    ap.add_argument(
        "--stale-after", type=float, default=0.0, help="s before a pinned request is duplicated"
    )
    ap.add_argument(
        "--no-verify", action="store_true", help="skip Ed25519 in handshakes (framing kept)"
    )
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument(
        "--native",
        action="store_true",
        help="run the simulator's modules compiled by mypyc (built once into .native/)",
    )
    ap.add_argument(
        "--only", choices=("homogeneous", "heterogeneous"), help="run one rate mix only"
    )
    args = ap.parse_args(argv)
    if args.native:
        from _native import NativeBuildError, activate

        try:
            activate()
        except NativeBuildError as exc:
            print(f"simulate: {exc}", file=sys.stderr)
            return 2
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
                slots=args.slots,
                fresh_first=not args.no_fresh_first,
                super_seed=not args.no_super_seed,
                suppress_haves=not args.no_suppress_haves,
                spread=not args.no_spread,
                busy_backoff=args.busy_backoff,
                backlog=args.backlog,
                stale_after=args.stale_after,
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
        f"max_peers {first.max_peers}; slots {first.slots or 'fair'}; "
        f"super-seed {first.super_seed}; Ed25519 {first.verify}; "
        f"{'compiled (mypyc)' if args.native else 'pure Python'}"
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
