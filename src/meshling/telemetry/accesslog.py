"""The access log writers: one bounded, batched queue per backend, off the request path.

`log()` only appends a (renderer, record) pair to the backend's bounded list; a timer on
the event loop renders the batch (`meshling.telemetry.logformat`) and writes it every
100 ms, or sooner when it fills. When a backend falls behind (a slow disk, a collector
that is down), new records are dropped and counted by backend
(`meshling_access_log_dropped_total{backend}`) rather than slowing requests down.

* **stdout** and **file**: written with `os.write`; a file rotated away (renamed or
  deleted) is reopened at its path, so logrotate works without signals.
* **tcp**: a connection to a collector, opened in the background and reopened with
  backoff when it drops; records wait in the queue (up to its bound) while it is down,
  and go out newline-delimited once it is up. Records already handed to a connection
  that then breaks are lost with it.

Sinks with equal backends share one writer (`AccessLogWriters`), across listeners and
across reloads: a reload neither loses queued records nor reopens files needlessly. A
backend the new snapshot no longer names is flushed and closed; a connection still open
on the old chain then counts its records as dropped for that backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from meshling.snapshot.model import AccessLog, AccessLogBackend
from meshling.telemetry.logformat import (  # noqa: F401  (the record layout, re-exported)
    BYTES_RECEIVED,
    BYTES_SENT,
    CLUSTER,
    DIRECTION,
    DOWNSTREAM,
    DURATION,
    ERROR,
    HEAD,
    IDENTITY,
    LISTENER,
    REQUEST_ID,
    ROUTE,
    SERVICE,
    SOURCE,
    START,
    STATUS,
    UPSTREAM,
    Record,
    compile_json,
    compile_text,
)
from meshling.telemetry.metrics import Metrics

log = logging.getLogger("meshling.accesslog")

Render = Callable[[Record], str]

FLUSH_INTERVAL = 0.1
BATCH = 512
REOPEN_CHECK = 1.0
# a collector that takes less than this is not sent more: the rest waits in the queue
TCP_HIGH_WATER = 1 << 20
RECONNECT_BASE = 0.1
RECONNECT_CAP = 5.0


def renderer(sink: AccessLog) -> Render:
    """The compiled format of a sink (checked by the loader already)."""
    if sink.format == "text":
        return compile_text(sink.template)
    return compile_json(sink.fields)


class BackendWriter:
    """One backend's bounded queue of records and its batched flush."""

    def __init__(self, backend: AccessLogBackend, metrics: Metrics) -> None:
        self.backend = backend
        self.label = backend.label
        self.metrics = metrics
        self.max_pending = backend.max_pending
        # flush sooner than the timer once this many wait: half a small queue's bound, so
        # that a healthy backend never drops records for lack of a flush
        self.batch = min(BATCH, max(1, backend.max_pending // 2))
        self.pending: list[tuple[Render, Record]] = []
        self.loop = asyncio.get_running_loop()
        self.flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        # the flush is due at once (`batch` records wait), not at the timer
        self.soon = False
        self.closed = False
        metrics.access_log_dropped.setdefault(self.label, 0)

    def drop(self, count: int) -> None:
        dropped = self.metrics.access_log_dropped
        dropped[self.label] = dropped.get(self.label, 0) + count

    def log(self, render: Render, record: Record) -> None:
        pending = self.pending
        if len(pending) >= self.max_pending or self.closed:
            self.drop(1)
            return
        pending.append((render, record))
        if len(pending) >= self.batch:
            if not self.soon:
                if self.flush_handle is not None:
                    self.flush_handle.cancel()
                self.flush_handle = self.loop.call_soon(self.flush)
                self.soon = True
        elif self.flush_handle is None:
            self.flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def take(self, most: int | None = None) -> bytes:
        """Render and remove the first `most` queued records (all: None)."""
        if most is None or most >= len(self.pending):
            entries, self.pending = self.pending, []
        else:
            entries, self.pending = self.pending[:most], self.pending[most:]
        return "".join([render(record) for render, record in entries]).encode()

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write what is queued (as far as the backend takes it) and stop."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        self.flush()
        self.closed = True


class FileWriter(BackendWriter):
    """stdout, or a file reopened at its path when rotated away."""

    def __init__(self, backend: AccessLogBackend, metrics: Metrics) -> None:
        super().__init__(backend, metrics)
        self.fd = -1
        self.inode: tuple[int, int] | None = None
        self.last_reopen_check = 0.0
        self._open()

    def _open(self) -> None:
        if self.backend.kind == "stdout":
            self.fd = sys.stdout.fileno()
            return
        self.fd = os.open(self.backend.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        st = os.fstat(self.fd)
        self.inode = (st.st_dev, st.st_ino)

    def _reopen_if_rotated(self) -> None:
        if self.inode is None:
            return
        try:
            st = os.stat(self.backend.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current != self.inode:
            os.close(self.fd)
            self._open()

    def flush(self) -> None:
        self.flush_handle = None
        self.soon = False
        if not self.pending or self.fd < 0:
            return
        now = self.loop.time()
        if now - self.last_reopen_check > REOPEN_CHECK:
            self.last_reopen_check = now
            try:
                self._reopen_if_rotated()
            except OSError as exc:
                log.warning("access log %s cannot be reopened: %s", self.backend.path, exc)
        count = len(self.pending)
        data = self.take()
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except BlockingIOError:
            self.drop(data.count(b"\n"))
        except OSError:
            self.drop(count)

    def close(self) -> None:
        super().close()
        if self.inode is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class _Collector(asyncio.Protocol):
    """The connection to a TCP collector: only its state matters, nothing is read."""

    def __init__(self, writer: TcpWriter) -> None:
        self.writer = writer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """A collector has nothing to say; whatever it sends is ignored."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.writer.lost(self)


class TcpWriter(BackendWriter):
    """A TCP collector, connected in the background and reconnected with backoff."""

    def __init__(self, backend: AccessLogBackend, metrics: Metrics) -> None:
        from meshling.agent.backoff import Backoff

        super().__init__(backend, metrics)
        self.backoff = Backoff(RECONNECT_BASE, RECONNECT_CAP)
        self.collector: _Collector | None = None
        self.connecting: asyncio.Task[None] | None = asyncio.ensure_future(self._connect())

    async def _connect(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        while not self.closed:
            try:
                _, protocol = await self.loop.create_connection(
                    lambda: _Collector(self), self.backend.host, self.backend.port
                )
            except OSError as exc:
                wait = self.backoff.failure()
                log.debug("access log collector %s: %s; again in %.2fs", self.label, exc, wait)
                await asyncio.sleep(wait)
                continue
            self.backoff.success()
            self.collector = protocol
            self.connecting = None
            log.info("access log collector %s connected", self.label)
            if self.pending:
                self.flush()
            return

    def lost(self, collector: _Collector) -> None:
        if collector is not self.collector:
            return
        self.collector = None
        if not self.closed:
            log.info("access log collector %s lost; reconnecting", self.label)
            self.connecting = asyncio.ensure_future(self._connect(self.backoff.failure()))

    def flush(self) -> None:
        self.flush_handle = None
        self.soon = False
        collector = self.collector
        if collector is None or collector.transport is None or not self.pending:
            return  # queued until the collector is back (or dropped past the bound)
        transport = collector.transport
        room = TCP_HIGH_WATER - transport.get_write_buffer_size()
        if room <= 0:
            # a slow collector: keep the records queued and look again at the next tick
            self.flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)
            return
        transport.write(self.take(BATCH * 4))
        if self.pending:
            self.flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def close(self) -> None:
        super().close()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.collector is not None and self.collector.transport is not None:
            self.collector.transport.close()  # after the buffered records are written
        self.collector = None
        if self.pending:
            self.drop(len(self.pending))
            self.pending = []


class ChainLogs:
    """A filter chain's sinks: each a writer, a renderer and the callers it logs."""

    __slots__ = ("sinks",)

    def __init__(self, sinks: Sequence[tuple[BackendWriter, Render, frozenset[bytes] | None]]):
        # (writer, renderer, SPIFFE IDs of the callers logged; None: every caller)
        self.sinks = tuple(sinks)

    def log(self, record: Record, identity: bytes | None = None) -> None:
        for writer, render, identities in self.sinks:
            if identities is None or (identity is not None and identity in identities):
                writer.log(render, record)


class AccessLogWriters:
    """The proxy's writers, one per backend, kept across reloads while a sink uses them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.writers: dict[AccessLogBackend, BackendWriter] = {}
        self.renderers: dict[tuple[object, ...], Render] = {}

    def writer(self, backend: AccessLogBackend) -> BackendWriter:
        found = self.writers.get(backend)
        if found is None:
            kind = TcpWriter if backend.kind == "tcp" else FileWriter
            found = self.writers[backend] = kind(backend, self.metrics)
        return found

    def chain(self, sinks: Iterable[AccessLog]) -> ChainLogs | None:
        """The compiled sinks of one chain; None when it has none."""
        compiled = []
        for sink in sinks:
            key = (sink.format, sink.fields, sink.template)
            render = self.renderers.get(key)
            if render is None:
                render = self.renderers[key] = renderer(sink)
            identities = (
                None if "*" in sink.identities else frozenset(i.encode() for i in sink.identities)
            )
            compiled.append((self.writer(sink.backend), render, identities))
        return ChainLogs(compiled) if compiled else None

    def retain(self, backends: Iterable[AccessLogBackend]) -> None:
        """Close the writers no sink uses any more (after their queues are written)."""
        keep = set(backends)
        for backend in [b for b in self.writers if b not in keep]:
            self.writers.pop(backend).close()
        self.renderers.clear()

    def close(self) -> None:
        self.retain(())


class AccessLogWriter:
    """One sink with its own writer: the snapshot's `access_log:` on its own, as tests
    and tools use it without a proxy."""

    def __init__(self, config: AccessLog, metrics: Metrics) -> None:
        self.config = config
        self.render = renderer(config)
        kind = TcpWriter if config.backend.kind == "tcp" else FileWriter
        self.backend: BackendWriter = kind(config.backend, metrics)

    def log(self, record: Record) -> None:
        self.backend.log(self.render, record)

    def flush(self) -> None:
        self.backend.flush()

    def close(self) -> None:
        self.backend.close()
