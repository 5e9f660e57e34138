"""Behaviour of the transports behind the one stream contract.

Tests of the contract take ``any_transport``: the reactor (epoll), the
proactor (io_uring) and the in-memory test backend (tests/memory_transport.py).
Tests of what only sockets do (resets, socket buffers, low-water marks) take
``transport`` (tests/conftest.py): the two socket backends.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import resource
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from peerd.errors import (
    ConnectError,
    ConnectionClosed,
    ConnectionReset,
    StorageError,
    TransportError,
    TransportTimeout,
    TransportUnavailable,
)
from peerd.transport import (
    TRANSPORTS,
    Listener,
    Stream,
    StreamBroken,
    StreamClosed,
    Transport,
    get_transport,
)

from .memory_transport import MemoryNetwork

MiB = 1 << 20


@pytest.fixture(params=[*TRANSPORTS, "memory"])
def any_transport(request: pytest.FixtureRequest) -> Transport:
    """The socket backends, then the in-memory one (a network of its own per test)."""
    if request.param == "memory":
        return MemoryNetwork().transport("127.0.0.1")
    try:
        return get_transport(request.param)
    except TransportUnavailable as exc:
        pytest.skip(str(exc))


async def stream_pair(transport: Transport) -> tuple[Stream, Stream]:
    """(client, server) streams connected over loopback."""
    listener = await transport.open_listener("127.0.0.1", 0)
    try:
        async with trio.open_nursery() as nursery:
            accepted: list[Stream] = []

            async def accept_one() -> None:
                accepted.append(await listener.accept())

            nursery.start_soon(accept_one)
            client = await transport.connect("127.0.0.1", listener.port)
    finally:
        await listener.aclose()
    return client, accepted[0]


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, position-dependent bytes (so a lost or moved byte shows)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    reps = size // len(block) + 1
    return (block * reps)[:size]


# --- selection ----------------------------------------------------------------


def test_get_transport_unknown_name_lists_valid_names() -> None:
    with pytest.raises(TransportUnavailable, match="reactor, proactor"):
        get_transport("carrier-pigeon")


def test_get_transport_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEER_TRANSPORT", raising=False)
    assert get_transport().name == "reactor"
    monkeypatch.setenv("PEER_TRANSPORT", "nope")
    with pytest.raises(TransportUnavailable, match="nope"):
        get_transport()
    assert get_transport("reactor").name == "reactor"


def test_proactor_unavailable_says_why_and_suggests_reactor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peerd.transport import _ring

    monkeypatch.setattr(_ring, "L", None)
    _ring._probe_cached.cache_clear()
    try:
        with pytest.raises(TransportUnavailable, match=r"liburing.*`--transport reactor` works"):
            get_transport("proactor")
    finally:
        _ring._probe_cached.cache_clear()


def _proactor_or_skip() -> Transport:
    try:
        return get_transport("proactor")
    except TransportUnavailable as exc:
        pytest.skip(str(exc))


async def _echo_and_cancel(transport: Transport) -> None:
    """Data both ways, then a parked receive cancelled (the kernel-side cancel)."""
    a, b = await stream_pair(transport)
    async with a, b:
        with trio.fail_after(10):
            await a.send_all(b"ping")
            got = bytearray(4)
            await b.recv_exactly_into(got)
            assert got == b"ping"
            with trio.move_on_after(0.1) as scope:
                await b.receive_some(10)  # parked in the ring: nothing comes
            assert scope.cancelled_caught
            await a.send_all(b"pong")
            assert await b.receive_some(10) == b"pong"


async def test_ring_set_up_falls_back_when_the_kernel_refuses_the_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peerd.transport import _ring

    transport = _proactor_or_skip()
    L = _ring.L
    # DEFER_TASKRUN without SINGLE_ISSUER is refused (EINVAL) by every kernel.
    monkeypatch.setattr(_ring, "SETUP_FLAGS", [L.IORING_SETUP_DEFER_TASKRUN, 0])
    await _echo_and_cancel(transport)
    assert _ring.current_ring().flags == 0


async def test_ring_with_deferred_task_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # DEFER_TASKRUN posts completions only when the owner asks for them: the
    # eventfd still wakes the reaper, which must fetch them (get_events).
    from peerd.transport import _ring

    transport = _proactor_or_skip()
    L = _ring.L
    flags = L.IORING_SETUP_DEFER_TASKRUN | L.IORING_SETUP_SINGLE_ISSUER
    monkeypatch.setattr(_ring, "SETUP_FLAGS", [flags, 0])
    await _echo_and_cancel(transport)
    ring = _ring.current_ring()
    if ring.flags != flags:
        pytest.skip("this kernel has no DEFER_TASKRUN")
    async with transport.open_mux() as mux:  # started ops, completed via callbacks
        a, b = await stream_pair(transport)
        async with a, b:
            mux.add(b)
            await a.send_all(b"hello")
            with trio.fail_after(5):
                assert await mux.next_batch() == [(b, b"hello")]
            mux.send(b, b"back")
            got = bytearray(4)
            with trio.fail_after(5):
                await a.recv_exactly_into(got)
            assert got == b"back"
            await mux.remove(b)


# --- conformance ----------------------------------------------------------------


@pytest.mark.parametrize("lockstep", [False, True], ids=["buffered", "lockstep"])
async def test_memory_streams_pass_trio_conformance(lockstep: bool) -> None:
    transport = MemoryNetwork(lockstep=lockstep).transport()

    async def maker() -> tuple[Stream, Stream]:
        return await stream_pair(transport)

    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(maker, None)


async def test_trio_half_closeable_stream_conformance(any_transport: Transport) -> None:
    async def maker() -> tuple[Stream, Stream]:
        return await stream_pair(any_transport)

    with trio.fail_after(30):
        await trio.testing.check_half_closeable_stream(maker, None)


async def test_stream_errors_are_trio_and_transport_errors(any_transport: Transport) -> None:
    a, b = await stream_pair(any_transport)
    async with b:
        await a.send_eof()
        with pytest.raises(StreamClosed, match="send_eof") as shut:
            await a.send_all(b"late")
        assert isinstance(shut.value, TransportError)
        assert isinstance(shut.value, trio.ClosedResourceError)
        await a.send_eof()  # again: allowed
        await b.send_all(b"back")  # the other direction still works
        assert await a.receive_some() == b"back"
        await a.aclose()
        for op in (a.receive_some(), a.recv_exactly_into(bytearray(1)), a.send_eof()):
            with pytest.raises(StreamClosed, match="closed"):
                await op
        assert issubclass(StreamBroken, TransportError)
        assert issubclass(StreamBroken, trio.BrokenResourceError)


async def test_one_receiver_and_one_sender_at_a_time(any_transport: Transport) -> None:
    a, b = await stream_pair(any_transport)
    async with a, b:
        with trio.fail_after(5):
            with pytest.RaisesGroup(trio.BusyResourceError):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(b.recv_exactly_into, bytearray(10))
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(b.receive_some, 1)
            await a.send_all(b"still fine")  # the failed call took nothing
            assert await b.receive_some(100) == b"still fine"


# --- basic behaviour --------------------------------------------------------------


async def test_echo_stats_and_addresses(any_transport: Transport) -> None:
    transport = any_transport

    async def echo(stream: Stream) -> None:
        while data := await stream.receive_some(1000):
            await stream.send_all(data)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(transport.serve, "127.0.0.1", 0, echo)
            assert listener.port > 0
            async with await transport.connect("127.0.0.1", listener.port) as client:
                assert client.peer_address == ("127.0.0.1", listener.port)
                message = pattern(1, 5000)
                await client.send_all(memoryview(message)[:3000])
                await client.send_all(bytearray(message[3000:]))
                back = bytearray(5000)
                await client.recv_exactly_into(back)
                assert back == message
                await client.send_eof()  # half-close: the echo handler ends
                assert await client.receive_some() == b""  # server closed after handler
                assert client.bytes_sent == 5000
                assert client.bytes_received == 5000
            nursery.cancel_scope.cancel()


async def test_receive_some_max_bytes_and_eof(any_transport: Transport) -> None:
    a, b = await stream_pair(any_transport)
    async with a, b:
        await a.send_all(b"hello world")
        got = b""
        with trio.fail_after(5):
            while len(got) < 5:
                got += await b.receive_some(5 - len(got))
        assert got == b"hello"
        await a.aclose()
        rest = bytearray(6)
        await b.recv_exactly_into(rest)
        assert rest == b" world"
        assert await b.receive_some(100) == b""
        with pytest.raises(ValueError):
            await b.receive_some(0)


async def test_serve_shutdown_closes_listener_and_connections(any_transport: Transport) -> None:
    transport = any_transport
    entered = trio.Event()

    async def hold(stream: Stream) -> None:
        entered.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(transport.serve, "127.0.0.1", 0, hold)
            client = await transport.connect("127.0.0.1", listener.port)
            await entered.wait()
            nursery.cancel_scope.cancel()
        async with client:
            try:  # the server side was closed: EOF or reset, never a hang
                assert await client.receive_some() == b""
            except ConnectionReset:
                pass
        with pytest.raises(ConnectError, match=rf"cannot connect to 127\.0\.0\.1:{listener.port}"):
            await transport.connect("127.0.0.1", listener.port)


async def test_serve_handler_transport_error_ends_only_that_connection(
    any_transport: Transport,
) -> None:
    transport = any_transport

    async def strict(stream: Stream) -> None:
        buf = bytearray(10)
        await stream.recv_exactly_into(buf)  # ConnectionClosed on a short message
        await stream.send_all(buf)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(transport.serve, "127.0.0.1", 0, strict)
            async with await transport.connect("127.0.0.1", listener.port) as bad:
                await bad.send_all(b"short")
                await bad.send_eof()
                assert await bad.receive_some() == b""
            async with await transport.connect("127.0.0.1", listener.port) as good:
                await good.send_all(b"0123456789")
                out = bytearray(10)
                await good.recv_exactly_into(out)
                assert out == b"0123456789"
            nursery.cancel_scope.cancel()


async def test_listen_close_listen_again_same_port(any_transport: Transport) -> None:
    transport = any_transport
    first = await transport.open_listener("127.0.0.1", 0, backlog=512)
    port = first.port
    a = await transport.connect("127.0.0.1", port)
    b = await first.accept()
    await first.aclose()
    await first.aclose()  # idempotent
    await b.aclose()  # server side closes first: its socket enters TIME_WAIT
    await a.aclose()
    second = await transport.open_listener("127.0.0.1", port)
    async with second:
        assert second.port == port
        async with await transport.connect("127.0.0.1", port) as c, await second.accept() as d:
            await c.send_all(b"again")
            assert await d.receive_some() == b"again"


async def test_listen_on_busy_port_is_transport_error(any_transport: Transport) -> None:
    transport = any_transport
    async with await transport.open_listener("127.0.0.1", 0) as first:
        with pytest.raises(TransportError, match=rf"cannot listen on 127\.0\.0\.1:{first.port}"):
            await transport.open_listener("127.0.0.1", first.port)


async def test_connect_to_closed_port_is_connect_error(any_transport: Transport) -> None:
    transport = any_transport
    listener = await transport.open_listener("127.0.0.1", 0)
    port = listener.port
    await listener.aclose()
    with pytest.raises(ConnectError, match=rf"^cannot connect to 127\.0\.0\.1:{port}: "):
        await transport.connect("127.0.0.1", port)


async def test_connect_to_unresolvable_name_is_connect_error(transport: Transport) -> None:
    with pytest.raises(ConnectError, match=r"cannot connect to no-such-host\.invalid:80"):
        await transport.connect("no-such-host.invalid", 80)


async def test_connect_timeout_is_transport_timeout(transport: Transport) -> None:
    # A listener whose accept queue is full drops further SYNs: connect hangs.
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        fillers = []
        with trio.fail_after(5):
            for _ in range(2):  # fill the (backlog + 1) queue
                try:
                    fillers.append(await transport.connect("127.0.0.1", port, timeout=0.5))
                except TransportTimeout:
                    break
            with pytest.raises(TransportTimeout, match=rf"127\.0\.0\.1:{port}"):
                await transport.connect("127.0.0.1", port, timeout=0.3)
        for f in fillers:
            await f.aclose()
    finally:
        sock.close()


async def test_connect_binds_source_host(any_transport: Transport) -> None:
    transport = any_transport
    async with await transport.open_listener("127.0.0.1", 0) as listener:
        async with await transport.connect("127.0.0.1", listener.port, source_host="127.0.0.2"):
            async with await listener.accept() as server:
                assert server.peer_address[0] == "127.0.0.2"


async def test_cancelled_connect_passes_cancellation_through(any_transport: Transport) -> None:
    transport = any_transport
    async with await transport.open_listener("127.0.0.1", 0) as listener:
        with trio.CancelScope() as scope:
            scope.cancel()
            await transport.connect("127.0.0.1", listener.port)
        assert scope.cancelled_caught


# --- failures in the middle -----------------------------------------------------------


async def test_peer_closes_mid_transfer(any_transport: Transport) -> None:
    transport = any_transport
    a, b = await stream_pair(transport)
    async with b:
        await a.send_all(pattern(2, 100_000))
        await a.aclose()
        buf = bytearray(MiB)
        with trio.fail_after(5), pytest.raises(ConnectionClosed, match="100000 of 1048576"):
            await b.recv_exactly_into(buf)
        assert buf[:100_000] == pattern(2, 100_000)


def _raw_connect_with_linger0(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


async def test_reset_by_peer_on_receive(transport: Transport) -> None:
    async with await transport.open_listener("127.0.0.1", 0) as listener:
        raw = _raw_connect_with_linger0(listener.port)
        await raw.connect(("127.0.0.1", listener.port))
        async with await listener.accept() as server:
            with trio.fail_after(5):
                await raw.send(b"partial")
                raw.close()  # SO_LINGER 0: RST instead of FIN
                buf = bytearray(4)
                with pytest.raises(ConnectionReset, match="reset") as reset:
                    while True:
                        await server.recv_exactly_into(buf)
                assert isinstance(reset.value, trio.BrokenResourceError)


async def test_reset_by_peer_on_send(transport: Transport) -> None:
    async with await transport.open_listener("127.0.0.1", 0) as listener:
        raw = _raw_connect_with_linger0(listener.port)
        await raw.connect(("127.0.0.1", listener.port))
        async with await listener.accept() as server:
            raw.close()
            chunk = bytes(MiB)
            with trio.fail_after(5), pytest.raises(ConnectionReset):
                while True:
                    await server.send_all(chunk)


async def test_cancel_mid_receive_then_reuse_buffer(any_transport: Transport) -> None:
    transport = any_transport
    a, b = await stream_pair(transport)
    async with a, b:
        first = pattern(3, MiB)
        second = pattern(4, MiB)
        buf = bytearray(8 * MiB)
        await a.send_all(first)
        with trio.move_on_after(0.3) as scope:
            await b.recv_exactly_into(buf)  # gets `first`, then waits for more
        assert scope.cancelled_caught
        assert buf[: len(first)] == first
        # The cancelled receive must be finished in the kernel: after new data
        # arrives, nothing may write into the buffer behind our back.
        buf[:] = b"\xee" * len(buf)
        await a.send_all(second)
        await trio.sleep(0.2)
        assert buf.count(b"\xee") == len(buf)
        with trio.fail_after(5):
            await b.recv_exactly_into(memoryview(buf)[: len(second)])
        assert buf[: len(second)] == second
        assert buf.count(b"\xee", len(second)) == len(buf) - len(second)

        # Single receive: cancelled before data means no data was consumed.
        with trio.move_on_after(0.1):
            await b.receive_some()
        await a.send_all(b"after")
        out = bytearray(5)
        with trio.fail_after(5):
            await b.recv_exactly_into(out)
        assert out == b"after"


async def test_close_wakes_blocked_receiver(any_transport: Transport) -> None:
    transport = any_transport
    a, b = await stream_pair(transport)
    async with a:

        async def blocked() -> None:
            with pytest.raises(StreamClosed):
                await b.receive_some(4096)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked)
                await trio.testing.wait_all_tasks_blocked()
                await b.aclose()


# --- bulk ------------------------------------------------------------------------


async def _hashing_receiver(stream: Stream, total: int, chunk: int) -> bytes:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    got = 0
    while got < total:
        view = memoryview(buf)[: min(chunk, total - got)]
        await stream.recv_exactly_into(view)
        await trio.to_thread.run_sync(h.update, view)
        got += len(view)
    assert await stream.receive_some() == b""
    return h.digest()


async def test_one_gib_transfer_checked_by_hash(transport: Transport) -> None:
    total = 1 << 30
    chunk = 4 * MiB
    block = bytearray(os.urandom(chunk))
    expected = hashlib.sha256()
    a, b = await stream_pair(transport)

    async def sender() -> None:
        async with a:
            for i in range(total // chunk):
                block[:8] = i.to_bytes(8, "big")  # every chunk differs
                expected.update(block)
                await a.send_all(block)

    result: list[bytes] = []

    async def receiver() -> None:
        async with b:
            result.append(await _hashing_receiver(b, total, chunk))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
    assert result == [expected.digest()]
    assert b.bytes_received == total
    assert a.bytes_sent == total


async def test_500_concurrent_connections(any_transport: Transport) -> None:
    transport = any_transport
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))

    async def echo(stream: Stream) -> None:
        buf = bytearray(8)
        await stream.recv_exactly_into(buf)
        await stream.send_all(buf[::-1])

    async def client(port: int, i: int, done: list[int]) -> None:
        async with await transport.connect("127.0.0.1", port) as s:
            msg = i.to_bytes(8, "big")
            await s.send_all(msg)
            back = bytearray(8)
            await s.recv_exactly_into(back)
            assert back == msg[::-1]
            done.append(i)

    done: list[int] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(
                functools.partial(transport.serve, backlog=1024), "127.0.0.1", 0, echo
            )
            async with trio.open_nursery() as clients:
                for i in range(500):
                    clients.start_soon(client, listener.port, i, done)
            nursery.cancel_scope.cancel()
    assert sorted(done) == list(range(500))


# --- files ---------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Any) -> Iterator[tuple[int, bytes]]:
    content = os.urandom(3 * MiB + 17)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield fd, content
    os.close(fd)


@pytest.mark.parametrize(("offset", "count"), [(0, 1), (12345, 2_000_001), (3 * MiB + 3, 14)])
async def test_sendfile_ranges(
    any_transport: Transport, data_file: tuple[int, bytes], offset: int, count: int
) -> None:
    fd, content = data_file
    a, b = await stream_pair(any_transport)
    async with a, b:
        got = bytearray(count)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.recv_exactly_into, got)
                await a.sendfile(fd, offset, count)
                await a.send_all(b"!")
        assert got == content[offset : offset + count]
        assert a.bytes_sent == count + 1
        assert await b.receive_some(1) == b"!"


@pytest.mark.parametrize(("offset", "count"), [(0, 1), (12345, 2_000_001), (77, 0)])
async def test_sendfile_with_a_corked_header(
    any_transport: Transport, data_file: tuple[int, bytes], offset: int, count: int
) -> None:
    # The header (MSG_MORE) and the file's bytes arrive byte-identical, in
    # order, back to back, and both count as sent.
    fd, content = data_file
    header = bytes(range(13))
    a, b = await stream_pair(any_transport)
    async with a, b:
        got = bytearray(len(header) + count + 1)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.recv_exactly_into, got)
                await a.sendfile(fd, offset, count, header=header)
                await a.sendfile(fd, 0, 0, header=b"")  # nothing at all: still fine
                await a.send_all(b"!")
        assert bytes(got) == header + content[offset : offset + count] + b"!"
        assert a.bytes_sent == len(header) + count + 1


async def test_sendfile_with_a_header_past_end_of_file_is_storage_error(
    any_transport: Transport, data_file: tuple[int, bytes]
) -> None:
    fd, content = data_file
    a, b = await stream_pair(any_transport)
    async with a, b:
        with trio.fail_after(10), pytest.raises(StorageError, match="90 bytes short"):
            await a.sendfile(fd, len(content) - 10, 100, header=b"hdr")
        got = bytearray(13)  # the header went out (uncorked by the file's bytes)
        with trio.fail_after(1):
            await b.recv_exactly_into(got)
        assert got == b"hdr" + content[-10:]


async def test_sendfile_past_end_of_file_is_storage_error(
    any_transport: Transport, data_file: tuple[int, bytes]
) -> None:
    fd, content = data_file
    a, b = await stream_pair(any_transport)
    async with a, b:
        with trio.fail_after(10), pytest.raises(StorageError, match="90 bytes short"):
            await a.sendfile(fd, len(content) - 10, 100)  # 10 bytes fit the socket buffer
        got = bytearray(10)
        await b.recv_exactly_into(got)
        assert got == content[-10:]


async def test_sendfile_waiting_on_a_full_socket_is_cancellable(
    transport: Transport, tmp_path: Any
) -> None:
    size = 64 * MiB  # sparse: more than loopback socket buffers hold
    path = tmp_path / "big.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    a, b = await stream_pair(transport)
    try:
        async with a, b:
            with trio.move_on_after(0.3) as scope:
                await a.sendfile(fd, 0, size)  # nobody reads: the socket fills up
            assert scope.cancelled_caught
            assert 0 < a.bytes_sent < size
            got = bytearray(a.bytes_sent)  # what went out arrives intact
            with trio.fail_after(10):
                await b.recv_exactly_into(got)
            assert got.count(0) == len(got)
            await a.send_all(b"!")  # the stream is still usable
            assert await b.receive_some(1) == b"!"
    finally:
        os.close(fd)


async def _trickle(stream: Stream, data: bytes, step: int, pause: float) -> None:
    """Send ``data`` in ``step``-byte pieces, ``pause`` seconds apart."""
    for i in range(0, len(data), step):
        await stream.send_all(data[i : i + step])
        await trio.sleep(pause)


async def test_exact_receive_of_a_trickle_then_small_receive_returns_promptly(
    transport: Transport,
) -> None:
    # recv_exactly_into may raise the socket's receive low-water mark; it must
    # still finish when the bytes trickle in, and a later small receive_some
    # must not wait for more bytes than the peer sends.
    a, b = await stream_pair(transport)
    data = pattern(9, 700 * 1024)
    async with a, b:
        got = bytearray(len(data))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trickle, a, data, 100 * 1024, 0.02)
                await b.recv_exactly_into(got)
        assert got == data

        async def send_later(what: bytes) -> None:
            await trio.sleep(0.05)  # the receiver is parked before the bytes come
            await a.send_all(what)

        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_later, b"tail")
                assert await b.receive_some(100) == b"tail"
        await a.send_all(b"xy")
        small = bytearray(2)
        with trio.fail_after(2):
            await b.recv_exactly_into(small)
        assert small == b"xy"


# --- the proactor's receive paths ----------------------------------------------------


def _count_ring_ops(
    monkeypatch: pytest.MonkeyPatch, task: trio.lowlevel.Task | None = None
) -> list[int]:
    """From now on, the SQE count of every ring operation (of ``task`` only, if given)."""
    from peerd.transport import _ring

    ops: list[int] = []
    perform = _ring.Ring.perform

    async def counting(self: Any, steps: Any, keep: object) -> list[int]:
        if task is None or trio.lowlevel.current_task() is task:
            ops.append(len(steps))
        return await perform(self, steps, keep)

    monkeypatch.setattr(_ring.Ring, "perform", counting)
    return ops


async def test_proactor_receives_into_an_mmap_slice_one_ring_op_per_mark_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A chunk buffer is a page-aligned mmap: each step that has to wait is
    # one RECV at the buffer's address (no READV, no separate POLL_ADD),
    # however the bytes trickle in, and the kernel waits for the low-water
    # mark rather than returning every 64 KiB piece; the buffer is free once
    # the receive is done.
    import mmap

    from peerd.transport import _ring
    from peerd.transport.reactor import LOWAT_CAP

    transport = _proactor_or_skip()
    assert _ring.RAW_SQE, "the liburing wheel's SQE layout changed: receives fall back to READV"
    a, b = await stream_pair(transport)
    data = pattern(11, 2 * MiB)
    async with a, b:
        buf = mmap.mmap(-1, 3 * MiB)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trickle, a, data, 64 * 1024, 0.005)
                await trio.testing.wait_all_tasks_blocked()
                # Only this task's operations: not the sender's.
                ops = _count_ring_ops(monkeypatch, trio.lowlevel.current_task())
                await b.recv_exactly_into(memoryview(buf)[MiB:])
        assert set(ops) == {1}
        # At most a wait for the mark, plus what had come meanwhile, per step
        # (the 32 pieces one by one would be 32).
        assert len(ops) <= 2 * (len(data) // LOWAT_CAP) + 1
        assert buf[MiB:] == data
        buf.close()  # BufferError if the receive still exported it


async def test_proactor_lets_other_tasks_run_while_a_peer_trickles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bytes that are there are taken with plain recvs, without a ring op: a
    # peer that keeps a byte or two queued whenever we look must not keep
    # the loop from yielding. Simulated: every plain recv finds one byte.
    from peerd.transport import proactor

    transport = _proactor_or_skip()
    a, b = await stream_pair(transport)
    async with a, b:

        def one_byte(self: Any, view: memoryview) -> int:
            view[0] = 0x2A
            return 1

        monkeypatch.setattr(proactor.ProactorStream, "_recv_now", one_byte)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await trio.lowlevel.checkpoint()
                ticks += 1

        buf = bytearray(800)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                await trio.lowlevel.checkpoint()  # the ticker is running
                ticks = 0
                await b.recv_exactly_into(buf)
                nursery.cancel_scope.cancel()
        assert buf == b"*" * 800
        assert ticks >= 50  # a yield every few bytes (none at all: 0 or 1)


_FALLBACK_CHECKS = [
    ("RAW_SQE", test_peer_closes_mid_transfer),
    ("RAW_SQE", test_cancel_mid_receive_then_reuse_buffer),
    ("RAW_SQE", test_exact_receive_of_a_trickle_then_small_receive_returns_promptly),
    ("SUBMIT_RELEASES_GIL", test_peer_closes_mid_transfer),
    ("SUBMIT_RELEASES_GIL", test_cancel_mid_receive_then_reuse_buffer),
]


@pytest.mark.parametrize(
    ("switch", "check"),
    _FALLBACK_CHECKS,
    ids=[f"no {k}-{f.__name__.removeprefix('test_')}" for k, f in _FALLBACK_CHECKS],
)
async def test_proactor_works_where_a_wheel_layout_check_fails(
    monkeypatch: pytest.MonkeyPatch, switch: str, check: Any
) -> None:
    # RAW_SQE off: receives are READV steps; SUBMIT_RELEASES_GIL off: the
    # wheel's own submit (holding the GIL).
    from peerd.transport import _ring

    transport = _proactor_or_skip()
    monkeypatch.setattr(_ring, switch, False)
    await check(transport)
    if switch == "SUBMIT_RELEASES_GIL":
        assert _ring.current_ring()._struct == 0


async def test_proactor_sends_a_small_frame_without_a_ring_op_and_waits_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A control frame goes with one plain send when the socket takes it; when
    # the socket buffer is full, what is left waits in the ring, in order.

    transport = _proactor_or_skip()
    a, b = await stream_pair(transport)
    async with a, b:
        ops = _count_ring_ops(monkeypatch)
        await a.send_all(b"frame")
        assert ops == []
        got = bytearray(5)
        await b.recv_exactly_into(got)
        assert got == b"frame"
        # Fill the socket buffers with a plain non-blocking writer on a's fd:
        # the next frame only partly fits, or not at all.
        raw = socket.socket(fileno=os.dup(a.fileno()))
        raw.setblocking(False)
        filled = bytearray()
        try:
            while True:
                block = pattern(len(filled), 65536)
                filled += block[: raw.send(block)]
        except BlockingIOError:
            pass
        finally:
            os.close(raw.detach())  # only the duplicate fd: the connection stays
        tail = pattern(13, 60_000)
        out = bytearray(len(filled) + len(tail))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_all, tail)
                await trio.sleep(0.2)
                assert ops, "the rest of the frame did not wait in the ring"
                await b.recv_exactly_into(out)
        assert out[: len(filled)] == filled
        assert out[len(filled) :] == tail


async def test_proactor_receives_what_is_there_without_a_ring_op_and_waits_in_the_ring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # receive_some and recv_exactly_into take bytes already queued with a
    # plain recv; only a receive that has to wait for them is a ring operation.
    transport = _proactor_or_skip()
    a, b = await stream_pair(transport)
    async with a, b:
        ops = _count_ring_ops(monkeypatch)
        await a.send_all(b"header")
        assert select.select([b.fileno()], [], [], 5)[0], "loopback did not deliver"
        assert await b.receive_some(100) == b"header"
        payload = pattern(5, 60_000)  # one loopback segment
        await a.send_all(payload)
        assert select.select([b.fileno()], [], [], 5)[0], "loopback did not deliver"
        got = bytearray(len(payload))
        await b.recv_exactly_into(got)  # the bulk path too
        assert got == payload
        assert ops == []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def later() -> None:
                    await trio.sleep(0.05)
                    await a.send_all(b"later")

                nursery.start_soon(later)
                assert await b.receive_some(100) == b"later"
        assert ops == [1]


def _longest_pause_during(submit: Any) -> tuple[float, float]:
    """Run ``submit()`` while another thread runs Python; return the longest
    pause of that thread during the call and the call's duration (s)."""
    import threading
    import time

    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        while len(stamps) < 1000:  # running
            time.sleep(0.001)
        t0 = time.perf_counter()
        submit()
        t1 = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    inside = [t0] + [t for t in stamps if t0 < t < t1] + [t1]
    return max(b - a for a, b in itertools.pairwise(inside)), t1 - t0


