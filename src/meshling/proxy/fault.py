"""Faults in the proxy: delays on the deadline wheel, resets, and paced responses.

* A **delay** is an entry on the proxy's deadline wheel (`Delayed`), never a sleep or a
  timer of its own: it costs what a route timeout costs, and is one tick (10 ms) late
  at most.
* An **abort** answers with the fault's status (done by the HTTP layer, `x-meshling-error:
  fault_abort`) or resets the connection (`reset`: SO_LINGER 0, so the caller sees a
  TCP RST rather than a clean close).
* A **bandwidth limit** wraps the downstream transport in a `PacedTransport`: what is
  written queues there and leaves at the limit, a little every wheel tick. A queue above
  `HIGH_WATER` pauses the upstream's reading, as a full socket buffer would, so nothing
  is buffered beyond that; closing waits until the queue has left.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from meshling.proxy.deadlines import Deadlines

# bytes queued by a paced transport before the other side stops reading
HIGH_WATER = 64 * 1024
# the most a paced transport sends at once after a quiet spell, in seconds of its rate
BURST = 0.02
TICK = 0.01


class Delayed:
    """A request or connection held on the deadline wheel; released when due."""

    __slots__ = ("release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release

    def on_timeout(self) -> None:
        self.release()


def hold(deadlines: Deadlines, seconds: float, release: Callable[[], None]) -> None:
    """Call `release` after `seconds`, on the wheel."""
    deadlines.add(Delayed(release), seconds)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close a connection with a TCP reset."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class PacedTransport:
    """A downstream transport whose writes leave at no more than `rate` bytes a second.

    `pace(rate)` limits what is written from now on; `unpace()` lets later writes
    through at once, after what is queued has left at the old rate (so bytes never
    overtake each other). Everything else is the wrapped transport's.
    """

    def __init__(self, transport: Any, protocol: Any, deadlines: Deadlines) -> None:
        self.transport = transport
        self.protocol = protocol
        self.deadlines = deadlines
        # bytes a second for what is queued, and whether new writes queue too
        self.rate = 0.0
        self.active = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.credit = 0.0
        self.updated = time.monotonic()
        self.armed = False
        self.paused = False
        # close / write_eof asked for: done once the queue is empty
        self.closing = False
        self.eof = False

    def pace(self, rate: float) -> None:
        if not self.queue:
            self.credit = 0.0
            self.updated = time.monotonic()
        self.rate = rate
        self.active = True

    def unpace(self) -> None:
        self.active = False

    # -- the transport interface the proxy uses -------------------------------------
    def write(self, data: bytes) -> None:
        if not self.active and not self.queue:
            self.transport.write(data)
            return
        if self.closing or self.transport.is_closing():
            return
        self.queue.append(data)
        self.queued += len(data)
        if not self.armed:
            self._flush()
        if self.queued > HIGH_WATER and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def close(self) -> None:
        if self.queue:
            self.closing = True
        else:
            self.transport.close()

    def write_eof(self) -> None:
        if self.queue:
            self.eof = True
        else:
            self.transport.write_eof()

    def abort(self) -> None:
        self.queue.clear()
        self.queued = 0
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.closing or bool(self.transport.is_closing())

    def get_write_buffer_size(self) -> int:
        return self.queued + int(self.transport.get_write_buffer_size())

    def __getattr__(self, name: str) -> Any:
        # pause_reading, resume_reading, get_extra_info, ...: the wrapped transport's
        return getattr(self.transport, name)

    # -- pacing ---------------------------------------------------------------------
    def on_timeout(self) -> None:
        self.armed = False
        self._flush()

    def _flush(self) -> None:
        transport = self.transport
        if transport.is_closing():
            self.queue.clear()
            self.queued = 0
            return
        now = time.monotonic()
        credit = self.credit + (now - self.updated) * self.rate
        self.updated = now
        credit = min(credit, max(self.rate * BURST, 1.0))
        queue = self.queue
        while queue and credit >= 1.0:
            chunk = queue[0]
            n = min(len(chunk), int(credit))
            if n == len(chunk):
                queue.popleft()
            else:
                queue[0] = chunk[n:]
                chunk = chunk[:n]
            transport.write(chunk)
            self.queued -= n
            credit -= n
        self.credit = credit
        if queue:
            self.armed = True
            self.deadlines.add(self, TICK)
            return
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()
        if self.closing:
            transport.close()
        elif self.eof:
            self.eof = False
            transport.write_eof()
