"""Run a whole local swarm: a tracker, S seeders and N-S leechers on loopback.

Each peer is a real ``peer`` process with its own ``$PEER_HOME`` in a
temporary directory. A random file of ``--size`` is shared by the seeders and
downloaded by every leecher at the same time; progress is shown live (read
from each leecher's resume state), then a table per peer: time, MB/s and the
bytes received from each other peer. Every copy is checked by SHA-256.
Everything started is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peerd.manifest import default_chunk_size
from peerd.ratelimit import parse_size

PY = sys.executable


@dataclass
class Peer:
    name: str
    home: Path
    key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    out: Path | None = None
    result: dict[str, object] = field(default_factory=dict)
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_cmd(*args: str) -> list[str]:
    return [PY, "-m", "peerd", *args]


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def progress_of(out: Path) -> int:
    """Verified chunks recorded in a leecher's resume state (0 if none yet)."""
    try:
        state = msgpack.unpackb(out.with_name(out.name + ".part.state").read_bytes())
        return sum(bin(b).count("1") for b in state["bits"])
    except (OSError, ValueError, KeyError, TypeError, msgpack.ExtraData):
        return -1 if out.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--peers", type=int, default=6, help="peer processes in all (default 6)")
    ap.add_argument("--seeders", type=int, default=2, help="how many of them seed (default 2)")
    ap.add_argument("--size", default="256MiB", help="file size, e.g. 64MiB, 1GiB (default 256MiB)")
    ap.add_argument("--transport", choices=["reactor", "proactor"], default=None)
    ap.add_argument("--json", action="store_true", help="print a final JSON document")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = ap.parse_args()
    if args.seeders < 1 or args.peers <= args.seeders:
        ap.error("need at least one seeder and one leecher (--peers > --seeders >= 1)")
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        ap.error(str(exc))
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="peer-swarm-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    if args.transport:
        env["PEER_TRANSPORT"] = args.transport
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        port = free_port()
        tracker = f"127.0.0.1:{port}"
        env["PEER_TRACKER"] = tracker
        tproc = subprocess.Popen(
            [PY, "-m", "tracker", "--port", str(port), "--data", str(work / "tracker")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(tproc)
        src = work / "source.bin"
        console.print(f"creating a random {size:,}-byte file ...")
        source_digest = make_file(src, size)
        peers = [Peer(f"peer{k}", work / f"peer{k}") for k in range(args.peers)]
        for p in peers:
            p.home.mkdir()
            p.key = subprocess.run(
                peer_cmd("id"),
                env={**env, "PEER_HOME": str(p.home)},
                capture_output=True,
                check=True,
                text=True,
            ).stdout.strip()
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or tproc.poll() is not None:
                raise SystemExit(
                    f"tracker did not start: {tproc.stderr.read().decode() if tproc.stderr else ''}"
                )
            time.sleep(0.05)
        seeders, leechers = peers[: args.seeders], peers[args.seeders :]
        content_id = ""
        for p in seeders:
            p.proc = subprocess.Popen(
                peer_cmd("share", str(src)),
                env={**env, "PEER_HOME": str(p.home)},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p.proc)
            assert p.proc.stdout is not None
            line = p.proc.stdout.readline().decode().strip()
            if not line:
                raise SystemExit(f"{p.name} failed to share the file")
            content_id = line
        console.print(
            f"content id {content_id}; {len(seeders)} seeder(s), {len(leechers)} leecher(s)"
        )
        t0 = time.monotonic()
        for p in leechers:
            p.out = p.home / "download.bin"
            p.proc = subprocess.Popen(
                peer_cmd("get", content_id, "-o", str(p.out), "--json", "--seed"),
                env={**env, "PEER_HOME": str(p.home)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            procs.append(p.proc)
        chunk_size = default_chunk_size(size)
        nchunks = max(1, -(-size // chunk_size))
        done: dict[str, float] = {}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        ) as bar:
            tasks = {p.name: bar.add_task(p.name, total=size) for p in leechers}
            while len(done) < len(leechers):
                if time.monotonic() - t0 > args.timeout:
                    raise SystemExit(f"swarm did not finish within {args.timeout:.0f} s")
                for p in leechers:
                    assert p.proc is not None and p.out is not None
                    if p.name in done:
                        continue
                    if p.out.exists():
                        done[p.name] = time.monotonic() - t0
                        bar.update(tasks[p.name], completed=size)
                        continue
                    if p.proc.poll() is not None:
                        err = p.proc.stderr.read().decode() if p.proc.stderr else ""
                        raise SystemExit(f"{p.name} failed: {err.strip()[-500:]}")
                    got = progress_of(p.out)
                    bar.update(tasks[p.name], completed=min(size, max(got, 0) * size // nchunks))
                time.sleep(0.1)
        for p in leechers:
            assert p.proc is not None and p.proc.stdout is not None
            line = p.proc.stdout.readline().decode().strip()
            p.result = json.loads(line) if line else {}
        by_key = {p.key[:12]: p.name for p in peers}
        table = Table(
            title=f"{size:,} bytes to {len(leechers)} leechers from {len(seeders)} seeders"
        )
        table.add_column("peer")
        table.add_column("seconds", justify="right")
        table.add_column("MB/s", justify="right")
        table.add_column("sha256")
        table.add_column("received from")
        summary = []
        ok = True
        for p in leechers:
            assert p.out is not None
            good = sha256_file(p.out) == source_digest
            ok &= good
            sources = {
                by_key.get(name.split("@")[0], name): n
                for name, n in dict(p.result.get("bytes_per_peer", {})).items()  # type: ignore[call-overload]
            }
            table.add_row(
                p.name,
                f"{p.result.get('seconds', 0):.2f}",
                f"{p.result.get('MBps', 0)}",
                "ok" if good else "MISMATCH",
                ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sources.items())),
            )
            summary.append({"peer": p.name, "verified": good, "received_from": sources, **p.result})
        console.print(table)
        if args.json:
            print(
                json.dumps(
                    {"id": content_id, "size": size, "seeders": len(seeders), "peers": summary}
                )
            )
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print("interrupted; stopping the swarm")
        return 130
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
