"""The tracker over real sockets on loopback, with both transports.

In-process servers (``nursery.start(serve_tracker, ...)``) and real
``TrackerClient`` connections; a few run ``peer tracker`` (``python -m cli
tracker``) as a real process, e.g. to check that manifests survive a restart.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.content.hashing import hash_chunk, merkle_root
from peerd.content.identity import Identity
from peerd.content.manifest import Info, Manifest
from peerd.errors import TrackerError
from peerd.node.tracker_client import AUTH_CONTEXT, TrackerClient
from peerd.transport import Stream, Transport
from peerd.wire import (
    NEED_DATA,
    Announce,
    Auth,
    Challenge,
    Closed,
    Error,
    Event,
    Ok,
    Peers,
    Scrape,
    ScrapeResult,
    ScrapeStat,
    TrackerClientConnection,
)
from tracker.manifests import ManifestStore
from tracker.server import TrackerLimits, serve_tracker

CS = 16 * 1024


def make_manifest(data: bytes, signer: Identity, name: str = "f.bin") -> Manifest:
    hashes = b"".join(hash_chunk("blake3", data[i : i + CS]) for i in range(0, len(data), CS))
    info = Info(name, len(data), CS, "blake3", hashes, merkle_root("blake3", hashes))
    return Manifest(info).signed(signer)


def fake_manifest(chunks: int, signer: Identity, name: str = "f.bin") -> Manifest:
    """A valid signed manifest of ``chunks`` chunks without the data (random hashes)."""
    hashes = os.urandom(32 * chunks)
    info = Info(name, chunks * CS, CS, "blake3", hashes, merkle_root("blake3", hashes))
    return Manifest(info).signed(signer)


# An ANNOUNCE needs a published manifest: every tracker these tests start has
# these three stored (see running_tracker).
_PUBLISHER = Identity.generate()
PUBLISHED = [fake_manifest(n, _PUBLISHER, f"{n}.bin") for n in (8, 16, 4096)]
CID, CID16, CID4096 = (m.content_id for m in PUBLISHED)


def bits(n: int, have: set[int]) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in have:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Running:
    """An in-process tracker under test."""

    def __init__(self, transport: Transport, port: int) -> None:
        self.transport = transport
        self.port = port

    async def __call__(self, identity: Identity, source_host: str | None = None) -> TrackerClient:
        return await TrackerClient.connect(
            self.transport, "127.0.0.1", self.port, identity, source_host=source_host
        )


@asynccontextmanager
async def running_tracker(
    transport: Transport, data_dir: Path, **kwargs: Any
) -> AsyncIterator[Running]:
    """Start an in-process tracker; yields a ``connect(identity)`` callable."""
    store = ManifestStore(data_dir)
    for m in PUBLISHED:
        store.put(m.content_id, m.encode(), m.info.num_chunks)
    store.close()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_tracker, "127.0.0.1", 0, data_dir, transport, **kwargs)
        )
        yield Running(transport, port)
        nursery.cancel_scope.cancel()


async def read_event(stream: Stream, conn: TrackerClientConnection) -> Event:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def test_announce_scrape_complete_stop(transport: Transport, tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    manifest = make_manifest(os.urandom(9 * CS + 1), alice)  # 10 chunks
    cid = manifest.content_id
    full = bits(10, set(range(10)))
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            a = await connect(alice)
            b = await connect(bob, source_host="127.0.0.2")
            async with a, b:
                await a.publish(manifest)
                peers = await a.announce(cid, 6001, "started", full)
                assert peers is not None and peers.peers == () and peers.interval == 60
                peers = await b.announce(cid, 6002, "started", bits(10, {0}))
                assert peers is not None
                [entry] = peers.peers
                assert (entry.ip, entry.port, entry.key) == ("127.0.0.1", 6001, alice.public_key)
                assert entry.bits == full
                assert peers.availability == b"\x00\x02" + b"\x00\x01" * 9
                # the tracker records the address the connection comes from
                peers = await a.announce(cid, 6001, "periodic", full)
                assert peers is not None
                assert [(p.ip, p.key) for p in peers.peers] == [("127.0.0.2", bob.public_key)]
                # CID is published but has no peer: left out
                assert await a.scrape([cid, CID]) == [ScrapeStat(cid, 1, 1, 0)]
                await b.announce(cid, 6002, "completed", full)
                assert await b.scrape([cid]) == [ScrapeStat(cid, 2, 0, 1)]
                assert await a.announce(cid, 6001, "stopped", full) is None
                peers = await b.announce(cid, 6002, "periodic", full)
                assert peers is not None and peers.peers == ()
                # a bitmap of the wrong size is refused, the connection stays usable
                with pytest.raises(TrackerError) as info:
                    await b.announce(cid, 6002, "periodic", bits(20, set()))
                assert info.value.code == "bad-request"
                assert await b.scrape([cid]) == [ScrapeStat(cid, 1, 0, 1)]
                # without a published manifest there is no swarm to join
                with pytest.raises(TrackerError) as info:
                    await b.announce(bytes(range(32)), 6002, "started", bits(10, {0, 9}))
                assert info.value.code == "not-found"
                assert await b.scrape([bytes(range(32))]) == []


async def test_entries_expire_after_the_ttl(transport: Transport, tmp_path: Path) -> None:
    clock = FakeClock()
    alice, bob = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with running_tracker(
            transport, tmp_path, clock=clock, ttl=30.0, interval=10.0
        ) as connect:
            a = await connect(alice)
            b = await connect(bob)
            async with a, b:
                await a.announce(CID, 1, "started", bits(8, {1}))
                clock.now += 29
                peers = await b.announce(CID, 2, "started", bits(8, set()))
                assert peers is not None and [p.key for p in peers.peers] == [alice.public_key]
                assert peers.interval == 10
                clock.now += 2  # alice missed her announces
                peers = await b.announce(CID, 2, "periodic", bits(8, set()))
                assert peers is not None and peers.peers == ()
                assert await b.scrape([CID]) == [ScrapeStat(CID, 0, 1, 0)]


async def test_rarest_holder_is_offered_first(transport: Transport, tmp_path: Path) -> None:
    ids = [Identity.generate() for _ in range(5)]
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            clients = [await connect(i) for i in ids]
            try:
                for c in clients[:3]:
                    await c.announce(CID16, 1, "started", bits(16, set(range(1, 16))))
                await clients[3].announce(CID16, 4, "started", bits(16, {0}))
                peers = await clients[4].announce(CID16, 5, "started", bits(16, set()), want=1)
                assert peers is not None
                assert [p.key for p in peers.peers] == [ids[3].public_key]
                assert peers.availability[:4] == b"\x00\x01\x00\x03"
            finally:
                for c in clients:
                    await c.aclose()


async def test_publish_get_and_resolve(transport: Transport, tmp_path: Path) -> None:
    alice = Identity.generate()
    manifest = make_manifest(os.urandom(3 * CS + 7), alice)
    cid = manifest.content_id
    # two ids sharing a 20-character prefix, stored beforehand (no SHA-256
    # preimage needed to test the ambiguous case)
    twin_a, twin_b = bytes.fromhex("ab" * 10 + "00" * 22), bytes.fromhex("ab" * 10 + "11" * 22)
    store = ManifestStore(tmp_path)
    store.put(twin_a, b"x", 1)
    store.put(twin_b, b"y", 1)
    store.close()
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            async with await connect(alice) as client:
                with pytest.raises(TrackerError) as info:
                    await client.get_manifest(cid)
                assert info.value.code == "not-found"
                await client.publish(manifest)
                await client.publish(manifest)  # idempotent
                got = await client.get_manifest(cid)
                assert got == manifest
                assert await client.resolve(cid.hex()[:16]) == cid
                assert await client.resolve(cid.hex()) == cid
                with pytest.raises(TrackerError) as info:
                    await client.resolve("ab" * 8)
                assert info.value.code == "ambiguous-prefix"
                assert await client.resolve("ab" * 10 + "1") == twin_b
                with pytest.raises(TrackerError) as info:
                    await client.resolve("0123456789abcdef0")
                assert info.value.code in ("not-found", "ambiguous-prefix")
                if not (cid.hex().startswith("0123456789abcdef0")):
                    assert info.value.code == "not-found"
                with pytest.raises(TrackerError) as info:
                    await client.resolve("abc")  # too short: refused before sending
                assert info.value.code == "bad-request"
                # the manifest's chunk count now sizes the swarm's bitmaps
                with pytest.raises(TrackerError, match="4 chunks"):
                    await client.announce(cid, 1, "started", b"\xff\xff")
                peers = await client.announce(cid, 1, "started", bits(4, {0, 3}))
                assert peers is not None and len(peers.availability) == 8


async def test_publish_refuses_bad_manifests(transport: Transport, tmp_path: Path) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    good = make_manifest(os.urandom(CS), alice)
    forged = Manifest(good.info, ((mallory.public_key, good.signatures[0][1]),))
    unsigned = Manifest(good.info)
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            async with await connect(alice) as client:
                for bad in (forged, unsigned):
                    with pytest.raises(TrackerError) as info:
                        await client.publish(bad)
                    assert info.value.code == "bad-manifest"
                with pytest.raises(TrackerError) as info:
                    await client.get_manifest(good.content_id)
                assert info.value.code == "not-found"


async def test_auth_for_another_key_is_rejected(transport: Transport, tmp_path: Path) -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            port = connect.port
            # mallory claims alice's key, signing with her own
            async with await transport.connect("127.0.0.1", port) as stream:
                conn = TrackerClientConnection()
                challenge = await read_event(stream, conn)
                assert isinstance(challenge, Challenge)
                sig = mallory.sign(AUTH_CONTEXT + challenge.nonce)
                await stream.send_all(conn.send(Auth(alice.public_key, sig)))
                refusal = await read_event(stream, conn)
                assert isinstance(refusal, Error) and refusal.code == "auth-failed"
                assert isinstance(await read_event(stream, conn), Closed)
            # a signature replayed from another connection's challenge fails too
            async with await transport.connect("127.0.0.1", port) as stream:
                conn = TrackerClientConnection()
                first = await read_event(stream, conn)
                assert isinstance(first, Challenge)
                old = alice.sign(AUTH_CONTEXT + bytes(32))
                await stream.send_all(conn.send(Auth(alice.public_key, old)))
                refusal = await read_event(stream, conn)
                assert isinstance(refusal, Error) and refusal.code == "auth-failed"
            # alice herself is fine
            async with await connect(alice) as client:
                assert await client.scrape([CID]) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # unknown frame type
        struct.pack(">BI", 34, 0xFFFFFFFF),  # ANNOUNCE with an absurd length prefix
        struct.pack(">BI", 34, 3) + b"\xc1\xc1\xc1",  # invalid msgpack body
    ],
    ids=["unknown-type", "oversized-length", "bad-body"],
)
async def test_garbage_closes_only_that_connection(
    transport: Transport, tmp_path: Path, garbage: bytes
) -> None:
    alice = Identity.generate()
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path) as connect:
            async with await connect(alice) as client:
                await client.announce(CID, 1, "started", b"\x80")
                # after the handshake
                async with await transport.connect("127.0.0.1", connect.port) as stream:
                    conn = TrackerClientConnection()
                    challenge = await read_event(stream, conn)
                    assert isinstance(challenge, Challenge)
                    me = Identity.generate()
                    await stream.send_all(
                        conn.send(Auth(me.public_key, me.sign(AUTH_CONTEXT + challenge.nonce)))
                    )
                    await read_event(stream, conn)
                    await stream.send_all(garbage)
                    reply = await read_event(stream, conn)
                    assert isinstance(reply, Error) and reply.code == "bad-frame"
                    assert await stream.receive_some(100) == b""
                # instead of AUTH
                async with await transport.connect("127.0.0.1", connect.port) as stream:
                    await stream.send_all(garbage)
                    data = b""
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                    assert data[0] == 32 and data.find(b"bad-frame") > 0
                # the tracker still serves the others
                peers = await client.announce(CID, 1, "periodic", b"\x80")
                assert peers is not None
                assert await client.scrape([CID]) == [ScrapeStat(CID, 0, 1, 0)]


async def test_connection_limits_and_handshake_timeout(
    transport: Transport, tmp_path: Path
) -> None:
    limits = TrackerLimits(connections_per_address=2, handshake_timeout=0.3)
    ids = [Identity.generate() for _ in range(3)]
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            a = await connect(ids[0])
            b = await connect(ids[1])
            with pytest.raises(TrackerError) as info:
                await TrackerClient.connect(
                    transport, "127.0.0.1", connect.port, ids[2], busy_wait=0
                )
            assert info.value.code == "too-many"
            # another address has its own allowance
            c = await connect(ids[2], source_host="127.0.0.3")
            await c.aclose()
            await b.aclose()
            await trio.sleep(0.05)  # let the tracker notice the close
            # a silent client is dropped after the handshake timeout
            async with await transport.connect("127.0.0.1", connect.port) as stream:
                conn = TrackerClientConnection()
                assert isinstance(await read_event(stream, conn), Challenge)
                reply = await read_event(stream, conn)
                assert isinstance(reply, Error) and reply.code == "handshake-timeout"
            await a.aclose()


async def test_pipelined_requests_and_idle_timeout(transport: Transport, tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    limits = TrackerLimits(idle_timeout=1.0)
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            async with await connect(alice) as a:
                await a.announce(CID, 6001, "started", b"\x80")
                # AUTH and three requests in one write: answered in order
                async with await transport.connect("127.0.0.1", connect.port) as stream:
                    conn = TrackerClientConnection()
                    challenge = await read_event(stream, conn)
                    assert isinstance(challenge, Challenge)
                    sig = bob.sign(AUTH_CONTEXT + challenge.nonce)
                    await stream.send_all(
                        conn.send(Auth(bob.public_key, sig))
                        + conn.send(Announce(CID, 6002, "started", b"\x40", 50))
                        + conn.send(Announce(CID, 6002, "periodic", b"\x40", 50))
                        + conn.send(Scrape((CID,)))
                    )
                    assert isinstance(await read_event(stream, conn), Ok)
                    for _ in range(2):
                        peers = await read_event(stream, conn)
                        assert isinstance(peers, Peers)
                        assert [(p.ip, p.port, p.key, p.bits) for p in peers.peers] == [
                            ("127.0.0.1", 6001, alice.public_key, b"\x80")
                        ]
                        assert peers.availability == b"\x00\x01" * 2 + bytes(12)
                    assert await read_event(stream, conn) == ScrapeResult(
                        (ScrapeStat(CID, 0, 2, 0),)
                    )
                    # a client that keeps talking outlives the idle timeout...
                    for _ in range(5):
                        await trio.sleep(0.3)
                        await stream.send_all(conn.send(Scrape((CID,))))
                        assert isinstance(await read_event(stream, conn), ScrapeResult)
                    # ...then silence: the tracker closes the connection
                    start = trio.current_time()
                    assert isinstance(await read_event(stream, conn), Closed)
                    assert 0.9 < trio.current_time() - start < 4.0


async def _authenticated(
    transport: Transport, port: int, who: Identity
) -> tuple[Stream, TrackerClientConnection]:
    stream = await transport.connect("127.0.0.1", port)
    conn = TrackerClientConnection()
    challenge = await read_event(stream, conn)
    assert isinstance(challenge, Challenge)
    await stream.send_all(conn.send(Auth(who.public_key, who.sign(AUTH_CONTEXT + challenge.nonce))))
    assert isinstance(await read_event(stream, conn), Ok)
    return stream, conn


async def test_replies_keep_request_order_across_waits(
    transport: Transport, tmp_path: Path
) -> None:
    # Fast answers (known content), answers that need the database (a content
    # the index has not seen) and rate-limit waits, pipelined in one write:
    # the replies still come back in request order.
    alice, bob = Identity.generate(), Identity.generate()
    unknown = bytes(range(1, 33))
    limits = TrackerLimits(messages_per_second=20.0)
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            async with await connect(alice) as a:
                await a.announce(CID, 6001, "started", b"\x80")
                stream, conn = await _authenticated(transport, connect.port, bob)
                async with stream:
                    requests = []
                    for i in range(30):  # more than the 20-message burst
                        if i % 3 == 0:
                            # not published: answered (ERROR) in its turn
                            requests.append(Announce(unknown, 6002, "started", b"\x01", 5))
                        elif i % 3 == 1:
                            requests.append(Announce(CID, 6002, "periodic", b"\x40", 5))
                        else:
                            requests.append(Scrape((CID, unknown)))
                    start = trio.current_time()
                    await stream.send_all(b"".join(conn.send(r) for r in requests))
                    for i in range(30):
                        reply = await read_event(stream, conn)
                        if i % 3 == 2:
                            assert isinstance(reply, ScrapeResult), (i, reply)
                        elif i % 3 == 0:
                            assert isinstance(reply, Error) and reply.code == "not-found", (
                                i,
                                reply,
                            )
                        else:
                            assert isinstance(reply, Peers), (i, reply)
                            assert reply.content_id == CID
                    # the bucket (20/s, burst 20) made the last 10 wait ~0.5 s
                    assert trio.current_time() - start > 0.3


async def test_half_close_while_a_request_waits(transport: Transport, tmp_path: Path) -> None:
    # The client pipelines more than its rate allows and shuts its sending
    # side at once: the tracker answers everything, then closes, and goes on
    # serving the others.
    alice, bob = Identity.generate(), Identity.generate()
    limits = TrackerLimits(messages_per_second=5.0)
    with trio.fail_after(20):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            async with await connect(alice) as a:
                await a.announce(CID, 6001, "started", b"\x80")
                stream, conn = await _authenticated(transport, connect.port, bob)
                async with stream:
                    await stream.send_all(b"".join(conn.send(Scrape((CID,))) for _ in range(8)))
                    await stream.send_eof()
                    for _ in range(8):
                        assert isinstance(await read_event(stream, conn), ScrapeResult)
                    assert isinstance(await read_event(stream, conn), Closed)
                assert await a.scrape([CID]) == [ScrapeStat(CID, 0, 1, 0)]


async def test_a_client_that_does_not_read_stalls_only_itself(
    transport: Transport, tmp_path: Path
) -> None:
    ids = [Identity.generate() for _ in range(10)]
    big = bytes([0xFF]) * 512  # 4,096 chunks: every answer is ~14 KB
    limits = TrackerLimits(messages_per_second=1e6)
    count = 1000  # ~14 MB of answers, far beyond socket buffers and the queue bound
    with trio.fail_after(60):
        async with running_tracker(transport, tmp_path, limits=limits) as connect:
            clients = [await connect(i) for i in ids]
            for port, client in enumerate(clients, 7000):
                await client.announce(CID4096, port, "started", big)
            stuck, conn = await _authenticated(transport, connect.port, Identity.generate())
            async with stuck:
                ask = conn.send(Announce(CID4096, 6000, "started", bytes(512), 50))
                ask += b"".join(
                    conn.send(Announce(CID4096, 6000, "periodic", bytes(512), 50))
                    for _ in range(count - 1)
                )
                await stuck.send_all(ask)
                await trio.sleep(0.5)
                # Everyone else is still answered promptly.
                with trio.fail_after(5):
                    for client in clients:
                        assert await client.scrape([CID4096]) == [ScrapeStat(CID4096, 10, 1, 0)]
                # And the stuck client gets every answer, in order, once it reads.
                for _ in range(count):
                    reply = await read_event(stuck, conn)
                    assert isinstance(reply, Peers) and len(reply.peers) == 10
            for client in clients:
                await client.aclose()


async def test_unreachable_tracker(transport: Transport) -> None:
    listener = await transport.open_listener("127.0.0.1", 0)
    port = listener.port
    await listener.aclose()
    with trio.fail_after(10), pytest.raises(TrackerError) as info:
        await TrackerClient.connect(transport, "127.0.0.1", port, Identity.generate())
    assert info.value.code == "unreachable" and f"127.0.0.1:{port}" in str(info.value)


async def _start_process(data: Path, transport_name: str, *extra: str) -> tuple[trio.Process, int]:
    """``peer tracker --port 0 ...``; returns the process and the port it reports."""
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "cli",
            "tracker",
            "--port",
            "0",
            "--data",
            str(data),
            "--transport",
            transport_name,
            *extra,
        ],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    while b"tracker listening on" not in seen or not seen.endswith(b"\n"):
        chunk = await proc.stderr.receive_some(4096)
        assert chunk, f"tracker exited early: {seen.decode(errors='replace')}"
        seen += chunk
    line = seen[seen.index(b"tracker listening on") :].split(b"\n")[0].decode()
    port = int(line.split()[3].rsplit(":", 1)[1])
    return proc, port


async def _stop_process(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    async with proc.stderr:
        while await proc.stderr.receive_some(4096):
            pass
    assert await proc.wait() == 0


async def test_manifests_survive_a_restart(transport: Transport, tmp_path: Path) -> None:
    alice = Identity.generate()
    manifest = make_manifest(os.urandom(2 * CS), alice)
    data = tmp_path / "data"
    with trio.fail_after(40):
        proc, port = await _start_process(data, transport.name)
        try:
            async with await TrackerClient.connect(transport, "127.0.0.1", port, alice) as client:
                await client.publish(manifest)
                await client.announce(manifest.content_id, 9, "started", bits(2, {0, 1}))
        finally:
            await _stop_process(proc)
        assert (data / "manifests.sqlite3").exists()
        proc, port = await _start_process(data, transport.name)
        try:
            async with await TrackerClient.connect(transport, "127.0.0.1", port, alice) as client:
                assert await client.get_manifest(manifest.content_id) == manifest
                assert await client.resolve(manifest.content_id.hex()[:16]) == manifest.content_id
                # peers are soft state: gone after the restart (a content
                # without peers is left out of SCRAPE)
                assert await client.scrape([manifest.content_id]) == []
        finally:
            await _stop_process(proc)


def test_manifest_store_prefixes(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path / "db")
    ids = [bytes.fromhex("00" * 8 + f"{i:02x}" * 24) for i in (1, 2)] + [bytes(range(32))]
    for n, cid in enumerate(ids):
        assert store.put(cid, b"m%d" % n, n + 1)
    assert not store.put(ids[0], b"other", 5)  # first publish wins
    assert store.get(ids[0]) == b"m0" and store.num_chunks(ids[2]) == 3
    assert store.get(b"\xee" * 32) is None and store.num_chunks(b"\xee" * 32) is None
    assert store.resolve_prefix(ids[2].hex()[:16]) == ids[2]
    assert store.resolve_prefix("00" * 8 + "02") == ids[1]
    for prefix, code in [
        ("00" * 8, "ambiguous-prefix"),
        ("ff" * 8, "not-found"),
        ("00" * 7, "bad-request"),
        ("ZZ" * 8, "bad-request"),
        ("0" * 65, "bad-request"),
    ]:
        with pytest.raises(TrackerError) as info:
            store.resolve_prefix(prefix)
        assert info.value.code == code
    assert len(store) == 3
    store.close()
    store.close()
    reopened = ManifestStore(tmp_path / "db")
    assert reopened.get(ids[1]) == b"m1" and len(reopened) == 3
    reopened.close()


async def test_peer_tracker_passes_its_disk_budget(transport: Transport, tmp_path: Path) -> None:
    # `peer tracker --max-disk 1MiB`: a key may use an eighth of it (128 KiB),
    # so a 5000-chunk manifest (160 KiB of hashes) is refused, a small one kept.
    alice = Identity.generate()
    with trio.fail_after(40):
        proc, port = await _start_process(
            tmp_path / "data",
            transport.name,
            "--max-memory",
            "128MiB",
            "--max-disk",
            "1MiB",
        )
        try:
            async with await TrackerClient.connect(transport, "127.0.0.1", port, alice) as client:
                with pytest.raises(TrackerError) as info:
                    await client.publish(fake_manifest(5000, alice, "big.bin"))
                assert info.value.code == "limit"
                await client.publish(fake_manifest(8, alice, "small.bin"))
        finally:
            await _stop_process(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-memory", "nonsense"), "--max-memory: cannot read 'nonsense' as a size"),
        (("--max-disk", "4 parsecs"), "--max-disk: cannot read '4 parsecs' as a size"),
        (("--max-memory", "1MiB"), "--max-memory must be at least 64 MiB"),
    ],
)
def test_peer_tracker_refuses_a_bad_budget(args: tuple[str, ...], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cli", "tracker", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"peer: error: {message}"), run.stderr
