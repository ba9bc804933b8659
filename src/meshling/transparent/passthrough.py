"""Passthrough: a captured connection to a destination outside the mesh, forwarded to
where the app sent it, byte for byte.

The proxy connects as its own user, whose traffic the capture rules leave alone, so the
connection goes out directly instead of coming back to the proxy. Flow control and
half-close are as for the TCP filter: a side whose write buffer fills stops the other
from reading, and a FIN is passed on as a write-EOF.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime, ConnectionSet

log = logging.getLogger("meshling.proxy")

# bytes held from the app while the connection to the destination opens
PENDING_LIMIT = 256 * 1024
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 3600.0


class PassthroughDownstream(Side):
    """The app's captured connection; opens one to its original destination."""

    def __init__(
        self, chain: ChainRuntime, connections: ConnectionSet, destination: tuple[str, int]
    ) -> None:
        # per-connection
        self.chain = chain
        self.connections = connections
        self.destination = destination
        self.upstream: PassthroughUpstream | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.pending_eof = False
        self.connecting: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.closed = False
        self.eof_in = False  # the app sent FIN
        self.eof_out = False  # the destination sent FIN (passed on to the app)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        stats = self.chain.listener_stats
        stats.cx_total += 1
        stats.cx_active += 1
        self.connections.add(self)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.destination
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: PassthroughUpstream(self), host, port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            log.debug("passthrough to %s:%d failed: %s", host, port, exc)
            self.abort()
            return
        finally:
            self.connecting = None
        upstream = protocol
        if self.closed:
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
        if self.upstream is not None:
            if exc is None and self.eof_in:
                self.upstream.write_eof()
            else:
                self.upstream.close()

    # -- app -> destination -----------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.chain.listener_stats.bytes_received += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.pause_reading()

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.upstream is not None:
            self.upstream.write_eof()
        else:
            self.pending_eof = True
        if self.eof_out:
            self.close()
            return False
        return True

    # -- destination -> app -----------------------------------------------------
    def write(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.chain.listener_stats.bytes_sent += len(data)
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        self.eof_out = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.eof_in:
            self.transport.close()
        else:
            self.transport.write_eof()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- what the proxy asks of every connection --------------------------------
    def tick(self, now: float) -> None:
        if now - self.last_activity > IDLE_TIMEOUT:
            self.close()

    def is_idle(self) -> bool:
        return False

    def drain(self) -> None:
        """An opaque stream has no request boundary: it ends on its own or at the deadline."""

    def close(self) -> None:
        super().close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        super().abort()
        if self.upstream is not None:
            self.upstream.abort()


class PassthroughUpstream(Side):
    """The proxy's connection to the original destination."""

    def __init__(self, downstream: PassthroughDownstream) -> None:
        self.downstream = downstream
        self.eof_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.downstream.write(data)

    def eof_received(self) -> bool:
        self.downstream.write_eof()
        return not self.eof_sent

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.downstream.abort()
        elif not self.downstream.eof_out:
            self.downstream.write_eof()

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
