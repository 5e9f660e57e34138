"""Clients with several trackers: a pool of two on one real Redis, one killed with -9.

Real processes throughout: ``redis-server`` (tests/redis_server.py), two
``peer tracker --store redis://...``, a ``peer share --tracker A,B`` whose
link names both trackers, and ``peer get LINK``: one running while tracker A
is killed, one started after. Both transports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.transport import Transport
from tests.e2e import PY, Swarm, free_port, random_file, wait_port
from tests.redis_server import RedisServer

MiB = 1 << 20


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def start_tracker(s: Swarm, url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(PY, "-m", "cli", "tracker", "--port", str(port), "--transport", s.transport),
            *("--store", url, "--data", str(s.root / f"t{port}")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    s.procs.append(proc)
    wait_port(port, proc)
    return proc, port


def test_a_killed_tracker_does_not_stall_downloads(
    transport: Transport, tmp_path: Path, redis: RedisServer
) -> None:
    s = Swarm(tmp_path, transport.name)
    try:
        a, port_a = start_tracker(s, redis.url)
        _, port_b = start_tracker(s, redis.url)
        src = random_file(tmp_path / "f.bin", 4 * MiB)
        seeder = s.peer(
            "seeder", "share", str(src), "--tracker", f"127.0.0.1:{port_a},127.0.0.1:{port_b}"
        )
        assert seeder.stdout is not None
        link = seeder.stdout.readline().decode().strip()
        assert f"127.0.0.1:{port_a}" in link and f"127.0.0.1:{port_b}" in link, link
        time.sleep(0.3)  # the seeder's announce is in Redis (flushed within 0.1 s)
        # a getter at 2 MiB/s (~2 s) from the link (both trackers, A first) ...
        out1 = tmp_path / "out1.bin"
        getter = s.peer("g1", "get", link, "-o", str(out1), "--json", "--down-limit", "2MiB")
        time.sleep(0.7)
        a.send_signal(signal.SIGKILL)  # ... loses tracker A mid-download
        a.wait()
        started = time.monotonic()
        # a getter started now finds A dead and takes B, which knows the seeder
        out2 = tmp_path / "out2.bin"
        result = s.run("g2", "get", link, "-o", str(out2), "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.strip().splitlines()[-1])["bytes"] == 4 * MiB
        after_kill = time.monotonic() - started
        assert getter.wait(timeout=60) == 0, getter.stderr.read() if getter.stderr else ""
        want = hashlib.sha256(src.read_bytes()).digest()
        for out in (out1, out2):
            assert hashlib.sha256(out.read_bytes()).digest() == want
        # not a speed claim: a stalled client would wait out 10 s timeouts or more
        assert after_kill < 20, after_kill
    finally:
        s.close()


def test_several_trackers_parse_and_refuse(tmp_path: Path) -> None:
    env_home = {"PEER_HOME": str(tmp_path)}

    many = ",".join(f"127.0.0.1:{7000 + i}" for i in range(9))
    for spec, message in [
        (many, "give 1 to 8 HOST:PORT"),
        ("127.0.0.1:1,nohost", "tracker"),
    ]:
        done = subprocess.run(
            [PY, "-m", "cli", "get", "00" * 32, "--tracker", spec],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env_home},
        )
        assert done.returncode != 0
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("peer: error:") and message in last, done.stderr


def test_a_hung_tracker_is_left_within_the_failover_time(
    transport: Transport, tmp_path: Path, redis: RedisServer
) -> None:
    s = Swarm(tmp_path, transport.name)
    a = None
    try:
        a, port_a = start_tracker(s, redis.url)
        _, port_b = start_tracker(s, redis.url)
        src = random_file(tmp_path / "f.bin", 1 * MiB)
        _, cid = s.share("seeder", src, "--tracker", f"127.0.0.1:{port_b}")
        time.sleep(0.3)
        # A accepts connections (the kernel does) but never answers: stopped, not dead
        a.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        out = tmp_path / "out.bin"
        trust = ("--trust", s.key("seeder"))
        trackers = ("--tracker", f"127.0.0.1:{port_a},127.0.0.1:{port_b}")
        result = s.run("g", "get", cid, "-o", str(out), "--json", *trust, *trackers, timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == src.read_bytes()
        # A's 2 s (FAILOVER_TIMEOUT) then B; a client stuck on A would wait 10 s or more
        assert took < 9, took
    finally:
        if a is not None and a.poll() is None:
            a.send_signal(signal.SIGCONT)
        s.close()
