"""The embedded store: one SQLite file in WAL mode.

Tables: ``resources`` (current state), ``events`` (one row per write, keyed by
revision; what watches read and resume from), ``meta`` (the revision counter
and the oldest revision still kept), ``schema_version``.

Several processes may share the file: writes take SQLite's write lock
(``BEGIN IMMEDIATE``) so revisions stay strictly increasing, and watches poll
the events table (an indexed range read) besides being woken at once by
writes made through the same ``SqliteStore``.

All SQLite calls run on one worker thread per store, so the event loop never
blocks on the file lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from meshlet.control.resources import Resource
from meshlet.control.store.base import (
    Compacted,
    Event,
    EventType,
    NotFound,
    Snapshot,
    StoreError,
    check_expected,
    check_kind,
    decode,
    encode,
    kinds_filter,
    stamp,
)

SCHEMA_VERSION = 1
# Events kept for watches to resume from; older ones are dropped in batches.
EVENTS_KEPT = 10_000
POLL_INTERVAL = 0.2
BUSY_TIMEOUT_MS = 5_000
WATCH_BATCH = 500

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS resources (
        kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
        revision INTEGER NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (kind, namespace, name))""",
    """CREATE TABLE IF NOT EXISTS events (
        revision INTEGER PRIMARY KEY, type TEXT NOT NULL, kind TEXT NOT NULL,
        namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL)""",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0)",
]

T = TypeVar("T")
# Aliases: inside the class, ``list`` names the Store method.
Bodies = list[str]
EventRows = list[tuple[int, str, str, str]]
Kinds = list[str]


