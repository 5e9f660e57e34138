"""The Redis backend: many tracker processes, one shared state (coredis, on Trio).

Each tracker answers ANNOUNCE from its local ``SwarmIndex`` (the hot path is
unchanged) and keeps that index a *view* of the state in Redis:

* Write-behind: every announce that changes what Redis holds is queued,
  deduplicated per (content, key), and flushed every ``FLUSH_SECONDS`` by
  one ``EVALSHA`` of ``_FLUSH`` for the whole batch. The script checks the
  limits *in Redis* (entries per address, peers per content), writes the
  entry, and appends it to the change log ``peer:log`` (a stream). An entry
  already in Redis with the same address, port and bitmap is only written
  again once its expiry there is ``ttl / 4`` old, so repeated announces of
  an unchanged peer cost Redis nothing.
* Read: every ``READ_SECONDS`` the tracker reads the change log from where it
  left off (one ``XREAD``) and applies the other trackers' changes to the
  contents its view holds. A content it has not seen yet is loaded whole
  (``HGETALL``) on its first local announce, before that announce is
  answered. So a peer announced to one tracker is in every other's answers
  within FLUSH + READ seconds (0.3 s) plus Redis's latency.
* Faults: a failed flush or read is retried with backoff (0.1 s doubling to
  2 s); meanwhile the tracker answers from its last view (logged once as
  stale) and keeps the writes queued (one per local entry at most). A
  Redis that restarted empty is refilled by these queued writes and by the
  peers' periodic re-announces.

Keys (``{...}`` is the Redis Cluster hash tag: a content's keys share a slot):

* ``peer:{<cid hex>}:p``  hash: 32-byte key -> entry (13 digits of expiry in
  unix ms, then msgpack [payer address, stated address, port, bitmap]);
  expires ``ttl`` after its last write.
* ``peer:{<cid hex>}:m``  hash: ``d`` the manifest bytes, ``n`` its chunk count.
* ``peer:a:{<address>}``  sorted set of cid+key (64 bytes) by expiry: the
  entries an address pays for, counted against ``entries_per_address``.
* ``peer:ids``  sorted set of published content ids (hex): prefix lookup by
  ``ZRANGEBYLEX``. ``peer:q``  hash: manifest bytes charged, in all (``t``),
  per key (``k:<hex>``) and per address (``a:<address>``).
* ``peer:log``  stream of changes (one field: origin tracker, content id,
  key, entry value or empty for gone), trimmed to the last ``LOG_SECONDS`` (a
  tracker that falls further behind misses changes until the peers' next
  periodic announces).

The flush script and the manifest script touch keys of several slots, so
as written they run on one Redis (or a Sentinel-managed primary); on Redis
Cluster they would have to be split per slot (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgpack
import trio

from peerd.errors import StorageError, TrackerError

from ._backend import Backend
from ._peer_table import pack_ip
from .index import SwarmIndex
from .manifests import MIN_PREFIX, ROW_BYTES

__all__ = ["RedisBackend", "SharedIndex", "open_redis"]

log = logging.getLogger("tracker.redis")

FLUSH_SECONDS = 0.1  # queued writes go out at least this often
READ_SECONDS = 0.2  # the change log is read at least this often
BATCH = 2000  # writes per EVALSHA
LOG_SECONDS = 10.0  # change log entries are kept this long (then trimmed)
LOG_READ = 10_000  # change log entries taken per XREAD
REFUSED_SECONDS = 5.0  # an entry Redis refused is refused locally this long
ENTRY_BYTES = 256  # an entry's charge in Redis beyond its bitmap
PENDING_MAX = 1_000_000  # queued writes kept while Redis is away (oldest dropped)
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
_HEX = frozenset("0123456789abcdef")

_FLUSH = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local per_addr = tonumber(ARGV[3])
local per_content = tonumber(ARGV[4])
local origin = ARGV[5]
local renew = tonumber(ARGV[6])
local clock = redis.call('TIME')  -- the log's ids are Redis's clock: trim by it
local minid = (tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
               - tonumber(ARGV[7])) .. '-0'
local per_bytes = tonumber(ARGV[8])
local refused = {}
local swept = {}
local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local function expiry(v)
  return tonumber(string.sub(v, 1, 13)) or 0
end
local function logged(cid, pk, val)
  redis.call('XADD', 'peer:log', 'MINID', '~', minid, '*', 'e', origin .. cid .. pk .. val)
end
local n = (#ARGV - 8) / 4
for i = 1, n do
  local h, a, ab = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local cid, pk, val, cost = ARGV[4 * i + 5], ARGV[4 * i + 6], ARGV[4 * i + 7], ARGV[4 * i + 8]
  -- what the address pays for: cid, key and the entry's charge in bytes
  local member = cid .. pk .. cost
  if not swept[a] then
    -- the address's expired entries leave its counts and their hashes
    swept[a] = true
    local gone = redis.call('ZRANGEBYSCORE', a, '-inf', now, 'LIMIT', 0, 512)
    for _, m in ipairs(gone) do
      local hk = 'peer:{' .. hex(string.sub(m, 1, 32)) .. '}:p'
      local mk = string.sub(m, 33, 64)
      local old = redis.call('HGET', hk, mk)
      if old and expiry(old) <= now then
        redis.call('HDEL', hk, mk)
      end
      redis.call('ZREM', a, m)
      redis.call('DECRBY', ab, tonumber(string.sub(m, 65)) or 0)
    end
  end
  local old = redis.call('HGET', h, pk)
  if val == '' then
    if old then
      redis.call('HDEL', h, pk)
      logged(cid, pk, '')
    end
    if redis.call('ZREM', a, member) == 1 then
      redis.call('DECRBY', ab, tonumber(cost))
    end
  elseif not (old and string.sub(old, 14) == string.sub(val, 14)
              and expiry(val) - expiry(old) < renew) then
    local ok = true
    local paid = redis.call('ZSCORE', a, member)
    if not paid then
      if redis.call('ZCARD', a) >= per_addr
         or tonumber(redis.call('GET', ab) or '0') + tonumber(cost) > per_bytes then
        ok = false
      elseif not old and redis.call('HLEN', h) >= per_content then
        ok = false
      end
    end
    if ok then
      redis.call('HSET', h, pk, val)
      redis.call('PEXPIRE', h, ttl)
      redis.call('ZADD', a, expiry(val), member)
      redis.call('PEXPIRE', a, ttl)
      if not paid then
        redis.call('INCRBY', ab, tonumber(cost))
      end
      redis.call('PEXPIRE', ab, ttl)
      logged(cid, pk, val)
    else
      refused[#refused + 1] = i
    end
  end
end
return refused
"""

