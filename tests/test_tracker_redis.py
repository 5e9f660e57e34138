"""Several trackers on one real Redis (``--store redis://...``), both transports.

A real ``redis-server`` (tests/redis_server.py) on a free loopback port, or
a real three-node Redis Cluster (``redis+cluster://``; one per test worker,
emptied before each test); two in-process trackers on real sockets share
it; ``peer tracker`` as a process for the start-up failure. Nothing
imitates Redis.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

import tracker._redis
from peerd.content.identity import Identity
from peerd.errors import TrackerError
from peerd.node.tracker_client import TrackerClient
from peerd.transport import Transport
from tests.e2e import free_port, stop, wait_port
from tests.redis_server import RedisClusterServers, RedisServer, TlsProxy, make_tls_cert
from tests.test_tracker import CS, bits, make_manifest
from tracker._budget import Budget
from tracker._redis import _entries, _log, _manifest, _payer, _payer_bytes, _shard
from tracker.server import TrackerLimits, serve_tracker
from tracker.store import open_backend

SEEN_WITHIN = 1.0  # the promise: announced to one tracker, in every other's answers by then


def one_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    yield from one_redis(tmp_path / "redis")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["redis", "cluster"])
def shared(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RedisServer | RedisClusterServers]:
    """One Redis, or a Redis Cluster: the same tests hold on both."""
    if request.param == "redis":
        yield from one_redis(tmp_path / "redis")
        return
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    for node in cluster.nodes:
        assert node.command("FLUSHALL").startswith(b"+OK")
    yield cluster
    # coredis's cluster client leaves anyio memory streams unclosed (a
    # ResourceWarning in their __del__; not ours to fix): collected here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@asynccontextmanager
async def trackers(
    transport: Transport, tmp_path: Path, url: str, n: int = 2, **kwargs: Any
) -> AsyncIterator[list[int]]:
    """``n`` in-process trackers on ``url``; yields their ports."""
    async with trio.open_nursery() as nursery:
        ports = []
        for i in range(n):
            ports.append(
                await nursery.start(
                    functools.partial(
                        serve_tracker,
                        "127.0.0.1",
                        0,
                        tmp_path / f"unused{i}",
                        transport,
                        store=url,
                        **kwargs,
                    )
                )
            )
        yield ports
        nursery.cancel_scope.cancel()


async def connect(transport: Transport, port: int, identity: Identity) -> TrackerClient:
    return await TrackerClient.connect(transport, "127.0.0.1", port, identity)


async def peers_seen(client: TrackerClient, cid: bytes, have: bytes) -> set[int]:
    peers = await client.announce(cid, 7000, "periodic", have, 50)
    assert peers is not None
    return {p.port for p in peers.peers}


async def test_announce_to_one_seen_by_the_other(
    transport: Transport, tmp_path: Path, shared: RedisServer | RedisClusterServers
) -> None:
    redis = shared
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = make_manifest(os.urandom(3 * CS), alice)
    cid = manifest.content_id
    with trio.fail_after(20):
        async with trackers(transport, tmp_path, redis.url) as (a, b):
            ca, cb = await connect(transport, a, alice), await connect(transport, b, bob)
            cc = await connect(transport, a, carol)
            async with ca, cb, cc:
                await ca.publish(manifest)
                # published to A: resolves from B, by full id and by a 16-hex prefix
                assert await cb.resolve(cid.hex()) == cid
                assert await cb.resolve(cid.hex()[:16]) == cid
                assert await cb.get_manifest(cid) == manifest
                await ca.announce(cid, 1111, "started", bits(3, {0, 1, 2}), 0)
                # B has never seen this content: its first answer loads it from Redis
                start = trio.current_time()
                while 1111 not in await peers_seen(cb, cid, bits(3, set())):
                    assert trio.current_time() - start < SEEN_WITHIN
                    await trio.sleep(0.05)
                # B now holds the content: a newcomer on A reaches B through the change log
                await cc.announce(cid, 3333, "started", bits(3, {1}), 0)
                start = trio.current_time()
                while 3333 not in await peers_seen(cb, cid, bits(3, set())):
                    assert trio.current_time() - start < SEEN_WITHIN
                    await trio.sleep(0.05)
                # and bob, announced to B, is in A's answers
                start = trio.current_time()
                while 7000 not in await peers_seen(ca, cid, bits(3, {0, 1, 2})):
                    assert trio.current_time() - start < SEEN_WITHIN
                    await trio.sleep(0.05)
                # a stop on A leaves B's answers too
                await cc.announce(cid, 3333, "stopped", bits(3, {1}), 0)
                start = trio.current_time()
                while 3333 in await peers_seen(cb, cid, bits(3, set())):
                    assert trio.current_time() - start < SEEN_WITHIN
                    await trio.sleep(0.05)
                # what is in Redis is not trusted: garbage there (a hand-written
                # entry, a log record) is skipped, and both trackers go on answering
                bad_key = b"\x07" * 32
                redis.command("HSET", _entries(cid), bad_key, b"9999999999999\xc1")
                for junk in (b"\xc1", msgpack.packb(["no-ip", "", 1, b"\x00"])):
                    record = b"\x00" * 8 + cid + bad_key + b"9999999999999" + junk
                    assert redis.command("XADD", _log(_shard(cid)), "*", "e", record).startswith(
                        b"$"
                    )
                for junk in (b"-5", b"x", b"9" * 12):  # completed counts no tracker wrote
                    record = b"\x00" * 8 + cid + junk
                    assert redis.command("XADD", _log(_shard(cid)), "*", "c", record).startswith(
                        b"$"
                    )
                await trio.sleep(0.3)
                for client in (ca, cb):
                    assert [s.completed for s in await client.scrape([cid])] == [0]
                everyone = {alice.public_key, bob.public_key}
                for client, me in ((ca, alice), (cb, bob)):
                    peers = await client.announce(cid, 7000, "periodic", bits(3, {0}), 50)
                    assert peers is not None
                    assert {p.key for p in peers.peers} == everyone - {me.public_key}
                # an unknown content is still refused by either
                with pytest.raises(TrackerError) as info:
                    await cb.announce(b"\x01" * 32, 1, "started", b"\x00", 0)
                assert info.value.code == "not-found"


async def test_limit_per_address_holds_across_trackers(
    transport: Transport,
    tmp_path: Path,
    shared: RedisServer | RedisClusterServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = shared
    monkeypatch.setattr(tracker._redis, "REFUSED_SECONDS", 0.3)
    owner = Identity.generate()
    manifest = make_manifest(os.urandom(CS), owner)
    cid = manifest.content_id
    ids = [Identity.generate() for _ in range(4)]
    limits = TrackerLimits(shared_entries_per_address=3)
    with trio.fail_after(20):
        async with trackers(transport, tmp_path, redis.url, limits=limits) as (a, b):
            async with await connect(transport, a, owner) as c:
                await c.publish(manifest)
            clients = [
                await connect(transport, port, i) for port, i in zip((a, a, b, b), ids, strict=True)
            ]
            try:
                for n, c in enumerate(clients):
                    await c.announce(cid, 2000 + n, "started", bits(1, {0}), 0)
                    start = trio.current_time()  # each write flushed before the next
                    while n < 3 and redis.command("HLEN", _entries(cid)) != b":%d\r\n" % (n + 1):
                        assert trio.current_time() - start < SEEN_WITHIN
                        await trio.sleep(0.05)
                # three entries from 127.0.0.1 in Redis, counted there over both trackers
                assert redis.command("HLEN", _entries(cid)) == b":3\r\n"
                assert redis.command("ZCARD", _payer("127.0.0.1")) == b":3\r\n"
                # and their bytes: 256 + a 1-byte bitmap each
                assert redis.command("GET", _payer_bytes("127.0.0.1")) == b"$3\r\n771\r\n"
                # the fourth is refused by Redis, then by its tracker
                start = trio.current_time()
                with pytest.raises(TrackerError) as info:
                    while trio.current_time() - start < SEEN_WITHIN:
                        await clients[3].announce(cid, 2003, "periodic", bits(1, {0}), 0)
                        await trio.sleep(0.05)
                assert info.value.code == "limit"
                # the refused entry is in neither tracker's answers
                for port in (a, b):
                    async with await connect(transport, port, Identity.generate()) as c:
                        assert 2003 not in await peers_seen(c, cid, bits(1, set()))
                await trio.sleep(0.25)  # those askers' own entries are refused by now
                # one stops (on A): its place frees in Redis, and the refused one fits (on B)
                await clients[0].announce(cid, 2000, "stopped", bits(1, {0}), 0)
                await trio.sleep(0.35)
                assert redis.command("ZCARD", _payer("127.0.0.1")) == b":2\r\n"
                assert redis.command("GET", _payer_bytes("127.0.0.1")) == b"$3\r\n514\r\n"
                await clients[3].announce(cid, 2003, "periodic", bits(1, {0}), 0)
                start = trio.current_time()
                while redis.command("ZCARD", _payer("127.0.0.1")) != b":3\r\n":
                    assert trio.current_time() - start < SEEN_WITHIN
                    await trio.sleep(0.05)
            finally:
                for c in clients:
                    await c.aclose()


async def test_scrape_counts_completed_over_the_pool(
    transport: Transport, tmp_path: Path, shared: RedisServer | RedisClusterServers
) -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = make_manifest(os.urandom(2 * CS), alice)
    cid = manifest.content_id
    with trio.fail_after(20):
        async with trackers(transport, tmp_path, shared.url) as (a, b):
            ca, cb = await connect(transport, a, alice), await connect(transport, b, bob)
            cc = await connect(transport, b, carol)
            async with ca, cb, cc:
                await ca.publish(manifest)
                # alice completes on A (twice: counted once), bob and carol on B
                await ca.announce(cid, 1111, "started", bits(2, set()), 0)
                await ca.announce(cid, 1111, "completed", bits(2, {0, 1}), 0)
                await ca.announce(cid, 1111, "completed", bits(2, {0, 1}), 0)
                await cb.announce(cid, 2222, "completed", bits(2, {0, 1}), 0)
                await cc.announce(cid, 3333, "completed", bits(2, {0, 1}), 0)
                # every tracker's SCRAPE soon says 3: the count lives in Redis
                for client in (ca, cb):
                    start = trio.current_time()
                    while True:
                        (stat,) = await client.scrape([cid])
                        if stat.completed == 3:
                            break
                        assert stat.completed < 3
                        assert trio.current_time() - start < SEEN_WITHIN, stat
                        await trio.sleep(0.05)
                    assert (stat.seeders, stat.leechers) == (3, 0)
                await trio.sleep(0.3)  # and it stays 3 (alice's second completion not counted)
                for client in (ca, cb):
                    assert [s.completed for s in await client.scrape([cid])] == [3]


async def test_expired_entries_are_swept_from_their_contents(
    tmp_path: Path, shared: RedisServer | RedisClusterServers
) -> None:
    """Step 1 finds an address's expired entries; step 2 deletes them in their contents' slots."""
    backend = await open_backend(
        shared.url,
        tmp_path,
        ttl=2.0,
        interval=1.0,
        clock=trio.current_time,
        max_contents=100,
        max_contents_per_peer=100,
        max_peers_per_content=100,
        memory=Budget(1 << 30, 1 << 28),
        max_disk=1 << 30,
        entries_per_address=100,
    )
    cid, other = b"\x3c" + os.urandom(31), b"\xd2" + os.urandom(31)  # two shards
    gone, kept = b"k" * 32, b"m" * 32

    async def until(*check: str | bytes, reply: bytes) -> None:
        start = trio.current_time()
        while shared.command(*check) != reply:
            assert trio.current_time() - start < SEEN_WITHIN, check
            await trio.sleep(0.05)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            backend.wrote(cid, gone, "127.0.0.9", "", 1, b"\x80")
            await until("HEXISTS", _entries(cid), gone, reply=b":1\r\n")
            await trio.sleep(1.0)
            # another address's entry keeps the content's hash alive, and another
            # entry of the first address keeps that address's keys alive
            backend.wrote(cid, kept, "127.0.0.8", "", 2, b"\x80")
            backend.wrote(other, kept, "127.0.0.9", "", 3, b"\x80")
            await until("HEXISTS", _entries(cid), kept, reply=b":1\r\n")
            await until("HEXISTS", _entries(other), kept, reply=b":1\r\n")
            await trio.sleep(1.1)  # the first entry has expired, its hash lives on
            assert shared.command("HEXISTS", _entries(cid), gone) == b":1\r\n"
            assert shared.command("ZCARD", _payer("127.0.0.9")) == b":2\r\n"
            # that address's next write (to the other shard) sweeps it, from both slots
            backend.wrote(other, gone, "127.0.0.9", "", 4, b"\x80")
            await until("HEXISTS", _entries(other), gone, reply=b":1\r\n")
            await until("HEXISTS", _entries(cid), gone, reply=b":0\r\n")
            assert shared.command("HEXISTS", _entries(cid), kept) == b":1\r\n"
            assert shared.command("ZCARD", _payer("127.0.0.9")) == b":2\r\n"
            assert shared.command("GET", _payer_bytes("127.0.0.9")) == b"$3\r\n514\r\n"
            nursery.cancel_scope.cancel()


async def test_a_full_content_sheds_entries_no_address_sweeps(
    tmp_path: Path, shared: RedisServer | RedisClusterServers
) -> None:
    """Entries whose addresses went quiet (their keys expired whole) do not keep a content full."""
    backend = await open_backend(
        shared.url,
        tmp_path,
        ttl=2.0,
        interval=1.0,
        clock=trio.current_time,
        max_contents=100,
        max_contents_per_peer=100,
        max_peers_per_content=2,
        memory=Budget(1 << 30, 1 << 28),
        max_disk=1 << 30,
        entries_per_address=100,
    )
    cid = os.urandom(32)
    quiet, live, late = b"q" * 32, b"l" * 32, b"n" * 32

    async def until(*check: str | bytes, reply: bytes) -> None:
        start = trio.current_time()
        while shared.command(*check) != reply:
            assert trio.current_time() - start < SEEN_WITHIN, check
            await trio.sleep(0.05)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            backend.wrote(cid, quiet, "127.0.0.7", "", 1, b"\x80")
            await until("HEXISTS", _entries(cid), quiet, reply=b":1\r\n")
            await trio.sleep(1.0)
            backend.wrote(cid, live, "127.0.0.6", "", 2, b"\x80")  # full now, alive till +3 s
            await until("HEXISTS", _entries(cid), live, reply=b":1\r\n")
            await trio.sleep(1.1)  # the quiet address's entry and keys have expired
            assert shared.command("EXISTS", _payer("127.0.0.7")) == b":0\r\n"
            assert shared.command("HLEN", _entries(cid)) == b":2\r\n"
            backend.wrote(cid, late, "127.0.0.5", "", 3, b"\x80")
            await until("HEXISTS", _entries(cid), late, reply=b":1\r\n")
            assert shared.command("HEXISTS", _entries(cid), quiet) == b":0\r\n"
            assert shared.command("HEXISTS", _entries(cid), live) == b":1\r\n"
            nursery.cancel_scope.cancel()


@pytest.fixture
def coredis_leaks() -> Iterator[None]:
    """Collect garbage after the test, still under its warning filter.

    coredis drops the anyio memory streams of its failed connection attempts
    without closing them (a ResourceWarning in their ``__del__``, not ours
    to fix): collected here, they warn in this test, not in a later one.
    """
    yield
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("coredis_leaks")
async def test_redis_restart_keeps_serving_then_repopulates(
    transport: Transport, tmp_path: Path, redis: RedisServer
) -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = make_manifest(os.urandom(2 * CS), alice)
    cid = manifest.content_id
    with trio.fail_after(30):
        async with trackers(transport, tmp_path, redis.url) as (a, b):
            ca, cb = await connect(transport, a, alice), await connect(transport, b, bob)
            async with ca, cb:
                await ca.publish(manifest)
                await ca.announce(cid, 1111, "started", bits(2, {0, 1}), 0)
                await trio.sleep(0.3)
                assert 1111 in await peers_seen(cb, cid, bits(2, set()))
                await trio.sleep(0.4)  # bob's entry, announced to B, reaches A
                redis.stop()
                # Redis is gone: both still answer from their last view
                await trio.sleep(0.3)
                assert 1111 in await peers_seen(cb, cid, bits(2, set()))
                assert 7000 in await peers_seen(ca, cid, bits(2, {0, 1}))
                redis.start()  # empty: no persistence
                # the writes queued meanwhile and the re-announces fill it again
                await ca.announce(cid, 1111, "periodic", bits(2, {0, 1}), 0)
                await trio.sleep(2.5)  # the backoff reaches 0.8 s by now
                assert redis.command("HEXISTS", _entries(cid), alice.public_key) == b":1\r\n"
                # a newcomer after the restart reaches the other tracker again
                async with await connect(transport, a, carol) as cc:
                    await cc.announce(cid, 3333, "started", bits(2, {1}), 0)
                    start = trio.current_time()
                    while 3333 not in await peers_seen(cb, cid, bits(2, set())):
                        assert trio.current_time() - start < SEEN_WITHIN + 2.0
                        await trio.sleep(0.05)


def test_redis_unreachable_at_start_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "tracker",
            "--port",
            "0",
            "--data",
            str(tmp_path),
            "--store",
            f"redis://:secret@127.0.0.1:{port}/0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "peer: error:" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("peer: error: cannot reach Redis at redis://127.0.0.1:")
    assert "secret" not in done.stderr and "Traceback" not in done.stderr


def test_bad_store_url_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "tracker", "--port", "0", "--store", "mysql://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("peer: error: --store mysql://x")


@pytest.fixture
def tls_redis(redis: RedisServer, tmp_path: Path) -> Iterator[tuple[TlsProxy, Path]]:
    """TLS (a throwaway self-signed certificate) in front of the real redis-server."""
    cert, key = make_tls_cert(tmp_path / "tls")
    proxy = TlsProxy(redis.port, cert, key)
    try:
        yield proxy, cert
    finally:
        proxy.close()


def test_rediss_with_its_ca(
    transport: Transport, tmp_path: Path, redis: RedisServer, tls_redis: tuple[TlsProxy, Path]
) -> None:
    proxy, cert = tls_redis
    port = free_port()
    url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
    err = tmp_path / "tracker.err"
    with err.open("wb") as to_err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli", "tracker", "--port", str(port)),
                *("--transport", transport.name, "--data", str(tmp_path / "t"), "--store", url),
            ],
            stdout=subprocess.DEVNULL,
            stderr=to_err,
        )
    owner = Identity.generate()
    manifest = make_manifest(os.urandom(CS), owner)
    cid = manifest.content_id

    async def publish() -> None:
        with trio.fail_after(20):
            async with await connect(transport, port, owner) as client:
                await client.publish(manifest)
                assert await client.resolve(cid.hex()[:16]) == cid

    try:
        try:
            wait_port(port, proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {err.read_text(errors='replace')[-2000:]}") from None
        trio.run(publish)
        # it went through TLS to the real Redis
        assert proxy.handshakes >= 1
        assert redis.command("EXISTS", _manifest(cid)) == b":1\r\n"
    finally:
        assert stop(proc) == 0


def test_rediss_with_an_untrusted_certificate_is_one_line(
    tmp_path: Path, tls_redis: tuple[TlsProxy, Path]
) -> None:
    proxy, _cert = tls_redis  # its CA not given: the self-signed certificate is refused
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cli", "tracker", "--port", "0", "--data", str(tmp_path)),
            *("--store", f"rediss://:secret@127.0.0.1:{proxy.port}/0"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "peer: error:" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(
        f"peer: error: cannot reach Redis at rediss://127.0.0.1:{proxy.port}"
    )
    assert "certificate" in errors[0] and "ssl_ca_certs" in errors[0]
    assert "secret" not in done.stderr and "Traceback" not in done.stderr
    assert proxy.handshakes == 0


def tracker_error(tmp_path: Path, url: str) -> str:
    """``peer tracker --store url`` fails at start: its one error line."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "tracker",
            "--port",
            "0",
            "--data",
            str(tmp_path),
            "--store",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "peer: error:" in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_cluster_and_a_lone_redis_are_not_mistaken(
    tmp_path: Path, redis: RedisServer, redis_cluster: RedisClusterServers
) -> None:
    # a cluster's node named as one Redis: said so (not a MOVED error later)
    node = redis_cluster.nodes[0]
    line = tracker_error(tmp_path, f"redis://127.0.0.1:{node.port}/0")
    assert line == (
        f"peer: error: redis://127.0.0.1:{node.port}/0 is a Redis Cluster node: "
        "name it redis+cluster://HOST:PORT"
    )
    # a lone Redis named as a cluster
    line = tracker_error(tmp_path, f"redis+cluster://127.0.0.1:{redis.port}")
    assert line.startswith(
        f"peer: error: cannot reach Redis at redis+cluster://127.0.0.1:{redis.port}"
    )
    assert line.endswith("(is it a Redis Cluster?)")
