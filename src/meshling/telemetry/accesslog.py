"""The structured access log: JSON lines, written in batches off the request path.

`log()` only appends an entry to a bounded list; a timer on the event loop
serialises and writes the batch every 100 ms (or sooner when it fills). When
the writer falls behind, new entries are dropped and counted rather than
slowing requests down. A file that was rotated away (renamed or deleted) is
reopened at its path, so logrotate works without signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from meshling.snapshot.model import AccessLog
from meshling.telemetry.metrics import Metrics

FLUSH_INTERVAL = 0.1
BATCH = 512
MAX_PENDING = 16384
REOPEN_CHECK = 1.0


class AccessLogWriter:
    def __init__(self, config: AccessLog, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.fields = config.fields
        self.pending: list[dict[str, Any]] = []
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

    def log(self, entry: dict[str, Any]) -> None:
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
        dumps = json.dumps
        lines = [dumps({k: e.get(k) for k in fields}, separators=(",", ":")) for e in entries]
        data = ("\n".join(lines) + "\n").encode()
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
