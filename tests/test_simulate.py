"""The in-memory swarm simulator: correctness invariants on small swarms.

The T / T_min bound asserted here is a property of the scheduler (how well
it uses every peer's upload), measured on the virtual clock; it does not
depend on the speed of this machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim import SimConfig, Simulation, leecher_rates, run, t_min

ROOT = Path(__file__).resolve().parent.parent


def _check(cfg: SimConfig) -> None:
    sim = Simulation(cfg)
    r = sim.run()
    # Every leecher completes and holds every chunk, each stored exactly once.
    assert all(t < float("inf") for t in r.completed)
    assert r.received == [cfg.chunks] * cfg.n
    assert all(all(node.have) for node in sim.nodes)
    # Every chunk that arrived was sent; what was sent and not yet arrived is
    # at most one chunk per link still on the wire when the last leecher ended.
    arrived = (cfg.n * cfg.chunks + r.duplicates) * cfg.chunk_size
    on_the_wire = sum(r.uploaded) - arrived
    assert 0 <= on_the_wire <= len(sim.nodes) * cfg.chunk_size
    # No node exceeded its upload rate: its link was never busy longer than the run
    # (a chunk may be still on the wire when the last leecher finishes).
    for node, busy in zip(sim.nodes, r.busy, strict=True):
        assert busy <= r.T + cfg.chunk_size / (node.rate * (1 - cfg.loss)) + 1e-9
        assert node.uploaded <= node.rate * busy + 1e-6
    # Every connection was authenticated with real signatures.
    assert r.handshakes >= 2 * cfg.n
    assert r.T >= r.T_min
    assert r.ratio < 2.0


@pytest.mark.parametrize("hetero", [False, True])
def test_small_swarm_completes_near_the_bound(hetero: bool) -> None:
    _check(SimConfig(n=12, chunks=48, heterogeneous=hetero, seed=7))


class _OneHeap(Simulation):
    """Every delivery through the heap: the order the FIFO beside it must keep."""

    def _deliver(self, s, data, leave):  # type: ignore[no-untyped-def]
        if self.cfg.loss:
            arrive = leave + self._lossy_delay(len(data), s.node, s.remote)
        else:
            arrive = leave + s.node.delay + s.remote.delay
        arrive = s.arrive_after = max(arrive, s.arrive_after)
        self.at(arrive, self._on_bytes, s.other, data)


@pytest.mark.parametrize("loss", [0.0, 0.03])
def test_the_delivery_fifo_keeps_the_order_of_one_heap(loss: float) -> None:
    # With loss some deliveries are due before the FIFO's tail and take the
    # heap: the run must still be event for event the one-heap run.
    cfg = SimConfig(n=20, chunks=32, delay=0.03, loss=loss, heterogeneous=True, verify=False)
    fast, slow = Simulation(cfg).run(), _OneHeap(cfg).run()
    assert (fast.T, fast.events, fast.duplicates, fast.completed) == (
        slow.T,
        slow.events,
        slow.duplicates,
        slow.completed,
    )


def test_delay_and_loss() -> None:
    _check(SimConfig(n=8, chunks=40, delay=0.05, loss=0.02, seed=3))


def test_deterministic_for_a_seed() -> None:
    cfg = SimConfig(n=6, chunks=24, seed=11)
    assert run(cfg).T == run(cfg).T


def test_lower_bound_formula() -> None:
    rates = leecher_rates(4, 100.0, heterogeneous=True)
    assert rates == [100.0, 25.0, 100.0, 25.0]
    # Seeder-bound: F / u_s dominates.
    assert t_min(1000, 100.0, [100.0] * 4) == 10.0
    # Swarm-bound: N F / (u_s + sum u_i).
    assert t_min(1000, 100.0, [1.0] * 4) == pytest.approx(4000 / 104)


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"chunks": 0}, {"loss": 0.7}, {"delay": -1.0}, {"seed_rate": 0.0}]
)
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**kwargs)  # type: ignore[arg-type]


def test_cli_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--n", "5", "--chunks", "16"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("|     5 |")]
    assert len(rows) == 2
    ratio = float(rows[0].split("|")[5])
    assert 1.0 <= ratio < 2.0


def test_cli_rejects_bad_options() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "simulate.py"), "--n", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "simulate:" in proc.stderr and "Traceback" not in proc.stderr


def test_the_product_never_imports_the_simulator() -> None:
    # The simulator drives the product's pure code from outside: every module
    # of peerd, tracker and cli imports without it, in a fresh interpreter
    # where it could be found (the repository is on sys.path).
    code = (
        "import importlib, pkgutil, sys\n"
        "for top in ('peerd', 'tracker', 'cli'):\n"
        "    pkg = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.')))\n"
        "print(len([m for m in sys.modules if m.split('.')[0] in ('peerd', 'tracker', 'cli')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert int(out[1]) > 20  # the walk did import the product


def test_no_product_source_names_the_simulator() -> None:
    # The same rule read from the source, for imports behind a function or a
    # condition that an import does not execute.
    import ast

    for top in ("peerd", "tracker", "cli"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] != "sim", f"{path} imports {name}"
