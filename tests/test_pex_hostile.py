"""A hostile peer's PEX against a real downloading ``peer get`` (both transports).

The hostile peer (tests/hostile.py: written from docs/PROTOCOL.md, no peerd
code) connects to a getter that downloads from a slow no-tracker sharer and
tells it, by PEX, of 96 loopback addresses where the test listens, plus
addresses the getter must never dial (unspecified, multicast, another family,
the getter itself). The getter dials each good address once, about this
content, never more than its connection target at a time, none of the bad
ones; a PEX sooner than the rate allows is ignored, and the connection
stays (an honest PEX may arrive late behind a long DATA).
"""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import pytest

from peerd.app.link import parse_link

from .e2e import Swarm, free_port, wait_port
from .hostile import GOODBYE, HELLO, handshake, message, read_raw_message, read_until_closed
from .test_pex_swarm import PATCH, _log_file, start_sharer

pytestmark = pytest.mark.parametrize("backend", ["reactor", "proactor"])

PEX = 13
CHUNK = 32 * 1024
SIZE = 1024 * 1024  # 32 chunks; at 64 KiB/s the download outlasts the test
MAX_PEERS = 50  # the getter's connection target (docs/PROTOCOL.md, "Peer exchange")


def _listeners(host: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        sock.listen(4)
        sock.setblocking(False)
        out.append(sock)
    return out


def _accept_all(listeners: list[socket.socket], seconds: float) -> dict[int, list[socket.socket]]:
    """Connections accepted within ``seconds``, by listening port."""
    got: dict[int, list[socket.socket]] = {}
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(listeners, [], [], left)
        for sock in ready:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                continue
            got.setdefault(sock.getsockname()[1], []).append(conn)
    return got


def _downloading(log: Path, deadline: float) -> None:
    """Wait until the getter is connected to the sharer: its download has
    started (before that it answers a handshake with ``wrong-content``)."""
    while "connected to peer" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_a_hostile_pex_cannot_make_a_getter_dial_past_its_cap(tmp_path: Path, backend: str) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(SIZE))
    good = _listeners("127.0.0.1", 96)
    trap4 = _listeners("127.0.0.1", 1)[0]
    trap6 = _listeners("::1", 1)[0]
    accepted: dict[int, list[socket.socket]] = {}
    s = Swarm(tmp_path, backend, PATCH)  # no tracker: only the link's sharer
    try:
        _sharer, only_x = start_sharer(s, src, "--chunk-size", "32KiB", "--up-limit", "64KiB")
        cid = parse_link(only_x).content_id
        port = free_port()
        log = _log_file(tmp_path / "getter.log")
        getter = s.peer(
            "getter",
            "get",
            "-v",
            only_x,
            "-o",
            str(tmp_path / "out.bin"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "60",
            stderr=log,
        )
        os.close(log)
        wait_port(port, getter)
        _downloading(tmp_path / "getter.log", time.monotonic() + 20)
        hostile = handshake(port, cid, chunks=SIZE // CHUNK)
        try:
            ports = [sock.getsockname()[1] for sock in good]
            bad = [
                ["0.0.0.0", trap4.getsockname()[1]],  # would reach this machine
                ["224.0.0.1", trap4.getsockname()[1]],
                ["::1", trap6.getsockname()[1]],  # another family than the connection's
                ["127.0.0.1", port],  # the getter itself
            ]
            first = [["127.0.0.1", p] for p in ports[:46]] + bad
            hostile.sendall(message(PEX, added=first))
            time.sleep(PATCH["peerd.engine.pex.PEX_INTERVAL"] / 2 + 0.2)  # just within the rate
            hostile.sendall(message(PEX, added=[["127.0.0.1", p] for p in ports[46:]]))
            # And one more at once: too soon.
            hostile.sendall(message(PEX, added=[["127.0.0.1", ports[0]]]))
            accepted = _accept_all([*good, trap4, trap6], 3.0)
            assert trap4.getsockname()[1] not in accepted
            assert trap6.getsockname()[1] not in accepted
            assert all(len(conns) == 1 for conns in accepted.values())  # one dial per address
            # The getter's target is 50 connections (the sharer, the hostile
            # peer and the sharer's dial among them): the rest wait.
            assert 40 <= len(accepted) <= MAX_PEERS - 2, len(accepted)
            for conns in accepted.values():  # each a dial about this content
                conns[0].settimeout(5)
                kind, hello, _ = read_raw_message(conns[0])
                assert kind == HELLO and hello["id"] == cid
            # The third PEX came too soon: ignored (its one address was
            # dialled for the first PEX, and only once), the connection kept.
            frames, closed = read_until_closed(hostile, 1.0)
            assert not closed
            assert not [kind for kind, _ in frames if kind == GOODBYE]
        finally:
            hostile.close()
        assert getter.poll() is None  # the download goes on
    finally:
        s.close()
        for conns in accepted.values():
            for conn in conns:
                conn.close()
        for sock in [*good, trap4, trap6]:
            sock.close()