_PUT_MANIFEST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local c = tonumber(ARGV[6])
if tonumber(redis.call('HGET', KEYS[3], 't') or '0') + c > tonumber(ARGV[7]) then return -1 end
if tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or '0') + c > tonumber(ARGV[8]) then return -2 end
if tonumber(redis.call('HGET', KEYS[3], ARGV[5]) or '0') + c > tonumber(ARGV[9]) then return -3 end
redis.call('HINCRBY', KEYS[3], 't', c)
redis.call('HINCRBY', KEYS[3], ARGV[4], c)
redis.call('HINCRBY', KEYS[3], ARGV[5], c)
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'n', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""


def _entries(cid: bytes) -> str:
    return f"peer:{{{cid.hex()}}}:p"


def _manifest(cid: bytes) -> str:
    return f"peer:{{{cid.hex()}}}:m"


def _payer(address: str) -> str:
    return f"peer:a:{{{address}}}"


def _payer_bytes(address: str) -> str:
    return f"peer:ab:{{{address}}}"


def entry_charge(nbytes: int) -> int:
    """Bytes an entry with an ``nbytes`` bitmap is charged in Redis (measured ~250 at 32)."""
    return ENTRY_BYTES + nbytes


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _describe(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    _creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{host}" if at else url


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
        kept = self._unchanged(content_id, key, ip, at, port, bits, now)
        frame = super().announce_frame(
            content_id, key, ip, port, event, bits, num_chunks, want, now, interval, at=at
        )
        self._written(content_id, key, ip, at, port, bits, kept)
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
    ) -> None:
        if kept is None:
            self.backend.wrote(cid, key, ip, at, port, bits)
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
        kept = self._unchanged(content_id, key, ip, at, port, bits, now)
        out = super().announce(content_id, key, ip, port, event, bits, num_chunks, want, now, at=at)
        self._written(content_id, key, ip, at, port, bits, kept)
        return out


