"""Session deadlines under ``trio.testing.MockClock``: no real waiting.

A real seeder :class:`~peerd.node.node.Node` on the in-memory transport
(tests/memory_transport.py) with connections that have no buffer at all
(``lockstep``: a send waits for the receiver), and a client that completes
the handshake, asks for chunks and never reads. The seeder's writer blocks;
its watchdog must close the connection once the send has made no progress
for ``SEND_STALL_TIMEOUT`` (30 s of mock time), not before. The same rule on
real sockets and a real process: tests/test_hostile_network.py (non-reader).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from peerd.content.identity import Identity
from peerd.content.manifest import Manifest, build_manifest
from peerd.content.store import SourceFile
from peerd.node import session as session_module
from peerd.node.node import Node
from peerd.wire import NEED_DATA, Bitfield, Request

from .memory_transport import MemoryNetwork

KiB = 1 << 10


def test_a_peer_that_never_reads_is_dropped_at_the_send_deadline(tmp_path: Path) -> None:
    # A memory stream has no descriptor (fileno -1): no kernel send queue.
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(512 * KiB))
    closed_at: list[float] = []

    async def main() -> None:
        net = MemoryNetwork(lockstep=True)
        seeder_id, client_id = Identity.generate(), Identity.generate()
        manifest = Manifest(build_manifest(src, chunk_size=64 * KiB), ()).signed(seeder_id)
        chunks = manifest.info.num_chunks
        async with trio.open_nursery() as nursery:
            tracker = ("10.0.0.9", 9)  # nobody there: announces fail quietly
            seeder = await nursery.start(
                Node(seeder_id, net.transport("10.0.0.1"), host="10.0.0.1", tracker=tracker).run
            )
            await seeder.add_content(manifest, SourceFile(src, manifest.info))
            client = Node(client_id, net.transport("10.0.0.2"), host="10.0.0.2", tracker=tracker)
            stream, conn, _hello = await client._dial(manifest.content_id, "10.0.0.1", seeder.port)
            await stream.send_all(conn.send(Bitfield(bytes((chunks + 7) // 8))))
            while not isinstance(event := conn.next_event(), Bitfield):  # the seeder's
                assert event is NEED_DATA, event
                conn.receive_data(await stream.receive_some(65536))
            for i in range(chunks):
                await stream.send_all(conn.send(Request(i, 0, 64 * KiB)))
            t0 = trio.current_time()
            # Never read: the seeder's send of the first chunk waits for us.
            # Its end closes ours: a send to a closed peer fails.
            with trio.fail_after(10 * session_module.SEND_STALL_TIMEOUT):
                while True:
                    await trio.sleep(0.5)
                    try:
                        await stream.send_all(b"")
                    except trio.BrokenResourceError:
                        break
                    if not seeder.contents[manifest.content_id].sessions:
                        break
            closed_at.append(trio.current_time() - t0)
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    stall = session_module.SEND_STALL_TIMEOUT
    assert stall <= closed_at[0] <= stall + 3, closed_at
