"""One side of a proxied connection: its transport, and what the other side may do to it.

Both planes of a proxied connection (downstream and upstream, HTTP or TCP) pause
and resume each other's reading for flow control and close or abort each other
on errors; those controls live here once.
"""

from __future__ import annotations

import asyncio


class Side(asyncio.Protocol):
    transport: asyncio.Transport | None = None

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after what was written is sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once: the peer sees a reset."""
        if self.transport is not None:
            self.transport.abort()