class SqliteStore:
    """``Store`` on a SQLite file. Open with ``await SqliteStore.open(path)``."""

    def __init__(self, path: Path, *, poll_interval: float = POLL_INTERVAL,
                 events_kept: int = EVENTS_KEPT) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.events_kept = events_kept
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshlet-sqlite")
        self._db: sqlite3.Connection | None = None
        self._changed = asyncio.Event()
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, *, poll_interval: float = POLL_INTERVAL,
                   events_kept: int = EVENTS_KEPT) -> SqliteStore:
        store = cls(Path(path), poll_interval=poll_interval, events_kept=events_kept)
        await store._run(store._connect)
        return store

    # -- Store interface ----------------------------------------------------- #

    async def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        check_kind(kind)
        row = await self._run(self._fetch_one, kind, namespace, name)
        return decode(row[1]) if row is not None else None

    async def list(self, kind: str, namespace: str | None = None) -> list[Resource]:
        check_kind(kind)
        rows = await self._run(self._fetch_all, [kind], namespace)
        return [decode(body) for body in rows[0]]

    async def snapshot(self, kinds: Iterable[str] | None = None) -> Snapshot:
        chosen = kinds_filter(kinds)
        bodies, revision = await self._run(self._fetch_all, sorted(chosen) if chosen else None, None)
        return Snapshot([decode(body) for body in bodies], revision)

    async def put(self, resource: Resource, expected_version: str | None = None) -> Resource:
        check_kind(resource.kind)
        stored = await self._run(self._put, resource, expected_version)
        self._notify()
        return stored

    async def delete(self, kind: str, namespace: str, name: str,
                     expected_version: str | None = None) -> Resource:
        check_kind(kind)
        removed = await self._run(self._delete, kind, namespace, name, expected_version)
        self._notify()
        return removed

    async def watch(self, kinds: Iterable[str] | None = None,
                    start_revision: int | None = None) -> AsyncIterator[Event]:
        chosen = kinds_filter(kinds)
        last = start_revision if start_revision is not None else await self.revision()
        while not self._closed:
            changed = self._changed
            try:
                rows, compacted = await self._run(self._events_after, last)
            except StoreError:
                if self._closed:
                    return  # closed under the watch: the watch ends
                raise
            if last < compacted:
                raise Compacted(f"revision {last} is compacted (oldest kept: {compacted})")
            for revision, event_type, kind, body in rows:
                last = revision
                if chosen is None or kind in chosen:
                    yield Event(EventType(event_type), decode(body), revision)
            if len(rows) < WATCH_BATCH:
                try:
                    await asyncio.wait_for(changed.wait(), self.poll_interval)
                except TimeoutError:
                    pass

    async def revision(self) -> int:
        return await self._run(self._revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notify()
        await self._run(self._disconnect)
        self._executor.shutdown(wait=False)

    # -- worker-thread side ----------------------------------------------------- #

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed and fn != self._disconnect:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db = db
        with self._transaction() as tx:
            for statement in _SCHEMA:
                tx.execute(statement)
            row = tx.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {row[0]}; this meshlet knows "
                                 f"up to {SCHEMA_VERSION}")

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> _Transaction:
        return _Transaction(self._conn(), begin)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is closed")
        return self._db

    def _revision(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        return int(row[0])

    def _fetch_one(self, kind: str, namespace: str, name: str) -> tuple[int, str] | None:
        row = self._conn().execute(
            "SELECT revision, body FROM resources WHERE kind = ? AND namespace = ? AND name = ?",
            (kind, namespace, name)).fetchone()
        return (int(row[0]), str(row[1])) if row is not None else None

    def _fetch_all(self, kinds: Kinds | None, namespace: str | None) -> tuple[Bodies, int]:
        # One read transaction so the bodies and the revision agree.
        with self._transaction("BEGIN") as tx:
            revision = int(tx.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
            query = "SELECT body FROM resources"
            clauses: Kinds = []
            params: Kinds = []
            if kinds is not None:
                clauses.append(f"kind IN ({','.join('?' * len(kinds))})")
                params.extend(kinds)
            if namespace is not None:
                clauses.append("namespace = ?")
                params.append(namespace)
            if clauses:
                query += " WHERE " + " AND ".join(clauses)
            query += " ORDER BY kind, namespace, name"
            bodies = [str(row[0]) for row in tx.execute(query, params)]
        return bodies, revision

    def _put(self, resource: Resource, expected_version: str | None) -> Resource:
        with self._transaction() as tx:
            current = self._fetch_one(*resource.key)
            previous = decode(current[1]) if current is not None else None
            check_expected(resource.key, str(current[0]) if current else None, expected_version)
            revision = self._next_revision(tx)
            stored = stamp(resource, previous, revision, str(uuid.uuid4()))
            body = encode(stored)
            tx.execute("INSERT OR REPLACE INTO resources (kind, namespace, name, revision, body) "
                       "VALUES (?, ?, ?, ?, ?)", (*resource.key, revision, body))
            event = EventType.ADDED if previous is None else EventType.MODIFIED
            self._record(tx, revision, event, resource.key, body)
        return stored

    def _delete(self, kind: str, namespace: str, name: str, expected_version: str | None) -> Resource:
        key = (kind, namespace, name)
        with self._transaction() as tx:
            current = self._fetch_one(*key)
            if current is None:
                raise NotFound(f"{kind} {namespace}/{name} not found")
            check_expected(key, str(current[0]), expected_version)
            revision = self._next_revision(tx)
            tx.execute("DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?", key)
            self._record(tx, revision, EventType.DELETED, key, current[1])
        return decode(current[1])

    def _next_revision(self, tx: sqlite3.Connection) -> int:
        tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")
        return int(tx.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])

    def _record(self, tx: sqlite3.Connection, revision: int, event: EventType,
                key: tuple[str, str, str], body: str) -> None:
        tx.execute("INSERT INTO events (revision, type, kind, namespace, name, body) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (revision, event.value, *key, body))
        # Compact in batches of a tenth so most writes do not delete anything.
        if revision % max(1, self.events_kept // 10) == 0:
            oldest_kept = revision - self.events_kept
            if oldest_kept > 0:
                tx.execute("DELETE FROM events WHERE revision <= ?", (oldest_kept,))
                tx.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (oldest_kept,))

    def _events_after(self, revision: int) -> tuple[EventRows, int]:
        db = self._conn()
        compacted = int(db.execute("SELECT value FROM meta WHERE key = 'compacted'").fetchone()[0])
        rows = db.execute("SELECT revision, type, kind, body FROM events WHERE revision > ? "
                          "ORDER BY revision LIMIT ?", (revision, WATCH_BATCH)).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows], compacted

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class _Transaction:
    """``with`` block around BEGIN IMMEDIATE (write) or BEGIN (read) ... COMMIT/ROLLBACK."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._db = db
        self._begin = begin

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute(self._begin)
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
