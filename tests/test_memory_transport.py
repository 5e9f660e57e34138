"""The in-memory test backend (tests/memory_transport.py) under a mock clock."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from peerd.errors import ConnectError, StorageError, TransportTimeout
from peerd.transport import Listener, Stream

from .memory_transport import MemoryNetwork


def run_mock(fn: object, *args: object) -> float:
    """Run ``fn`` under MockClock(autojump_threshold=0); returns real seconds taken."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    start = time.monotonic()
    trio.run(fn, *args, clock=clock)  # type: ignore[arg-type]
    return time.monotonic() - start


def test_a_conversation_under_mock_clock_takes_no_real_time(tmp_path: Path) -> None:
    content = os.urandom(700_000)
    path = tmp_path / "chunk.bin"
    path.write_bytes(content)

    async def main() -> None:
        net = MemoryNetwork()
        server_side, client_side = net.transport("10.0.0.1"), net.transport("10.0.0.2")
        served: list[bytes] = []

        async def handler(stream: Stream) -> None:
            assert stream.peer_address[0] == "10.0.0.2"
            assert stream.fileno() == -1
            head = bytearray(5)
            await stream.recv_exactly_into(head)
            served.append(bytes(head))
            fd = os.open(path, os.O_RDONLY)
            try:
                await stream.sendfile(fd, 1000, 600_000)
            finally:
                os.close(fd)
            await stream.send_eof()
            with trio.fail_after(3600):  # an hour of mock time: the client's EOF comes first
                assert await stream.receive_some() == b"!"
                assert await stream.receive_some() == b""

        async with trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(server_side.serve, "0.0.0.0", 7000, handler)
            assert (listener.host, listener.port) == ("10.0.0.1", 7000)
            t0 = trio.current_time()
            stream = await client_side.connect("10.0.0.1", 7000)
            assert stream.peer_address == ("10.0.0.1", 7000)
            # A timeout the mock clock jumps through: the server waits for us.
            with trio.move_on_after(120) as scope:
                await stream.receive_some()
            assert scope.cancelled_caught
            assert trio.current_time() - t0 == pytest.approx(120)
            await stream.send_all(b"hello")
            got = bytearray(600_000)
            await stream.recv_exactly_into(got)
            assert got == content[1000:601_000]
            assert await stream.receive_some() == b""  # the server half-closed
            await stream.send_all(b"!")  # ... and still receives
            await stream.send_eof()  # the handler's receive ends; it closes
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert served == [b"hello"]

    assert run_mock(main) < 5


def test_connect_errors_and_unreachable_hosts_time_out_in_mock_time() -> None:
    async def main() -> None:
        net = MemoryNetwork()
        t = net.transport("10.0.0.2")
        with pytest.raises(ConnectError, match=r"cannot connect to 10\.0\.0\.9:80: .*refused"):
            await t.connect("10.0.0.9", 80)
        net.unreachable.add("10.0.0.9")
        t0 = trio.current_time()
        with pytest.raises(TransportTimeout, match="timed out after 30"):
            await t.connect("10.0.0.9", 80, timeout=30)
        assert trio.current_time() - t0 == 30

    assert run_mock(main) < 5


def test_sendfile_short_file_is_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"abc")

    async def main() -> None:
        t = MemoryNetwork().transport()
        listener = await t.open_listener("127.0.0.1", 0)
        client = await t.connect("127.0.0.1", listener.port)
        server = await listener.accept()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(StorageError, match="2 bytes short"):
                await server.sendfile(fd, 1, 4)
        finally:
            os.close(fd)
        assert await client.receive_some() == b"bc"
        for s in (client, server, listener):
            await s.aclose()

    run_mock(main)


def test_memory_mux_batches_replies_and_eof() -> None:
    async def main() -> None:
        t = MemoryNetwork().transport()
        listener = await t.open_listener("127.0.0.1", 0)
        clients = [await t.connect("127.0.0.1", listener.port) for _ in range(3)]
        servers = [await listener.accept() for _ in clients]
        async with t.open_mux() as mux:
            for s in servers:
                mux.add(s)
            for i, c in enumerate(clients):
                await c.send_all(b"ping%d" % i)
            mux.pause(servers[2])
            seen: dict[Stream, bytes] = {}
            with trio.move_on_after(1):
                while len(seen) < 3:
                    for server, data in await mux.next_batch():
                        assert isinstance(data, bytes)
                        seen[server] = seen.get(server, b"") + data
                        mux.send(server, data.upper())
            assert seen == {servers[0]: b"ping0", servers[1]: b"ping1"}  # [2] is paused
            mux.resume(servers[2])
            batch = await mux.next_batch()
            assert batch == [(servers[2], b"ping2")]
            mux.send(servers[2], b"PING2")
            for i, c in enumerate(clients):
                assert await c.receive_some() == b"PING%d" % i
            await clients[0].aclose()
            assert await mux.next_batch() == [(servers[0], b"")]
            assert mux.unsent(servers[1]) == 0
            await mux.remove(servers[0])
        for stream in (*clients, *servers):
            await stream.aclose()
        await listener.aclose()

    run_mock(main)
