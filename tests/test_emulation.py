"""The emulated network of scripts/swarm.py: own namespace, an address per peer, tc caps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from swarm import Network, SwarmError, remove_work, run_swarm, sha256_file

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="needs root and iproute2 (ip, tc)"
)
MiB = 1 << 20


@needs_root
@pytest.mark.parametrize("backend", ["reactor", "proactor"])
def test_emulated_swarm_uses_own_addresses_and_caps(backend: str) -> None:
    rate = 4_000_000
    size = 4 * MiB
    try:
        res = run_swarm(
            peers=3,
            seeders=1,
            size=size,
            transport=backend,
            emulate=True,
            up_rates=[rate] * 3,
            timeout=120,
        )
        hosts = {p.host for p in res.peers}
        assert len(hosts) == 3 and all(h.startswith("127.0.0.") and h != "127.0.0.1" for h in hosts)
        for p in res.leechers:
            assert p.out is not None and sha256_file(p.out) == res.source_digest
            # Other peers are seen at their own addresses, not at 127.0.0.1.
            senders = {name.split("@")[1].split(":")[0] for name in p.result["bytes_per_peer"]}  # type: ignore[union-attr]
            assert senders <= hosts
        # Every byte comes from capped uploaders: two leechers together can
        # receive at most 3 * rate (seeder + each other).
        assert res.seconds >= 2 * size / (3 * rate) * 0.9
    finally:
        remove_work()
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    # This run's namespace (others may run beside it in other test workers).
    mine = f"peer-swarm-{os.getpid()}"
    assert mine not in ns.split(), "the namespace must be removed afterwards"


def test_emulation_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SwarmError, match="needs root"), Network(emulate=True):
        pass
