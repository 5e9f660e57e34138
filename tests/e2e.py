"""Helpers for end-to-end tests: real tracker and peer processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("process did not stop on SIGTERM") from None


class Swarm:
    """Starts processes for one test and stops every one of them afterwards."""

    def __init__(self, root: Path, transport: str) -> None:
        self.root = root
        self.transport = transport
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tracker_port = free_port()
        self.tracker: subprocess.Popen[bytes] | None = None

    def env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PEER_HOME=str(home),
            PEER_TRACKER=f"127.0.0.1:{self.tracker_port}",
            PEER_TRANSPORT=self.transport,
        )
        return env

    def home(self, name: str) -> Path:
        home = self.root / name
        home.mkdir(exist_ok=True)
        return home

    def start_tracker(self) -> subprocess.Popen[bytes]:
        self.tracker = subprocess.Popen(
            [
                PY,
                "-m",
                "cli",
                "tracker",
                "--port",
                str(self.tracker_port),
                "--data",
                str(self.root / "tracker"),
                "--transport",
                self.transport,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.procs.append(self.tracker)
        wait_port(self.tracker_port, self.tracker)
        return self.tracker

    def peer(
        self, name: str, *args: str, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [PY, "-m", "cli", *args], env=self.env(self.home(name)), stdout=stdout, stderr=stderr
        )
        self.procs.append(proc)
        return proc

    def run(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "cli", *args],
            env=self.env(self.home(name)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def key(self, name: str) -> str:
        out = self.run(name, "id")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def share(self, name: str, path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        proc = self.peer(name, "share", str(path), *extra)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert len(line) == 64, f"share printed {line!r}; stderr: {self._err(proc)}"
        return proc, line

    @staticmethod
    def _err(proc: subprocess.Popen[bytes]) -> str:
        if proc.poll() is None:
            return "(still running)"
        return proc.stderr.read().decode() if proc.stderr else ""

    def get(
        self, name: str, cid: str, out: Path, *extra: str, timeout: float = 120
    ) -> dict[str, Any]:
        res = self.run(name, "get", cid, "-o", str(out), "--json", *extra, timeout=timeout)
        assert res.returncode == 0, f"get failed ({res.returncode}): {res.stderr}"
        result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return result

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


@contextmanager
def swarm(root: Path, transport: str) -> Iterator[Swarm]:
    s = Swarm(root, transport)
    try:
        s.start_tracker()
        yield s
    finally:
        s.close()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path
