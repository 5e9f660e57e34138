"""Benchmark: swarm distribution time against the textbook lower bound.

One seeder and N leechers start together in an emulated network (its own
namespace, an address per peer, every peer's upload capped by tc); the time
until the last leecher holds a verified copy is compared with

    T_min = max(F / u_s, N * F / (u_s + sum(u_i)))

and with the client/server time N * F / u_s. Rows: N in --ns, homogeneous
rates and heterogeneous (half of the leechers at a quarter of the rate), per
transport. A last row checks the application's own ``--up-limit`` against
tc's cap: one seeder limited by ``--up-limit`` alone, one leecher, the rate
achieved vs the limit.

Root only (network namespaces and tc). Example:

    .venv/bin/python scripts/bench_distribution.py --size 64MiB --rate 4MB --ns 4,8,16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm import SwarmError, remove_work, run_swarm

from peerd.units import parse_size


def t_min(size: int, seeder_rate: float, leecher_rates: list[float]) -> float:
    n = len(leecher_rates)
    return max(size / seeder_rate, n * size / (seeder_rate + sum(leecher_rates)))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="64MiB", help="file size (default 64MiB)")
    ap.add_argument(
        "--rate", default="4MB", help="every peer's upload cap (default 4MB = 4,000,000 B/s)"
    )
    ap.add_argument("--ns", default="4,8,16", help="leecher counts (default 4,8,16)")
    ap.add_argument("--transports", default="reactor,proactor")
    ap.add_argument(
        "--chunk-size", default="256KiB", help="chunk size of the shared file (default 256KiB)"
    )
    ap.add_argument("--no-hetero", action="store_true", help="skip the heterogeneous rows")
    ap.add_argument("--no-limit-check", action="store_true", help="skip the --up-limit row")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_distribution: error: needs root (network namespaces and tc)", file=sys.stderr)
        return 1
    size = parse_size(args.size)
    rate = parse_size(args.rate)
    console = Console(stderr=True)
    rows = []
    try:
        for n in [int(x) for x in args.ns.split(",")]:
            shapes = [("homogeneous", [rate] * n)]
            if not args.no_hetero:
                shapes.append(
                    ("heterogeneous", [rate if k % 2 == 0 else rate // 4 for k in range(n)])
                )
            for shape, leech_rates in shapes:
                for transport in args.transports.split(","):
                    res = run_swarm(
                        peers=n + 1,
                        seeders=1,
                        size=size,
                        transport=transport,
                        emulate=True,
                        up_rates=[rate, *leech_rates],
                        chunk_size=args.chunk_size,
                        console=console,
                    )
                    remove_work()
                    bound = t_min(size, rate, [float(r) for r in leech_rates])
                    cs = n * size / rate
                    rows.append((n, shape, transport, res.seconds, bound, cs))
                    console.print(
                        f"N={n} {shape} {transport}: T={res.seconds:.2f}s T_min={bound:.2f}s ratio={res.seconds / bound:.3f}"
                    )
        limit_rows = []
        if not args.no_limit_check:
            for transport in args.transports.split(","):
                res = run_swarm(
                    peers=2,
                    seeders=1,
                    size=size // 2,
                    transport=transport,
                    emulate=True,
                    up_rates=[rate * 4, rate * 4],
                    app_up_limit=str(rate),
                    console=console,
                )
                remove_work()
                # The leecher's own figure: verified bytes / seconds of its download.
                achieved = float(res.leechers[0].result["MBps"]) * 1e6  # type: ignore[arg-type]
                limit_rows.append((transport, rate, achieved))
    except SwarmError as exc:
        print(f"bench_distribution: error: {exc}", file=sys.stderr)
        return 1
    finally:
        remove_work()
    print(
        f"\nF = {size / 2**20:.0f} MiB in {args.chunk_size} chunks, every upload capped at {rate / 1e6:g} MB/s by tc (heterogeneous: odd leechers at a quarter)\n"
    )
    print("| N | rates | transport | T (s) | T_min (s) | T / T_min | client/server N*F/u_s (s) |")
    print("|---|---|---|---|---|---|---|")
    for n, shape, transport, t, bound, cs in rows:
        print(
            f"| {n} | {shape} | {transport} | {t:.2f} | {bound:.2f} | {t / bound:.3f} | {cs:.1f} |"
        )
    if limit_rows:
        print("\n| app --up-limit check | limit (MB/s) | achieved (MB/s) | achieved / limit |")
        print("|---|---|---|---|")
        for transport, limit, achieved in limit_rows:
            print(
                f"| {transport} | {limit / 1e6:.2f} | {achieved / 1e6:.2f} | {achieved / limit:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
