"""The Mux (many streams, one serving task) on both transports, over loopback."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from peerd.errors import TransportError, TransportUnavailable
from peerd.transport import Mux, Stream, Transport, get_transport
from peerd.transport._base import MUX_BATCH

from .test_transport import pattern, stream_pair


@pytest.fixture(params=["reactor", "proactor", "proactor-single-shot"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Transport:
    """Both transports; the proactor twice: its mux with multishot RECVs and a
    buffer pool (the default where the ring offers one), and with single-shot
    RECVs (the fallback where it does not)."""
    name = request.param
    if name == "proactor-single-shot":
        from peerd.transport import _ring

        monkeypatch.setattr(_ring, "BUFFER_RINGS", False)
        name = "proactor"
    try:
        return get_transport(name)
    except TransportUnavailable as exc:
        pytest.skip(str(exc))


async def _collect(mux: Mux, want: dict[Stream, int]) -> dict[Stream, bytes]:
    """Read from the mux until every stream in ``want`` gave that many bytes."""
    got: dict[Stream, bytearray] = {s: bytearray() for s in want}
    while any(len(got[s]) < n for s, n in want.items()):
        for stream, result in await mux.next_batch():
            assert isinstance(result, bytes), result
            assert result, "unexpected EOF"
            got[stream] += result
    return {s: bytes(b) for s, b in got.items()}


async def test_mux_echoes_many_streams_in_order(transport: Transport) -> None:
    pairs = [await stream_pair(transport) for _ in range(8)]
    async with transport.open_mux() as mux:
        for _, server in pairs:
            mux.add(server)
        # Every client sends three messages; the server echoes each back reversed.
        for i, (client, _) in enumerate(pairs):
            for k in range(3):
                await client.send_all(pattern(i * 10 + k, 100 + k))
        want = {server: 303 for _, server in pairs}
        got = await _collect(mux, want)
        for i, (_, server) in enumerate(pairs):
            expect = b"".join(pattern(i * 10 + k, 100 + k) for k in range(3))
            assert got[server] == expect
            mux.send(server, got[server][::-1])
        # Replies sent while working through a batch go out even though the
        # caller waits for something else than its next batch.
        with trio.fail_after(10):
            for client, server in pairs:
                back = bytearray(303)
                await client.recv_exactly_into(back)
                assert bytes(back) == got[server][::-1]
                assert mux.unsent(server) == 0
        for _, server in pairs:
            await mux.remove(server)
    for client, server in pairs:
        await client.aclose()
        await server.aclose()


async def test_mux_queues_big_output_until_the_peer_reads(transport: Transport) -> None:
    client, server = await stream_pair(transport)
    big = pattern(7, 8 << 20)  # far more than the socket buffers hold
    async with transport.open_mux() as mux:
        mux.add(server)
        mux.send(server, big)
        mux.send(server, b"tail")  # queued behind, must come out after
        with trio.fail_after(10):
            assert mux.unsent(server) > 0
            back = bytearray(len(big) + 4)
            async with trio.open_nursery() as nursery:

                async def keep_serving() -> None:
                    # The reactor flushes queued output while waiting for input.
                    with trio.CancelScope() as scope:
                        cancel.append(scope)
                        while True:
                            await mux.next_batch()

                cancel: list[trio.CancelScope] = []
                nursery.start_soon(keep_serving)
                await client.recv_exactly_into(back)
                cancel[0].cancel()
        assert bytes(back) == big + b"tail"
        assert mux.unsent(server) == 0
        await mux.remove(server)
    await client.aclose()
    await server.aclose()


async def test_mux_pause_holds_input_until_resume(transport: Transport) -> None:
    (c1, s1), (c2, s2) = await stream_pair(transport), await stream_pair(transport)
    async with transport.open_mux() as mux:
        mux.add(s1)
        mux.add(s2)
        mux.pause(s1)
        await c1.send_all(b"held")
        await c2.send_all(b"flows")
        with trio.fail_after(5):
            assert await _collect(mux, {s2: 5}) == {s2: b"flows"}
        with trio.move_on_after(0.2):
            batch = await mux.next_batch()
            raise AssertionError(f"a paused stream was reported: {batch}")
        mux.resume(s1)
        with trio.fail_after(5):
            assert await _collect(mux, {s1: 4}) == {s1: b"held"}
        await mux.remove(s1)
        await mux.remove(s2)
    for s in (c1, s1, c2, s2):
        await s.aclose()


async def test_mux_reports_eof_and_reset(transport: Transport) -> None:
    (c1, s1), (c2, s2) = await stream_pair(transport), await stream_pair(transport)
    async with transport.open_mux() as mux:
        mux.add(s1)
        mux.add(s2)
        await c1.aclose()  # clean close: EOF
        # A reset: unread data at close makes the kernel send RST.
        mux.send(s2, b"x" * 1000)
        await trio.sleep(0.05)
        await c2.aclose()
        results: dict[Stream, object] = {}
        with trio.fail_after(5):
            while len(results) < 2:
                for stream, result in await mux.next_batch():
                    results.setdefault(stream, result)
        assert results[s1] == b""
        assert isinstance(results[s2], TransportError), results[s2]
        # Sending to a reset connection never raises from send().
        for _ in range(3):
            mux.send(s2, b"y" * 65536)
        await mux.remove(s1)
        await mux.remove(s2)
    await s1.aclose()
    await s2.aclose()


async def test_mux_remove_with_operations_in_flight(transport: Transport) -> None:
    # A receive is pending (proactor: in the ring) and output is queued: remove
    # must take it all back so the owner can close the stream safely.
    client, server = await stream_pair(transport)
    mux = transport.open_mux()
    mux.add(server)
    mux.send(server, pattern(1, 8 << 20))
    with trio.fail_after(5):
        await mux.remove(server)
    assert mux.unsent(server) == 0
    await server.aclose()
    await client.aclose()
    await mux.aclose()


async def test_mux_next_batch_is_cancellable(transport: Transport) -> None:
    client, server = await stream_pair(transport)
    async with transport.open_mux() as mux:
        mux.add(server)
        with trio.move_on_after(0.1) as scope:
            await mux.next_batch()
        assert scope.cancelled_caught
        # Still works afterwards.
        await client.send_all(b"ok")
        with trio.fail_after(5):
            assert await _collect(mux, {server: 2}) == {server: b"ok"}
    await client.aclose()
    await server.aclose()


async def test_mux_reports_eof_once_even_after_pause_and_resume(transport: Transport) -> None:
    client, server = await stream_pair(transport)
    async with transport.open_mux() as mux:
        mux.add(server)
        await client.send_all(b"bye")
        await client.send_eof()
        got: list[object] = []
        with trio.fail_after(5):
            while b"" not in got:
                got += [r for _, r in await mux.next_batch()]
        assert b"".join(r for r in got if isinstance(r, bytes)) == b"bye"
        mux.pause(server)
        mux.resume(server)
        mux.send(server, b"still open for writing")  # half-closed, not closed
        with trio.move_on_after(0.3):
            batch = await mux.next_batch()
            raise AssertionError(f"reported again after EOF: {batch}")
        back = bytearray(22)
        with trio.fail_after(5):
            await client.recv_exactly_into(back)
        assert bytes(back) == b"still open for writing"
        await mux.remove(server)
    await client.aclose()
    await server.aclose()


async def test_mux_batches_are_bounded_and_lose_nothing(transport: Transport) -> None:
    pairs = [await stream_pair(transport) for _ in range(MUX_BATCH + 8)]
    async with transport.open_mux() as mux:
        for _, server in pairs:
            mux.add(server)
        for i, (client, _) in enumerate(pairs):
            await client.send_all(pattern(i, 10))
        await trio.sleep(0.1)  # everything has arrived
        sizes = []
        got: dict[Stream, bytes] = {}
        with trio.fail_after(5):
            while len(got) < len(pairs):
                batch = await mux.next_batch()
                sizes.append(len(batch))
                for stream, data in batch:
                    assert isinstance(data, bytes)
                    got[stream] = got.get(stream, b"") + data
        assert max(sizes) <= MUX_BATCH < sum(sizes)
        for i, (_, server) in enumerate(pairs):
            assert got[server] == pattern(i, 10)
    for client, server in pairs:
        await client.aclose()
        await server.aclose()


async def test_mux_send_failure_wakes_a_parked_dispatcher(transport: Transport) -> None:
    # The dispatcher waits in next_batch with nothing to read; another task's
    # send fails (our side shut its writing half down: EPIPE). That failure
    # must reach the dispatcher now, not whenever some stream has input.
    client, server = await stream_pair(transport)
    try:
        async with transport.open_mux() as mux:
            mux.add(server)
            await server.send_eof()
            got: list[object] = []
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:

                    async def dispatcher() -> None:
                        got.extend(await mux.next_batch())

                    nursery.start_soon(dispatcher)
                    await trio.sleep(0.1)  # parked
                    mux.send(server, b"reply")
            assert len(got) == 1, got
            stream, result = got[0]  # type: ignore[misc]
            assert stream is server and isinstance(result, TransportError), got
            await mux.remove(server)
    finally:
        await server.aclose()
        await client.aclose()


async def test_mux_remove_and_resume_from_other_tasks_while_the_dispatcher_waits(
    transport: Transport,
) -> None:
    # The dispatcher is parked in next_batch (proactor: on the mux's own
    # ring). Other tasks pause, resume and remove streams: what they arm or
    # cancel must reach the kernel without waiting for the dispatcher, and a
    # remove must finish while the dispatcher keeps waiting.
    (c1, s1), (c2, s2) = [await stream_pair(transport) for _ in range(2)]
    got: list[tuple[Stream, object]] = []
    arrived = trio.Event()
    async with transport.open_mux() as mux:
        mux.add(s1)
        mux.add(s2)

        async def dispatcher() -> None:
            while True:
                got.extend(await mux.next_batch())
                arrived.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dispatcher)
                await trio.sleep(0.05)  # parked
                mux.pause(s1)
                await trio.sleep(0.05)
                await c1.send_all(b"held")
                await trio.sleep(0.1)
                assert got == []  # paused: not read
                mux.resume(s1)  # arms its receive from this task
                await arrived.wait()
                assert got == [(s1, b"held")]
                await mux.remove(s2)  # its receive cancelled; the dispatcher waits on
                arrived = trio.Event()
                await c1.send_all(b"more")
                await arrived.wait()
                assert got[-1] == (s1, b"more")
                nursery.cancel_scope.cancel()
        await mux.remove(s1)
    for s in (s1, s2, c1, c2):
        await s.aclose()


async def test_mux_replies_deferred_in_a_batch_go_out_while_the_dispatcher_waits_elsewhere(
    transport: Transport,
) -> None:
    # Replies to a batch of several streams are held until the next
    # next_batch; a dispatcher that awaits something else first must not
    # hold them back.
    pairs = [await stream_pair(transport) for _ in range(6)]
    async with transport.open_mux() as mux:
        for _, server in pairs:
            mux.add(server)
        for client, _ in pairs:
            await client.send_all(b"ask")
        await trio.sleep(0.1)  # every request is in
        with trio.fail_after(5):
            batch = await mux.next_batch()
            while len(batch) < len(pairs):
                batch += await mux.next_batch()
        for stream, result in batch:
            assert result == b"ask"
            mux.send(stream, b"answer")
        got = bytearray(6)
        with trio.fail_after(5):  # no next_batch: the dispatcher waits here
            for client, _ in pairs:
                await client.recv_exactly_into(got)
                assert got == b"answer"
        for _, server in pairs:
            await mux.remove(server)
    for client, server in pairs:
        await client.aclose()
        await server.aclose()


async def test_ring_mux_waits_for_readiness_after_eagain(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that answers RECV with -EAGAIN (forced here with
    MSG_DONTWAIT) must not make the ring mux spin re-submitting it; nor a
    reply that does not fit the socket buffer (written directly, then
    POLL_ADD for POLLOUT: no SEND in the ring)."""
    if transport.name != "proactor":
        pytest.skip("the ring mux only")
    from peerd.transport import _ring

    calls = {"recv": 0, "send": 0}
    real_recv, real_send = _ring.L.io_uring_prep_recv, _ring.L.io_uring_prep_send

    def recv(sqe: object, fd: int, buf: object, flags: int) -> None:
        calls["recv"] += 1
        if calls["recv"] < 1000:  # bounded: an unfixed spin would never yield
            flags |= socket.MSG_DONTWAIT
        real_recv(sqe, fd, buf, flags)

    def send(sqe: object, fd: int, data: object, flags: int) -> None:
        calls["send"] += 1
        if calls["send"] < 1000:
            flags |= socket.MSG_DONTWAIT
        real_send(sqe, fd, data, flags)

    monkeypatch.setattr(_ring.L, "io_uring_prep_recv", recv)
    monkeypatch.setattr(_ring.L, "io_uring_prep_send", send)
    monkeypatch.setattr(_ring, "BUFFER_RINGS", False)  # single-shot RECVs
    client, server = await stream_pair(transport)
    try:
        async with transport.open_mux() as mux:
            mux.add(server)
            await trio.sleep(0.2)  # nothing to read: the RECV must wait, not spin
            assert calls["recv"] <= 3, calls
            await client.send_all(b"ping")
            with trio.fail_after(5):
                assert await _collect(mux, {server: 4}) == {server: b"ping"}
            # More than the socket buffers hold, to a peer that is not reading.
            big = pattern(3, 8 << 20)
            mux.send(server, big)
            await trio.sleep(0.2)
            assert calls["send"] <= 10, calls
            back = bytearray(len(big))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:

                    async def keep_serving() -> None:
                        while True:
                            await mux.next_batch()

                    nursery.start_soon(keep_serving)
                    await client.recv_exactly_into(back)
                    nursery.cancel_scope.cancel()
            assert bytes(back) == big
            await mux.remove(server)
    finally:
        await server.aclose()
        await client.aclose()


