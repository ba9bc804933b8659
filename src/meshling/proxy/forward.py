"""Forwarding: opaque bytes between a downstream connection and the upstream it opened.

The TCP filter (`proxy.tcp`) and transparent passthrough (`transparent.passthrough`)
differ only in where the upstream is and what they count; the byte pipe is this one:

- Bytes that arrive before the upstream is connected are held, up to `PENDING_LIMIT`,
  after which the downstream stops reading; they are sent when it connects.
- Flow control is symmetric: when one side's write buffer passes its high-water mark,
  the other side stops reading until it drains.
- A FIN from one side is passed on as a write-EOF to the other (half-close); a side
  whose both directions are done closes. A reset upstream resets the downstream, so
  the client sees the failure.

A subclass opens the upstream (with `ForwardUpstream(self)` as its protocol), hands it
to `attach`, and counts bytes and connections through the `received`, `sent`,
`finished` and `upstream_lost` hooks.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime, ConnectionSet

# Bytes buffered from a downstream that is still waiting for its upstream connection.
PENDING_LIMIT = 256 * 1024


class ForwardDownstream(Side):
    """The accepted connection: forwards to its upstream once `attach` gives it one."""

    def __init__(self, chain: ChainRuntime, connections: ConnectionSet) -> None:
        # per-connection
        self.chain = chain
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.upstream: ForwardUpstream | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.pending_eof = False
        self.connecting: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.closed = False
        self.eof_in = False  # downstream sent FIN
        self.eof_out = False  # upstream sent FIN (passed downstream)

    # -- lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def attach(self, upstream: ForwardUpstream) -> None:
        """The upstream is connected: send it what the downstream sent meanwhile."""
        if self.closed:
            # the downstream went away while connecting: the upstream is not wanted
            upstream.close()
            return
        self.upstream = upstream
        if self.pending:
            upstream.write(b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0
            self.resume_reading()
        if self.pending_eof:
            upstream.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.connections.discard(self)
            self.chain.listener_stats.cx_active -= 1
            if self.connecting is not None:
                self.connecting.cancel()
            self.finished()
        if self.upstream is not None:
            if exc is None and self.eof_in:
                self.upstream.write_eof()
            else:
                self.upstream.close()

    def finished(self) -> None:
        """The downstream connection is gone (once, after it was counted as active)."""

    # -- downstream -> upstream ------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        n = len(data)
        self.chain.listener_stats.bytes_received += n
        self.received(n)
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_size += n
        if self.pending_size > PENDING_LIMIT:
            self.pause_reading()

    def received(self, n: int) -> None:
        """Count `n` bytes from downstream, beyond the listener's statistics."""

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.upstream is not None:
            self.upstream.write_eof()
        else:
            self.pending_eof = True
        if self.eof_out:
            self.close()
            return False
        return True  # keep the transport open: the other direction may still flow

    # -- upstream -> downstream ------------------------------------------------
    def write(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        n = len(data)
        self.chain.listener_stats.bytes_sent += n
        self.sent(n)
        if self.transport is not None:
            self.transport.write(data)

    def sent(self, n: int) -> None:
        """Count `n` bytes to downstream, beyond the listener's statistics."""

    def write_eof(self) -> None:
        self.eof_out = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.eof_in:
            self.transport.close()
        else:
            self.transport.write_eof()

    def upstream_lost(self, upstream: ForwardUpstream, exc: Exception | None) -> None:
        """The upstream connection ended: with an error, reset the downstream; cleanly,
        pass its FIN on if it was not passed already."""
        if exc is not None:
            self.abort()
        elif not self.eof_out:
            self.write_eof()

    # -- flow control: our transport's buffer governs the upstream's reading -----
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- what the proxy asks of every connection --------------------------------
    def drain(self) -> None:
        """An opaque stream has no request boundary: it finishes on its own or at the deadline."""

    def is_idle(self) -> bool:
        return False

    def close(self) -> None:
        super().close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        super().abort()
        if self.upstream is not None:
            self.upstream.abort()


class ForwardUpstream(Side):
    """The connection the downstream opened; passes what it reads back downstream."""

    def __init__(self, downstream: ForwardDownstream) -> None:
        self.downstream = downstream
        self.transport: asyncio.Transport | None = None
        self.eof_sent = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.downstream.write(data)

    def eof_received(self) -> bool:
        self.downstream.write_eof()
        return not self.eof_sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.downstream.upstream_lost(self, exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        self.eof_sent = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.downstream.eof_out:
            self.transport.close()
        else:
            self.transport.write_eof()

    def pause_writing(self) -> None:
        self.downstream.pause_reading()

    def resume_writing(self) -> None:
        self.downstream.resume_reading()
