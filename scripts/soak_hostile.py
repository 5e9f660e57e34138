#!/usr/bin/env python3
"""Soak on a hostile network (issue 14): honest downloads while every attack runs.

One real tracker and one real seeder (``peer share``) serve an honest getter
that downloads the file again and again (``peer get``, each copy checked
byte for byte). Meanwhile a hostile client cycles through every attack of
issue 14 against the seeder and the tracker:

* peer side: pipelined MANIFEST_REQUESTs never read, an unsolicited 40 MiB
  MANIFEST header, 300 BITFIELDs, HAVE past the last chunk, HELLO version 1,
  handshaked-then-silent sessions from other addresses, connections that
  never say HELLO, a client that requests every chunk and never reads;
* swarm: a relay proxy on 127.0.0.2 (listed under its own key) that passes
  the seeder's genuine handshake through and then corrupts DATA, and a
  seeder whose BITFIELD has pad bits set;
* tracker side: pipelined GET_MANIFEST never read, ANNOUNCE for unknown ids
  with a large bitmap, PUBLISH of renamed (re-signed) manifests. The tracker
  may refuse these; the soak only sends them and goes on.

Every second it samples the seeder's and the tracker's RSS. At the end it
prints one JSON line::

    {"downloads_ok": N, "downloads_failed": N, "seeder_rss_max_mib": x,
     "tracker_rss_max_mib": y, "attacks_sent": {...}, ...}

and exits 1 if an honest download failed or was not byte-identical, if no
download finished at all, if a process died, or if an RSS exceeded
``--max-rss-mib``.

    .venv/bin/python scripts/soak_hostile.py --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from tests.e2e import PY, Swarm, random_file, wait_port  # noqa: E402
from tests.hostile import (  # noqa: E402
    ANNOUNCE,
    BITFIELD,
    GET_MANIFEST,
    HAVE,
    HEADER,
    HELLO,
    MANIFEST,
    MANIFEST_REQUEST,
    PUBLISH,
    REQUEST,
    ContentInfo,
    Key,
    PadBitsPeer,
    RelayProxy,
    TrackerSession,
    bitfield,
    handshake,
    handshake_from,
    message,
    read_until_closed,
    rss_kib,
    signed,
)

MiB = 1 << 20
KiB = 1 << 10
FILE_SIZE = 16 * MiB
CHUNK = "16KiB"
ERRORS = (OSError, ConnectionError, AssertionError, ValueError, KeyError, TypeError)


class Soak:
    def __init__(self, root: Path, transport: str) -> None:
        self.root = root
        self.s = Swarm(root, transport)
        self.logs: list[IO[bytes]] = []
        self.attacks: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []
        self.get_seconds: list[float] = []
        self.rss_max = {"seeder": 0, "tracker": 0}
        self.rss_trend: dict[str, list[float]] = {"seeder": [], "tracker": []}
        self.stop = threading.Event()
        self.held: list[socket.socket] = []  # connections kept open for a cycle

    # --- processes --------------------------------------------------------------
    def _log(self, name: str) -> IO[bytes]:
        f = (self.root / f"{name}.log").open("wb")
        self.logs.append(f)
        return f

    def start(self) -> None:
        s = self.s
        # Our own tracker process: its log goes to a file, not to a pipe.
        s.tracker = subprocess.Popen(
            [
                PY,
                "-m",
                "cli",
                "tracker",
                "--port",
                str(s.tracker_port),
                "--data",
                str(self.root / "tracker"),
                "--transport",
                s.transport,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log("tracker"),
            cwd=ROOT,
        )
        s.procs.append(s.tracker)
        wait_port(s.tracker_port, s.tracker)
        self.src = random_file(self.root / "f.bin", FILE_SIZE)
        self.digest = hashlib.sha256(self.src.read_bytes()).digest()
        self.seed = s.peer(
            "seed",
            "share",
            str(self.src),
            "--id-only",
            "--chunk-size",
            CHUNK,
            stderr=self._log("seed"),
        )
        assert self.seed.stdout is not None
        self.cid_hex = self.seed.stdout.readline().decode().strip()
        assert len(self.cid_hex) == 64, self.cid_hex
        self.cid = bytes.fromhex(self.cid_hex)
        deadline = time.monotonic() + 15
        while True:
            log_text = (self.root / "seed.log").read_text()
            m = re.search(r" on (?:port (\d+) on every interface|\S+:(\d+));", log_text)
            if m:
                self.port = int(m.group(1) or m.group(2))
                break
            if time.monotonic() > deadline or self.seed.poll() is not None:
                raise SystemExit(
                    "the seeder did not start: " + (self.root / "seed.log").read_text()
                )
            time.sleep(0.05)
        t = TrackerSession(s.tracker_port, Key())
        self.content = ContentInfo.from_manifest(t.get_manifest(self.cid))
        t.close()
        self.n = self.content.num_chunks
        self.rss_start = {"seeder": rss_kib(self.seed.pid), "tracker": rss_kib(s.tracker.pid)}

    def close(self) -> None:
        for sock in self.held:
            sock.close()
        self.s.close()
        for f in self.logs:
            f.close()

    # --- the honest getter and the sampler ---------------------------------------
    def getter(self) -> None:
        k = 0
        while not self.stop.is_set():
            k += 1
            out = self.root / f"got{k}.bin"
            t0 = time.monotonic()
            try:
                res = self.s.run(
                    "leech", "get", self.cid_hex, "-o", str(out), "--json", "-v", timeout=90
                )
            except subprocess.TimeoutExpired:
                self.failed += 1
                self.failures.append(f"get {k} timed out")
                continue
            took = time.monotonic() - t0
            good = res.returncode == 0 and out.exists()
            if good:
                good = hashlib.sha256(out.read_bytes()).digest() == self.digest
            if good:
                self.ok += 1
                self.get_seconds.append(took)
                bans = re.findall(r"banned peer \S+", res.stderr)
                self.attacks["relay_bans_seen_by_getter"] += len(bans)
                if any("@127.0.0.1:" + str(self.port) in b for b in bans):
                    self.failed += 1
                    self.failures.append(f"get {k} banned the honest seeder: {bans}")
            else:
                self.failed += 1
                self.failures.append(f"get {k} rc={res.returncode}: {res.stderr[-1500:]}")
            with contextlib.suppress(OSError):
                out.unlink()

    def sampler(self) -> None:
        procs = {"seeder": self.seed, "tracker": self.s.tracker}
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            for name, proc in procs.items():
                assert proc is not None
                with contextlib.suppress(OSError, AssertionError):
                    rss = rss_kib(proc.pid)
                    self.rss_max[name] = max(self.rss_max[name], rss)
                    if tick % 10 == 0:  # the trend: growth that does not level off is a leak
                        self.rss_trend[name].append(round(rss / 1024, 1))

    # --- attacks -------------------------------------------------------------------
    def _hs(self) -> socket.socket:
        return handshake(self.port, self.cid)

    def manifest_flood(self) -> None:
        socks = [self._hs() for _ in range(4)]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(message(MANIFEST_REQUEST) * 2000)
        time.sleep(0.2)
        for sock in socks:
            read_until_closed(sock, 2)
            sock.close()

    def unsolicited_manifest(self) -> None:
        socks = [self._hs() for _ in range(4)]
        for sock in socks:
            sock.sendall(HEADER.pack(MANIFEST, 40 * MiB) + b"\x81\xa8manifest\xc6")
        for sock in socks:
            read_until_closed(sock, 2)
            sock.close()

    def bitfield_repeat(self) -> None:
        sock = self._hs()
        with contextlib.suppress(OSError):
            sock.sendall(message(BITFIELD, bits=bitfield([False] * self.n)) * 300)
        read_until_closed(sock, 2)
        sock.close()

    def have_out_of_range(self) -> None:
        sock = self._hs()
        sock.sendall(
            message(BITFIELD, bits=bitfield([False] * self.n)) + message(HAVE, idx=[self.n])
        )
        read_until_closed(sock, 2)
        sock.close()

    def hello_v1(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(
            message(HELLO, v=1, key=Key().public, port=0, id=self.cid, nonce=os.urandom(32))
        )
        read_until_closed(sock, 2)
        sock.close()

    def silent_sessions(self) -> None:
        """Handshaked, then silent, from two other addresses; held a cycle."""
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(80):
                try:
                    self.held.append(handshake_from(self.port, self.cid, source))
                except ERRORS:
                    pass

    def stalled_handshakes(self) -> None:
        """Connections that never say HELLO, from the getter's own address."""
        for _ in range(200):
            try:
                self.held.append(socket.create_connection(("127.0.0.1", self.port), timeout=3))
            except OSError:
                pass

    def non_reader(self) -> None:
        sock = self._hs()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        reqs = b"".join(
            message(REQUEST, idx=i, off=0, len=self.content.chunk_length(i))
            for i in range(min(self.n, 64))
        )
        sock.sendall(message(BITFIELD, bits=bitfield([False] * self.n)) + reqs)
        self.held.append(sock)  # never read; closed at the end of the next cycle

    def tracker_get_manifest_unread(self) -> None:
        t = TrackerSession(self.s.tracker_port, Key())
        t.sock.setblocking(False)
        data = message(GET_MANIFEST, id=self.cid) * 20_000
        pos, deadline = 0, time.monotonic() + 2
        while pos < len(data) and time.monotonic() < deadline:
            try:
                pos += t.sock.send(data[pos:])
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        time.sleep(0.5)
        t.close()

    def tracker_announce_unknown(self) -> None:
        t = TrackerSession(self.s.tracker_port, Key())
        t.sock.settimeout(3)
        bits = b"\xff" * (128 * KiB)
        for _ in range(10):
            try:
                t.request(
                    message(
                        ANNOUNCE, id=os.urandom(32), port=1, event="started", bits=bits, want=50
                    )
                )
            except ERRORS:
                break
        t.close()

    def tracker_publish_renamed(self) -> None:
        outer = msgpack.unpackb(self.content.manifest, raw=False)
        info = msgpack.unpackb(outer["info"], raw=False)
        key = Key()
        t = TrackerSession(self.s.tracker_port, key)
        t.sock.settimeout(5)
        for _ in range(5):
            info["name"] = f"renamed-{os.urandom(6).hex()}.bin"
            info_b = msgpack.packb(info, use_bin_type=True)
            manifest = msgpack.packb(
                {"info": info_b, "sigs": [list(signed(info_b, key))]}, use_bin_type=True
            )
            try:
                t.request(message(PUBLISH, manifest=manifest))
            except ERRORS:
                break
        t.close()

    # --- the run ---------------------------------------------------------------------
    def run(self, duration: float) -> dict[str, Any]:
        self.start()
        relay = RelayProxy(("127.0.0.1", self.port), host="127.0.0.2")
        relay.announce(self.s.tracker_port, self.content)
        pad = PadBitsPeer(self.content, self.src)
        pad.bits = b"\xff" * ((self.n + 7) // 8)
        if self.n % 8 == 0:
            pad.bits = b"\xff" * (self.n // 8) + b"\x01"  # wrong length instead
        pad.announce(self.s.tracker_port)
        threads = [
            threading.Thread(target=self.getter, daemon=True),
            threading.Thread(target=self.sampler, daemon=True),
        ]
        for t in threads:
            t.start()
        attacks: list[Callable[[], None]] = [
            self.manifest_flood,
            self.unsolicited_manifest,
            self.bitfield_repeat,
            self.have_out_of_range,
            self.hello_v1,
            self.silent_sessions,
            self.stalled_handshakes,
            self.non_reader,
            self.tracker_get_manifest_unread,
            self.tracker_announce_unknown,
            self.tracker_publish_renamed,
        ]
        end = time.monotonic() + duration
        cycle_held: list[socket.socket] = []
        while time.monotonic() < end:
            for attack in attacks:
                if time.monotonic() >= end:
                    break
                try:
                    attack()
                except ERRORS as exc:
                    self.errors[f"{attack.__name__}: {type(exc).__name__}"] += 1
                self.attacks[attack.__name__] += 1
            # What was held for a cycle goes now; this cycle's stays one more.
            for sock in cycle_held:
                sock.close()
            cycle_held, self.held = self.held, []
        self.held = cycle_held
        self.stop.set()
        threads[0].join(timeout=120)
        threads[1].join(timeout=5)
        self.attacks["relay_connections"] = relay.relayed
        self.attacks["relay_chunks_corrupted"] = len(relay.corrupted)
        self.attacks["pad_bits_seeder_handshakes"] = pad.handshakes
        relay.close()
        pad.close()
        alive = {
            "seeder": self.seed.poll() is None,
            "tracker": self.s.tracker is not None and self.s.tracker.poll() is None,
        }
        return {
            "downloads_ok": self.ok,
            "downloads_failed": self.failed,
            "seeder_rss_max_mib": round(self.rss_max["seeder"] / 1024, 1),
            "tracker_rss_max_mib": round(self.rss_max["tracker"] / 1024, 1),
            "seeder_rss_start_mib": round(self.rss_start["seeder"] / 1024, 1),
            "tracker_rss_start_mib": round(self.rss_start["tracker"] / 1024, 1),
            "rss_mib_every_10s": self.rss_trend,
            "get_seconds_median": round(statistics.median(self.get_seconds or [0.0]), 2),
            "get_seconds_max": round(max(self.get_seconds, default=0.0), 2),
            "processes_alive": alive,
            "attacks_sent": dict(self.attacks),
            "attack_errors": dict(self.errors),
            "failures": self.failures[:5],
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of attacks")
    ap.add_argument("--max-rss-mib", type=float, default=256.0, help="bound on either RSS")
    ap.add_argument("--transport", default="reactor", choices=["reactor", "proactor"])
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    root = Path(tempfile.mkdtemp(prefix="soak-hostile-"))
    soak = Soak(root, args.transport)
    signal.signal(signal.SIGTERM, lambda *_: soak.stop.set())
    try:
        summary = soak.run(args.duration)
    finally:
        soak.close()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    summary["max_rss_mib"] = args.max_rss_mib
    if args.keep:
        summary["logs"] = str(root)
    print(json.dumps(summary))
    bad = (
        summary["downloads_failed"] > 0
        or summary["downloads_ok"] == 0
        or not all(summary["processes_alive"].values())
        or summary["seeder_rss_max_mib"] > args.max_rss_mib
        or summary["tracker_rss_max_mib"] > args.max_rss_mib
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
