"""Helpers for end-to-end tests: real tracker and peer processes on loopback."""

from __future__ import annotations

import json
import os
import random
import re
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

# Runs the real ``peer`` command with some of the product's module constants
# set first (PEER_TEST_PATCH, JSON {"module.NAME": value}): a real process
# whose deadlines are shortened, so a test need not wait out 15-30 s timeouts.
PATCHED_PEER = """
import importlib, json, os, sys
for name, value in json.loads(os.environ.pop("PEER_TEST_PATCH")).items():
    module, _, attr = name.rpartition(".")
    mod = importlib.import_module(module)
    assert hasattr(mod, attr), name
    setattr(mod, attr, value)
sys.argv[0] = "peer"
from cli.app import main
main()
"""


def listen_port(text: str) -> int | None:
    """The port in a seeder's "seeding NAME on HOST:PORT; ..." line (or None)."""
    m = re.search(r" on (?:port (\d+) on every interface|\S+:(\d+));", text)
    if not m:
        return None
    return int(m.group(1) or m.group(2))


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _bindable(port: int) -> bool:
    """Can a listener bind ``port`` on every interface (IPv6 and IPv4, or IPv4 alone)?"""
    try:
        if socket.has_ipv6:
            with socket.socket(socket.AF_INET6) as s6:
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s6.bind(("::", port))
        else:
            with socket.socket() as s4:
                s4.bind(("0.0.0.0", port))
    except OSError:
        return False
    return True


def content_id_of(line: str) -> str | None:
    """The content id (64 hex) ``peer share`` printed: bare, or in a ``peer:ID?...`` link."""
    m = re.fullmatch(r"(?:peer:)?([0-9a-f]{64})(?:\?\S*)?", line.strip())
    return m.group(1) if m else None


def free_port(*, and_plus: int = 0) -> int:
    """A port free on every interface, outside the kernel's ephemeral range;
    with ``and_plus``, port + and_plus as well (a Redis cluster bus).

    The tests run in parallel and some open hundreds of connections: a port
    the kernel handed out (bind to port 0) may be some connection's local
    port by the time a tracker binds it.
    """
    ephemeral = _ephemeral_ports()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 32000 - and_plus)
        ports = (port, port + and_plus) if and_plus else (port,)
        if not any(p in ephemeral for p in ports) and all(map(_bindable, ports)):
            return port
    raise AssertionError("no free port found")


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

    def __init__(self, root: Path, transport: str, patch: dict[str, object] | None = None) -> None:
        self.root = root
        self.transport = transport
        self.patch = patch or {}
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

    def command(self, *args: str, patch: dict[str, object] | None = None) -> list[str]:
        """argv of ``peer ARGS`` (through PATCHED_PEER when constants are patched)."""
        if patch or self.patch:
            return [PY, "-c", PATCHED_PEER, *args]
        return [PY, "-m", "cli", *args]

    def _env(self, name: str, patch: dict[str, object] | None) -> dict[str, str]:
        env = self.env(self.home(name))
        if patch or self.patch:
            env["PEER_TEST_PATCH"] = json.dumps({**self.patch, **(patch or {})})
        return env

    def home(self, name: str) -> Path:
        home = self.root / name
        home.mkdir(exist_ok=True)
        return home

    def start_tracker(self, *, new_port: bool = False) -> subprocess.Popen[bytes]:
        """Start the tracker (on the same port as before unless ``new_port``)."""
        if new_port:
            self.tracker_port = free_port()
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
        self,
        name: str,
        *args: str,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        patch: dict[str, object] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            self.command(*args, patch=patch),
            env=self._env(name, patch),
            stdout=stdout,
            stderr=stderr,
        )
        self.procs.append(proc)
        return proc

    def run(
        self,
        name: str,
        *args: str,
        timeout: float = 60,
        patch: dict[str, object] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args, patch=patch),
            env=self._env(name, patch),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def key(self, name: str) -> str:
        """NAME's public key, as ``peer id`` prints it (read here: no process)."""
        from peerd.content.identity import Identity

        return Identity.load_or_create(self.home(name)).public_hex

    def key_cli(self, name: str) -> str:
        """NAME's public key from a real ``peer id``."""
        out = self.run(name, "id")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def share(self, name: str, path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        proc = self.peer(name, "share", str(path), *extra)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        cid = content_id_of(line)
        assert cid is not None, f"share printed {line!r}; stderr: {self._err(proc)}"
        return proc, cid

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
def swarm(root: Path, transport: str, patch: dict[str, object] | None = None) -> Iterator[Swarm]:
    """A tracker, and every process started through it stopped at the end.

    ``patch`` sets product constants in every ``peer`` process (PATCHED_PEER).
    """
    s = Swarm(root, transport, patch)
    try:
        for attempt in range(3):  # a port taken between free_port() and the bind
            try:
                s.start_tracker(new_port=attempt > 0)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        yield s
    finally:
        s.close()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path
