"""Published manifests, persisted in SQLite (``manifests.sqlite3`` under the data dir).

The store keeps bytes exactly as published; verifying them is the server's
job before ``put``. Content ids are stored as 64-character lowercase hex text
(the primary key, so a B-tree index), which makes a prefix lookup a range
scan: every id starting with ``p`` lies in ``[p, p + "g")`` because ``g``
sorts after every hex digit.

The methods are synchronous and short; the tracker server calls them through
one worker thread (``trio.to_thread.run_sync`` with a limiter of 1), so the
connection is opened with ``check_same_thread=False`` and is never used by
two threads at once.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from peerd.errors import StorageError, TrackerError

__all__ = ["DB_NAME", "MIN_PREFIX", "ManifestStore"]

DB_NAME = "manifests.sqlite3"
MIN_PREFIX = 16
_HEX = frozenset("0123456789abcdef")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    id TEXT PRIMARY KEY,            -- content id, 64 lowercase hex characters
    num_chunks INTEGER NOT NULL,
    data BLOB NOT NULL,             -- the signed manifest as published
    published REAL NOT NULL         -- unix time of the first publish
) WITHOUT ROWID
"""


class ManifestStore:
    """Signed manifests by content id, in one SQLite file.

    Args:
        path: the database file, or a directory to hold ``manifests.sqlite3``
            (created if missing).

    Raises:
        StorageError: the file cannot be created or is not a usable database.
    """

    def __init__(self, path: Path | str) -> None:
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
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open manifest database {path}: {exc}") from exc

    def put(self, content_id: bytes, data: bytes, num_chunks: int) -> bool:
        """Store a (verified) manifest; returns False if it was already there."""
        try:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO manifests (id, num_chunks, data, published) "
                "VALUES (?, ?, ?, ?)",
                (content_id.hex(), num_chunks, data, time.time()),
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot store manifest: {exc}") from exc
        return cur.rowcount == 1

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
