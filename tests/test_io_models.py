"""The servers of scripts/bench_io_models.py answer correctly, so the benchmark cannot rot.

Each model's server runs in its own process (``--serve MODEL``) and gets 4
connections, all active for ~0.2 s of closed-loop request/response; every
answer is checked byte for byte, including a request split across two
writes and two requests in one write. One test runs the whole driver (its
load-generator processes and its table) on a tiny matrix.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerd.errors import TransportUnavailable
from peerd.transport import get_transport

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_io_models.py"
MODELS = (
    "blocking",
    "busypoll",
    "select",
    "poll",
    "epoll",
    "sigio",
    "uring",
    "reactor",
    "proactor",
)
REQUEST = bytes(range(64))
RESPONSE = b"0123456789abcdef" * 4


def _skip_without_io_uring(model: str) -> None:
    if model in ("uring", "proactor"):
        try:
            get_transport("proactor")
        except TransportUnavailable as exc:
            pytest.skip(str(exc))


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = s.recv(n - len(got))
        if not data:
            raise AssertionError(f"server closed the connection after {len(got)} of {n} bytes")
        got += data
    return got


def _nothing_more(s: socket.socket) -> None:
    ready, _, _ = select.select([s], [], [], 0.05)
    assert not ready or s.recv(4096, socket.MSG_PEEK) == b"", "server sent more than asked"


@pytest.mark.parametrize("model", MODELS)
def test_server_answers_every_request(model: str) -> None:
    _skip_without_io_uring(model)
    server = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--serve", model],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 15)
        assert ready, f"{model} server did not start"
        word, port = server.stdout.readline().split()
        assert word == "READY"
        conns = [socket.create_connection(("127.0.0.1", int(port)), timeout=5) for _ in range(4)]
        answered = 0
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            for s in conns:
                s.sendall(REQUEST)
            for s in conns:
                assert _recv_exactly(s, 64) == RESPONSE
                answered += 1
        a, b = conns[0], conns[1]
        a.sendall(REQUEST[:10])  # one request in two pieces: one answer, after the second
        time.sleep(0.02)
        _nothing_more(a)
        a.sendall(REQUEST[10:])
        assert _recv_exactly(a, 64) == RESPONSE
        b.sendall(REQUEST * 2)  # two requests in one write: two answers
        assert _recv_exactly(b, 128) == RESPONSE * 2
        for s in conns:
            _nothing_more(s)
            s.close()
        assert answered >= 4
        assert server.poll() is None, f"{model} server died"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def test_driver_measures_a_tiny_matrix() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--models",
            "epoll",
            "--conns",
            "4",
            "--active",
            "50",
            "--warm",
            "0.05",
            "--window",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| epoll")]
    assert len(rows) == 1, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        _model, c, a, active, rps = cells[:5]
        assert c == "4"
        assert active == ("2" if a == "50" else "4")
        assert float(rps.replace(",", "")) > 0, row  # requests were answered at all
        assert cells[-1] == "", row  # no errors, nothing left unanswered


def test_driver_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "kqueue"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "unknown model(s) kqueue" in out.stderr
