"""The benchmark scripts run, on the smallest inputs, so their figures stay reproducible.

docs/BENCHMARKS.md gives a command for every figure; a script that no longer
runs makes those figures unreproducible (``bench_tracker.py --floor`` once
broke that way, unseen, when ``announce_frame`` took a keyword argument).
Each test runs one script end to end on a tiny load, both transports, and
checks the shape of what it prints: one row per transport, positive
figures. No speed is asserted. (``bench_io_models.py`` has its own tests.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from peerd.errors import TransportUnavailable
from peerd.transport import get_transport

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _both_transports() -> None:
    try:
        get_transport("proactor")
    except TransportUnavailable as exc:
        pytest.skip(str(exc))


def _run(script: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return res


def _rows(out: str, first: str) -> list[list[str]]:
    """The markdown table rows whose first cell is ``first``, split into cells."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            rows.append(cells)
    return rows


def test_bench_tracker_alternated_floor_run() -> None:
    out = _run(
        "bench_tracker.py",
        *("--conns", "4", "--seconds", "0.3", "--warmup", "0.1", "--workers", "1"),
        *("--contents", "10", "--entries", "1000", "--chunks", "16"),
        *("--floor", "--alternate", "1"),
    ).stdout
    assert re.search(r"median announces/s \(proactor/reactor\): \d+\.\d+", out), out
    rows = _rows(out, "memory")
    assert sorted(r[1] for r in rows) == ["proactor", "reactor"], out
    for row in rows:
        assert row[2] == "4" and int(row[3]) > 0, row  # C, announces/s


def test_bench_tracker_refuses_entries_it_cannot_spread() -> None:
    res = _run("bench_tracker.py", "--entries", "100", code=2)
    assert "--entries: 1000 identities" in res.stderr


def test_bench_mux_runs_both_muxes() -> None:
    out = _run("bench_mux.py", "--conns", "4", "--seconds", "0.3", "--runs", "1").stdout
    rows = _rows(out, "4")
    assert sorted(r[1] for r in rows) == ["proactor", "reactor"], out
    for row in rows:
        assert int(row[2]) > 0 and float(row[3]) > 0, row  # req/s, server us/req


def test_bench_transports_tiny_matrix() -> None:
    out = _run(
        "bench_transports.py",
        *("--gib", "0.01", "--repeat", "1", "--cases", "plain,file", "--conns", "1"),
        "--no-write",
    ).stdout
    for case in ("plain, 1 conn", "file, 1 conn"):
        (line,) = [x for x in out.splitlines() if x.startswith(case)]
        for model in ("blocking", "reactor", "proactor"):
            assert re.search(rf"\b{model}\s+\d+ MB/s", line), line
        assert re.search(r"p/r \d+\.\d+", line), line


def test_bench_swarm_one_small_run() -> None:
    out = _run("bench_swarm.py", "--size", "4MiB", "--runs", "1").stdout
    for transport in ("reactor", "proactor"):
        (row,) = _rows(out, f"verified download, {transport}")
        assert int(row[1]) > 0, row  # MB/s
