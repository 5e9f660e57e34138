"""The Redis backend: many tracker processes, one shared state (coredis, on Trio).

Each tracker answers ANNOUNCE from its local ``SwarmIndex`` (the hot path is
unchanged) and keeps that index a *view* of the state in Redis:

* Write-behind: every announce that changes what Redis holds is queued,
  deduplicated per (content, key), and flushed every ``FLUSH_SECONDS`` in
  two steps, each a script call per hash slot (on one Redis: one call for
  the whole batch): the payers' addresses check and charge their limits
  (``_PAY``), then the contents' shards write the charged entries, check the
  per-content limit, count completions and append to their change log
  (``_PUT``). An entry already in Redis with the same address, port and
  bitmap is only written again once its expiry there is ``ttl / 4`` old, so
  repeated announces of an unchanged peer cost Redis nothing.
* Read: every ``READ_SECONDS`` the tracker reads the change log's shards
  from where it left off (one ``XREAD`` of all 16 on one Redis, one per
  shard on a cluster) and applies the other trackers' changes to the
  contents its view holds. A content it has not seen yet is loaded whole
  (``HGETALL``) on its first local announce, before that announce is
  answered. So a peer announced to one tracker is in every other's answers
  within FLUSH + READ seconds (0.3 s) plus Redis's latency.
* Faults: a failed flush or read is retried with backoff (0.1 s doubling to
  2 s); meanwhile the tracker answers from its last view (logged once as
  stale) and keeps the writes queued (one per local entry at most). A
  Redis that restarted empty is refilled by these queued writes and by the
  peers' periodic re-announces.

Keys. ``{...}`` is the Redis Cluster hash tag; every call touches one slot,
so the same calls run on one Redis and on a cluster (``redis+cluster://``):

* Per content, tagged with its shard, the first hex digit of its id ``x``
  (the key then spells the whole id, ``peer:{x}yyyy...``):
  ``:p`` hash: 32-byte key -> entry (13 digits of expiry in unix ms, then
  msgpack [payer address, stated address, port, bitmap]), expires ``ttl``
  after its last write; ``:m`` hash: ``d`` the manifest, ``n`` its chunk
  count; ``:c`` hash: ``#`` the completed count, and the keys counted
  (``s``: when a full ``:p`` was last swept).
* ``peer:{x}:log``  the shard's change log, a stream (field ``e``: origin
  tracker, content id, key, entry value or empty for gone; field ``c``:
  origin, content id, completed count), trimmed to the last
  ``LOG_SECONDS`` (a tracker that falls further behind misses changes
  until the peers' next periodic announces).
* ``peer:{aN}:a:<address>`` sorted set of cid+key+charge by expiry, and
  ``peer:{aN}:ab:<address>`` bytes: what an address pays for, counted
  against its limits; ``N`` (one hex digit of the address's CRC-32) puts the
  addresses in 16 shards, so a flush is at most 16 calls per step on a
  cluster however many addresses it carries.
* ``peer:{g}:ids`` sorted set of published content ids (hex): prefix lookup
  by ``ZRANGE BYLEX``; ``peer:{g}:q`` hash: manifest bytes charged, in all
  (``t``), per key (``k:<hex>``) and per address (``a:<address>``).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from peerd.errors import StorageError, TrackerError

from ._backend import Backend
from ._peer_table import pack_ip
from .index import SwarmIndex, SwarmStat
from .manifests import MIN_PREFIX, ROW_BYTES

__all__ = ["RedisBackend", "SharedIndex", "open_redis"]

log = logging.getLogger("tracker.redis")

FLUSH_SECONDS = 0.1  # queued writes go out at least this often
READ_SECONDS = 0.2  # the change log is read at least this often
BATCH = 2000  # writes per flush round
LOG_SECONDS = 10.0  # change log entries are kept this long (then trimmed)
LOG_READ = 10_000  # change log entries taken per XREAD, per shard
REFUSED_SECONDS = 5.0  # an entry Redis refused is refused locally this long
ENTRY_BYTES = 256  # an entry's charge in Redis beyond its bitmap
PENDING_MAX = 1_000_000  # queued writes kept while Redis is away (oldest dropped)
SWEEP = 512  # expired entries an address's script sweeps per flush
FULL_SWEEP_SECONDS = 5.0  # a full content's hash is swept of expired entries at most this often
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
_HEX = frozenset("0123456789abcdef")
# The shards: a content's hash tag is the first hex digit of its id. Each
# shard's change log is one stream in its slot; a tracker on a cluster reads
# them with one XREAD each, so more shards would cost every tracker more
# reads (16 spread 4/6/6 over a 3-node cluster's even slot ranges).
SHARDS = tuple(f"{i:x}" for i in range(16))
CLUSTER_SUFFIX = "+cluster"  # redis+cluster://, rediss+cluster://

# Per address shard (one slot: {aN}): sweep the address's expired entries,
# then for each write check and charge its count and bytes, or give back a
# release. Returns {refused op numbers, swept members}: the caller deletes
# the swept entries in their contents' slots.
_PAY = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local per_addr = tonumber(ARGV[3])
local per_bytes = tonumber(ARGV[4])
local refused = {}
local swept = {}
local seen = {}
local n = (#ARGV - 4) / 3
for i = 1, n do
  local a, ab = KEYS[2 * i - 1], KEYS[2 * i]
  -- member: content id, key and the entry's charge in bytes
  local member, cost, exp = ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3]), ARGV[3 * i + 4]
  if not seen[a] then
    seen[a] = true
    local gone = redis.call('ZRANGEBYSCORE', a, '-inf', now, 'LIMIT', 0, SWEEP)
    for _, m in ipairs(gone) do
      redis.call('ZREM', a, m)
      redis.call('DECRBY', ab, tonumber(string.sub(m, 65)) or 0)
      swept[#swept + 1] = m
    end
  end
  if exp == '' then
    if redis.call('ZREM', a, member) == 1 then
      redis.call('DECRBY', ab, cost)
    end
  else
    if redis.call('ZSCORE', a, member) then
      redis.call('ZADD', a, exp, member)
    elseif redis.call('ZCARD', a) >= per_addr
           or tonumber(redis.call('GET', ab) or '0') + cost > per_bytes then
      refused[#refused + 1] = i
    else
      redis.call('ZADD', a, exp, member)
      redis.call('INCRBY', ab, cost)
    end
    redis.call('PEXPIRE', a, ttl)
    redis.call('PEXPIRE', ab, ttl)
  end
end
return {refused, swept}
""".replace("SWEEP", str(SWEEP))

