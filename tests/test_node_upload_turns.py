"""Upload turns in a real node: a connection that stops moving cannot hold the link.

A node uploads on one connection at a time (``peerd.engine.scheduling.UploadTurns``).
A remote that asks for chunks and then never reads leaves that connection's
writer blocked in ``sendfile`` while it holds the turn; the turn must stop
counting after ``TURN_STALL`` without progress so the node keeps serving
everyone else.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .e2e import listen_port, random_file, swarm
from .hostile import REQUEST, handshake, message

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])
MiB = 1 << 20


def test_a_peer_that_stops_reading_does_not_stall_other_uploads(
    tmp_path: Path, backend: str
) -> None:
    src = random_file(tmp_path / "f.bin", 16 * MiB)
    with swarm(tmp_path, backend) as s:
        seed, cid_hex = s.share("seed", src, "--chunk-size", "1MiB")
        assert seed.stderr is not None
        line = seed.stderr.readline().decode()
        port = listen_port(line)
        assert port is not None, line
        stuck = handshake(port, bytes.fromhex(cid_hex), chunks=16)
        try:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # Every chunk, and never a byte read: far more than the socket
            # buffers hold, so the seeder's writer for it blocks mid-chunk.
            stuck.sendall(b"".join(message(REQUEST, idx=i, off=0, len=MiB) for i in range(16)))
            out = tmp_path / "copy.bin"
            result = s.get("leech", cid_hex, out, "--timeout", "30", timeout=60)
            assert out.read_bytes() == src.read_bytes()
            assert result["bytes"] == 16 * MiB
        finally:
            stuck.close()