async def test_mux_reads_no_further_ahead_than_one_receive(transport: Transport) -> None:
    """A lent stream's input waits in the kernel, not in the mux, until the
    dispatcher takes it: a fast sender is held back by the socket buffers
    (what the server can refuse or charge before it buffers anything)."""
    from peerd.transport.proactor import MUX_READ_AHEAD

    total = 64 << 20  # more than the loopback socket buffers hold (tcp_rmem max 32 MiB)
    # "About one receive" (reactor: 64 KiB reads, proactor single-shot: 16 KiB);
    # the proactor's multishot RECV: its threshold plus what the buffer pool
    # lets in before the cancel lands (a constant per mux, not per stream).
    bound = max(128 << 10, MUX_READ_AHEAD) if transport.name == "proactor" else 128 << 10
    data = pattern(5, total)
    client, server = await stream_pair(transport)
    sent = 0
    try:
        async with transport.open_mux() as mux, trio.open_nursery() as nursery:
            mux.add(server)

            async def sender() -> None:
                nonlocal sent
                view = memoryview(data)
                for start in range(0, total, 1 << 20):
                    await client.send_all(view[start : start + (1 << 20)])
                    sent += 1 << 20

            nursery.start_soon(sender)
            got = bytearray()
            with trio.fail_after(30):
                # The dispatcher is busy elsewhere; then paused, then busy again.
                for phase in ("busy", "paused", "busy"):
                    if phase == "paused":
                        mux.pause(server)
                    await trio.sleep(0.5)
                    ahead = server.bytes_received - len(got)
                    assert ahead <= bound, f"{phase}: the mux holds {ahead} bytes ahead"
                    assert sent < total, "the sender was never held back"
                    if phase == "paused":
                        mux.resume(server)
                    # Take a few batches: each time, at most one receive is ahead.
                    for _ in range(8):
                        for stream, result in await mux.next_batch():
                            assert stream is server and isinstance(result, bytes), result
                            got += result
                        ahead = server.bytes_received - len(got)
                        assert ahead <= bound, f"the mux holds {ahead} bytes ahead"
                # Then everything arrives, in order.
                while len(got) < total:
                    for _, result in await mux.next_batch():
                        assert isinstance(result, bytes) and result, result
                        got += result
                        assert server.bytes_received - len(got) <= bound
            assert got == data
            await mux.remove(server)
    finally:
        await client.aclose()
        await server.aclose()