class RedisManifests:
    """Published manifests in Redis (same rules and limits as ``ManifestStore``)."""

    def __init__(self, backend: RedisBackend, max_disk: int) -> None:
        self.backend = backend
        self.client = backend.client
        self.max_bytes = max_disk
        self.max_bytes_per_key = max_disk // 8
        self.max_bytes_per_address = max_disk // 4
        self._put = self.client.register_script(_PUT_MANIFEST)

    async def put(
        self, content_id: bytes, data: bytes, num_chunks: int, key: bytes, address: str
    ) -> bool:
        cost = len(data) + ROW_BYTES
        args = [
            content_id.hex(),
            data,
            num_chunks,
            "k:" + key.hex(),
            "a:" + address,
            cost,
            self.max_bytes,
            self.max_bytes_per_key,
            self.max_bytes_per_address,
        ]
        keys = [_manifest(content_id), "peer:ids", "peer:q"]
        done = await self.backend.call(self._put(keys=keys, args=args))
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
        return bool(done)

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
                "peer:ids", f"[{prefix}", f"({prefix}g", sortby=PureToken.BYLEX, offset=0, count=2
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
    """The shared state: a local view, write-behind to Redis, the change log read back."""

    index: SharedIndex

    def __init__(
        self,
        client: Any,
        where: str,
        *,
        clock: Callable[[], float],
        index_args: dict[str, Any],
        max_disk: int,
        entries_per_address: int,
        bytes_per_address: int,
    ) -> None:
        self.client = client
        self.where = where
        self.clock = clock
        self.ttl = float(index_args["ttl"])
        self.entries_per_address = entries_per_address
        self.bytes_per_address = bytes_per_address
        self.peers_per_content = int(index_args["max_peers_per_content"])
        self.origin = secrets.token_bytes(8)
        self._flush_script = client.register_script(_FLUSH)
        # (content, key) -> (payer address, entry value or b"" to delete, charge)
        self.pending: dict[tuple[bytes, bytes], tuple[str, bytes, int]] = {}
        self.refused: dict[tuple[bytes, bytes], float] = {}
        self.loading: dict[bytes, trio.Event] = {}  # contents being loaded
        self.last_id = b"0-0"
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
        self, content_id: bytes, key: bytes, ip: str, at: str, port: int, bits: bytes
    ) -> None:
        expiry = _wall_ms() + int(self.ttl * 1000)
        value = b"%013d" % expiry + msgpack.packb([ip, at, port, bits])
        self._queue(content_id, key, (ip, value, entry_charge(len(bits))))

    def removed(self, content_id: bytes, key: bytes, ip: str, charge: int) -> None:
        self._queue(content_id, key, (ip, b"", charge))

    def _queue(self, cid: bytes, key: bytes, write: tuple[str, bytes, int]) -> None:
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
            rows = await self.call(self.client.hgetall(_entries(content_id)))
            now, wall = self.clock(), time.time()
            for key, value in rows.items():
                self._apply(content_id, bytes(key), bytes(value), num_chunks, now, wall)
        finally:
            del self.loading[content_id]
            done.set()

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
        try:
            async with self.client:
                await self._started(task_status)
        except* StorageError as group:
            raise group.exceptions[0] from None
        except* (OSError, TimeoutError) as group:
            raise StorageError(
                f"cannot reach Redis at {self.where}: {group.exceptions[0]}"
            ) from None

    async def _started(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            with trio.fail_after(5.0):
                await self.ping()
                entries = await self.call(self.client.xrevrange("peer:log", "+", "-", 1))
        except (StorageError, trio.TooSlowError) as exc:
            detail = (
                str(exc.__cause__ or exc) if isinstance(exc, StorageError) else "no answer in 5 s"
            )
            raise StorageError(f"cannot reach Redis at {self.where}: {detail}") from None
        if entries:
            self.last_id = bytes(_raw(entries[0].identifier))
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
        """Send the queued writes (one script call per ``BATCH``)."""
        while self.pending:
            taken = dict(list(self.pending.items())[:BATCH])
            for k in taken:
                del self.pending[k]
            now = _wall_ms()
            ttl = int(self.ttl * 1000)
            keys: list[str] = []
            args: list[bytes | str | int] = [
                now,
                ttl,
                self.entries_per_address,
                self.peers_per_content,
                self.origin,
                ttl // 4,
                int(LOG_SECONDS * 1000),
                self.bytes_per_address,
            ]
            ops = list(taken.items())
            for (cid, key), (payer, value, charge) in ops:
                keys += [_entries(cid), _payer(payer), _payer_bytes(payer)]
                args += [cid, key, value, b"%d" % charge]
            try:
                refused = await self.call(self._flush_script(keys=keys, args=args))
            except StorageError:
                for k, v in taken.items():
                    self.pending.setdefault(k, v)  # a newer write wins
                raise
            if refused:
                until = self.clock() + REFUSED_SECONDS
                if len(self.refused) > 100_000:
                    self.refused.clear()
                for i in refused:
                    (cid, key), _ = ops[int(i) - 1]
                    self.refused[(cid, key)] = until
                    if (cid, key) not in self.pending:
                        self.index.remove_entry(cid, key)
                log.warning("Redis refused %d entries over the shared limits", len(refused))

    async def read(self) -> None:
        """Apply the other trackers' changes from the change log."""
        while True:
            got = await self.call(self.client.xread({"peer:log": self.last_id}, count=LOG_READ))
            if not got:
                return
            entries = next(iter(got.values()))
            if not entries:
                return
            now, wall, index, origin = self.clock(), time.time(), self.index, self.origin
            for entry in entries:
                # origin (8 bytes), content id (32), key (32), entry value ("" = gone)
                e = _raw(entry.field_values.get(b"e", b""))
                if len(e) < 72 or e[:8] == origin:
                    continue
                cid = e[8:40]
                n = index.num_chunks(cid)
                if n is None:
                    continue  # a content this view does not hold: loaded when asked
                self._apply(cid, e[40:72], e[72:], n, now, wall)
            self.last_id = bytes(_raw(entries[-1].identifier))
            if len(entries) < LOG_READ:
                return


def _raw(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


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

    Raises:
        StorageError: the URL is unusable.
    """
    import coredis

    where = _describe(url)
    try:
        client = coredis.Redis.from_url(
            url, decode_responses=False, connect_timeout=2.0, stream_timeout=5.0
        )
    except (ValueError, TypeError) as exc:
        raise StorageError(f"--store {where}: {exc}") from exc
    return RedisBackend(
        client,
        where,
        clock=clock,
        index_args=index_args,
        max_disk=max_disk,
        entries_per_address=entries_per_address,
        bytes_per_address=bytes_per_address,
    )
