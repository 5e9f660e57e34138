"""Run a whole local swarm: a tracker, S seeders and N-S leechers on loopback.

Each peer is a real ``peer`` process with its own ``$PEER_HOME`` in a
temporary directory. A random file of ``--size`` is shared by the seeders and
downloaded by every leecher at the same time; progress is shown live (read
from each leecher's resume state), then a table per peer: time, MB/s and the
bytes received from each other peer. Every copy is checked by SHA-256.
Everything started is stopped and removed at the end, also on Ctrl-C.

With ``--emulate`` (root only) the swarm runs in a network namespace of its
own: the tracker and every peer get their own address on that namespace's
loopback (127.0.0.x), and each peer's upload is capped with ``tc`` (an htb
class per source address, ``--up-rate``). All traffic stays on loopback
addresses inside the namespace, which is deleted afterwards.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from peerd.content.manifest import default_chunk_size
from peerd.units import parse_size

PY = sys.executable


class SwarmError(Exception):
    """The swarm could not be run (one line for the user)."""


@dataclass
class Peer:
    name: str
    home: Path
    host: str = "127.0.0.1"
    up_rate: int | None = None  # tc cap in bytes/s (emulation only)
    key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    out: Path | None = None
    done_at: float | None = None
    result: dict[str, object] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def chunks_verified(out: Path) -> int:
    """Verified chunks recorded in a leecher's resume state (0 if none yet)."""
    try:
        state = msgpack.unpackb(out.with_name(out.name + ".part.state").read_bytes())
        return sum(bin(b).count("1") for b in state["bits"])
    except (OSError, ValueError, KeyError, TypeError, msgpack.ExtraData):
        return 0


