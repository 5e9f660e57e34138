"""Addresses and ports on the command line: IPv6, validation, the defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.app import check_port, parse_address, where
from peerd.errors import PeerError


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:7070", ("127.0.0.1", 7070)),
        ("[::1]:7070", ("::1", 7070)),
        ("[2001:db8::7]:1", ("2001:db8::7", 1)),
        ("tracker.example:65535", ("tracker.example", 65535)),
    ],
)
def test_addresses_read(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text, "tracker") == want


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", ":7070", "[::1:7070", "h:x", "h:-1"]
)
def test_bad_addresses_say_how_to_write_one(text: str) -> None:
    with pytest.raises(PeerError, match=r"HOST:PORT \(port 1-65535\)"):
        parse_address(text, "tracker")


def test_ports_and_where() -> None:
    assert check_port(0) == 0 and check_port(65535) == 65535
    for bad in (-1, 65536, 70000):
        with pytest.raises(PeerError, match="1-65535"):
            check_port(bad)
    assert where("::", 7000) == "port 7000 on every interface"
    assert where("0.0.0.0", 7000) == "port 7000 on every interface"
    assert where("::1", 7000) == "[::1]:7000"
    assert where("127.0.0.1", 7000) == "127.0.0.1:7000"


def test_a_port_out_of_range_is_one_line_not_a_wrap(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "share", str(f), "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PEER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "peer: error: --port 70000 is not a port: use 1-65535, or 0 for any free port"
    )


def test_my_address_is_an_address_of_this_machine() -> None:
    import ipaddress

    from cli.app import _my_address

    address = ipaddress.ip_address(_my_address())
    assert not address.is_unspecified and not address.is_multicast


def test_a_tracker_that_cannot_listen_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data",
                str(tmp_path / "t"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PEER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "peer: error:" in line]
    assert lines == [f"peer: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in proc.stderr


def _peer(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PEER_HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


def test_version_and_a_bad_timeout(tmp_path: Path) -> None:
    version = _peer("--version", home=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("peer ")
    assert "(protocol 2)" in version.stdout
    bad = _peer("get", "ab" * 32, "--timeout", "-1", home=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "peer: error: --timeout -1 is not a positive number of seconds"


def test_output_ending_in_a_slash_is_a_directory(tmp_path: Path) -> None:
    # Nothing to get from (the tracker is not there): the directory is made
    # first, and no file named after it appears.
    target = tmp_path / "newdir"
    res = _peer("get", "ab" * 32, "-o", f"{target}/", "--tracker", "127.0.0.1:9", home=tmp_path)
    assert res.returncode == 1
    assert target.is_dir()


def test_json_failures_are_json_and_an_unreachable_tracker_is_said_once(tmp_path: Path) -> None:
    res = _peer("get", "ab" * 32, "--json", "--tracker", "127.0.0.1:9", home=tmp_path)
    assert res.returncode == 1
    assert json.loads(res.stdout) == {
        "error": "cannot reach tracker 127.0.0.1:9: Connection refused "
        "(is a tracker running there? `peer tracker` starts one)",
        "code": 1,
    }
    assert res.stderr.count("127.0.0.1:9") == 1, res.stderr


def test_help_names_what_a_value_is(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "cli", "get", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PEER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )
    assert res.returncode == 0
    for metavar in ("SECONDS", "HOST:PORT", "RATE", "KEY", "ADDR", "PORT", "PATH"):
        assert metavar in res.stdout, metavar
    for placeholder in ("<float>", "<int>", "<list[str]>"):
        assert placeholder not in res.stdout, placeholder
    top = subprocess.run(
        [sys.executable, "-m", "cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PEER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
    )
    assert "PEER_HOME" in top.stdout and "PEER_TRACKER" in top.stdout
