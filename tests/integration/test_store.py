"""The resource store suite, run against both stores: SQLite on a temporary file, and the
real PostgreSQL server (each test in a fresh schema, dropped afterwards).

PostgreSQL is found at $MESHLING_TEST_POSTGRES, by default
postgresql://postgres@127.0.0.1:5432/test. When it is not reachable the PostgreSQL tests
fail, saying so: they are part of the suite, not optional.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import textwrap
import uuid
from collections.abc import Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from meshling.controlplane.store import (
    AlreadyExists,
    Change,
    Conflict,
    NotFound,
    Store,
    StoreError,
    Watch,
    open_store,
)
from meshling.controlplane.store.postgres import PostgresStore, redact

pytestmark = pytest.mark.integration

T = TypeVar("T")

PG_URL = os.environ.get("MESHLING_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SPEC = {"sources": [{"match": {"service": "web"}}], "action": "ALLOW", "weight": 1.5}


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    """Run one test body with a deadline, so that nothing can hang the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def next_change(watch: Watch, timeout: float = 1.0) -> Change:
    return await asyncio.wait_for(anext(watch), timeout)


async def no_change(watch: Watch, wait: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(watch), wait)


async def pg_execute(sql: str) -> Any:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def pg_url(schema: str) -> str:
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


@pytest.fixture(scope="session")
def postgres() -> str:
    try:
        run(pg_execute("SELECT 1"))
    except Exception as e:
        pytest.fail(
            f"PostgreSQL is not reachable at {redact(PG_URL)} ({type(e).__name__}: {e}). "
            "The store tests need a real server: start one on 127.0.0.1:5432 with a database "
            "'test' (trust auth), or point MESHLING_TEST_POSTGRES at one.",
            pytrace=False,
        )
    return PG_URL


