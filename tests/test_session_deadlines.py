"""Idle timeout and keep-alive on real sockets (issue 14, finding 5).

An in-process seeder with its deadlines shortened (the rules, not the
numbers, are under test: docs/PROTOCOL.md gives 20 s / 60 s), and a raw
client written from the spec (tests/hostile.py) on a thread: a client that
goes silent gets KEEPALIVEs, then GOODBYE ``idle`` and the close; one that
sends KEEPALIVE keeps its connection.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgpack
import pytest
import trio

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest, build_manifest
from peerd.content.store import SourceFile
from peerd.node import session as session_module
from peerd.node.node import Node
from peerd.transport import Transport

from .hostile import GOODBYE, KEEPALIVE, handshake, message, read_frame

MiB = 1 << 20


def _frames_until_closed(sock: socket.socket, limit: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Read frames for up to ``limit`` seconds: (frames, closed by the peer)."""
    frames: list[tuple[int, bytes]] = []
    sock.settimeout(0.2)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            frames.append(read_frame(sock))
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            return frames, True
    return frames, False


def _silent_client(port: int, cid: bytes) -> tuple[list[tuple[int, bytes]], bool, float]:
    sock = handshake(port, cid, chunks=2)
    t0 = time.monotonic()
    try:
        frames, closed = _frames_until_closed(sock, 8)
    finally:
        sock.close()
    return frames, closed, time.monotonic() - t0


def _talking_client(port: int, cid: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    sock = handshake(port, cid, chunks=2)
    try:
        frames: list[tuple[int, bytes]] = []
        for _ in range(8):  # 4 s, twice the idle timeout
            sock.sendall(message(KEEPALIVE))
            got, closed = _frames_until_closed(sock, 0.5)
            frames += got
            if closed:
                return frames, True
        return frames, False
    finally:
        sock.close()


async def test_silent_peer_gets_keepalives_then_idle_goodbye(
    tmp_path: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "KEEPALIVE_EVERY", 0.5)
    monkeypatch.setattr(session_module, "IDLE_TIMEOUT", 2.0)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(2 * MiB))
    ident = Identity.generate()
    manifest = Manifest(build_manifest(src), ()).signed(ident)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(Node(ident, transport, tracker=("127.0.0.1", 9)).run)
            await node.add_content(manifest, SourceFile(src, manifest.info))
            cid = manifest.content_id
            frames, closed, took = await trio.to_thread.run_sync(_silent_client, node.port, cid)
            kinds = [k for k, _ in frames]
            assert closed, f"a silent peer was not closed: {kinds}"
            assert 1.5 <= took <= 6, took
            assert KEEPALIVE in kinds, kinds
            goodbyes = [msgpack.unpackb(b)["reason"] for k, b in frames if k == GOODBYE]
            assert goodbyes and goodbyes[-1].startswith("idle"), goodbyes
            frames, closed = await trio.to_thread.run_sync(_talking_client, node.port, cid)
            assert not closed, "a peer that sends KEEPALIVE was closed as idle"
            nursery.cancel_scope.cancel()
