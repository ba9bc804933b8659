"""The embedded store: one SQLite file, zero set-up.

All database work runs on one thread that owns the connection, so the event loop never
blocks on disk and statements never interleave. Every write also appends to a `changes`
log in the same transaction; watchers follow that log, woken at once by writes made
through this store and by a short poll for writes made by other stores on the same file
(another process, or another store in this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from .model import (
    AlreadyExists,
    Change,
    ChangeOp,
    Conflict,
    NotFound,
    Resource,
    StoreError,
    Watch,
    check_key,
    encode_labels,
    encode_spec,
    matches,
)

T = TypeVar("T")

# How often watchers look for writes made by other stores on the same file.
POLL_INTERVAL = 0.2
# How long the change log keeps an entry: far longer than any poll gap.
CHANGE_LOG_RETENTION = 600.0
# How long a statement waits for another process's write lock before giving up.
BUSY_TIMEOUT_MS = 10_000

# Numbered migrations, applied in order and recorded in schema_migrations. Append only:
# never edit one that has shipped.
MIGRATIONS: Sequence[tuple[int, str, Sequence[str]]] = (
    (
        1,
        "resources, tombstones and change log",
        (
            """CREATE TABLE resources (
                kind TEXT NOT NULL,
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                labels TEXT NOT NULL,
                spec TEXT NOT NULL,
                version INTEGER NOT NULL,
                created TEXT NOT NULL,
                updated TEXT NOT NULL,
                PRIMARY KEY (kind, mesh, name)
            )""",
            # The last version of each deleted resource, so that a re-created one goes on
            # counting from there instead of starting again at 1.
            """CREATE TABLE tombstones (
                kind TEXT NOT NULL,
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                PRIMARY KEY (kind, mesh, name)
            )""",
            # AUTOINCREMENT: a sequence number is never reused, even after pruning.
            """CREATE TABLE changes (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                op TEXT NOT NULL,
                at REAL NOT NULL
            )""",
        ),
    ),
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _resource(row: sqlite3.Row) -> Resource:
    return Resource(
        kind=row["kind"],
        mesh=row["mesh"],
        name=row["name"],
        labels=json.loads(row["labels"]),
        spec=json.loads(row["spec"]),
        version=row["version"],
        created=datetime.fromisoformat(row["created"]),
        updated=datetime.fromisoformat(row["updated"]),
    )


class SqliteStore:
    """A store in one SQLite file (WAL mode, created 0600)."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, db: sqlite3.Connection) -> None:
        self.path = path
        self._executor = executor
        self._db = db
        # watchers, and the change-log position each one starts after
        self._watches: dict[Watch, int] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SqliteStore:
        file = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshling-sqlite")
        loop = asyncio.get_running_loop()
        try:
            db = await loop.run_in_executor(executor, _connect, file)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        store = cls(file, executor, db)
        try:
            await store._run(_migrate, db)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreError(f"the store at {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise StoreError(f"the store at {self.path} failed: {e}") from e

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await self._run(_transaction, self._db, fn, *args)
        self._wake.set()
        return result

    # reads

    async def get(self, kind: str, mesh: str, name: str) -> Resource:
        check_key(kind, mesh, name)
        row = await self._run(_select_one, self._db, kind, mesh, name)
        if row is None:
            raise NotFound(kind, mesh, name)
        return _resource(row)

    async def list(
        self, kind: str, mesh: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Resource]:
        if mesh is None:
            sql = "SELECT * FROM resources WHERE kind = ? ORDER BY name, mesh"
            params: tuple[str, ...] = (kind,)
        else:
            sql = "SELECT * FROM resources WHERE kind = ? AND mesh = ? ORDER BY name"
            params = (kind, mesh)
        rows = await self._run(_select_all, self._db, sql, params)
        # Label selection in Python: a control plane holds thousands of resources, not
        # millions, and this keeps the file free of JSON-extension requirements.
        resources = [_resource(row) for row in rows]
        return [r for r in resources if matches(r.labels, selector)]

    # writes

    async def create(
        self,
        kind: str,
        mesh: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
    ) -> Resource:
        check_key(kind, mesh, name)
        row = await self._write(_create, kind, mesh, name, encode_spec(spec), encode_labels(labels))
        return _resource(row)

    async def update(
        self,
        kind: str,
        mesh: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
        *,
        version: int,
    ) -> Resource:
        check_key(kind, mesh, name)
        encoded_labels = None if labels is None else encode_labels(labels)
        row = await self._write(
            _update, kind, mesh, name, encode_spec(spec), encoded_labels, version
        )
        return _resource(row)

    async def delete(self, kind: str, mesh: str, name: str, *, version: int | None = None) -> None:
        check_key(kind, mesh, name)
        await self._write(_delete, kind, mesh, name, version)

    async def patch_many(
        self, kind: str, patches: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> None:
        rows = []
        for mesh, name, patch in patches:
            check_key(kind, mesh, name)
            encode_spec(patch)  # refuses what JSON cannot hold
            rows.append((mesh, name, patch))
        if rows:
            # no _write: records are not logged as changes, so no watcher needs waking
            await self._run(_transaction, self._db, _patch_many, kind, rows)

    # changes

    async def watch(self) -> Watch:
        start = await self._run(_last_change, self._db)
        w = Watch(self._unwatch)
        self._watches[w] = start
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._follow(start), name="meshling-sqlite-watch")
        return w

    def _unwatch(self, w: Watch) -> None:
        self._watches.pop(w, None)
        if not self._watches:
            self._wake.set()  # let the poller see there is no one left and stop

    async def _follow(self, seq: int) -> None:
        while self._watches and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
            self._wake.clear()
            if not self._watches or self._closed:
                break
            for row in await self._run(_changes_after, self._db, seq):
                seq = row[0]
                change = Change(kind=row[1], mesh=row[2], name=row[3], version=row[4], op=row[5])
                for w, after in list(self._watches.items()):
                    if seq > after:
                        w.deliver(change)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for w in list(self._watches):
            w.end()
        self._watches.clear()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=False)


