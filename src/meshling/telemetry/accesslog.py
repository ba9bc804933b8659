"""The structured access log: JSON lines, written in batches off the request path.

`log()` only appends an entry to a bounded list; a timer on the event loop
serialises and writes the batch every 100 ms (or sooner when it fills). When
the writer falls behind, new entries are dropped and counted rather than
slowing requests down. A file that was rotated away (renamed or deleted) is
reopened at its path, so logrotate works without signals.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any

from meshling.snapshot.model import AccessLog
from meshling.telemetry.metrics import Metrics

# A request's record as the proxy hands it over: a plain tuple, in this order, of raw
# values. Building it costs the request path next to nothing; turning it into JSON
# happens in the batched flush, and only for the fields the snapshot asks for.
(
    START,
    DURATION,
    LISTENER,
    ROUTE,
    CLUSTER,
    UPSTREAM,
    DOWNSTREAM,
    HEAD,
    STATUS,
    BYTES_RECEIVED,
    BYTES_SENT,
    ERROR,
    REQUEST_ID,
) = range(13)
Record = tuple[Any, ...]


def _string(value: str | bytes | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(_json_string(value))


def _header(head: Any, name: bytes) -> bytes | None:
    if head is None:
        return None
    for n, v in head.headers:
        if n == name:
            return bytes(v)
    return None


def _head_field(attribute: str) -> Callable[[Record], str]:
    def extract(r: Record) -> str:
        head = r[HEAD]
        return "null" if head is None else _string(getattr(head, attribute))

    return extract


# How each field of ACCESS_LOG_FIELDS is written, as JSON text.
_FIELDS: dict[str, Callable[[Record], str]] = {
    "start_time": lambda r: repr(round(r[START], 6)),
    "duration_ms": lambda r: repr(round(r[DURATION] * 1000, 3)),
    "listener": lambda r: _string(r[LISTENER]),
    "route": lambda r: _string(r[ROUTE]),
    "cluster": lambda r: _string(r[CLUSTER]),
    "upstream": lambda r: "null" if r[UPSTREAM] is None else _string(str(r[UPSTREAM])),
    "downstream": lambda r: _string(r[DOWNSTREAM]),
    "method": _head_field("method"),
    "path": _head_field("target"),
    "authority": _head_field("host"),
    "protocol": lambda r: "null" if r[HEAD] is None else f'"HTTP/{r[HEAD].version.decode()}"',
    "status": lambda r: str(r[STATUS]),
    "bytes_received": lambda r: str(r[BYTES_RECEIVED]),
    "bytes_sent": lambda r: str(r[BYTES_SENT]),
    "error": lambda r: _string(r[ERROR]),
    "request_id": lambda r: _string(r[REQUEST_ID] or _header(r[HEAD], b"x-request-id")),
    "user_agent": lambda r: _string(_header(r[HEAD], b"user-agent")),
}

FLUSH_INTERVAL = 0.1
BATCH = 512
MAX_PENDING = 16384
REOPEN_CHECK = 1.0


class AccessLogWriter:
    def __init__(self, config: AccessLog, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.fields = [(f'"{name}":', _FIELDS[name]) for name in config.fields]
        self.pending: list[Record] = []
        self.fd = -1
        self.inode: tuple[int, int] | None = None
        self.loop = asyncio.get_running_loop()
        self.flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.last_reopen_check = 0.0
        self._open()

    def _open(self) -> None:
        if self.config.path == "-":
            self.fd = sys.stdout.fileno()
            return
        self.fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        st = os.fstat(self.fd)
        self.inode = (st.st_dev, st.st_ino)

    def _reopen_if_rotated(self) -> None:
        if self.inode is None:
            return
        try:
            st = os.stat(self.config.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current != self.inode:
            os.close(self.fd)
            self._open()

    def log(self, entry: Record) -> None:
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self.metrics.access_log_dropped += 1
            return
        pending.append(entry)
        if self.flush_handle is None:
            self.flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)
        elif len(pending) == BATCH:
            self.flush_handle.cancel()
            self.flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_handle = None
        entries, self.pending = self.pending, []
        if not entries:
            return
        now = self.loop.time()
        if now - self.last_reopen_check > REOPEN_CHECK:
            self.last_reopen_check = now
            self._reopen_if_rotated()
        fields = self.fields
        lines = [
            "{" + ",".join([key + extract(record) for key, extract in fields]) + "}\n"
            for record in entries
        ]
        data = "".join(lines).encode()
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except BlockingIOError:
            self.metrics.access_log_dropped += data.count(b"\n")
        except OSError:
            self.metrics.access_log_dropped += len(entries)

    def close(self) -> None:
        if self.flush_handle is not None:
            self.flush_handle.cancel()
        self.flush()
        if self.inode is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
