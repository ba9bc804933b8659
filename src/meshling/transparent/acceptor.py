"""Accepting on a transparent listener: the original destination picks the chain.

Every connection was redirected by the capture rules; its original destination (the
address the app dialled) decides which chain serves it (`ChainTable`): a mesh service's
virtual IP takes that service's outbound chain, and the rest goes to a passthrough chain
or, without one, is refused. The picked chain is then served as its own listener would
serve it: TLS handshake, protocol detection, or straight to the HTTP or TCP filter.

A connection made to the listener's own address (nothing redirected it) is refused: its
"original destination" is the listener itself, and forwarding there would loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshling.proxy.acceptor import DetectingAcceptor, TlsAcceptor
from meshling.transparent.original_dst import original_destination
from meshling.transparent.passthrough import PassthroughDownstream

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime, ConnectionSet, ListenerRuntime

log = logging.getLogger("meshling.proxy")


class TransparentAcceptor(DetectingAcceptor):
    def __init__(
        self,
        runtime: ListenerRuntime,
        make_http: Callable[[ChainRuntime], asyncio.Protocol],
        make_tcp: Callable[[ChainRuntime], asyncio.Protocol],
        connections: ConnectionSet,
    ) -> None:
        super().__init__(runtime, make_http, make_tcp)
        self.make_tcp = make_tcp
        self.make = self._make
        self.connections = connections

    def _make(self, chain: ChainRuntime) -> asyncio.Protocol:
        """The protocol of a chain with one filter (a TLS chain's, after its handshake)."""
        return self.make_http(chain) if chain.http is not None else self.make_tcp(chain)

    async def _serve(self, conn: socket.socket, chain: ChainRuntime | None = None) -> None:
        listener = self.runtime.chain
        table = listener.transparent
        assert table is not None
        try:
            local = conn.getsockname()[:2]
            try:
                destination = original_destination(conn)
            except OSError:  # no conntrack entry: nothing redirected it
                destination = local
        except OSError:  # reset before it was served
            conn.close()
            return
        if destination == local:
            log.info(
                "%s: refused a connection made to the listener itself, not redirected to it",
                self.runtime.config.name,
            )
            conn.close()
            return
        address, port = destination
        chosen = table.pick(address, port)
        if chosen is None:
            log.debug("%s: no chain for %s:%d", self.runtime.config.name, address, port)
            conn.close()
            return
        try:
            if chosen.passthrough:
                connections = self.connections
                await self.loop.connect_accepted_socket(
                    lambda: PassthroughDownstream(chosen, connections, destination), conn
                )
            elif chosen.detection is not None:
                await DetectingAcceptor._serve(self, conn, chosen)
            elif chosen.tls is not None:
                await TlsAcceptor._serve(self, conn, chosen)
            else:
                await self.loop.connect_accepted_socket(lambda: self._make(chosen), conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as exc:
            log.debug("%s: connection lost: %s", self.runtime.config.name, exc)
            conn.close()