# Everything below runs on the store's database thread.


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file ourselves so it is private from the first byte: it holds the
        # mesh's whole configuration. SQLite gives the -wal and -shm files the same mode.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _enable_wal(db)
        if mode != "wal":
            raise StoreError(f"cannot open the store at {path}: SQLite refused WAL mode ({mode})")
        db.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, much faster
        db.execute("PRAGMA foreign_keys = ON")
        return db
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the store at {path}: {e}") from None


def _enable_wal(db: sqlite3.Connection) -> str:
    """Switch the database to WAL mode; returns the journal mode in force.

    The switch needs an exclusive lock, and SQLite reports a competing opener (another
    store opening the same fresh file) as "database is locked" at once, without waiting
    for busy_timeout: retry for as long as that timeout, then give up.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _migrate(db: sqlite3.Connection) -> None:
    def apply(db: sqlite3.Connection) -> None:
        db.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied TEXT NOT NULL
            )"""
        )
        applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        known = {number for number, _, _ in MIGRATIONS}
        if unknown := applied - known:
            raise StoreError(
                f"the database has schema migration {max(unknown)}, newer than this meshling "
                f"knows (up to {max(known)}); upgrade meshling"
            )
        for number, name, statements in MIGRATIONS:
            if number in applied:
                continue
            for statement in statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                (number, name, _now()),
            )

    # BEGIN IMMEDIATE takes the write lock before reading schema_migrations, so two
    # processes opening a fresh file cannot both decide to apply the same migration.
    _transaction(db, apply)


