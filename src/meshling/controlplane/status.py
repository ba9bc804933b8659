"""Dataplane status: what the control plane knows of each proxy's stream, kept in the
store so that every replica can answer for proxies connected to another.

One `DataplaneStatus` record per dataplane (mesh, name), an internal kind (not in
`resources.kinds()`: the resource API neither lists nor writes it). Its spec:

    service              the service of the dataplane's token when it connected
    connected            a stream is open (false after a clean disconnect)
    replica              the control-plane replica holding the stream
    stream               an id of that stream, so a stale write can be told apart
    connected_at         when the stream was registered (ISO 8601, UTC)
    last_seen            refreshed by the owning replica every heartbeat
    pushed               the snapshot version last sent
    applied              the snapshot version last ACKed (or reported in the hello)
    last_nack            {"version", "reason", "at"} of the last NACK, or null
    tls_paths            where the proxy keeps its certificate, key and bundle, or null
    certificate_expires  the expiry of the last certificate signed for it

A dataplane is *online* when `connected` and `last_seen` is within the offline window
(30 s by default); a replica that dies stops refreshing `last_seen`, so its proxies go
offline on their own. Fields are merged in (`Store.patch_many`): the stream's replica and
the CA's sign route each write only their own fields.

`StatusWriter` batches: notes made between two flushes become one transaction, and the
heartbeat of every stream of a replica is one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

from meshling.controlplane.store import Resource, Store, StoreError

log = logging.getLogger(__name__)

STATUS_KIND: Final = "DataplaneStatus"
DEFAULT_OFFLINE_AFTER: Final = 30.0
HEARTBEAT_INTERVAL: Final = 10.0
# how long a note waits for others to share its transaction
FLUSH_INTERVAL: Final = 0.1

Key = tuple[str, str]  # (mesh, dataplane name)
Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def heartbeat_interval(offline_after: float) -> float:
    """How often a replica refreshes `last_seen`: often enough that two missed beats
    still leave a proxy online."""
    return min(HEARTBEAT_INTERVAL, offline_after / 3)


def is_online(spec: dict[str, Any], now: dt.datetime, offline_after: float) -> bool:
    last_seen = parse_iso(spec.get("last_seen"))
    return (
        bool(spec.get("connected"))
        and last_seen is not None
        and (now - last_seen).total_seconds() <= offline_after
    )


def summary(
    mesh: str,
    name: str,
    service: str | None,
    status: Resource | None,
    now: dt.datetime,
    offline_after: float,
) -> dict[str, Any]:
    """One row of the status list: a dataplane and what its stream last said."""
    spec = status.spec if status is not None else {}
    return {
        "name": name,
        "mesh": mesh,
        "service": service or spec.get("service"),
        "online": is_online(spec, now, offline_after),
        "connected": bool(spec.get("connected")),
        "replica": spec.get("replica"),
        "last_seen": spec.get("last_seen"),
        "applied": spec.get("applied"),
        "pushed": spec.get("pushed"),
        "last_nack": spec.get("last_nack"),
        "certificate_expires": spec.get("certificate_expires"),
    }


def detail(
    mesh: str,
    name: str,
    service: str | None,
    status: Resource | None,
    now: dt.datetime,
    offline_after: float,
) -> dict[str, Any]:
    """A dataplane's whole status (the snapshot is added by the caller)."""
    spec = status.spec if status is not None else {}
    return {
        **summary(mesh, name, service, status, now, offline_after),
        "connected_at": spec.get("connected_at"),
        "tls_paths": spec.get("tls_paths"),
    }


class StatusWriter:
    """Batched status writes: `note` merges fields into what the next flush writes."""

    def __init__(self, store: Store, *, flush_interval: float = FLUSH_INTERVAL) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._pending: dict[Key, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # every flush that wrote, and the records in it (for measurements and tests)
        self.flushes = 0
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="meshling-status-writer")

    def note(self, key: Key, **fields: Any) -> None:
        """Fields of one dataplane's status to write; a later note wins per field."""
        self._pending.setdefault(key, {}).update(fields)
        self._wake.set()

    def note_many(self, keys: Iterable[Key], **fields: Any) -> None:
        for key in keys:
            self._pending.setdefault(key, {}).update(fields)
        self._wake.set()

    async def _run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            # let the notes of a burst (a push to a thousand proxies, their ACKs) gather
            await asyncio.sleep(self._flush_interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            await self._store.patch_many(
                STATUS_KIND, [(mesh, name, fields) for (mesh, name), fields in pending.items()]
            )
        except StoreError as e:
            log.warning("cannot write the status of %d dataplanes: %s", len(pending), e)
            # keep them for the next flush, under anything noted since
            for key, fields in pending.items():
                self._pending[key] = {**fields, **self._pending.get(key, {})}
            if not self._closed:
                await asyncio.sleep(1.0)
                self._wake.set()
            return
        self.flushes += 1
        self.written += len(pending)

    async def close(self) -> None:
        """Write what is pending, and stop."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
