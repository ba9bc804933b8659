"""The store's vocabulary: resources, changes, errors, and the interface every store implements.

A resource is addressed by `(kind, mesh, name)` and carries labels, a spec and a
resource version. The version starts at 1, grows by one on every write and keeps
growing across a delete and a re-create of the same name, so `(kind, mesh, name,
version)` names one state of a resource for every reader, watchers included.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Protocol

# `resync`: changes may have been missed (a PostgreSQL watcher lost its connection and has
# it back); kind, mesh and name are `*` and the consumer re-lists what it follows.
ChangeOp = Literal["created", "updated", "deleted", "resync"]

# Longest kind, mesh or name accepted: a DNS label set, as elsewhere in the mesh, and small
# enough that a change always fits in one PostgreSQL NOTIFY payload (8000 bytes).
MAX_NAME_LENGTH = 253


@dataclass(frozen=True)
class Resource:
    kind: str
    mesh: str
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    version: int
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class Change:
    kind: str
    mesh: str
    name: str
    version: int
    op: ChangeOp


# Delivered to every watch after a gap in the notifications.
RESYNC = Change(kind="*", mesh="*", name="*", version=0, op="resync")


class StoreError(Exception):
    """The store could not do what was asked; the message says why."""


class NotFound(StoreError):
    def __init__(self, kind: str, mesh: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found in mesh {mesh!r}")
        self.kind, self.mesh, self.name = kind, mesh, name


class AlreadyExists(StoreError):
    def __init__(self, kind: str, mesh: str, name: str) -> None:
        super().__init__(
            f"{kind} {name!r} already exists in mesh {mesh!r}; update it instead of creating it"
        )
        self.kind, self.mesh, self.name = kind, mesh, name


class Conflict(StoreError):
    def __init__(self, kind: str, mesh: str, name: str, *, current: int, given: int) -> None:
        super().__init__(
            f"{kind} {name!r} in mesh {mesh!r} has changed: its current version is {current}, "
            f"the write was based on version {given}; read it again and retry"
        )
        self.kind, self.mesh, self.name = kind, mesh, name
        self.current, self.given = current, given


class Watch:
    """The changes a store makes after this watch was opened, in commit order.

    Iterate it with `async for`; close it (or use `async with`) when done. Iteration ends
    when the store is closed.
    """

    def __init__(self, on_close: Callable[[Watch], None]) -> None:
        # Unbounded: a store delivers from a callback that must not block; a slow
        # consumer costs memory, never a lost change.
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False

    def deliver(self, change: Change) -> None:
        if not self._closed:
            self._queue.put_nowait(change)

    def end(self) -> None:
        """The store is closing: let the consumer finish what is queued, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Change:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        change = await self._queue.get()
        if change is None:
            raise StopAsyncIteration
        return change

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            self._on_close(self)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Store(Protocol):
    """Resources by `(kind, mesh, name)`, with optimistic concurrency and change notification."""

    async def create(
        self,
        kind: str,
        mesh: str,
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str] | None = None,
    ) -> Resource:
        """Store a new resource at version 1 (or one past the version it was deleted at).

        Raises AlreadyExists if it is present.
        """
        ...

    async def get(self, kind: str, mesh: str, name: str) -> Resource:
        """Raises NotFound."""
        ...

    async def list(
        self, kind: str, mesh: str | None = None, selector: dict[str, str] | None = None
    ) -> list[Resource]:
        """Resources of one kind, in one mesh or all, whose labels include every pair of
        `selector`; sorted by name (then mesh)."""
        ...

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
        """Replace the spec (and the labels, unless None) of the resource at `version`.

        Raises NotFound, or Conflict if `version` is not the current one; then nothing changes.
        """
        ...

    async def delete(self, kind: str, mesh: str, name: str, *, version: int | None = None) -> None:
        """Remove the resource, only at `version` if given. Raises NotFound or Conflict."""
        ...

    async def patch_many(
        self, kind: str, patches: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> None:
        """Create or update many records of `kind` in one transaction: each `(mesh, name,
        patch)` merges the patch's top-level keys into the stored spec (creating it from
        the patch when absent).

        For records many writers touch field by field and nobody watches (dataplane
        status): no version check, and no change notification.
        """
        ...

    async def watch(self) -> Watch:
        """Subscribe to every change committed from now on, through any store on this database."""
        ...

    async def close(self) -> None: ...


def check_key(kind: str, mesh: str, name: str) -> None:
    for field, value in (("kind", kind), ("mesh", mesh), ("name", name)):
        if not isinstance(value, str) or not value:
            raise StoreError(f"resource {field} must be a non-empty string, got {value!r}")
        if len(value) > MAX_NAME_LENGTH:
            raise StoreError(
                f"resource {field} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed"
            )


def encode_labels(labels: dict[str, str] | None) -> str:
    labels = labels or {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise StoreError(f"labels must map strings to strings, got {key!r}: {value!r}")
    return json.dumps(labels, sort_keys=True)


def encode_spec(spec: dict[str, Any]) -> str:
    if not isinstance(spec, dict):
        raise StoreError(f"spec must be a mapping, got {type(spec).__name__}")
    try:
        return json.dumps(spec, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"spec cannot be stored as JSON: {e}") from None


def matches(labels: dict[str, str], selector: dict[str, str] | None) -> bool:
    return not selector or all(labels.get(k) == v for k, v in selector.items())