@pytest.fixture
def pg_schema(postgres: str) -> Iterator[str]:
    schema = f"meshling_test_{uuid.uuid4().hex[:12]}"
    yield schema
    run(pg_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh, empty database of the backend under test."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'store.db'}"
    return pg_url(request.getfixturevalue("pg_schema"))


# create / get / list / update / delete


def test_store_create_then_get_returns_the_same_resource(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            made = await store.create(
                "TrafficPermission", "default", "web-to-api", SPEC, {"team": "a"}
            )
            assert made.version == 1
            assert (made.kind, made.mesh, made.name) == (
                "TrafficPermission",
                "default",
                "web-to-api",
            )
            assert made.spec == SPEC
            assert made.labels == {"team": "a"}
            assert isinstance(made.created, datetime) and made.created.tzinfo is not None
            assert made.created == made.updated
            assert await store.get("TrafficPermission", "default", "web-to-api") == made
        finally:
            await store.close()

    run(body())


def test_store_list_by_kind_and_mesh_sorted_by_name(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            for mesh, name in [
                ("default", "c"),
                ("default", "a"),
                ("other", "b"),
                ("default", "b"),
            ]:
                await store.create("Timeout", mesh, name, {"seconds": 1})
            await store.create("Retry", "default", "a", {"attempts": 2})
            in_default = await store.list("Timeout", "default")
            assert [r.name for r in in_default] == ["a", "b", "c"]
            everywhere = await store.list("Timeout")
            assert [(r.name, r.mesh) for r in everywhere] == [
                ("a", "default"),
                ("b", "default"),
                ("b", "other"),
                ("c", "default"),
            ]
            assert await store.list("Timeout", "nowhere") == []
            assert await store.list("Unknown") == []
        finally:
            await store.close()

    run(body())


def test_store_list_label_selector_requires_every_pair(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.create("Dataplane", "m", "web-1", {}, {"service": "web", "zone": "a"})
            await store.create("Dataplane", "m", "web-2", {}, {"service": "web", "zone": "b"})
            await store.create("Dataplane", "m", "api-1", {}, {"service": "api", "zone": "a"})
            await store.create("Dataplane", "m", "bare", {})

            async def names(selector: dict[str, str] | None) -> list[str]:
                return [r.name for r in await store.list("Dataplane", "m", selector)]

            assert await names(None) == ["api-1", "bare", "web-1", "web-2"]
            assert await names({}) == ["api-1", "bare", "web-1", "web-2"]
            assert await names({"service": "web"}) == ["web-1", "web-2"]
            assert await names({"service": "web", "zone": "a"}) == ["web-1"]
            assert await names({"zone": "a"}) == ["api-1", "web-1"]
            assert await names({"service": "web", "zone": "c"}) == []
            assert await names({"missing": "x"}) == []
        finally:
            await store.close()

    run(body())


def test_store_update_bumps_version_and_keeps_labels_unless_given(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            v1 = await store.create("Retry", "m", "r", {"attempts": 1}, {"team": "a"})
            v2 = await store.update("Retry", "m", "r", {"attempts": 2}, version=1)
            assert (v2.version, v2.spec, v2.labels) == (2, {"attempts": 2}, {"team": "a"})
            assert v2.created == v1.created and v2.updated >= v1.updated
            v3 = await store.update("Retry", "m", "r", {"attempts": 3}, {"team": "b"}, version=2)
            assert (v3.version, v3.labels) == (3, {"team": "b"})
            assert await store.get("Retry", "m", "r") == v3
        finally:
            await store.close()

    run(body())


def test_store_delete_removes_and_recreate_continues_the_version(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.create("Mesh", "m", "m", {})
            await store.update("Mesh", "m", "m", {"mtls": True}, version=1)
            await store.delete("Mesh", "m", "m", version=2)
            with pytest.raises(NotFound):
                await store.get("Mesh", "m", "m")
            assert await store.list("Mesh") == []
            again = await store.create("Mesh", "m", "m", {})
            assert again.version == 3  # never reuses a version a watcher may have seen
            await store.delete("Mesh", "m", "m")  # no version: unconditional
            assert await store.list("Mesh") == []
        finally:
            await store.close()

    run(body())


# errors


def test_store_stale_version_conflicts_and_changes_nothing(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.create("Timeout", "m", "t", {"seconds": 1}, {"team": "a"})
            current = await store.update("Timeout", "m", "t", {"seconds": 2}, version=1)
            with pytest.raises(Conflict) as err:
                await store.update("Timeout", "m", "t", {"seconds": 99}, {"team": "x"}, version=1)
            assert (err.value.current, err.value.given) == (2, 1)
            assert "current version is 2" in str(err.value)
            assert "version 1" in str(err.value)
            with pytest.raises(Conflict):
                await store.update("Timeout", "m", "t", {"seconds": 99}, version=7)
            with pytest.raises(Conflict):
                await store.delete("Timeout", "m", "t", version=1)
            assert await store.get("Timeout", "m", "t") == current
        finally:
            await store.close()

    run(body())


def test_store_concurrent_updates_of_one_version_let_exactly_one_win(url: str) -> None:
    async def body() -> None:
        a, b = await open_store(url), await open_store(url)
        try:
            await a.create("Retry", "m", "r", {"attempts": 1})
            results = await asyncio.gather(
                a.update("Retry", "m", "r", {"attempts": 2}, version=1),
                b.update("Retry", "m", "r", {"attempts": 3}, version=1),
                return_exceptions=True,
            )
            conflicts = [r for r in results if isinstance(r, Conflict)]
            winners = [r for r in results if not isinstance(r, BaseException)]
            assert len(conflicts) == 1 and len(winners) == 1, results
            assert await a.get("Retry", "m", "r") == winners[0]
            assert winners[0].version == 2
        finally:
            await a.close()
            await b.close()

    run(body())


def test_store_create_of_existing_raises_already_exists(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            made = await store.create("Mesh", "m", "m", {"a": 1})
            with pytest.raises(AlreadyExists, match="'m' already exists in mesh 'm'"):
                await store.create("Mesh", "m", "m", {"a": 2})
            assert await store.get("Mesh", "m", "m") == made
        finally:
            await store.close()

    run(body())


def test_store_missing_resource_raises_not_found(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            with pytest.raises(NotFound, match="Mesh 'nope' not found in mesh 'm'"):
                await store.get("Mesh", "m", "nope")
            with pytest.raises(NotFound):
                await store.update("Mesh", "m", "nope", {}, version=1)
            with pytest.raises(NotFound):
                await store.delete("Mesh", "m", "nope")
            with pytest.raises(NotFound):
                await store.delete("Mesh", "m", "nope", version=1)
        finally:
            await store.close()

    run(body())


def test_store_rejects_bad_keys_and_specs(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            with pytest.raises(StoreError, match="name must be a non-empty string"):
                await store.create("Mesh", "m", "", {})
            with pytest.raises(StoreError, match="at most 253"):
                await store.create("Mesh", "m", "x" * 300, {})
            with pytest.raises(StoreError, match="cannot be stored as JSON"):
                await store.create("Mesh", "m", "m", {"when": datetime.now()})
            with pytest.raises(StoreError, match="labels must map strings to strings"):
                await store.create("Mesh", "m", "m", {}, {"n": 1})  # type: ignore[dict-item]
            assert await store.list("Mesh") == []
        finally:
            await store.close()

    run(body())


# watch


def test_store_watch_sees_create_update_delete_in_order(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            await store.create("Mesh", "m", "before", {})  # made before watching: not seen
            async with await store.watch() as changes:
                await store.create("Timeout", "m", "t", {"seconds": 1})
                await store.update("Timeout", "m", "t", {"seconds": 2}, version=1)
                with pytest.raises(Conflict):
                    await store.update("Timeout", "m", "t", {"seconds": 3}, version=1)
                await store.delete("Timeout", "m", "t")
                seen = [await next_change(changes) for _ in range(3)]
                assert seen == [
                    Change("Timeout", "m", "t", 1, "created"),
                    Change("Timeout", "m", "t", 2, "updated"),
                    Change("Timeout", "m", "t", 2, "deleted"),
                ]
                await no_change(changes)  # the failed write sent nothing
        finally:
            await store.close()

    run(body())


def test_store_every_watcher_gets_every_change_and_close_ends_watches(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        first, second = await store.watch(), await store.watch()
        await store.create("Mesh", "m", "m", {})
        expected = Change("Mesh", "m", "m", 1, "created")
        assert await next_change(first) == expected
        assert await next_change(second) == expected
        await second.aclose()
        await store.close()
        assert [c async for c in first] == []

    run(body())


def test_store_write_through_one_store_reaches_another_stores_watch(url: str) -> None:
    async def body() -> None:
        writer, reader = await open_store(url), await open_store(url)
        try:
            async with await reader.watch() as changes:
                await writer.create("Retry", "m", "r", {"attempts": 1})
                await writer.update("Retry", "m", "r", {"attempts": 2}, version=1)
                assert await next_change(changes, timeout=1.0) == Change(
                    "Retry", "m", "r", 1, "created"
                )
                assert await next_change(changes, timeout=1.0) == Change(
                    "Retry", "m", "r", 2, "updated"
                )
            assert (await reader.get("Retry", "m", "r")).spec == {"attempts": 2}
        finally:
            await writer.close()
            await reader.close()

    run(body())


# migrations and persistence


def test_store_concurrent_opens_of_a_fresh_database_migrate_once(url: str, backend: str) -> None:
    async def body() -> list[Any]:
        stores: list[Store] = await asyncio.gather(*(open_store(url) for _ in range(4)))
        try:
            await stores[0].create("Mesh", "m", "m", {})
            for store in stores:
                assert [r.name for r in await store.list("Mesh")] == ["m"]
        finally:
            for store in stores:
                await store.close()
        if backend == "sqlite":
            with sqlite3.connect(url.removeprefix("sqlite://")) as db:
                return db.execute("SELECT version FROM schema_migrations").fetchall()
        schema = url.rsplit("schema=", 1)[1]
        return [
            tuple(r) for r in await pg_execute(f'SELECT version FROM "{schema}".schema_migrations')
        ]

    assert run(body()) == [(1,)]


def test_store_keeps_resources_across_reopen(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        made = await store.create("Mesh", "m", "m", {"mtls": True}, {"env": "prod"})
        await store.close()
        store = await open_store(url)  # migrations already applied: a no-op
        try:
            assert await store.get("Mesh", "m", "m") == made
            assert (await store.update("Mesh", "m", "m", {}, version=1)).version == 2
        finally:
            await store.close()

    run(body())


# SQLite specifics


def test_store_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "store.db"

    async def body() -> None:
        store = await open_store(str(path))  # a plain path works too
        await store.create("Mesh", "m", "m", {})
        await store.close()

    run(body())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_sqlite_sees_writes_from_another_process(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'store.db'}"
    writer = textwrap.dedent(
        f"""
        import asyncio
        from meshling.controlplane.store import open_store

        async def main():
            store = await open_store({url!r})
            await store.create("Mesh", "m", "from-elsewhere", {{}})
            await store.close()

        asyncio.run(main())
        """
    )

    async def body() -> None:
        store = await open_store(url)
        try:
            async with await store.watch() as changes:
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", writer)
                assert await asyncio.wait_for(proc.wait(), 10) == 0
                change = await next_change(changes, timeout=1.0)
                assert change == Change("Mesh", "m", "from-elsewhere", 1, "created")
        finally:
            await store.close()

    run(body(), timeout=15)


def test_store_sqlite_refuses_a_database_from_a_newer_meshling(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    run(_open_and_close(str(path)))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    with pytest.raises(StoreError, match="migration 999, newer than this meshling"):
        run(_open_and_close(str(path)))


async def _open_and_close(url: str) -> None:
    store = await open_store(url)
    await store.close()


# PostgreSQL specifics


def test_store_postgres_unreachable_names_the_url_without_password() -> None:
    # a port nothing listens on: bound, then closed
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://meshling:hunter2@127.0.0.1:{port}/cp"
    with pytest.raises(StoreError) as err:
        run(_open_and_close(url))
    message = str(err.value)
    assert f"cannot connect to the store at postgresql://meshling@127.0.0.1:{port}/cp" in message
    assert "hunter2" not in message


def test_store_postgres_watch_reconnects_after_its_connection_drops(pg_schema: str) -> None:
    async def body() -> None:
        store = await open_store(pg_url(pg_schema))
        try:
            async with await store.watch() as changes:
                assert isinstance(store, PostgresStore)
                channel = store.channel
                killed = await pg_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE application_name = 'meshling-watch' AND query LIKE '%{channel}%'"
                )
                assert [tuple(r) for r in killed] == [(True,)]
                # The first write may fall in the gap before the listener is back; keep
                # writing until one arrives, as a replica writing steadily would.
                for n in range(40):
                    await store.create("Mesh", "m", f"m{n}", {})
                    try:
                        change = await next_change(changes, timeout=0.25)
                        if change.op == "resync":  # the signal that the gap is over
                            change = await next_change(changes, timeout=0.25)
                        break
                    except TimeoutError:
                        continue
                else:
                    pytest.fail("the watch never came back after its connection dropped")
                assert change.op == "created"
        finally:
            await store.close()

    run(body(), timeout=20)


def test_store_urls_are_checked() -> None:
    with pytest.raises(StoreError, match="unknown store scheme 'mysql'"):
        run(_open_and_close("mysql://h/db"))
    with pytest.raises(StoreError, match="bad schema"):
        run(_open_and_close("postgresql://h/db?schema=no-dashes"))
    assert redact("postgresql://u:secret@h:5/db?x=1") == "postgresql://u@h:5/db?x=1"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_store_patch_many_merges_fields_in_one_write_and_notifies_no_one(url: str) -> None:
    async def body() -> None:
        store = await open_store(url)
        try:
            async with await store.watch() as changes:
                await store.patch_many(
                    "Status", [("m", "a", {"x": 1, "y": {"z": 2}}), ("m", "b", {"x": 2})]
                )
                await store.patch_many("Status", [("m", "a", {"y": None, "w": "new"})])
                a = await store.get("Status", "m", "a")
                assert a.spec == {"x": 1, "y": None, "w": "new"}
                assert a.version == 2
                assert [r.name for r in await store.list("Status", "m")] == ["a", "b"]
                await store.patch_many("Status", [])
                with pytest.raises(StoreError):
                    await store.patch_many("Status", [("m", "", {"x": 1})])
                await no_change(changes)
        finally:
            await store.close()

    run(body())


def test_store_postgres_watch_says_resync_after_it_reconnects(pg_schema: str) -> None:
    async def body() -> None:
        store = await open_store(pg_url(pg_schema))
        try:
            async with await store.watch() as changes:
                assert isinstance(store, PostgresStore)
                await pg_execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    f" WHERE application_name = 'meshling-watch' AND query LIKE '%{store.channel}%'"
                )
                change = await next_change(changes, timeout=5)
                assert change.op == "resync" and change.kind == "*"
        finally:
            await store.close()

    run(body(), timeout=20)
