"""The distributor's I/O: it loads the view from the store, follows `store.watch()`, and
pushes rebuilt snapshots to the streams connected to this replica.

One task consumes the watch. A change wakes it; it then waits a few milliseconds for
more (an `apply` of fifty resources is fifty changes), re-reads each changed resource,
feeds the core, and rebuilds once per touched proxy. A large burst, a resync signal from
the store (a PostgreSQL watcher that reconnected), a read that failed, or the periodic
safety net re-list everything instead. Builds run in chunks, yielding to the loop between
them, so the first proxies get their push while the rest are still being built and the
loop keeps answering ACKs.

Streams register here (`register`) after their hello, and report ACKs and NACKs; their
status goes through the batched `StatusWriter`, with one heartbeat pass per interval.
A stream lasts as long as its token: one that is revoked, or expires, closes it
(`unauthenticated`), and the proxy reconnects with the token it reads then.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from meshling.controlplane.distributor.core import DistributorCore, Key, Outcome, Proxy
from meshling.controlplane.distributor.core import Resource as ViewResource
from meshling.controlplane.resources import MESH_KIND, Dataplane, kinds, parse_resource
from meshling.controlplane.status import (
    Clock,
    StatusWriter,
    heartbeat_interval,
    iso,
    utc_now,
)
from meshling.controlplane.store import RESYNC, Change, NotFound, Resource, Store, StoreError
from meshling.controlplane.telemetry import DEFAULT_STATS_INTERVAL, TapHub, Telemetry
from meshling.controlplane.tokens import REVOCATION_KIND
from meshling.snapshot.load import SnapshotError
from meshling.snapshot.model import TlsFiles

log = logging.getLogger(__name__)

# how long the consumer waits for the rest of a burst, and at most in all
DEBOUNCE: Final = 0.005
MAX_DELAY: Final = 0.1
# more changes than this in one batch: re-list instead of re-reading one by one
RELIST_ABOVE: Final = 64
# concurrent re-reads of changed resources
READS: Final = 8
# proxies built between two yields to the loop
CHUNK: Final = 50
# the safety net: a full re-list this often, whatever the watch said
RESYNC_EVERY: Final = 300.0
# close codes (see docs/config-stream.md)
CLOSE_INVALID: Final = 4400
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_SUPERSEDED: Final = 4409


class Stream(Protocol):
    """A proxy's stream, as the distributor drives it."""

    def offer(self, version: str, frame: str) -> None:
        """Send this push when the stream can; a later offer replaces an unsent one."""

    def refuse(self, reason: str, message: str, code: int) -> None:
        """Send a refusal and close."""


@dataclass(eq=False)
class Session:
    """One registered stream: its proxy in the core, and what it said."""

    proxy: Proxy
    stream: Stream
    service: str
    jti: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # versions pushed on this stream, newest last: an ACK must name one of them
    pushed: deque[str] = field(default_factory=lambda: deque(maxlen=16))
    applied: str | None = None
    # closes the stream when its token expires
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def key(self) -> Key:
        return self.proxy.key


def to_view(resource: Resource) -> ViewResource | None:
    """A stored resource as the builder reads it; None (logged) if it no longer parses."""
    metadata: dict[str, Any] = {"name": resource.name}
    if resource.kind != MESH_KIND:
        metadata["mesh"] = resource.mesh
    if resource.labels:  # not every kind has labels
        metadata["labels"] = resource.labels
    document = {"kind": resource.kind, "metadata": metadata, "spec": resource.spec}
    try:
        parsed: ViewResource = parse_resource(document, f"store:{resource.kind}")
    except SnapshotError as e:
        log.warning("ignoring stored %s %s/%s: %s", resource.kind, resource.mesh, resource.name, e)
        return None
    return parsed


