"""Published manifests, persisted in SQLite (``manifests.sqlite3`` under the data dir).

The store keeps bytes exactly as published (the server verifies them before
``put``); the first publish of a content id wins, a re-publish changes nothing.
Content ids are the primary key as 64-character lowercase hex, so a prefix
lookup is a range scan: every id starting with ``p`` lies in ``[p, p + "g")``
(``g`` sorts after every hex digit).

The methods are synchronous and short; the server calls them through one
worker thread (a limiter of 1), so the connection is opened with
``check_same_thread=False`` and is never used by two threads at once.

Disk is a budget: each manifest is charged its size plus ``ROW_BYTES`` to the
whole store, to the key that published it and to the address it came from
(remembered in the row, so the totals survive a restart); ``put`` refuses with
``limit`` what would not fit.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from peerd.errors import StorageError, TrackerError

__all__ = ["DB_NAME", "MIN_PREFIX", "ROW_BYTES", "ManifestStore"]

DB_NAME = "manifests.sqlite3"
MIN_PREFIX = 16
ROW_BYTES = 256  # charged per manifest beyond its bytes: id, columns, B-tree share
_UNBOUNDED = 1 << 62
_HEX = frozenset("0123456789abcdef")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    id TEXT PRIMARY KEY,            -- content id, 64 lowercase hex characters
    num_chunks INTEGER NOT NULL,
    data BLOB NOT NULL,             -- the signed manifest as published
    published REAL NOT NULL,        -- unix time of the first publish
    publisher BLOB NOT NULL DEFAULT x'',  -- the AUTH key that published it
    address TEXT NOT NULL DEFAULT ''      -- the address it was published from
) WITHOUT ROWID
"""
_COLUMNS = (
    ("publisher", "BLOB NOT NULL DEFAULT x''"),
    ("address", "TEXT NOT NULL DEFAULT ''"),
)


class ManifestStore:
    """Signed manifests by content id, in one SQLite file.

    Args:
        path: the database file, or a directory to hold ``manifests.sqlite3``
            (created if missing).
        max_bytes: disk budget of the whole store (see module doc).
        max_bytes_per_key: of it, what one publishing key may use.
        max_bytes_per_address: of it, what one address may use.

    Raises:
        StorageError: the file cannot be created or is not a usable database.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = _UNBOUNDED,
        max_bytes_per_key: int = _UNBOUNDED,
        max_bytes_per_address: int = _UNBOUNDED,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_key = max_bytes_per_key
        self.max_bytes_per_address = max_bytes_per_address
        path = Path(path)
        if path.is_dir() or not path.suffix:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create tracker data dir {path}: {exc}") from exc
            path = path / DB_NAME
        self.path = path
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(manifests)")}
            for name, decl in _COLUMNS:  # a database from before the disk budget
                if name not in have:
                    self._db.execute(f"ALTER TABLE manifests ADD COLUMN {name} {decl}")
            self.used = 0
            self._by_key: dict[bytes, int] = {}
            self._by_address: dict[str, int] = {}
            for key, address, size in self._db.execute(
                "SELECT publisher, address, LENGTH(data) FROM manifests"
            ):
                self._charge(bytes(key), address, size + ROW_BYTES)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open manifest database {path}: {exc}") from exc

    def _charge(self, key: bytes, address: str, n: int) -> None:
        self.used += n
        self._by_key[key] = self._by_key.get(key, 0) + n
        self._by_address[address] = self._by_address.get(address, 0) + n

    def put(
        self, content_id: bytes, data: bytes, num_chunks: int, key: bytes = b"", address: str = ""
    ) -> bool:
        """Store a (verified) manifest; returns False if it was already there.

        Args:
            content_id, data, num_chunks: the manifest, its bytes, its chunk count.
            key, address: who published it (charged for its disk).

        Raises:
            TrackerError: ``limit``: it would not fit the disk budget, in all,
                for ``key`` or for ``address``.
            StorageError: the database failed.
        """
        if self._one("SELECT 1 FROM manifests WHERE id = ?", (content_id.hex(),)) is not None:
            return False
        n = len(data) + ROW_BYTES
        if self.used + n > self.max_bytes:
            raise TrackerError("limit", "the tracker's disk budget for manifests is full")
        if self._by_key.get(key, 0) + n > self.max_bytes_per_key:
            raise TrackerError(
                "limit", f"this key has used its disk quota ({self.max_bytes_per_key} bytes)"
            )
        if self._by_address.get(address, 0) + n > self.max_bytes_per_address:
            raise TrackerError(
                "limit",
                f"this address has used its disk quota ({self.max_bytes_per_address} bytes)",
            )
        try:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO manifests (id, num_chunks, data, published, publisher, "
                "address) VALUES (?, ?, ?, ?, ?, ?)",
                (content_id.hex(), num_chunks, data, time.time(), key, address),
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot store manifest: {exc}") from exc
        if cur.rowcount != 1:
            return False
        self._charge(key, address, n)
        return True

    def get(self, content_id: bytes) -> bytes | None:
        """The manifest bytes published for ``content_id``, or None."""
        row = self._one("SELECT data FROM manifests WHERE id = ?", (content_id.hex(),))
        return None if row is None else bytes(row[0])

    def num_chunks(self, content_id: bytes) -> int | None:
        """The chunk count of a published content, or None."""
        row = self._one("SELECT num_chunks FROM manifests WHERE id = ?", (content_id.hex(),))
        return None if row is None else int(row[0])

    def resolve_prefix(self, prefix: str) -> bytes:
        """Expand a hex prefix of at least 16 characters to the one full content id.

        Raises:
            TrackerError: ``bad-request`` (not 16..64 lowercase hex),
                ``not-found`` (no match) or ``ambiguous-prefix`` (several).
        """
        if not MIN_PREFIX <= len(prefix) <= 64 or not set(prefix) <= _HEX:
            raise TrackerError(
                "bad-request", f"a content id prefix is 16..64 lowercase hex characters: {prefix!r}"
            )
        try:
            rows = self._db.execute(
                "SELECT id FROM manifests WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
                (prefix, prefix + "g"),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read manifest database: {exc}") from exc
        if not rows:
            raise TrackerError("not-found", f"no published content id starts with {prefix}")
        if len(rows) > 1:
            raise TrackerError(
                "ambiguous-prefix",
                f"{prefix} matches several content ids ({rows[0][0]}, {rows[1][0]}, ...); "
                "give more characters",
            )
        return bytes.fromhex(rows[0][0])

    def __len__(self) -> int:
        row = self._one("SELECT COUNT(*) FROM manifests", ())
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        """Checkpoint and close the database (idempotent)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # closing anyway; SQLite recovers the WAL on next open
        self._db.close()

    def _one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read manifest database: {exc}") from exc
        return row
