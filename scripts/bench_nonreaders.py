"""An honest download from a seeder that other getters hold with unread uploads.

Issue 14, finding 5: a getter that requests chunks and never reads used to
slow every other download from the same seeder (its writer held the upload
turn until the turn counted as stalled, again and again). This starts a real
tracker and seeder (``peer`` processes on loopback), opens N such non-readers
(handshake, REQUEST for every chunk, a tiny receive buffer, never a byte
read), then times an honest ``peer get`` of the same file, for each N in
``--readers`` in turn, ``--runs`` times interleaved, and prints the medians.

    .venv/bin/python scripts/bench_nonreaders.py --size 64MiB --readers 0 1 16 --runs 3
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e import random_file, swarm
from tests.hostile import REQUEST, handshake, message

MiB = 1 << 20


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(KiB|MiB|GiB)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * {None: 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}[m.group(2)]


def one_run(root: Path, size: int, readers: int, transport: str) -> float:
    src = random_file(root / "f.bin", size)
    with swarm(root, transport) as s:
        seed, cid = s.share("seed", src, "--chunk-size", "1MiB")
        assert seed.stderr is not None
        line = seed.stderr.readline().decode()
        m = re.search(r" on (?:port (\d+) on every interface|\S+:(\d+));", line)
        assert m, "no port line from the seeder"
        port = int(m.group(1) or m.group(2))
        chunks = -(-size // MiB)
        stuck = []
        for _ in range(readers):
            sock = handshake(port, bytes.fromhex(cid), chunks=chunks)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            requests = (
                message(REQUEST, idx=i, off=0, len=min(MiB, size - i * MiB)) for i in range(chunks)
            )
            sock.sendall(b"".join(requests))
            stuck.append(sock)
        try:
            started = time.monotonic()
            s.get("leech", cid, root / "copy.bin", "--timeout", "60", timeout=120)
            seconds = time.monotonic() - started
        finally:
            for sock in stuck:
                sock.close()
        assert (root / "copy.bin").read_bytes() == src.read_bytes()
        return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=_size, default=64 * MiB)
    ap.add_argument("--readers", type=int, nargs="+", default=[0, 1, 16])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--transport", default="reactor")
    args = ap.parse_args()
    times: dict[int, list[float]] = {n: [] for n in args.readers}
    for _ in range(args.runs):
        for n in args.readers:
            with tempfile.TemporaryDirectory() as tmp:
                times[n].append(one_run(Path(tmp), args.size, n, args.transport))
    out = {
        str(n): {
            "median_s": round(statistics.median(ts), 2),
            "MBps": round(args.size / statistics.median(ts) / 1e6, 1),
            "runs": [round(t, 2) for t in ts],
        }
        for n, ts in times.items()
    }
    print(json.dumps({"size": args.size, "transport": args.transport, "non_readers": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
