"""``peer tracker`` logs what it answers: a count per interval at INFO, each
publish and announce at DEBUG (``-v``). Real tracker and peer processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from .e2e import PATCHED_PEER, PY, Swarm, free_port, random_file, wait_port


@pytest.mark.parametrize("verbose", [False, True])
def test_tracker_logs_counts_and_with_v_every_request(tmp_path: Path, verbose: bool) -> None:
    port = free_port()
    env = dict(
        os.environ,
        PEER_HOME=str(tmp_path / "t"),
        PEER_TEST_PATCH=json.dumps({"tracker.server.COUNTS_EVERY": 0.5}),
    )
    argv = [PY, "-c", PATCHED_PEER, "tracker", "--port", str(port), "--data", str(tmp_path / "d")]
    tracker = subprocess.Popen(
        [*argv, *(["-v"] if verbose else [])],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    s = Swarm(tmp_path, "reactor")
    s.tracker_port = port
    try:
        wait_port(port, tracker)
        src = random_file(tmp_path / "f.bin", 50_000)
        _, cid = s.share("seed", src)
        s.get("leech", cid, tmp_path / "copy.bin")
    finally:
        s.close()
        tracker.send_signal(signal.SIGTERM)
        _, err = tracker.communicate(timeout=15)
    text = err.decode()
    assert tracker.returncode == 0, text
    # Every 0.5 s, and the rest of an interval when the tracker stops.
    counts = re.findall(r"last [\d.]+ s: (\d+) announces, (\d+) publishes", text)
    assert counts, text
    assert sum(int(p) for _, p in counts) == 1  # the seeder's one publish
    assert sum(int(a) for a, _ in counts) >= 2  # the seeder's and the leecher's started
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ tracker: last", text, re.M), text
    per_request = [f"publish {cid[:16]} (f.bin, 50000 bytes) from ", f"announce started {cid[:16]}"]
    for line in per_request:
        assert (line in text) == verbose, text
