"""A hostile client against a real tracker (issue 14: findings 4, 7, 8, 10).

Each test reproduces one attack with raw frames from docs/PROTOCOL.md
(``tests/hostile.py`` framing) against a tracker process (``python -m
tracker``: its RSS is measured from /proc) or an in-process one, and checks
the bound that holds: memory growth, the documented ERROR code, slots freed.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest
import trio

from peerd.content.identity import Identity
from peerd.errors import TrackerError
from peerd.node.tracker_client import TrackerClient
from peerd.transport import Transport
from peerd.wire import Auth, Challenge, ScrapeResult, TrackerClientConnection
from tracker._budget import LARGE_FRAME, Budget, Intake
from tracker.server import TrackerLimits

from .hostile import (
    AUTH,
    AUTH_CONTEXT,
    CHALLENGE,
    ERROR,
    GET_MANIFEST,
    OK,
    PUBLISH,
    T_MANIFEST,
    Key,
    TrackerSession,
    message,
    read_message,
    rss_kib,
)
from .test_tracker import (
    _start_process,
    _stop_process,
    fake_manifest,
    read_event,
    running_tracker,
)

MiB = 1 << 20
SCRAPE = 41


def _session(port: int, key: Key, source: str) -> TrackerSession:
    """An authenticated tracker connection from ``source`` (another loopback address)."""
    session = TrackerSession.__new__(TrackerSession)
    session.sock = socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0)
    )
    kind, body = read_message(session.sock)
    assert kind == CHALLENGE, (kind, body)
    session.sock.sendall(message(AUTH, key=key.public, sig=key.sign(AUTH_CONTEXT + body["nonce"])))
    kind, body = read_message(session.sock)
    assert kind == OK, (kind, body)
    return session


def _publish(session: TrackerSession, manifest: bytes) -> None:
    kind, body = session.request(message(PUBLISH, manifest=manifest))
    assert kind == OK, body


def _settled_rss(pid: int, seconds: float) -> int:
    """The highest RSS (KiB) seen over ``seconds``."""
    top = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        top = max(top, rss_kib(pid))
        time.sleep(0.05)
    return top


def _send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass  # refused, closed or timed out: what the tracker does is measured elsewhere

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


# --- finding 7: pipelined GET_MANIFEST whose replies are never read ----------------------
async def test_pipelined_get_manifest_without_reading_stays_bounded(
    transport: Transport, tmp_path: Path
) -> None:
    manifest = fake_manifest(2000, Identity.generate()).encode()  # ~64 KiB
    with trio.fail_after(60):
        proc, port = await _start_process(tmp_path / "data", transport.name)
        try:

            def attack() -> tuple[int, int]:
                session = TrackerSession(port, Key())
                _publish(session, manifest)
                content_id = fake_id(manifest)
                kind, body = session.request(message(GET_MANIFEST, id=content_id))
                assert kind == T_MANIFEST and body["manifest"] == manifest
                before = rss_kib(proc.pid)
                # 20,000 requests (~0.9 MB) asking for ~1.3 GB of answers, never read.
                session.sock.settimeout(3)
                sender = _send_in_background(
                    session.sock, message(GET_MANIFEST, id=content_id) * 20_000
                )
                grown = _settled_rss(proc.pid, 1.0) - before
                # Someone else is still answered.
                other = TrackerSession(port, Key())
                kind, _ = other.request(message(GET_MANIFEST, id=content_id))
                other.close()
                session.close()
                sender.join(5)
                return grown, kind

            grown, kind = await trio.to_thread.run_sync(attack)
            assert kind == T_MANIFEST
            # Main grew by ~300 MiB per 100,000 such requests, linearly; the
            # tracker now stops reading at 1 MiB unsent and shares one frame.
            assert grown < 48 * 1024, f"tracker grew by {grown} KiB"
        finally:
            await _stop_process(proc)


def fake_id(manifest: bytes) -> bytes:
    """The content id of an encoded manifest (PROTOCOL.md: SHA-256 of the info bytes)."""
    return hashlib.sha256(msgpack.unpackb(manifest)["info"]).digest()


# --- finding 4: announces for ids without a manifest -------------------------------------
async def test_announce_without_a_published_manifest_is_refused(
    transport: Transport, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        proc, port = await _start_process(tmp_path / "data", transport.name)
        try:

            def attack() -> tuple[list[str], int]:
                session = TrackerSession(port, Key())
                before = rss_kib(proc.pid)
                codes = []
                for _ in range(40):  # each took ~2.5 MiB on main: a swarm sized from the bits
                    kind, body = session.announce(os.urandom(32), 1, "started", bytes(131072))
                    codes.append(body["code"] if kind == ERROR else f"type {kind}")
                grown = rss_kib(proc.pid) - before
                session.close()
                return codes, grown

            codes, grown = await trio.to_thread.run_sync(attack)
            assert set(codes) == {"not-found"}, codes[:3]
            assert grown < 16 * 1024, f"tracker grew by {grown} KiB"
        finally:
            await _stop_process(proc)


# --- finding 4: PUBLISH bodies charged from their header -----------------------------------
async def test_large_publish_bodies_are_charged_before_they_are_buffered(
    transport: Transport, tmp_path: Path
) -> None:
    # 128 MiB of memory: a quarter (at least one largest frame, 40 MiB) for
    # requests being received, so one 40 MiB body at a time.
    length = 40 * MiB
    with trio.fail_after(60):
        proc, port = await _start_process(
            tmp_path / "data", transport.name, "--max-memory", "128MiB"
        )
        try:

            def attack() -> tuple[int, list[str], str]:
                before = rss_kib(proc.pid)
                sessions = [_session(port, Key(), f"127.0.0.{i}") for i in range(2, 6)]
                header = struct.pack(">BI", PUBLISH, length)
                codes = []
                for i, s in enumerate(sessions):
                    s.sock.sendall(header)
                    s.sock.settimeout(0.5 if i == 0 else 5)
                    try:
                        kind, body = read_message(s.sock)
                        codes.append(body.get("code", f"type {kind}"))
                    except TimeoutError:
                        codes.append("admitted")
                # Fill the admitted body but for its last byte; the refused
                # ones send theirs whole: dropped as they come.
                body = b"\x00" * length
                senders = []
                for i, s in enumerate(sessions):
                    s.sock.settimeout(10)
                    senders.append(_send_in_background(s.sock, body[1:] if i == 0 else body))
                for t in senders:
                    t.join(20)
                grown = _settled_rss(proc.pid, 0.5) - before
                # A refused connection goes on: it is answered after the refusal.
                sessions[1].sock.settimeout(10)
                kind, reply = sessions[1].request(message(SCRAPE, ids=[bytes(32)]))
                after = "ok" if kind == 42 and reply == {"stats": []} else f"{kind} {reply}"
                for s in sessions:
                    s.close()
                return grown, codes, after

            grown, codes, after = await trio.to_thread.run_sync(attack)
            assert codes == ["admitted", "limit", "limit", "limit"], codes
            assert after == "ok", after
            # Main buffered every body whole (4 x 40 MiB).
            assert grown < 80 * 1024, f"tracker grew by {grown} KiB"
        finally:
            await _stop_process(proc)


# --- finding 4: unique manifests cannot fill the disk --------------------------------------
async def test_publishes_stop_at_the_disk_budget(transport: Transport, tmp_path: Path) -> None:
    limits = TrackerLimits(max_disk=2 * MiB)  # 256 KiB per key, 512 KiB per address
    with trio.fail_after(30):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            me = Identity.generate()
            codes = []
            async with await connect(me) as client:
                for i in range(12):  # ~64 KiB each: renaming makes a fresh id
                    try:
                        await client.publish(fake_manifest(2000, me, f"copy{i}.bin"))
                        codes.append("ok")
                    except TrackerError as exc:
                        codes.append(exc.code)
            assert codes[:3] == ["ok"] * 3 and set(codes[4:]) == {"limit"}, codes
            # Other keys from the same address: its quarter, then no more.
            published = codes.count("ok")
            for _ in range(12):
                other = Identity.generate()
                async with await connect(other) as client:
                    try:
                        await client.publish(fake_manifest(2000, other, "x.bin"))
                        published += 1
                    except TrackerError as exc:
                        assert exc.code == "limit"
            assert published <= 8  # 512 KiB / ~64 KiB
            # Another address still has room: a quota is per address, not global.
            async with await connect(Identity.generate(), "127.0.0.7") as client:
                await client.publish(fake_manifest(16, me, "small.bin"))
    db = tmp_path / "manifests.sqlite3"
    assert db.stat().st_size < 4 * MiB


async def test_a_republish_keeps_the_first_signatures(transport: Transport, tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    first = fake_manifest(4, alice)
    other = type(first)(first.info).signed(bob)
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            async with await connect(bob) as client:
                await client.publish(first)
                await client.publish(other)  # OK, and nothing changes
                assert await client.get_manifest(first.content_id) == first


# --- finding 4: one manifest fetched many times by clients that never read --------------------
async def test_large_manifest_replies_are_shared_and_queued_in_pieces(
    transport: Transport, tmp_path: Path
) -> None:
    manifest = fake_manifest(128 * 1024, Identity.generate()).encode()  # 4 MiB
    cid = fake_id(manifest)
    with trio.fail_after(60):
        proc, port = await _start_process(tmp_path / "data", transport.name)
        try:

            def attack() -> int:
                publisher = TrackerSession(port, Key())
                _publish(publisher, manifest)
                publisher.close()
                before = rss_kib(proc.pid)
                stuck = []
                for i in range(16):
                    s = _session(port, Key(), f"127.0.1.{i + 1}")
                    s.sock.sendall(message(GET_MANIFEST, id=cid) * 4)
                    stuck.append(s)
                grown = _settled_rss(proc.pid, 1.0) - before
                for s in stuck:
                    s.close()
                return grown

            grown = await trio.to_thread.run_sync(attack)
            # Main: a fresh encoding (and a copy of the stored bytes) per reply,
            # 64 replies of 4 MiB parked; now one frame, <= ~1.3 MiB queued each.
            assert grown < 64 * 1024, f"tracker grew by {grown} KiB"
        finally:
            await _stop_process(proc)


# --- the input gate itself -------------------------------------------------------------
def test_intake_feeds_whole_frames_and_drops_refused_bodies() -> None:
    def frames(spec: list[tuple[int, int]]) -> bytes:
        return b"".join(struct.pack(">BI", t, n) + bytes([t]) * n for t, n in spec)

    rng = random.Random(14)
    for _ in range(500):
        spec = [
            (rng.choice([34, 36, 41]), rng.choice([0, 3, 100, LARGE_FRAME + 10, 200_000]))
            for _ in range(rng.randint(1, 6))
        ]
        data = frames(spec)
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 8)))
        for total, kept in ((1 << 40, spec), (1000, [f for f in spec if f[1] <= LARGE_FRAME])):
            budget = Budget(total, total)
            intake = Intake(budget, "a")
            fed, refusals, prev = b"", 0, 0
            for cut in [*cuts, len(data)]:
                fed += intake.admit(data[prev:cut])
                prev = cut
                while intake.refused:
                    refusals += 1
                    fed += intake.after_refusal()
            assert fed == frames(kept)
            assert refusals == len(spec) - len(kept)
            while intake.frames:
                intake.release(intake.consumed())
            assert intake.charged == 0 and budget.used == 0


# --- finding 10: idle connections and a busy address ----------------------------------------
async def test_idle_connections_give_way_and_the_client_retries(
    transport: Transport, tmp_path: Path
) -> None:
    limits = TrackerLimits(connections_per_address=4, idle_grace=0.3, handshake_timeout=1.0)
    with trio.fail_after(30):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            # Four authenticated connections that then say nothing.
            idle = [await connect(Identity.generate()) for _ in range(4)]
            await trio.sleep(0.4)
            async with await connect(Identity.generate()) as client:
                assert await client.scrape([bytes(32)]) == []
            for c in idle:
                await c.aclose()
            await trio.sleep(0.1)
            # Four that never authenticate hold their slots until the handshake
            # timeout: the client waits for one instead of failing.
            raw = [await transport.connect("127.0.0.1", connect.port) for _ in range(4)]
            try:
                start = trio.current_time()
                async with await connect(Identity.generate()) as client:
                    assert await client.scrape([bytes(32)]) == []
                assert trio.current_time() - start > 0.5
            finally:
                for r in raw:
                    await r.aclose()


async def test_client_refuses_a_challenge_of_another_version(transport: Transport) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            sock.sendall(message(CHALLENGE, v=1, nonce=os.urandom(32)))
            try:
                sock.recv(100)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with trio.fail_after(10), pytest.raises(TrackerError) as info:
            await TrackerClient.connect(transport, "127.0.0.1", port, Identity.generate())
        assert info.value.code == "unsupported-version"
        assert "version 1" in str(info.value)
    finally:
        listener.close()
        thread.join(5)


# --- finding 8: SCRAPE leaves unknown ids out -------------------------------------------------
async def test_scrape_leaves_out_ids_without_peers(transport: Transport, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            stream = await transport.connect("127.0.0.1", connect.port)
            async with stream:
                conn = TrackerClientConnection()
                me = Identity.generate()
                challenge = await read_event(stream, conn)
                assert isinstance(challenge, Challenge)
                sig = me.sign(b"peer-tracker-auth-v1\x00" + challenge.nonce)
                await stream.send_all(conn.send(Auth(me.public_key, sig)))
                await read_event(stream, conn)
                await stream.send_all(message(SCRAPE, ids=[os.urandom(32) for _ in range(3)]))
                assert await read_event(stream, conn) == ScrapeResult(())