def test_the_ring_submits_without_holding_the_gil() -> None:
    # The kernel does the proactor's receives inside io_uring_submit; another
    # Python thread (a getter's hashing and writing) must run meanwhile. A
    # long submit: 16 READVs of 64 MiB from /dev/zero, done inline. With the
    # wheel's own submit the other thread stalls for the whole call.
    import mmap

    import liburing as L

    from peerd.transport import _ring

    _proactor_or_skip()
    assert _ring.SUBMIT_RELEASES_GIL, "the wheel's layout changed: submits hold the GIL"
    ring = L.Ring()
    L.io_uring_queue_init(32, ring, 0)
    buf = mmap.mmap(-1, 64 * MiB)
    zero = os.open("/dev/zero", os.O_RDONLY)
    view = memoryview(buf)
    cqe = L.Cqe()
    iovs = []

    def prepare() -> None:
        for _ in range(16):
            iovs.append(L.Iovec([view]))
            L.io_uring_prep_readv(L.io_uring_get_sqe(ring), zero, iovs[-1], 0)

    def reap() -> None:
        for _ in range(16):
            L.io_uring_wait_cqe(ring, cqe)
            assert cqe[0].res > 0  # the kernel may stop a read of /dev/zero early
            L.io_uring_cqe_seen(ring, cqe[0])
        iovs.clear()

    def all_attempts_fail(ok: Any, submit: Any) -> str | None:
        # A busy machine deschedules threads anyway, either way round: up
        # to 10 attempts; None once one satisfies ok, else the last figures.
        for _attempt in range(10):
            prepare()
            pause, took = _longest_pause_during(submit)
            reap()
            if ok(pause, took):
                return None
        return f"paused {pause * 1e3:.0f} of {took * 1e3:.0f} ms"

    try:
        address = _ring._wheel_pointer(ring)
        miss = all_attempts_fail(
            lambda pause, took: pause < took / 2,
            lambda: _ring._submit_releasing_gil(address),
        )
        assert miss is None, f"another thread {miss} during the GIL-free submit"
        # The wheel's own call holds the GIL: the measure can tell.
        miss = all_attempts_fail(
            lambda pause, took: pause > took / 2, lambda: L.io_uring_submit(ring)
        )
        assert miss is None, f"another thread only {miss} during the wheel's submit"
    finally:
        os.close(zero)
        L.io_uring_queue_exit(ring)