class Network:
    """Where the processes run: plain loopback, or an emulated namespace."""

    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        self.ns = f"peer-swarm-{os.getpid()}" if emulate else ""

    def __enter__(self) -> Network:
        if not self.emulate:
            return self
        if os.geteuid() != 0:
            raise SwarmError("--emulate needs root (it creates a network namespace and tc classes)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise SwarmError("--emulate needs the ip and tc commands (Debian package iproute2)")
        self._run("ip", "netns", "add", self.ns)
        try:
            self._run("ip", "-n", self.ns, "link", "set", "lo", "up")
            # Like a link with sane queueing: each TCP flow may keep at most
            # 128 KiB below it (the default, 4 MiB per flow, turns a capped
            # uplink into seconds of FIFO delay for every request and HAVE).
            for knob in (
                "net.ipv4.tcp_limit_output_bytes=131072",
                "net.ipv4.tcp_notsent_lowat=131072",
            ):
                self._run("ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", knob)
            self._tc("qdisc add dev lo root handle 1: htb default 1 r2q 1000")
            self._tc("class add dev lo parent 1: classid 1:1 htb rate 100gbit")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.emulate:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    @staticmethod
    def _run(*cmd: str) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SwarmError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")

    def _tc(self, args: str) -> None:
        self._run("tc", "-n", self.ns, *args.split())

    def cap_upload(self, host: str, rate: int, classid: int) -> None:
        """Cap what ``host`` sends (its upload) to ``rate`` bytes/s."""
        bits = rate * 8
        burst = max(rate // 50, 256 * 1024)
        self._tc(
            f"class add dev lo parent 1: classid 1:{classid:x} htb rate {bits}bit "
            f"ceil {bits}bit burst {burst}b cburst {burst}b"
        )
        self._tc(
            f"filter add dev lo parent 1: protocol ip prio 1 u32 "
            f"match ip src {host}/32 flowid 1:{classid:x}"
        )

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns] if self.emulate else []

    def port_open(self, host: str, port: int) -> bool:
        code = f"import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(({host!r},{port})))"
        if not self.emulate:
            with socket.socket() as s:
                return s.connect_ex((host, port)) == 0
        return subprocess.run([*self.prefix(), PY, "-c", code], check=False).returncode == 0


@dataclass
class SwarmResult:
    content_id: str
    size: int
    seconds: float  # leechers started -> last verified copy in place
    peers: list[Peer]
    seeders: list[Peer]
    leechers: list[Peer]
    source_digest: str


def run_swarm(
    *,
    peers: int,
    seeders: int,
    size: int,
    transport: str | None = None,
    emulate: bool = False,
    up_rates: list[int | None] | None = None,
    app_up_limit: str | None = None,
    chunk_size: str | None = None,
    timeout: float = 600.0,
    on_tick: Callable[[list[Peer], int], None] | None = None,
    console: Console | None = None,
) -> SwarmResult:
    """Start a tracker and the peers, download everywhere, stop everything.

    ``up_rates[k]`` caps peer k's upload with tc (emulation only);
    ``app_up_limit`` is passed to every peer as ``--up-limit`` instead.
    """
    console = console or Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="peer-swarm-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    if transport:
        env["PEER_TRANSPORT"] = transport
    try:
        with Network(emulate) as net:
            tracker_host = "127.0.0.2" if emulate else "127.0.0.1"
            port = free_port()
            env["PEER_TRACKER"] = f"{tracker_host}:{port}"
            tproc = subprocess.Popen(
                [
                    *net.prefix(),
                    PY,
                    "-m",
                    "cli",
                    "tracker",
                    "--host",
                    tracker_host,
                    "--port",
                    str(port),
                    "--data",
                    str(work / "tracker"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            procs.append(tproc)
            src = work / "source.bin"
            console.print(f"creating a random {size:,}-byte file ...")
            source_digest = make_file(src, size)
            all_peers = [Peer(f"peer{k}", work / f"peer{k}") for k in range(peers)]
            for k, p in enumerate(all_peers):
                p.home.mkdir()
                if emulate:
                    p.host = f"127.0.0.{10 + k}"
                    p.up_rate = up_rates[k] if up_rates else None
                    if p.up_rate:
                        net.cap_upload(p.host, p.up_rate, 0x10 + k)
                p.key = subprocess.run(
                    [PY, "-m", "cli", "id"],
                    env={**env, "PEER_HOME": str(p.home)},
                    capture_output=True,
                    check=True,
                    text=True,
                ).stdout.strip()
            deadline = time.monotonic() + 15
            while not net.port_open(tracker_host, port):
                if time.monotonic() > deadline or tproc.poll() is not None:
                    err = (
                        tproc.stderr.read().decode()
                        if tproc.stderr and tproc.poll() is not None
                        else ""
                    )
                    raise SwarmError(f"tracker did not start: {err.strip()}")
                time.sleep(0.05)
            common = ["--host", "127.0.0.1"] if not emulate else []
            limit = ["--up-limit", app_up_limit] if app_up_limit else []
            chunking = ["--chunk-size", chunk_size] if chunk_size else []
            seeds, leeches = all_peers[:seeders], all_peers[seeders:]
            content_id = ""
            for p in seeds:
                host = ["--host", p.host, "--bind", p.host] if emulate else common
                p.proc = subprocess.Popen(
                    [
                        *net.prefix(),
                        PY,
                        "-m",
                        "cli",
                        "share",
                        str(src),
                        "--id-only",
                        *host,
                        *limit,
                        *chunking,
                    ],
                    env={**env, "PEER_HOME": str(p.home)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                procs.append(p.proc)
                assert p.proc.stdout is not None
                line = p.proc.stdout.readline().decode().strip()
                if not line:
                    err = p.proc.stderr.read().decode() if p.proc.stderr else ""
                    raise SwarmError(f"{p.name} failed to share the file: {err.strip()[-300:]}")
                content_id = line
            console.print(
                f"content id {content_id}; {len(seeds)} seeder(s), {len(leeches)} leecher(s)"
            )
            # Start every leecher's interpreter first, then release them all at
            # once (scripts/_start_together.py): T counts from the release.
            go = work / "go"
            starter = str(Path(__file__).resolve().parent / "_start_together.py")
            for p in leeches:
                p.out = p.home / "download.bin"
                host = ["--host", p.host, "--bind", p.host] if emulate else common
                p.proc = subprocess.Popen(
                    [
                        *net.prefix(),
                        PY,
                        starter,
                        str(p.home / "ready"),
                        str(go),
                        "--",
                        "get",
                        content_id,
                        "-o",
                        str(p.out),
                        "--json",
                        "--seed",
                        *host,
                        *limit,
                    ],
                    env={**env, "PEER_HOME": str(p.home)},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                procs.append(p.proc)
            deadline = time.monotonic() + 60
            while not all((p.home / "ready").exists() for p in leeches):
                for p in leeches:
                    assert p.proc is not None
                    if p.proc.poll() is not None:
                        err = p.proc.stderr.read().decode() if p.proc.stderr else ""
                        raise SwarmError(f"{p.name} failed to start: {err.strip()[-300:]}")
                if time.monotonic() > deadline:
                    raise SwarmError("leechers did not start within 60 s")
                time.sleep(0.01)
            go.touch()
            t0 = time.monotonic()
            chunk_bytes = parse_size(chunk_size) if chunk_size else default_chunk_size(size)
            nchunks = max(1, -(-size // chunk_bytes))
            while any(p.done_at is None for p in leeches):
                now = time.monotonic()
                if now - t0 > timeout:
                    raise SwarmError(f"swarm did not finish within {timeout:.0f} s")
                for p in leeches:
                    assert p.proc is not None and p.out is not None
                    if p.done_at is None and p.out.exists():
                        p.done_at = now - t0
                    elif p.done_at is None and p.proc.poll() is not None:
                        err = p.proc.stderr.read().decode() if p.proc.stderr else ""
                        raise SwarmError(f"{p.name} failed: {err.strip()[-500:]}")
                if on_tick is not None:
                    on_tick(leeches, nchunks)
                time.sleep(0.02)
            seconds = max(p.done_at or 0.0 for p in leeches)
            for p in leeches:
                assert p.proc is not None and p.proc.stdout is not None
                line = p.proc.stdout.readline().decode().strip()
                p.result = json.loads(line) if line else {}
            return SwarmResult(content_id, size, seconds, all_peers, seeds, leeches, source_digest)
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
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        # Checks read the copies before the directory goes away.
        _cleanup.append(work)


_cleanup: list[Path] = []


def remove_work() -> None:
    while _cleanup:
        shutil.rmtree(_cleanup.pop(), ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--peers", type=int, default=6, help="peer processes in all (default 6)")
    ap.add_argument("--seeders", type=int, default=2, help="how many of them seed (default 2)")
    ap.add_argument("--size", default="256MiB", help="file size, e.g. 64MiB, 1GiB (default 256MiB)")
    ap.add_argument("--transport", choices=["reactor", "proactor"], default=None)
    ap.add_argument(
        "--emulate",
        action="store_true",
        help="own network namespace, an address per peer, tc upload caps (root)",
    )
    ap.add_argument(
        "--up-rate", default=None, help="with --emulate: every peer's upload cap, e.g. 8MB"
    )
    ap.add_argument(
        "--chunk-size", default=None, help="chunk size for the shared file, e.g. 256KiB"
    )
    ap.add_argument("--json", action="store_true", help="print a final JSON document")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = ap.parse_args()
    if args.seeders < 1 or args.peers <= args.seeders:
        ap.error("need at least one seeder and one leecher (--peers > --seeders >= 1)")
    if args.up_rate and not args.emulate:
        ap.error(
            "--up-rate needs --emulate (use --up-limit-style app limits via the peer command otherwise)"
        )
    try:
        size = parse_size(args.size)
        rate = parse_size(args.up_rate) if args.up_rate else None
    except ValueError as exc:
        ap.error(str(exc))
    console = Console(stderr=True)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    )
    tasks: dict[str, object] = {}

    def tick(leechers: list[Peer], nchunks: int) -> None:
        for p in leechers:
            if p.name not in tasks:
                tasks[p.name] = bar.add_task(p.name, total=size)
            got = (
                size
                if p.done_at is not None
                else min(size, chunks_verified(p.out) * size // nchunks)
                if p.out
                else 0
            )
            bar.update(tasks[p.name], completed=got)  # type: ignore[arg-type]

    try:
        with bar:
            res = run_swarm(
                peers=args.peers,
                seeders=args.seeders,
                size=size,
                transport=args.transport,
                emulate=args.emulate,
                up_rates=[rate] * args.peers if rate else None,
                timeout=args.timeout,
                chunk_size=args.chunk_size,
                on_tick=tick,
                console=console,
            )
        by_key = {p.key[:12]: p.name for p in res.peers}
        table = Table(
            title=f"{size:,} bytes to {len(res.leechers)} leechers from {len(res.seeders)} seeders in {res.seconds:.2f} s"
        )
        for col, justify in (
            ("peer", "left"),
            ("seconds", "right"),
            ("MB/s", "right"),
            ("sha256", "left"),
            ("received from", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        summary = []
        ok = True
        for p in res.leechers:
            assert p.out is not None
            good = sha256_file(p.out) == res.source_digest
            ok &= good
            sources = {
                by_key.get(name.split("@")[0], name): n
                for name, n in dict(p.result.get("bytes_per_peer", {})).items()  # type: ignore[call-overload]
            }
            table.add_row(
                p.name,
                f"{p.done_at or 0:.2f}",
                f"{size / max(p.done_at or 1e-9, 1e-9) / 1e6:.1f}",
                "ok" if good else "MISMATCH",
                ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sources.items())),
            )
            summary.append(
                {
                    "peer": p.name,
                    "seconds": p.done_at,
                    "verified": good,
                    "received_from": sources,
                    **{k: v for k, v in p.result.items() if k != "seconds"},
                }
            )
        # The result goes to stdout (progress went to stderr), full width when
        # it is not a terminal, so `scripts/swarm > result.txt` keeps it whole.
        out = Console() if sys.stdout.isatty() else Console(width=200)
        out.print(table)
        if args.json:
            print(
                json.dumps(
                    {
                        "id": res.content_id,
                        "size": size,
                        "seconds": res.seconds,
                        "seeders": len(res.seeders),
                        "peers": summary,
                    }
                )
            )
        return 0 if ok else 1
    except SwarmError as exc:
        console.print(f"swarm: error: {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; the swarm was stopped and removed")
        return 130
    finally:
        remove_work()


if __name__ == "__main__":
    sys.exit(main())