def _transaction(db: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        raise StoreError(f"cannot start a write transaction: {e}") from None
    try:
        result = fn(db, *args)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except sqlite3.Error as e:
        db.execute("ROLLBACK")
        raise StoreError(f"cannot commit: {e}") from None
    return result


def _select_one(db: sqlite3.Connection, kind: str, mesh: str, name: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM resources WHERE kind = ? AND mesh = ? AND name = ?", (kind, mesh, name)
    ).fetchone()
    return row


def _select_all(db: sqlite3.Connection, sql: str, params: tuple[str, ...]) -> list[sqlite3.Row]:
    return db.execute(sql, params).fetchall()


def _log(
    db: sqlite3.Connection, kind: str, mesh: str, name: str, version: int, op: ChangeOp
) -> None:
    now = time.time()
    db.execute(
        "INSERT INTO changes (kind, mesh, name, version, op, at) VALUES (?, ?, ?, ?, ?, ?)",
        (kind, mesh, name, version, op, now),
    )
    db.execute("DELETE FROM changes WHERE at < ?", (now - CHANGE_LOG_RETENTION,))


def _current_version(db: sqlite3.Connection, kind: str, mesh: str, name: str) -> int | None:
    row = db.execute(
        "SELECT version FROM resources WHERE kind = ? AND mesh = ? AND name = ?", (kind, mesh, name)
    ).fetchone()
    return None if row is None else int(row[0])


def _create(
    db: sqlite3.Connection, kind: str, mesh: str, name: str, spec: str, labels: str
) -> sqlite3.Row:
    if _current_version(db, kind, mesh, name) is not None:
        raise AlreadyExists(kind, mesh, name)
    tomb = db.execute(
        "DELETE FROM tombstones WHERE kind = ? AND mesh = ? AND name = ? RETURNING version",
        (kind, mesh, name),
    ).fetchone()
    version = 1 if tomb is None else int(tomb[0]) + 1
    now = _now()
    db.execute(
        "INSERT INTO resources (kind, mesh, name, labels, spec, version, created, updated)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, mesh, name, labels, spec, version, now, now),
    )
    _log(db, kind, mesh, name, version, "created")
    row = _select_one(db, kind, mesh, name)
    assert row is not None
    return row


def _update(
    db: sqlite3.Connection,
    kind: str,
    mesh: str,
    name: str,
    spec: str,
    labels: str | None,
    version: int,
) -> sqlite3.Row:
    current = _current_version(db, kind, mesh, name)
    if current is None:
        raise NotFound(kind, mesh, name)
    if current != version:
        raise Conflict(kind, mesh, name, current=current, given=version)
    db.execute(
        "UPDATE resources SET spec = ?, labels = COALESCE(?, labels), version = ?, updated = ?"
        " WHERE kind = ? AND mesh = ? AND name = ?",
        (spec, labels, current + 1, _now(), kind, mesh, name),
    )
    _log(db, kind, mesh, name, current + 1, "updated")
    row = _select_one(db, kind, mesh, name)
    assert row is not None
    return row


def _delete(db: sqlite3.Connection, kind: str, mesh: str, name: str, version: int | None) -> None:
    current = _current_version(db, kind, mesh, name)
    if current is None:
        raise NotFound(kind, mesh, name)
    if version is not None and current != version:
        raise Conflict(kind, mesh, name, current=current, given=version)
    db.execute("DELETE FROM resources WHERE kind = ? AND mesh = ? AND name = ?", (kind, mesh, name))
    db.execute(
        "INSERT OR REPLACE INTO tombstones (kind, mesh, name, version) VALUES (?, ?, ?, ?)",
        (kind, mesh, name, current),
    )
    _log(db, kind, mesh, name, current, "deleted")


def _patch_many(
    db: sqlite3.Connection, kind: str, rows: list[tuple[str, str, dict[str, Any]]]
) -> None:
    now = _now()
    for mesh, name, patch in rows:
        row = db.execute(
            "SELECT spec, version FROM resources WHERE kind = ? AND mesh = ? AND name = ?",
            (kind, mesh, name),
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO resources (kind, mesh, name, labels, spec, version, created, updated)"
                " VALUES (?, ?, ?, '{}', ?, 1, ?, ?)",
                (kind, mesh, name, encode_spec(patch), now, now),
            )
        else:
            spec = {**json.loads(row[0]), **patch}
            db.execute(
                "UPDATE resources SET spec = ?, version = ?, updated = ?"
                " WHERE kind = ? AND mesh = ? AND name = ?",
                (encode_spec(spec), int(row[1]) + 1, now, kind, mesh, name),
            )


def _last_change(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
    return int(row[0])


def _changes_after(
    db: sqlite3.Connection, seq: int
) -> list[tuple[int, str, str, str, int, ChangeOp]]:
    rows = db.execute(
        "SELECT seq, kind, mesh, name, version, op FROM changes WHERE seq > ? ORDER BY seq",
        (seq,),
    ).fetchall()
    return [tuple(row) for row in rows]