class Distributor:
    """Snapshots for the streams of this replica, kept current from the store."""

    def __init__(
        self,
        store: Store,
        status: StatusWriter,
        *,
        replica: str,
        offline_after: float,
        clock: Clock = utc_now,
        debounce: float = DEBOUNCE,
        resync_every: float = RESYNC_EVERY,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
    ) -> None:
        self.store = store
        self.status = status
        self.replica = replica
        self.offline_after = offline_after
        self.core = DistributorCore()
        self._clock = clock
        self._debounce = debounce
        self._resync_every = resync_every
        self._kinds = frozenset(kinds())
        self._sessions: dict[Key, Session] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._changes: asyncio.Queue[Change | None] = asyncio.Queue()
        self._closed = False
        # peers of newly registered proxies, for the consumer to rebuild
        self._pending_builds: set[Key] = set()
        # golden metrics and taps from the streams of this replica (`meshling stat`, `tap`)
        self.telemetry = Telemetry(stats_interval=stats_interval)
        self.taps = TapHub(stats_interval)
        # counters, for measurements and tests
        self.batches = 0
        self.resyncs = 0

    # lifecycle

    async def start(self) -> None:
        watch = await self.store.watch()  # first, so nothing after the list is missed
        await self.resync()
        self.status.start()
        self._tasks = [
            asyncio.create_task(self._forward(watch), name="meshling-distributor-watch"),
            asyncio.create_task(self._consume(), name="meshling-distributor"),
            asyncio.create_task(self._heartbeat(), name="meshling-status-heartbeat"),
            asyncio.create_task(self._safety_net(), name="meshling-distributor-resync"),
        ]
        self._watch = watch

    async def close(self) -> None:
        """Close every stream (going away), record them disconnected, write the status."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._watch.aclose()
        now = iso(self._clock())
        for session in list(self._sessions.values()):
            if session.expiry is not None:
                session.expiry.cancel()
            self.status.note(session.key, connected=False, last_seen=now)
            session.stream.refuse("unavailable", "the control plane is shutting down", 1001)
        self._sessions.clear()
        await self.status.close()

    # streams

    def register(
        self,
        dataplane: Dataplane,
        version: int,
        tls: TlsFiles | None,
        *,
        service: str,
        jti: str,
        stream: Stream,
        applied: str | None,
        expires: dt.datetime | None = None,
    ) -> Session:
        """A stream's hello was accepted and its dataplane stored at `version`: build and
        push its snapshot. An earlier stream of the same dataplane here is closed, and
        this one will be when its token `expires`."""
        key = (dataplane.mesh, dataplane.name)
        touched = self.core.apply("Dataplane", dataplane.mesh, dataplane.name, version, dataplane)
        session = Session(Proxy(key, dataplane, tls), stream, service, jti, applied=applied)
        previous = self._sessions.get(key)
        if previous is not None:
            previous.stream.refuse(
                "superseded", "a newer stream registered the same dataplane", CLOSE_SUPERSEDED
            )
        self._sessions[key] = session
        self.core.connect(session.proxy)
        if expires is not None:
            left = (expires - self._clock()).total_seconds()
            session.expiry = asyncio.get_running_loop().call_later(
                max(0.0, left), self._expired, session, expires
            )
        now = iso(self._clock())
        self.status.note(
            key,
            service=service,
            connected=True,
            replica=self.replica,
            stream=session.id,
            connected_at=now,
            last_seen=now,
            applied=applied,
            tls_paths=None
            if tls is None
            else {"certificate": tls.certificate, "key": tls.key, "trust_bundle": tls.trust_bundle},
        )
        # itself at once; its peers (new endpoints) in the background, in chunks
        self._deliver(self.core.build([key]))
        touched.discard(key)
        if touched:
            self._changes.put_nowait(None)  # wake the consumer...
            self._pending_builds.update(touched)  # ...to build these
        return session

    def unregister(self, session: Session) -> None:
        if session.expiry is not None:
            session.expiry.cancel()
        if self._sessions.get(session.key) is not session:
            return  # superseded: the newer stream owns the status
        del self._sessions[session.key]
        self.core.disconnect(session.proxy)
        if not self._closed:
            self.status.note(session.key, connected=False, last_seen=iso(self._clock()))

    def ack(self, session: Session, version: str) -> bool:
        """The proxy runs `version`; False if it was never pushed on this stream."""
        if version not in session.pushed:
            return False
        session.applied = version
        self.status.note(session.key, applied=version, last_seen=iso(self._clock()))
        return True

    def nack(self, session: Session, version: str, reason: str) -> bool:
        if version not in session.pushed:
            return False
        now = iso(self._clock())
        self.status.note(
            session.key,
            last_nack={"version": version, "reason": reason[:1000], "at": now},
            last_seen=now,
        )
        return True

    def sessions(self) -> Sequence[Session]:
        return list(self._sessions.values())

    def snapshot_of(self, mesh: str, name: str, tls: TlsFiles | None) -> dict[str, Any] | str:
        return self.core.preview(mesh, name, tls)

    def _deliver(self, outcomes: Iterable[Outcome]) -> None:
        pushed: list[tuple[Key, str]] = []
        for outcome in outcomes:
            session = self._sessions.get(outcome.key)
            if session is None:
                continue
            if outcome.refusal is not None:
                session.stream.refuse("invalid", outcome.refusal, CLOSE_INVALID)
                continue
            assert outcome.version is not None and outcome.frame is not None
            session.pushed.append(outcome.version)
            session.stream.offer(outcome.version, outcome.frame)
            pushed.append((outcome.key, outcome.version))
        for key, version in pushed:
            self.status.note(key, pushed=version)

    async def _build_and_deliver(self, keys: set[Key]) -> None:
        ordered = sorted(keys)
        for start in range(0, len(ordered), CHUNK):
            self._deliver(self.core.build(ordered[start : start + CHUNK]))
            await asyncio.sleep(0)

    # following the store

    async def resync(self) -> None:
        """Re-list every resource the builder reads; rebuild every proxy."""
        listed: list[tuple[str, int, ViewResource]] = []
        for kind in sorted(self._kinds):
            for resource in await self.store.list(kind):
                parsed = to_view(resource)
                if parsed is not None:
                    listed.append((kind, resource.version, parsed))
        touched = self.core.reset(listed)
        self.resyncs += 1
        await self._build_and_deliver(touched)

    async def _forward(self, watch: Any) -> None:
        async for change in watch:
            self._changes.put_nowait(change)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._changes.get()]
            deadline = loop.time() + MAX_DELAY
            while loop.time() < deadline:
                try:
                    batch.append(await asyncio.wait_for(self._changes.get(), self._debounce))
                except TimeoutError:
                    break
            try:
                await self._apply(batch)
            except StoreError as e:
                log.warning("cannot read the store (%s); re-listing in a second", e)
                await asyncio.sleep(1.0)
                self._changes.put_nowait(RESYNC)
            except Exception:
                log.exception("the distributor failed on a batch of changes; re-listing")
                await asyncio.sleep(1.0)
                self._changes.put_nowait(RESYNC)

    async def _apply(self, batch: list[Change | None]) -> None:
        self.batches += 1
        touched, self._pending_builds = set(self._pending_builds), set()
        changes = [c for c in batch if c is not None]
        for change in changes:
            if change.kind == REVOCATION_KIND and change.op == "created":
                self._revoked(change.name)
        relevant = {
            (c.kind, c.mesh, c.name): c
            for c in changes
            if c.op == "resync" or c.kind in self._kinds
        }
        if any(c.op == "resync" for c in relevant.values()) or len(relevant) > RELIST_ABOVE:
            await self.resync()
            return
        reads = asyncio.Semaphore(READS)

        async def read(change: Change) -> tuple[Change, Resource | None]:
            async with reads:
                try:
                    return change, await self.store.get(change.kind, change.mesh, change.name)
                except NotFound:
                    return change, None

        for change, resource in await asyncio.gather(*map(read, relevant.values())):
            if resource is None:
                touched |= self.core.apply(
                    change.kind, change.mesh, change.name, change.version, None
                )
            else:
                touched |= self.core.apply(
                    change.kind, change.mesh, change.name, resource.version, to_view(resource)
                )
        if touched:
            await self._build_and_deliver(touched)

    def _expired(self, session: Session, expires: dt.datetime) -> None:
        if self._sessions.get(session.key) is session:
            session.stream.refuse(
                "unauthenticated",
                f"the dataplane token has expired: it expired at "
                f"{expires.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}, and a stream lasts only as "
                "long as its token; put a new one in the proxy's token file (meshling token "
                f"dataplane --service {session.service}), it is read again on reconnecting",
                CLOSE_UNAUTHENTICATED,
            )

    def _revoked(self, jti: str) -> None:
        for session in list(self._sessions.values()):
            if session.jti == jti:
                session.stream.refuse(
                    "unauthenticated", "the dataplane token has been revoked", CLOSE_UNAUTHENTICATED
                )

    async def _heartbeat(self) -> None:
        interval = heartbeat_interval(self.offline_after)
        while True:
            await asyncio.sleep(interval)
            now = iso(self._clock())
            # the whole connection, not just last_seen: it repairs a disconnect written
            # late by another replica for an earlier stream of the same dataplane
            for session in self._sessions.values():
                self.status.note(
                    session.key,
                    connected=True,
                    replica=self.replica,
                    stream=session.id,
                    last_seen=now,
                )

    async def _safety_net(self) -> None:
        while True:
            await asyncio.sleep(self._resync_every)
            self._changes.put_nowait(RESYNC)


def replica_id() -> str:
    """This process, as status records name it: `hostname:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"
