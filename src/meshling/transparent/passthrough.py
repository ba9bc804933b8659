"""Passthrough: a captured connection to a destination outside the mesh, forwarded to
where the app sent it, byte for byte.

The proxy connects as its own user, whose traffic the capture rules leave alone, so the
connection goes out directly instead of coming back to the proxy. The forwarding itself
(held bytes, flow control, half-close) is the TCP filter's, from `proxy.forward`; only
the destination and the listener's statistics are passthrough's own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshling.proxy.forward import ForwardDownstream, ForwardUpstream

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime, ConnectionSet

log = logging.getLogger("meshling.proxy")

CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 3600.0


class PassthroughDownstream(ForwardDownstream):
    """The app's captured connection; opens one to its original destination."""

    def __init__(
        self, chain: ChainRuntime, connections: ConnectionSet, destination: tuple[str, int]
    ) -> None:
        super().__init__(chain, connections)
        # per-connection
        self.destination = destination

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stats = self.chain.listener_stats
        stats.cx_total += 1
        stats.cx_active += 1
        self.connections.add(self)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.destination
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: ForwardUpstream(self), host, port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            log.debug("passthrough to %s:%d failed: %s", host, port, exc)
            self.abort()
            return
        finally:
            self.connecting = None
        self.attach(upstream)

    def tick(self, now: float) -> None:
        if now - self.last_activity > IDLE_TIMEOUT:
            self.close()
