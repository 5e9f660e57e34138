"""Reliability at the network edge (scenarios 9 and 10 of issue 6), both transports.

Hypothesis throws frames at a running tracker and a running peer (before and
after the handshake); then connection and request floods hit a seeder. After
each, the processes must still be up, their memory bounded, and a normal
download must succeed. Frames are built by tests.hostile from docs/PROTOCOL.md.
"""

from __future__ import annotations

import resource
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .e2e import Swarm, listen_port, random_file, swarm
from .hostile import (
    DATA,
    HAVE,
    REJECT,
    REQUEST,
    Key,
    TrackerSession,
    frame,
    handshake,
    message,
    read_frame,
    rss_kib,
)

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])
MiB = 1 << 20
RSS_GROWTH_LIMIT_KIB = 96 * 1024


def _share(s: Swarm, name: str, src: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    """Share and also learn the seeder's listening port (from its stderr line)."""
    proc, cid = s.share(name, src)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    port = listen_port(line)
    assert port is not None, line
    return proc, cid, port


def _send(port: int, data: bytes, *, host: str = "127.0.0.1", prefix: bytes = b"") -> None:
    """Connect, send, read whatever comes back for a moment, close. Never raises."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(prefix + data)
            sock.settimeout(0.05)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
    except OSError:
        pass


TYPES = st.sampled_from([*range(1, 12), *range(32, 45), 0, 12, 31, 45, 255])
frames = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.builds(frame, TYPES, st.binary(max_size=200)),  # valid header, garbage body
    st.builds(  # huge length prefixes: never allocate for them
        lambda t, n: struct.pack(">BI", t, n), TYPES, st.integers(2**24, 2**32 - 1)
    ),
    st.builds(lambda t, k: frame(t, b"") * k, TYPES, st.integers(100, 3000)),  # tiny frames
)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.lists(frames, min_size=1, max_size=4))
def _fuzz(targets: list[tuple[int, bytes]], data: list[bytes]) -> None:
    for port, prefix in targets:
        _send(port, b"".join(data), prefix=prefix)


def _peer_prefix(cid: bytes) -> bytes:
    """A well-formed HELLO first, so garbage reaches the post-HELLO parser too."""
    import os

    return message(1, v=2, key=Key().public, port=0, id=cid, nonce=os.urandom(32))


def test_fuzz_live_tracker_and_peer(tmp_path: Path, backend: str) -> None:
    src = random_file(tmp_path / "f.bin", 4 * MiB)
    with swarm(tmp_path, backend) as s:
        seed, cid, seed_port = _share(s, "seed", src)
        assert s.tracker is not None
        tracker = s.tracker
        rss0 = {p.pid: rss_kib(p.pid) for p in (seed, tracker)}
        # A connection that opens and never speaks, held through the fuzzing.
        mute = [
            socket.create_connection(("127.0.0.1", port)) for port in (seed_port, s.tracker_port)
        ]
        _fuzz(
            [(s.tracker_port, b""), (seed_port, b""), (seed_port, _peer_prefix(bytes.fromhex(cid)))]
        )
        # Thousands of tiny valid frames after a real handshake / auth.
        sock = handshake(seed_port, bytes.fromhex(cid), chunks=4)
        sock.sendall(message(HAVE, idx=[0]) * 5000)
        sock.close()
        session = TrackerSession(s.tracker_port, Key())
        session.sock.sendall(message(39, prefix="ab" * 8) * 3000)
        session.close()
        for c in mute:
            c.close()
        assert seed.poll() is None and tracker.poll() is None, "a process died"
        for p in (seed, tracker):
            grew = rss_kib(p.pid) - rss0[p.pid]
            assert grew < RSS_GROWTH_LIMIT_KIB, f"pid {p.pid} grew by {grew} KiB"
        s.get("leech", cid, tmp_path / "got.bin")
        assert (tmp_path / "got.bin").read_bytes() == src.read_bytes()


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for the flood's sockets here and in the peers started from this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if want < 2 * FLOOD + 500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {FLOOD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_many(port: int, n: int, source: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        try:
            sock = socket.create_connection(
                (("127.0.0.1", port)), timeout=3, source_address=(source, 0)
            )
        except OSError:
            continue
        socks.append(sock)
    return socks


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _pushes_back(port: int, cid: bytes, seconds: float = 20.0) -> bool:
    """Pipeline whole-chunk requests and never read: True once the peer stops reading.

    Each answer is a DATA of 1 MiB or a REJECT; a peer that queued every REJECT
    for a client that never reads would grow without bound, so it must stop
    taking requests (our sends then make no progress for a whole second).
    """
    sock = handshake(port, cid, chunks=8)
    # Small buffers on our side, so the bytes in flight are mostly the seeder's.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setblocking(False)
    # Distinct small requests (a duplicate of an outstanding one is owed once):
    # each is answered (DATA or REJECT), and the answers pile up unread.
    buf = b"".join(message(REQUEST, idx=k % 8, off=(k // 8) * 16, len=16) for k in range(2000))
    pos, last_progress, start = 0, time.monotonic(), time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            try:
                pos = (pos + sock.send(buf[pos:])) % len(buf)
                last_progress = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - last_progress > 1.0:
                    return True
                time.sleep(0.01)
        return False
    finally:
        sock.close()


# Sizes: the flood is 4 times the per-address limit (64) and the pipeline 300
# times the request queue (64): enough to hit each limit many times over.
FLOOD = 256
PIPELINED = 20_000


# Many sockets, and a seeder that must show it stops reading: not beside the
# other connection floods (tests/test_hostile_network.py, same group).
@pytest.mark.xdist_group("connection-floods")
def test_connection_and_request_floods(tmp_path: Path, backend: str, many_files: None) -> None:
    src = random_file(tmp_path / "f.bin", 8 * MiB)
    flood: list[socket.socket] = []
    with swarm(tmp_path, backend) as s:
        try:
            _floods(s, tmp_path, src, flood)
        finally:
            for c in flood:
                c.close()


def _floods(s: Swarm, tmp_path: Path, src: Path, flood: list[socket.socket]) -> None:
    seed, cid_hex, port = _share(s, "seed", src)
    cid = bytes.fromhex(cid_hex)
    rss0 = rss_kib(seed.pid)
    # FLOOD connections from one address: the per-address limit holds.
    flood += _open_many(port, FLOOD, "127.0.0.2")
    assert len(flood) >= FLOOD * 3 // 4, f"only {len(flood)} connections opened"
    # Connections still in the listen backlog look open until the seeder
    # accepts them and closes the excess: give a busy machine time for that.
    deadline = time.monotonic() + 15
    while (held := sum(_still_open(c) for c in flood)) > 64 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held <= 64, f"{held} connections from one address are held"
    # An honest peer from another address is served during the flood.
    leech = s.peer(
        "leech", "get", cid_hex, "-o", str(tmp_path / "a.bin"), "--json", "--bind", "127.0.0.3"
    )
    # A client that pipelines PIPELINED requests and reads every answer.
    sock = handshake(port, cid, host="127.0.0.1", chunks=8)
    replies: Counter[str] = Counter()

    def reader() -> None:
        try:
            while sum(replies.values()) < PIPELINED:
                kind, body = read_frame(sock)
                if kind == DATA:
                    replies["data"] += 1
                elif kind == REJECT:
                    replies["busy" if b"busy" in body else "other-reject"] += 1
        except (OSError, ConnectionError):
            replies["closed"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        # Distinct requests (a duplicate of an outstanding one is owed once):
        # 16-byte blocks of the file's 8 chunks.
        for k0 in range(0, PIPELINED, 5000):
            sock.sendall(
                b"".join(
                    message(REQUEST, idx=k % 8, off=(k // 8) * 16, len=16)
                    for k in range(k0, k0 + 5000)
                )
            )
        t.join(timeout=90)
    finally:
        sock.close()
    assert not t.is_alive(), f"replies stopped coming: {replies}"
    assert replies["data"] + replies["busy"] == PIPELINED, replies
    assert replies["busy"] > 0, "no request was refused: the queue limit did not hold"
    assert _pushes_back(port, cid), "the seeder kept reading from a client that never reads"
    grew = rss_kib(seed.pid) - rss0
    assert grew < RSS_GROWTH_LIMIT_KIB, f"seeder grew by {grew} KiB"
    _out, err = leech.communicate(timeout=90)
    assert leech.returncode == 0, err.decode()
    assert (tmp_path / "a.bin").read_bytes() == src.read_bytes()
    assert seed.poll() is None
