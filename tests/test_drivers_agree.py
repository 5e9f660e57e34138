"""One engine, two drivers: the node and the simulator make the same decisions.

The same scripted swarm (one seeder, one leecher, a tracker, six chunks with
a short last one) runs through the real node (two in-process nodes over
loopback sockets and an in-process tracker) and through the simulator (the
virtual clock). Every action either engine emits is recorded; the two
drivers must produce the same sequence for the seeder and for the leecher.
Randomness is the engines' only source of difference, so both get the same
seed; the swarm finishes before any rate is measured (RATE_WINDOW), so
timing does not change what is decided.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest, build_manifest
from peerd.content.store import ChunkStore, SourceFile
from peerd.engine import content_engine
from peerd.engine.content_engine import ContentEngine, Dial, Send, SendHave
from peerd.node.node import Node
from peerd.transport import get_transport
from tracker.server import serve_tracker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sim import SimConfig, Simulation  # noqa: E402

CHUNK = 16 * 1024
SIZE = 5 * CHUNK + 1000  # six chunks, the last one short
SEED = 20261207


def _normal(action: Any) -> tuple[Any, ...]:
    """An action without the driver's handles (one connection per engine here)."""
    if isinstance(action, Send):
        msg = action.message
        fields = tuple(getattr(msg, f.name) for f in dataclasses.fields(msg))
        return ("send", type(msg).__name__, *fields)
    if isinstance(action, SendHave):
        return ("have", action.index)
    if isinstance(action, Dial):
        return ("dial",)
    return (type(action).__name__, getattr(action, "reason", ""))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """Record every engine's actions by role, and give every engine the same seed."""
    log: dict[str, list[tuple[Any, ...]]] = {"seeder": [], "leecher": []}
    take = ContentEngine._take
    init = ContentEngine.__init__

    def seeded_init(self: ContentEngine, **kwargs: Any) -> None:
        kwargs["rng"] = random.Random(SEED)
        init(self, **kwargs)

    def recording_take(self: ContentEngine) -> list[Any]:
        out = take(self)
        log["seeder" if self.origin else "leecher"].extend(map(_normal, out))
        return out

    monkeypatch.setattr(ContentEngine, "__init__", seeded_init)
    monkeypatch.setattr(ContentEngine, "_take", recording_take)
    yield log


def _simulated() -> None:
    cfg = SimConfig(n=1, chunks=6, chunk_size=CHUNK, size=SIZE, delay=0.005, seed=3)
    result = Simulation(cfg).run()
    assert result.received == [6]
    assert result.T < content_engine.RATE_WINDOW  # no rate measured: depth stays 1


async def _real(tmp_path: Path) -> None:
    transport = get_transport("reactor")
    src = tmp_path / "f.bin"
    src.write_bytes(random.Random(1).randbytes(SIZE))
    publisher, getter = Identity.generate(), Identity.generate()
    manifest = Manifest(build_manifest(src, chunk_size=CHUNK), ()).signed(publisher)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(serve_tracker, "127.0.0.1", 0, tmp_path / "tracker", transport)
            )
            tracker = ("127.0.0.1", port)
            seeder = await nursery.start(Node(publisher, transport, tracker=tracker).run)

            async def publish(client: Any) -> None:
                await client.publish(manifest)

            await seeder.tracker_call(publish)
            seeding = await seeder.add_content(manifest, SourceFile(src, manifest.info))
            while seeding.engine.announce_due(trio.current_time()) == "started":
                await trio.sleep(0.01)  # the tracker knows the seeder first, as in the simulation
            leecher = await nursery.start(Node(getter, transport, tracker=tracker).run)
            store = await ChunkStore.open(manifest.info, manifest.content_id, tmp_path / "out")
            content = await leecher.add_content(manifest, store)
            await content.completed.wait()
            assert trio.current_time() - content.started_at < content_engine.RATE_WINDOW
            nursery.cancel_scope.cancel()
    assert (tmp_path / "out.part").read_bytes() == src.read_bytes() or store.complete


async def test_node_and_simulator_make_the_same_decisions(
    tmp_path: Path, recorded: dict[str, list[tuple[Any, ...]]]
) -> None:
    _simulated()
    simulated = {role: list(actions) for role, actions in recorded.items()}
    for actions in recorded.values():
        actions.clear()
    await _real(tmp_path)
    real = recorded
    # The leecher asks for every chunk once, the short last one at its length,
    # and tells the seeder nothing it holds (no HAVE to a holder).
    requests = [a for a in simulated["leecher"] if a[:2] == ("send", "Request")]
    assert sorted(r[2:] for r in requests) == [(i, 0, CHUNK if i < 5 else 1000) for i in range(6)]
    assert not [a for a in simulated["leecher"] if a[0] == "have"]
    assert real["leecher"] == simulated["leecher"]
    assert real["seeder"] == simulated["seeder"]