async def test_proactor_rings_use_the_gil_free_submit() -> None:
    from peerd.transport import _ring

    _proactor_or_skip()
    ring = _ring.current_ring()
    assert ring._struct and ring._struct == _ring._wheel_pointer(ring._ring)


@pytest.mark.parametrize(
    ("check", "pointer"),
    [("_raw_sqe_works", "_sqe_struct"), ("_submit_without_gil_works", "_wheel_pointer")],
    ids=["raw SQE", "GIL-free submit"],
)
def test_a_layout_check_refuses_a_wrong_layout_without_crashing(
    monkeypatch: pytest.MonkeyPatch, check: str, pointer: str
) -> None:
    # Should a wheel version lay its objects out differently, the pointer
    # read from one is garbage: unmapped (read through the kernel: EFAULT, no
    # crash) or readable but not the struct. Either way the wheel's own path
    # is kept (READV receives; the GIL-holding submit).
    from peerd.transport import _ring

    _proactor_or_skip()
    works = getattr(_ring, check)
    assert works()
    junk = bytearray(b"\xab" * 600)
    for wrong in (4096, ctypes.addressof(ctypes.c_char.from_buffer(junk))):
        monkeypatch.setattr(_ring, pointer, lambda obj, wrong=wrong: wrong)
        assert not works()
