"""The shared store: PostgreSQL, for several control-plane replicas on one database.

Writes go through a connection pool, each in one transaction that also sends a NOTIFY;
PostgreSQL delivers a notification only when its transaction commits, and in commit
order, so every replica's watchers see the same changes in the same order. One extra
connection per store LISTENs, and reconnects with backoff if it drops.

The URL may name a schema (`postgresql://user@host/db?schema=meshling`, default
`public`); tables, the migration lock and the notification channel all belong to it, so
several meshes (or test runs) can share one database without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from .model import (
    RESYNC,
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
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
POOL_MIN, POOL_MAX = 1, 10
# Backoff of the LISTEN connection's reconnects: doubles from the first to the last.
RECONNECT_FIRST, RECONNECT_LAST = 0.1, 5.0

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Numbered migrations, applied in order and recorded in schema_migrations. Append only:
# never edit one that has shipped. `{s}` is the quoted schema.
MIGRATIONS: Sequence[tuple[int, str, Sequence[str]]] = (
    (
        1,
        "resources and tombstones",
        (
            """CREATE TABLE {s}.resources (
                kind TEXT NOT NULL,
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                labels JSONB NOT NULL,
                spec JSONB NOT NULL,
                version BIGINT NOT NULL,
                created TIMESTAMPTZ NOT NULL,
                updated TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (kind, mesh, name)
            )""",
            "CREATE INDEX resources_labels ON {s}.resources USING GIN (labels jsonb_path_ops)",
            # The last version of each deleted resource, so that a re-created one goes on
            # counting from there instead of starting again at 1.
            """CREATE TABLE {s}.tombstones (
                kind TEXT NOT NULL,
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                PRIMARY KEY (kind, mesh, name)
            )""",
        ),
    ),
)


def redact(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _split_schema(url: str) -> tuple[str, str]:
    """The DSN to hand to the driver, and the schema named in the URL's query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = "public"
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    if not _IDENTIFIER.fullmatch(schema):
        raise StoreError(
            f"bad schema {schema!r} in store URL {redact(url)}: use letters, digits and "
            "underscores, at most 63, not starting with a digit"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


@contextlib.contextmanager
def _driver_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
        raise StoreError(f"{what}: {_reason(e)}") from e


def _resource(row: asyncpg.Record) -> Resource:
    return Resource(
        kind=row["kind"],
        mesh=row["mesh"],
        name=row["name"],
        labels=json.loads(row["labels"]),
        spec=json.loads(row["spec"]),
        version=row["version"],
        created=row["created"],
        updated=row["updated"],
    )


class PostgresStore:
    """A store in one PostgreSQL schema, shared by every replica that opens it."""

    def __init__(self, url: str, dsn: str, schema: str, pool: asyncpg.Pool) -> None:
        self.url = redact(url)
        self._dsn = dsn
        self._schema = schema
        self._pool = pool
        s = f'"{schema}"'
        self._resources = f"{s}.resources"
        self._tombstones = f"{s}.tombstones"
        # NOTIFY channels are per database: name this schema's one after it.
        channel = f"meshling_changes_{schema}"
        if len(channel) > 63:
            channel = "meshling_changes_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
        self.channel = channel
        # the LISTEN connection, and who is watching
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._reconnect: asyncio.Task[None] | None = None
        self._watches: set[Watch] = set()
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        dsn, schema = _split_schema(url)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=POOL_MIN,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": "meshling"},
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise StoreError(
                f"cannot connect to the store at {redact(url)}: {_reason(e)}"
            ) from None
        store = cls(url, dsn, schema, pool)
        try:
            await store._migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        s = f'"{self._schema}"'
        # An advisory lock keyed by the schema serialises replicas that start together; it
        # is released when the transaction ends, commit or not.
        key = int.from_bytes(
            hashlib.sha256(f"meshling.migrations.{self._schema}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        with _driver_errors(f"cannot migrate the store at {self.url}"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
                # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs the right to
                # create schemas, which a role given just its own schema may not have.
                if not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self._schema
                ):
                    await conn.execute(f"CREATE SCHEMA {s}")
                await conn.execute(
                    f"""CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
                        version INTEGER PRIMARY KEY,
                        name TEXT NOT NULL,
                        applied TIMESTAMPTZ NOT NULL DEFAULT now()
                    )"""
                )
                applied = {
                    r[0] for r in await conn.fetch(f"SELECT version FROM {s}.schema_migrations")
                }
                known = {number for number, _, _ in MIGRATIONS}
                if unknown := applied - known:
                    raise StoreError(
                        f"the database at {self.url} has schema migration {max(unknown)}, newer "
                        f"than this meshling knows (up to {max(known)}); upgrade meshling"
                    )
                for number, name, statements in MIGRATIONS:
                    if number in applied:
                        continue
                    for statement in statements:
                        await conn.execute(statement.format(s=s))
                    await conn.execute(
                        f"INSERT INTO {s}.schema_migrations (version, name) VALUES ($1, $2)",
                        number,
                        name,
                    )

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise StoreError(f"the store at {self.url} is closed")
        with _driver_errors(f"cannot {what} in the store at {self.url}"):
            async with self._pool.acquire() as conn, conn.transaction():
                yield conn

    async def _notify(
        self, conn: asyncpg.Connection, kind: str, mesh: str, name: str, version: int, op: ChangeOp
    ) -> None:
        payload = {"kind": kind, "mesh": mesh, "name": name, "version": version, "op": op}
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, json.dumps(payload))

    async def _current_version(
        self, conn: asyncpg.Connection, kind: str, mesh: str, name: str
    ) -> int | None:
        version: int | None = await conn.fetchval(
            f"SELECT version FROM {self._resources} WHERE kind = $1 AND mesh = $2 AND name = $3",
            kind,
            mesh,
            name,
        )
        return version

    # reads

    async def get(self, kind: str, mesh: str, name: str) -> Resource:
        check_key(kind, mesh, name)
        async with self._transaction("read") as conn:
            row = await conn.fetchrow(
                f"SELECT * FROM {self._resources} WHERE kind = $1 AND mesh = $2 AND name = $3",
                kind,
                mesh,
                name,
            )
        if row is None:
            raise NotFound(kind, mesh, name)
        return _resource(row)

    async def list(
        self, kind: str, mesh: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Resource]:
        # `labels @> selector` is "every pair of the selector is among the labels", served
        # by the GIN index.
        selector_json = encode_labels(selector)
        async with self._transaction("list") as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self._resources}"
                " WHERE kind = $1 AND ($2::text IS NULL OR mesh = $2) AND labels @> $3::jsonb"
                ' ORDER BY name COLLATE "C", mesh COLLATE "C"',
                kind,
                mesh,
                selector_json,
            )
        return [_resource(row) for row in rows]

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
        spec_json, labels_json = encode_spec(spec), encode_labels(labels)
        async with self._transaction("create") as conn:
            last = await conn.fetchval(
                f"DELETE FROM {self._tombstones} WHERE kind = $1 AND mesh = $2 AND name = $3"
                " RETURNING version",
                kind,
                mesh,
                name,
            )
            version = 1 if last is None else last + 1
            row = await conn.fetchrow(
                f"INSERT INTO {self._resources}"
                " (kind, mesh, name, labels, spec, version, created, updated)"
                " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, now(), now())"
                " ON CONFLICT DO NOTHING RETURNING *",
                kind,
                mesh,
                name,
                labels_json,
                spec_json,
                version,
            )
            if row is None:
                raise AlreadyExists(kind, mesh, name)
            await self._notify(conn, kind, mesh, name, version, "created")
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
        spec_json = encode_spec(spec)
        labels_json = None if labels is None else encode_labels(labels)
        async with self._transaction("update") as conn:
            # Compare-and-set in one statement: a concurrent writer that got there first
            # has changed the version, so this matches nothing.
            row = await conn.fetchrow(
                f"UPDATE {self._resources}"
                " SET spec = $4::jsonb, labels = COALESCE($5::jsonb, labels),"
                " version = version + 1, updated = now()"
                " WHERE kind = $1 AND mesh = $2 AND name = $3 AND version = $6 RETURNING *",
                kind,
                mesh,
                name,
                spec_json,
                labels_json,
                version,
            )
            if row is None:
                current = await self._current_version(conn, kind, mesh, name)
                if current is None:
                    raise NotFound(kind, mesh, name)
                raise Conflict(kind, mesh, name, current=current, given=version)
            await self._notify(conn, kind, mesh, name, row["version"], "updated")
        return _resource(row)

    async def delete(self, kind: str, mesh: str, name: str, *, version: int | None = None) -> None:
        check_key(kind, mesh, name)
        async with self._transaction("delete") as conn:
            deleted = await conn.fetchval(
                f"DELETE FROM {self._resources} WHERE kind = $1 AND mesh = $2 AND name = $3"
                " AND ($4::bigint IS NULL OR version = $4) RETURNING version",
                kind,
                mesh,
                name,
                version,
            )
            if deleted is None:
                current = await self._current_version(conn, kind, mesh, name)
                if current is None:
                    raise NotFound(kind, mesh, name)
                assert version is not None
                raise Conflict(kind, mesh, name, current=current, given=version)
            await conn.execute(
                f"INSERT INTO {self._tombstones} (kind, mesh, name, version)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (kind, mesh, name) DO UPDATE SET version = EXCLUDED.version",
                kind,
                mesh,
                name,
                deleted,
            )
            await self._notify(conn, kind, mesh, name, deleted, "deleted")

    async def patch_many(
        self, kind: str, patches: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> None:
        rows = []
        for mesh, name, patch in patches:
            check_key(kind, mesh, name)
            rows.append((kind, mesh, name, encode_spec(patch)))
        if not rows:
            return
        # One statement per record, pipelined by executemany in one transaction; `||`
        # merges the patch's top-level keys into the stored spec.
        async with self._transaction("write records") as conn:
            await conn.executemany(
                f"INSERT INTO {self._resources} AS r"
                " (kind, mesh, name, labels, spec, version, created, updated)"
                " VALUES ($1, $2, $3, '{}'::jsonb, $4::jsonb, 1, now(), now())"
                " ON CONFLICT (kind, mesh, name) DO UPDATE"
                " SET spec = r.spec || EXCLUDED.spec, version = r.version + 1, updated = now()",
                rows,
            )

    # changes

    async def watch(self) -> Watch:
        if self._closed:
            raise StoreError(f"the store at {self.url} is closed")
        async with self._listener_lock:
            if self._listener is None or self._listener.is_closed():
                await self._listen()
        w = Watch(self._watches.discard)
        self._watches.add(w)
        return w

    async def _listen(self) -> None:
        """Open the LISTEN connection; the caller holds the listener lock."""
        with _driver_errors(f"cannot listen for changes in the store at {self.url}"):
            conn = await asyncpg.connect(
                self._dsn,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": "meshling-watch"},
            )
            try:
                await conn.add_listener(self.channel, self._on_notification)
            except BaseException:
                await conn.close()
                raise
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn

    def _on_notification(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            change = Change(
                kind=data["kind"],
                mesh=data["mesh"],
                name=data["name"],
                version=int(data["version"]),
                op=data["op"],
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed change notification on %s: %r", channel, payload)
            return
        for w in list(self._watches):
            w.deliver(change)

    def _on_listener_lost(self, conn: object) -> None:
        if self._closed or conn is not self._listener:
            return
        self._listener = None
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.create_task(self._relisten(), name="meshling-pg-relisten")

    async def _relisten(self) -> None:
        # Changes committed while the connection was down are not replayed: a watcher
        # that must not miss one re-lists after a reconnect (logged below).
        delay = RECONNECT_FIRST
        while not self._closed:
            log.warning("change notifications from %s lost; reconnecting in %.1fs", self.url, delay)
            await asyncio.sleep(delay)
            try:
                async with self._listener_lock:
                    if self._closed:
                        return
                    if self._listener is None or self._listener.is_closed():
                        await self._listen()
                log.warning("change notifications from %s restored", self.url)
                # listening again: whatever a watcher re-lists now, later changes will
                # reach it, so nothing falls in between
                for w in list(self._watches):
                    w.deliver(RESYNC)
                return
            except StoreError as e:
                log.warning("%s", e)
                delay = min(delay * 2, RECONNECT_LAST)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        for w in list(self._watches):
            w.end()
        self._watches.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), CONNECT_TIMEOUT)
            self._listener = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT)