# Per content shard (one slot: {x}): write, delete or sweep entries, count
# completions, and append each change to the shard's change log. An op is
# 'w' (write), 'c' (write, and the key completed), 'd' (delete), 's' (delete
# if expired). Returns the refused op numbers (the content is full).
_PUT = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local per_content = tonumber(ARGV[3])
local origin = ARGV[4]
local renew = tonumber(ARGV[5])
local clock = redis.call('TIME')  -- the log's ids are Redis's clock: trim by it
local minid = (tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
               - tonumber(ARGV[6])) .. '-0'
local refused = {}
local function expiry(v)
  return tonumber(string.sub(v, 1, 13)) or 0
end
local n = (#ARGV - 6) / 4
for i = 1, n do
  local h, c, lg = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local cid, pk, val, what = ARGV[4 * i + 3], ARGV[4 * i + 4], ARGV[4 * i + 5], ARGV[4 * i + 6]
  local old = redis.call('HGET', h, pk)
  if what == 's' then
    if old and expiry(old) <= now then
      redis.call('HDEL', h, pk)
    end
  elseif what == 'd' then
    if old then
      redis.call('HDEL', h, pk)
      redis.call('XADD', lg, 'MINID', '~', minid, '*', 'e', origin .. cid .. pk)
    end
  else
    local ok = true
    if not (old and string.sub(old, 14) == string.sub(val, 14)
            and expiry(val) - expiry(old) < renew) then
      if not old and redis.call('HLEN', h) >= per_content
         and now - (tonumber(redis.call('HGET', c, 's')) or 0) >= FULL_SWEEP_MS then
        -- full: its expired entries (whose addresses no longer sweep them) go,
        -- at most every FULL_SWEEP_MS per content over the pool
        redis.call('HSET', c, 's', now)
        local all = redis.call('HGETALL', h)
        for j = 1, #all, 2 do
          if expiry(all[j + 1]) <= now then
            redis.call('HDEL', h, all[j])
          end
        end
      end
      if not old and redis.call('HLEN', h) >= per_content then
        ok = false
        refused[#refused + 1] = i
      else
        redis.call('HSET', h, pk, val)
        redis.call('PEXPIRE', h, ttl)
        redis.call('PEXPIRE', c, ttl)
        redis.call('XADD', lg, 'MINID', '~', minid, '*', 'e', origin .. cid .. pk .. val)
      end
    end
    if ok and what == 'c' and redis.call('HEXISTS', c, pk) == 0 then
      -- SCRAPE's completed count, once per key (keys remembered up to the cap)
      local done = redis.call('HINCRBY', c, '#', 1)
      if redis.call('HLEN', c) <= per_content then
        redis.call('HSET', c, pk, '')
      end
      redis.call('PEXPIRE', c, ttl)
      redis.call('XADD', lg, 'MINID', '~', minid, '*', 'c', origin .. cid .. done)
    end
  end
end
return refused
""".replace("FULL_SWEEP_MS", str(int(FULL_SWEEP_SECONDS * 1000)))

# The manifest budgets (one slot: {g}): check and charge, or give back.
_CHARGE = """
local c = tonumber(ARGV[3])
if c > 0 then
  if tonumber(redis.call('HGET', KEYS[1], 't') or '0') + c > tonumber(ARGV[4]) then return -1 end
  if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') + c > tonumber(ARGV[5]) then
    return -2
  end
  if tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0') + c > tonumber(ARGV[6]) then
    return -3
  end
end
redis.call('HINCRBY', KEYS[1], 't', c)
redis.call('HINCRBY', KEYS[1], ARGV[1], c)
redis.call('HINCRBY', KEYS[1], ARGV[2], c)
return 1
"""

# A manifest (its content's slot): written unless one is there already.
_WRITE_MANIFEST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'n', ARGV[2])
return 1
"""

IDS = "peer:{g}:ids"  # sorted set of published content ids (hex)
QUOTA = "peer:{g}:q"  # manifest bytes charged: in all, per key, per address


def _shard(cid: bytes) -> str:
    return f"{cid[0] >> 4:x}"


def _content(cid: bytes, what: str) -> str:
    h = cid.hex()
    return f"peer:{{{h[:1]}}}{h[1:]}:{what}"


def _entries(cid: bytes) -> str:
    return _content(cid, "p")


def _completed(cid: bytes) -> str:
    return _content(cid, "c")


def _manifest(cid: bytes) -> str:
    return _content(cid, "m")


def _log(shard: str) -> str:
    return f"peer:{{{shard}}}:log"


def _payer_shard(address: str) -> str:
    """An address's shard: its keys' hash tag (16 of them, like the contents')."""
    return f"a{zlib.crc32(address.encode()) & 15:x}"


def _payer(address: str) -> str:
    return f"peer:{{{_payer_shard(address)}}}:a:{address}"


def _payer_bytes(address: str) -> str:
    return f"peer:{{{_payer_shard(address)}}}:ab:{address}"


def entry_charge(nbytes: int) -> int:
    """Bytes an entry with an ``nbytes`` bitmap is charged in Redis (measured ~250 at 32)."""
    return ENTRY_BYTES + nbytes


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _describe(url: str) -> str:
    """``url`` without its password or query (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    _creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{host if at else rest}".partition("?")[0]


class SharedIndex(SwarmIndex):
    """The local view: a ``SwarmIndex`` whose announces are also queued for Redis."""

    def __init__(self, backend: RedisBackend, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend = backend

    def announce_frame(  # type: ignore[override]
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        event: str,
        bits: bytes,
        num_chunks: int | None,
        want: int,
        now: float,
        interval: int,
        *,
        at: str = "",
    ) -> bytes | None:
        self.backend.check(content_id, key, event)
        done = event == "completed"
        kept = None if done else self._unchanged(content_id, key, ip, at, port, bits, now)
        frame = super().announce_frame(
            content_id, key, ip, port, event, bits, num_chunks, want, now, interval, at=at
        )
        self._written(content_id, key, ip, at, port, bits, kept, done)
        return frame

    def _unchanged(
        self, cid: bytes, key: bytes, ip: str, at: str, port: int, bits: bytes, now: float
    ) -> float | None:
        """The entry's expiry if this announce changes nothing Redis needs to hear yet.

        That is: same payer, address, port and bitmap, and its expiry (the
        one Redis has) renewed less than ``ttl / 4`` ago. Such an announce
        is answered but not written, and leaves the expiry as it was, so the
        view's expiry stays the one Redis has and the next announce after
        ``ttl / 4`` writes (the flush script applies the same rule).
        """
        table = self._tables.get(cid)
        slot = None if table is None else table.slots.get(key)
        if table is None or slot is None:
            return None
        expiry = table.expires[slot]
        if expiry - now < 0.75 * self.ttl or table.addrs[slot] != ip:
            return None
        head = self._heads.get((at or ip, port))
        if head is None or table.heads[slot] != head:
            return None
        if table.bits[slot] != int.from_bytes(bits, "big"):
            return None
        return expiry

    def _written(
        self,
        cid: bytes,
        key: bytes,
        ip: str,
        at: str,
        port: int,
        bits: bytes,
        kept: float | None,
        completed: bool,
    ) -> None:
        if kept is None:
            self.backend.wrote(cid, key, ip, at, port, bits, completed)
            return
        table = self._tables.get(cid)
        slot = None if table is None else table.slots.get(key)
        if table is not None and slot is not None:
            table.expires[slot] = kept

    def announce(  # type: ignore[override]
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        port: int,
        event: str,
        bits: bytes,
        num_chunks: int | None,
        want: int,
        now: float,
        *,
        at: str = "",
    ) -> tuple[list[tuple[str, int, bytes, bytes]], bytes]:
        self.backend.check(content_id, key, event)
        if event == "stopped":
            table = self._tables.get(content_id)
            if table is not None and key in table.slots:
                self.backend.removed(content_id, key, ip, entry_charge(table.nbytes))
            return super().announce(
                content_id, key, ip, port, event, bits, num_chunks, want, now, at=at
            )
        done = event == "completed"
        kept = None if done else self._unchanged(content_id, key, ip, at, port, bits, now)
        out = super().announce(content_id, key, ip, port, event, bits, num_chunks, want, now, at=at)
        self._written(content_id, key, ip, at, port, bits, kept, done)
        return out

    def scrape(self, content_ids: list[bytes], now: float) -> list[SwarmStat]:
        """As ``SwarmIndex.scrape``, with the pool's completed counts (from Redis).

        A count is the one this view last read from Redis (it lags by the
        flush and read intervals); a content without one yet has this
        tracker's own count.
        """
        counts = self.backend.completed
        return [
            dataclasses.replace(s, completed=counts.get(s.content_id, s.completed))
            for s in super().scrape(content_ids, now)
        ]


class RedisManifests:
    """Published manifests in Redis (same rules and limits as ``ManifestStore``)."""

    def __init__(self, backend: RedisBackend, max_disk: int) -> None:
        self.backend = backend
        self.client = backend.client
        self.max_bytes = max_disk
        self.max_bytes_per_key = max_disk // 8
        self.max_bytes_per_address = max_disk // 4
        self._charge = self.client.register_script(_CHARGE)
        self._write = self.client.register_script(_WRITE_MANIFEST)

    async def put(
        self, content_id: bytes, data: bytes, num_chunks: int, key: bytes, address: str
    ) -> bool:
        """Store a manifest: charged (global slot), written (its content's slot), listed.

        Three calls, each in one slot (so it runs on Redis Cluster). The
        budgets are charged before the write, so they are never exceeded; a
        tracker that dies between the calls leaves a charge without a
        manifest (the budget errs on the safe side) or a manifest not yet
        listed for prefix lookup, which its next publish lists.
        """
        call, cid = self.backend.call, content_id.hex()
        if await call(self.client.exists([_manifest(content_id)])):
            await call(self.client.zadd(IDS, {cid: 0}))
            return False
        cost = len(data) + ROW_BYTES
        k, a = "k:" + key.hex(), "a:" + address
        limits = [self.max_bytes, self.max_bytes_per_key, self.max_bytes_per_address]
        done = await call(self._charge(keys=[QUOTA], args=[k, a, cost, *limits]))
        if done == -1:
            raise TrackerError("limit", "the tracker's disk budget for manifests is full")
        if done == -2:
            raise TrackerError(
                "limit", f"this key has used its disk quota ({self.max_bytes_per_key} bytes)"
            )
        if done == -3:
            raise TrackerError(
                "limit",
                f"this address has used its disk quota ({self.max_bytes_per_address} bytes)",
            )
        written = await call(self._write(keys=[_manifest(content_id)], args=[data, num_chunks]))
        if not written:  # published meanwhile through another tracker
            await call(self._charge(keys=[QUOTA], args=[k, a, -cost]))
        await call(self.client.zadd(IDS, {cid: 0}))
        return bool(written)

    async def get(self, content_id: bytes) -> bytes | None:
        data = await self.backend.call(self.client.hget(_manifest(content_id), "d"))
        return None if data is None else bytes(data)

    async def num_chunks(self, content_id: bytes) -> int | None:
        """The chunk count of a published content; also loads its swarm into the view.

        The server asks this on a content's first announce to this tracker,
        before answering it, so that first answer already lists the peers
        announced to the other trackers.
        """
        n = await self.backend.call(self.client.hget(_manifest(content_id), "n"))
        if n is None:
            return None
        await self.backend.load(content_id, int(n))
        return int(n)

    async def resolve_prefix(self, prefix: str) -> bytes:
        if not MIN_PREFIX <= len(prefix) <= 64 or not set(prefix) <= _HEX:
            raise TrackerError(
                "bad-request", f"a content id prefix is 16..64 lowercase hex characters: {prefix!r}"
            )
        from coredis.tokens import PureToken

        rows = await self.backend.call(
            self.client.zrange(
                IDS, f"[{prefix}", f"({prefix}g", sortby=PureToken.BYLEX, offset=0, count=2
            )
        )
        ids = [r.decode() if isinstance(r, bytes) else str(r) for r in rows]
        if not ids:
            raise TrackerError("not-found", f"no published content id starts with {prefix}")
        if len(ids) > 1:
            raise TrackerError(
                "ambiguous-prefix",
                f"{prefix} matches several content ids ({ids[0]}, {ids[1]}, ...); "
                "give more characters",
            )
        return bytes.fromhex(ids[0])

    def describe(self) -> str:
        return f"manifests in {self.backend.where}"

    def close(self) -> None:
        pass  # the client is closed by the backend's run()


class RedisBackend(Backend):
    """The shared state: a local view, write-behind to Redis, the change log read back.

    Every Redis call touches keys of one hash slot, so the same calls run on
    one Redis and on Redis Cluster. ``cluster`` only changes how a flush's
    writes are grouped into calls: on one Redis all of a step's writes go in
    one script call (as few round trips as possible), on a cluster one call
    per slot (per address shard, per content shard: 16 of each at most),
    sent concurrently.
    """

    index: SharedIndex

    def __init__(
        self,
        client: Any,
        where: str,
        *,
        cluster: bool = False,
        clock: Callable[[], float],
        index_args: dict[str, Any],
        max_disk: int,
        entries_per_address: int,
        bytes_per_address: int,
    ) -> None:
        self.client = client
        self.where = where
        self.cluster = cluster
        self.clock = clock
        self.ttl = float(index_args["ttl"])
        self.entries_per_address = entries_per_address
        self.bytes_per_address = bytes_per_address
        self.peers_per_content = int(index_args["max_peers_per_content"])
        self.origin = secrets.token_bytes(8)
        self._pay = client.register_script(_PAY)
        self._put = client.register_script(_PUT)
        self._time = client.register_script("return redis.call('TIME')")
        # (content, key) -> (payer address, entry value or b"" to delete, charge, completed)
        self.pending: dict[tuple[bytes, bytes], tuple[str, bytes, int, bool]] = {}
        self.refused: dict[tuple[bytes, bytes], float] = {}
        self.loading: dict[bytes, trio.Event] = {}  # contents being loaded
        self.completed: dict[bytes, int] = {}  # the pool's completed counts (SCRAPE)
        self.last_ids = dict.fromkeys(SHARDS, b"0-0")  # per change-log shard
        # the shards read together: all in one XREAD on one Redis, one per slot on a cluster
        self._log_groups = [[t] for t in SHARDS] if cluster else [list(SHARDS)]
        self.stale = False
        self.wake = trio.Event()
        super().__init__(SharedIndex(self, **index_args), RedisManifests(self, max_disk))

    # -- the hot path's hooks (synchronous) ----------------------------------------
    def check(self, content_id: bytes, key: bytes, event: str) -> None:
        """Refuse an entry Redis refused lately (its limits are counted there)."""
        if not self.refused or event == "stopped":
            return
        until = self.refused.get((content_id, key))
        if until is not None:
            if until > self.clock():
                raise TrackerError(
                    "limit",
                    "the shared tracker state is full for this address or content; retry later",
                )
            del self.refused[(content_id, key)]

    def wrote(
        self,
        content_id: bytes,
        key: bytes,
        ip: str,
        at: str,
        port: int,
        bits: bytes,
        completed: bool = False,
    ) -> None:
        expiry = _wall_ms() + int(self.ttl * 1000)
        value = b"%013d" % expiry + msgpack.packb([ip, at, port, bits])
        if not completed:  # a completion still waiting to go out is kept
            queued = self.pending.get((content_id, key))
            completed = queued is not None and queued[3]
        self._queue(content_id, key, (ip, value, entry_charge(len(bits)), completed))

    def removed(self, content_id: bytes, key: bytes, ip: str, charge: int) -> None:
        self._queue(content_id, key, (ip, b"", charge, False))

    def _queue(self, cid: bytes, key: bytes, write: tuple[str, bytes, int, bool]) -> None:
        pending = self.pending
        pending[(cid, key)] = write
        if len(pending) > PENDING_MAX:  # a long outage: the oldest news goes first
            del pending[next(iter(pending))]

    # -- Redis calls -----------------------------------------------------------------
    async def call(self, request: Any) -> Any:
        """Await one coredis request; a Redis failure is ``StorageError``."""
        from coredis.exceptions import RedisError

        try:
            return await request
        except (RedisError, OSError) as exc:
            raise StorageError(f"Redis at {self.where}: {exc}") from exc
        except Exception as exc:  # whatever else the client raises on a broken connection
            raise StorageError(f"Redis at {self.where}: {type(exc).__name__}: {exc}") from exc

    async def call_all(self, requests: list[Any]) -> list[Any]:
        """Await several requests (to different slots) at once; their replies in order."""
        if len(requests) == 1:
            return [await self.call(requests[0])]
        replies: list[Any] = [None] * len(requests)

        async def one(i: int) -> None:
            replies[i] = await self.call(requests[i])

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(requests)):
                    nursery.start_soon(one, i)
        except* StorageError as group:
            raise group.exceptions[0] from None
        return replies

    def _grouped(self, tags: list[str]) -> list[list[int]]:
        """Op numbers grouped by hash tag on a cluster (one slot per call), else all together."""
        if not self.cluster:
            return [list(range(len(tags)))] if tags else []
        groups: dict[str, list[int]] = {}
        for i, tag in enumerate(tags):
            groups.setdefault(tag, []).append(i)
        return list(groups.values())

    async def ping(self) -> None:
        await self.call(self.client.ping())

    async def load(self, content_id: bytes, num_chunks: int) -> None:
        """Put every live entry Redis holds for ``content_id`` into the view.

        Announces of one new content that arrive together share one load.
        """
        if self.index.num_chunks(content_id) is not None:
            return  # held already: the change log keeps it current
        loading = self.loading.get(content_id)
        if loading is not None:
            await loading.wait()
            return
        self.loading[content_id] = done = trio.Event()
        try:
            rows, completed = await self.call_all(
                [
                    self.client.hgetall(_entries(content_id)),
                    self.client.hget(_completed(content_id), "#"),
                ]
            )
            now, wall = self.clock(), time.time()
            for key, value in rows.items():
                self._apply(content_id, bytes(key), bytes(value), num_chunks, now, wall)
            if completed is not None:
                self._completed(content_id, bytes(completed))
            else:
                self.completed.pop(content_id, None)
        finally:
            del self.loading[content_id]
            done.set()

    def _completed(self, cid: bytes, count: bytes) -> None:
        try:
            n = int(count)
        except ValueError:
            return  # not written by a tracker: ignored
        if not 0 <= n < 1 << 32:  # SCRAPE's field is a u32
            return
        counts = self.completed
        counts[cid] = n
        if len(counts) > 2 * self.index.max_contents:  # keep those of contents the view holds
            for c in [c for c in counts if self.index.num_chunks(c) is None]:
                del counts[c]

    def _apply(
        self, cid: bytes, key: bytes, value: bytes, num_chunks: int, now: float, wall: float
    ) -> None:
        if (cid, key) in self.pending:
            return  # this tracker has newer news of it
        index = self.index
        if not value:
            index.remove_entry(cid, key)
            return
        try:
            expiry = int(value[:13]) / 1000 - wall + now
            ip, at, port, bits = msgpack.unpackb(value[13:])
            pack_ip(ip)
        except (ValueError, TypeError, TrackerError, msgpack.UnpackException):
            return  # not written by a tracker: ignored
        if not (
            isinstance(bits, bytes)
            and isinstance(at, str)
            and isinstance(port, int)
            and 0 <= port <= 0xFFFF
            and len(key) == 32
        ):
            return
        if at:
            try:
                pack_ip(at)
            except (TypeError, TrackerError):
                return
        index.put_entry(cid, key, ip, port, bits, num_chunks, expiry, now, at=at)

    # -- background work -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, check that Redis answers, then flush and read until cancelled.

        Raises:
            StorageError: Redis does not answer (in 5 s) at the start.
        """
        from coredis.exceptions import RedisError

        try:
            async with self.client:
                await self._started(task_status)
        except* StorageError as group:
            raise group.exceptions[0] from None
        except* (OSError, TimeoutError, RedisError) as group:
            # the cluster client connects (and maps the cluster) on entering
            hint = " (is it a Redis Cluster?)" if self.cluster else ""
            raise StorageError(
                f"cannot reach Redis at {self.where}: {group.exceptions[0]}{hint}"
            ) from None

    async def _started(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            with trio.fail_after(5.0):
                await self.ping()
                node = False
                if not self.cluster:  # a cluster's node named as a lone Redis: say so
                    try:
                        info = await self.call(self.client.info("cluster"))
                        node = str(info.get("cluster_enabled", 0)) == "1"
                    except StorageError:
                        pass  # a Redis-compatible server without INFO cluster: not a cluster
                if not node:
                    # Redis's clock (the log's ids), by a script: routed by its key on a cluster
                    clock = await self.call(self._time(keys=[_log(SHARDS[0])]))
        except (StorageError, trio.TooSlowError) as exc:
            detail = (
                _why(exc.__cause__ or exc) if isinstance(exc, StorageError) else "no answer in 5 s"
            )
            raise StorageError(f"cannot reach Redis at {self.where}: {detail}") from None
        if node:
            raise StorageError(
                f"{self.where} is a Redis Cluster node: name it redis+cluster://HOST:PORT"
            )
        # the change log from a second before now (a cluster's nodes' clocks may differ a little)
        start = b"%d-0" % (int(clock[0]) * 1000 + int(clock[1]) // 1000 - 1000)
        self.last_ids = dict.fromkeys(SHARDS, start)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._loop, self.flush, FLUSH_SECONDS)
                nursery.start_soon(self._loop, self.read, READ_SECONDS)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await self.flush()  # what is queued still goes out, if Redis is there
                except StorageError:
                    pass

    async def _loop(self, step: Callable[[], Any], every: float) -> None:
        delay = _BACKOFF_FIRST
        while True:
            try:
                await step()
            except StorageError as exc:
                if not self.stale:
                    self.stale = True
                    # str: a log record keeps no exception (and no dead connection) alive
                    log.warning(
                        "%s; answering from the last view (stale) until it is back", str(exc)
                    )
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            if self.stale:
                self.stale = False
                log.info("Redis at %s is back", self.where)
            delay = _BACKOFF_FIRST
            await trio.sleep(every)

    async def flush(self) -> None:
        """Send the queued writes (``BATCH`` at a time)."""
        while self.pending:
            taken = dict(list(self.pending.items())[:BATCH])
            for k in taken:
                del self.pending[k]
            try:
                await self._flush(list(taken.items()))
            except StorageError:
                for k, v in taken.items():
                    self.pending.setdefault(k, v)  # a newer write wins
                raise

    async def _flush(
        self, ops: list[tuple[tuple[bytes, bytes], tuple[str, bytes, int, bool]]]
    ) -> None:
        """One batch in two steps: the payers' counts, then the contents' entries.

        Step 1 (per address shard slot) checks and charges each write against its
        address's limits and sweeps the address's expired entries; step 2
        (per content shard slot) writes the charged entries and deletes the
        swept ones, checks the per-content limit and appends to the change
        log. An entry step 2 refuses is given back to its address (step 3,
        only then). Writes that repeat an op (a retried batch) are harmless:
        every op is idempotent.
        """
        now = _wall_ms()
        ttl = int(self.ttl * 1000)
        refused: set[int] = set()
        swept: list[bytes] = []
        members = [cid + key + b"%d" % charge for (cid, key), (_p, _v, charge, _c) in ops]
        # key names, once per address and per content of the batch
        payer_keys: dict[str, tuple[str, str, str]] = {}
        content_keys: dict[bytes, tuple[str, str, str, str]] = {}

        def payer_names(address: str) -> tuple[str, str, str]:
            names = payer_keys.get(address)
            if names is None:
                names = (_payer_shard(address), _payer(address), _payer_bytes(address))
                payer_keys[address] = names
            return names

        def content_names(cid: bytes) -> tuple[str, str, str, str]:
            names = content_keys.get(cid)
            if names is None:
                shard = _shard(cid)
                names = (shard, _entries(cid), _completed(cid), _log(shard))
                content_keys[cid] = names
            return names

        def pay_args(nums: list[int], release: bool) -> tuple[list[str], list[Any]]:
            keys: list[str] = []
            args: list[Any] = [now, ttl, self.entries_per_address, self.bytes_per_address]
            for i in nums:
                payer, value, charge, _c = ops[i][1]
                _tag, a, ab = payer_names(payer)
                keys += [a, ab]
                args += [members[i], charge, b"" if release or not value else value[:13]]
            return keys, args

        groups = self._grouped([payer_names(payer)[0] for _k, (payer, _v, _c, _d) in ops])
        calls = [self._pay(*pay_args(nums, False)) for nums in groups]
        for nums, (out, gone) in zip(groups, await self.call_all(calls), strict=True):
            refused.update(nums[int(i) - 1] for i in out)
            swept += [bytes(m) for m in gone]
        # step 2: entries (writes and deletes not refused, then the swept)
        puts: list[tuple[bytes, bytes, bytes, bytes, int]] = []  # cid, key, value, what, op
        for i, ((cid, key), (_p, value, _ch, completed)) in enumerate(ops):
            if i not in refused:
                what = (b"c" if completed else b"w") if value else b"d"
                puts.append((cid, key, value, what, i))
        for m in swept:
            if len(m) >= 64:
                puts.append((m[:32], m[32:64], b"", b"s", -1))
        groups = self._grouped([content_names(cid)[0] for cid, *_ in puts])
        calls = []
        for nums in groups:
            keys: list[str] = []
            args: list[Any] = [
                now,
                ttl,
                self.peers_per_content,
                self.origin,
                ttl // 4,
                int(LOG_SECONDS * 1000),
            ]
            for j in nums:
                cid, key, value, what, _i = puts[j]
                keys += content_names(cid)[1:]
                args += [cid, key, value, what]
            calls.append(self._put(keys=keys, args=args))
        full: list[int] = []
        for nums, out in zip(groups, await self.call_all(calls), strict=True):
            full += [puts[nums[int(j) - 1]][4] for j in out]
        if full:  # step 3: what a full content refused is given back to its payer
            groups = self._grouped([payer_names(ops[i][1][0])[0] for i in full])
            await self.call_all(
                [self._pay(*pay_args([full[j] for j in nums], True)) for nums in groups]
            )
            refused.update(full)
        if refused:
            until = self.clock() + REFUSED_SECONDS
            if len(self.refused) > 100_000:
                self.refused.clear()
            for i in refused:
                (cid, key), _ = ops[i]
                self.refused[(cid, key)] = until
                if (cid, key) not in self.pending:
                    self.index.remove_entry(cid, key)
            log.warning("Redis refused %d entries over the shared limits", len(refused))

    async def read(self) -> None:
        """Apply the other trackers' changes (and the pool's completed counts) from the log."""
        while True:
            calls = [
                self.client.xread({_log(t): self.last_ids[t] for t in shards}, count=LOG_READ)
                for shards in self._log_groups
            ]
            more = False
            now, wall, index, origin = self.clock(), time.time(), self.index, self.origin
            for got in await self.call_all(calls):
                for stream, entries in (got or {}).items():
                    if not entries:
                        continue
                    for entry in entries:
                        fields = entry.field_values
                        # origin (8 bytes), content id (32), key (32), entry value ("" = gone)
                        e = _raw(fields.get(b"e", b""))
                        if len(e) >= 72 and e[:8] != origin:
                            cid = e[8:40]
                            n = index.num_chunks(cid)
                            if n is not None:  # else: loaded when asked
                                self._apply(cid, e[40:72], e[72:], n, now, wall)
                            continue
                        # origin, content id, the pool's completed count (any origin)
                        c = _raw(fields.get(b"c", b""))
                        if len(c) > 40 and index.num_chunks(c[8:40]) is not None:
                            self._completed(c[8:40], c[40:])
                    shard = _raw(stream)[6:7].decode("ascii", "replace")
                    if shard in self.last_ids:
                        self.last_ids[shard] = bytes(_raw(entries[-1].identifier))
                    more = more or len(entries) >= LOG_READ
            if not more:
                return


def _why(exc: BaseException) -> str:
    """``exc`` in words, with the TLS failure under it if there is one (a certificate)."""
    import ssl

    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, ssl.SSLError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"{exc} (TLS: {cause.verify_message}; give the CA: ?ssl_ca_certs=PATH)"
    if isinstance(cause, ssl.SSLError):
        return f"{exc} (TLS: {cause.reason or cause})"
    return str(exc)


def _raw(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _client_url(url: str) -> tuple[str, bool]:
    """The URL coredis takes, and whether it names a cluster (``redis+cluster://``)."""
    scheme, sep, rest = url.partition("://")
    if scheme.endswith(CLUSTER_SUFFIX):
        return scheme.removesuffix(CLUSTER_SUFFIX) + sep + rest, True
    return url, False


async def open_redis(
    url: str,
    *,
    clock: Callable[[], float],
    index_args: dict[str, Any],
    max_disk: int,
    entries_per_address: int,
    bytes_per_address: int,
) -> RedisBackend:
    """The backend for Redis at ``url`` (``run`` connects and checks it answers).

    ``redis+cluster://HOST:PORT`` (or ``rediss+cluster://``) is a Redis
    Cluster reached through any one of its nodes.

    Raises:
        StorageError: the URL is unusable.
    """
    import coredis

    where = _describe(url)
    target, cluster = _client_url(url)
    options: dict[str, Any] = {
        "decode_responses": False,
        "connect_timeout": 2.0,
        "stream_timeout": 5.0,
    }
    try:
        if cluster:
            from urllib.parse import urlsplit

            from coredis.connection import TCPLocation

            u = urlsplit(target)
            start = TCPLocation(u.hostname or "127.0.0.1", u.port or 6379)
            client: Any = coredis.RedisCluster.from_url(target, startup_nodes=[start], **options)
        else:
            client = coredis.Redis.from_url(target, **options)
    except (ValueError, TypeError, OSError) as exc:
        raise StorageError(f"--store {where}: {exc}") from exc
    return RedisBackend(
        client,
        where,
        cluster=cluster,
        clock=clock,
        index_args=index_args,
        max_disk=max_disk,
        entries_per_address=entries_per_address,
        bytes_per_address=bytes_per_address,
    )