async def test_mux_pause_holds_input_that_already_arrived(transport: Transport) -> None:
    # The proactor has received it already (its RECV completed), the reactor
    # not: either way nothing is reported between pause and resume.
    client, server = await stream_pair(transport)
    async with transport.open_mux() as mux:
        mux.add(server)
        await client.send_all(b"early")
        await trio.sleep(0.1)
        mux.pause(server)
        with trio.move_on_after(0.2):
            batch = await mux.next_batch()
            raise AssertionError(f"a paused stream was reported: {batch}")
        mux.resume(server)
        with trio.fail_after(5):
            assert await _collect(mux, {server: 5}) == {server: b"early"}
        await mux.remove(server)
    await client.aclose()
    await server.aclose()


def _multishot_or_skip(mux: Mux) -> None:
    if not getattr(mux, "_multishot", False):
        pytest.skip("the ring mux without multishot receive here")


async def test_ring_mux_recovers_when_the_buffer_pool_runs_dry(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pool of 2 tiny buffers and 8 streams flooding: the kernel ends RECVs
    # with -ENOBUFS (F_MORE clear); each is armed again and nothing is lost.
    if transport.name != "proactor":
        pytest.skip("the ring mux only")
    from peerd.transport import proactor

    monkeypatch.setattr(proactor, "_MUX_BUFS", 2)
    monkeypatch.setattr(proactor, "_MUX_BUF", 64)
    results: list[int] = []
    real = proactor.RingMux._on_recv_multi

    def spy(self: proactor.RingMux, e: object, res: int, flags: int) -> None:
        results.append(res)
        real(self, e, res, flags)  # type: ignore[arg-type]

    monkeypatch.setattr(proactor.RingMux, "_on_recv_multi", spy)
    pairs = [await stream_pair(transport) for _ in range(8)]
    try:
        async with transport.open_mux() as mux:
            for _, server in pairs:
                mux.add(server)
            _multishot_or_skip(mux)
            frames = {server: pattern(i, 20_000) for i, (_, server) in enumerate(pairs)}
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for client, server in pairs:
                        nursery.start_soon(client.send_all, frames[server])
                    got = await _collect(mux, {server: 20_000 for _, server in pairs})
            assert got == frames
            assert -errno.ENOBUFS in results, "the pool never ran dry: the test proves nothing"
    finally:
        for client, server in pairs:
            await client.aclose()
            await server.aclose()


async def test_a_multishot_armed_again_sees_every_buffer_handed_back() -> None:
    # Buffers taken during a harvest go back to the kernel with one tail
    # store at its end. A RECV armed again inside that harvest (after
    # -ENOBUFS) and submitted at once must find them back already, or the
    # kernel answers -ENOBUFS again at once and the harvest never ends.
    try:
        get_transport("proactor")
    except TransportUnavailable as exc:
        pytest.skip(str(exc))
    from peerd.transport import _ring

    ring = _ring.Ring(owned=True)
    bufs = ring.buffer_ring(2, 64)
    if bufs is None:
        ring.close()
        pytest.skip("no provided-buffer rings here")
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    got = bytearray()
    dry = 0

    def done(res: int, flags: int) -> None:
        nonlocal dry
        if flags & _ring.L.IORING_CQE_F_BUFFER:
            got.extend(bufs.take(flags, max(res, 0)))
        if res == -errno.ENOBUFS:
            dry += 1
            assert dry < 20, "the pool stayed dry: armed again before its buffers were back"
            arm()
            ring._submit()  # as a task that is not the ring's pumper does

    def arm() -> None:
        ring.start_multishot(
            _ring.L.io_uring_prep_recv_multishot, (b.fileno(), None, 0), done, bufs.bgid
        )

    try:
        b.setblocking(True)
        a.sendall(bytes(range(200)))
        b.setblocking(False)
        arm()
        with trio.fail_after(5):
            while len(got) < 200:
                ring.harvest()
                await trio.sleep(0.001)
        assert bytes(got) == bytes(range(200))
        assert dry >= 1, "the pool never ran dry: the test proves nothing"
        ring.cancel_fd(b.fileno())
        with trio.fail_after(5):
            while ring._ops:
                ring.harvest()
                await trio.sleep(0.001)
    finally:
        ring.drop_buffer_ring(bufs)
        ring.close()
        a.close()
        b.close()


async def test_ring_mux_close_cancels_armed_receives_and_leaks_nothing(
    transport: Transport,
) -> None:
    if transport.name != "proactor":
        pytest.skip("the ring mux only")
    from peerd.transport import _ring

    _ring.current_ring()  # the streams' ring: before the count of open fds
    fds = len(os.listdir("/proc/self/fd"))
    pairs = [await stream_pair(transport) for _ in range(16)]
    mux = transport.open_mux()
    ring = mux._ring  # type: ignore[attr-defined]  # the mux's own ring
    for _, server in pairs:
        mux.add(server)
    multishot = getattr(mux, "_multishot", False)
    await pairs[0][0].send_all(b"some")
    with trio.fail_after(5):
        assert await _collect(mux, {pairs[0][1]: 4}) == {pairs[0][1]: b"some"}
    await trio.sleep(0.05)  # every RECV is armed in the kernel
    assert len(ring._ops) == 16
    with trio.fail_after(5):
        await mux.aclose()  # cancels all 16 in the kernel and waits for them
    assert not ring._ops, "operations left in the ring after the mux closed"
    if multishot:
        assert not ring._buffer_rings, "the buffer pool is still registered"
    for client, server in pairs:
        await client.aclose()
        await server.aclose()
    assert len(os.listdir("/proc/self/fd")) == fds  # the mux's ring and eventfd too
