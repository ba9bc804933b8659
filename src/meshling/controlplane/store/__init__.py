"""The control plane's resource store: one interface, SQLite or PostgreSQL behind it.

`open_store(url)` picks the implementation from the URL, applies any pending schema
migrations, and returns a `Store`:

- `sqlite:///var/lib/meshling/store.db`, or a plain path: embedded, zero set-up;
- `postgresql://user@host:5432/db[?schema=NAME]`: shared by several control-plane replicas.
"""

from __future__ import annotations

from .model import (
    RESYNC,
    AlreadyExists,
    Change,
    ChangeOp,
    Conflict,
    NotFound,
    Resource,
    Store,
    StoreError,
    Watch,
)

__all__ = [
    "RESYNC",
    "AlreadyExists",
    "Change",
    "ChangeOp",
    "Conflict",
    "NotFound",
    "Resource",
    "Store",
    "StoreError",
    "Watch",
    "open_store",
]


async def open_store(url: str) -> Store:
    """Open (creating and migrating if needed) the store that `url` names."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return await PostgresStore.open(url)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path:
            raise StoreError(f"store URL {url!r} names no file; use sqlite:///path/to/store.db")
        from .sqlite import SqliteStore

        return await SqliteStore.open(path)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise StoreError(
            f"unknown store scheme {scheme!r}: use sqlite:///path/to/store.db, a plain path, "
            "or postgresql://user@host:port/db"
        )
    if not url:
        raise StoreError("no store given: use a file path or postgresql://user@host:port/db")
    from .sqlite import SqliteStore

    return await SqliteStore.open(url)
