"""L4 proxying: opaque bytes between a downstream and an upstream connection.

Each side is an `asyncio.Protocol`; they share a `TcpSession`. Flow control is
symmetric: when one side's write buffer passes its high-water mark, the other
side stops reading until it drains. A FIN from one side is passed on as a
write-EOF to the other (half-close); the session ends when both directions
are done, on an error, or after the idle timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from meshling.proxy.cluster import ConnectError
from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.proxy.balancer import Host
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.listener import ChainRuntime, ConnectionSet
    from meshling.telemetry.metrics import TcpStats

# Bytes buffered from a downstream that is still waiting for its upstream connection.
PENDING_LIMIT = 256 * 1024


class TcpDownstream(Side):
    """The accepted connection; opens the upstream and forwards to it."""

    def __init__(self, chain: ChainRuntime, connections: ConnectionSet) -> None:
        # per-connection
        self.chain = chain
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.upstream: TcpUpstream | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.pending_eof = False
        self.connecting: asyncio.Task[None] | None = None
        self.stats: TcpStats | None = None
        self.last_activity = time.monotonic()
        self.closed = False
        self.eof_in = False  # downstream sent FIN
        self.eof_out = False  # upstream sent FIN (passed downstream)
        # the cluster that admitted the connection (circuit breaker) and the balancer's
        # host for it, both counting it until it ends
        self.admitted: ClusterRuntime | None = None
        self.chosen: Host | None = None
        # the cluster the connection goes to (picked once, on a weighted filter)
        self.cluster_name = ""
        # for the access log: when it began, the caller, bytes each way, why it failed
        self.started = time.monotonic()
        self.identity: bytes | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: str | None = None

    # -- lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        identity = None
        if self.chain.tls is not None:
            allowed, identity = self.chain.tls.peer(transport)
            if not allowed:
                self.closed = True
                self.transport.abort()
                return
        self.identity = identity
        if not self.chain.authorize(identity):
            # A denied caller's connection is closed before anything is forwarded.
            self.closed = True
            self.transport.close()
            return
        delay = 0.0
        inbound = self.chain.inbound
        if inbound is not None:
            admitted = inbound.connection(self, identity)
            if admitted is None:
                # Over a RateLimit, or aborted by a fault: closed before anything is forwarded.
                self.closed = True
                return
            delay = admitted
        tcp = self.chain.tcp
        assert tcp is not None
        weighted = tcp.weighted
        self.cluster_name = tcp.cluster if weighted is None else weighted.pick()
        self.stats = self.chain.metrics.tcp_stats(self.chain.listener, self.cluster_name)
        self.stats.cx_total += 1
        self.stats.cx_active += 1
        self.chain.listener_stats.cx_total += 1
        self.chain.listener_stats.cx_active += 1
        self.connections.add(self)
        if delay and inbound is not None:
            inbound.delay(self, delay)  # a fault's delay: connect upstream when it is over
            return
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        tcp = self.chain.tcp
        assert tcp is not None
        cluster = self.chain.clusters[self.cluster_name]
        # A connection is a request to the circuit breaker: over max_requests, it is closed.
        if cluster.admit() is not None:
            self.error = "circuit_breaker_max_requests"
            self.abort()
            return
        self.admitted = cluster
        peer = self.transport.get_extra_info("peername") if self.transport else None
        host = self.chosen = cluster.choose(None, peer[0].encode() if peer else b"")
        if host is None:
            cluster.stats.no_endpoint += 1
            self.error = "no_endpoint"
            self.abort()
            return
        endpoint = host.endpoint
        started = time.monotonic()
        try:
            protocol = await cluster.connect(
                endpoint, lambda: TcpUpstream(self), tcp.connect_timeout
            )
        except ConnectError as exc:
            if exc.status != 503:  # a refusal by the proxy's own limits says nothing of it
                latency = time.monotonic() - started
                cluster.report(endpoint, 502, "upstream_connect_failure", latency)
            self.error = "upstream_connect_failure" if exc.status != 503 else exc.reason
            self.abort()
            return
        finally:
            self.connecting = None
        # For outlier detection and latency estimates, a TCP connection's outcome is its
        # opening.
        cluster.report(endpoint, 200, None, time.monotonic() - started)
        assert isinstance(protocol, TcpUpstream)
        if self.closed:
            protocol.close()
            return
        cluster.stats.cx_total += 1
        cluster.stats.cx_active += 1
        self.upstream = protocol
        if self.pending:
            protocol.write(b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0
            assert self.transport is not None
            self.transport.resume_reading()
        if self.pending_eof:
            protocol.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if self.upstream is not None:
            if exc is None and self.eof_in:
                self.upstream.write_eof()
            else:
                self.upstream.close()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connections.discard(self)
        assert self.stats is not None
        self.stats.cx_active -= 1
        self.chain.listener_stats.cx_active -= 1
        if self.connecting is not None:
            self.connecting.cancel()
        if self.admitted is not None:
            self.admitted.finished(self.chosen, None, 0, None, 0.0)
        if self.chain.access_log is not None:
            self._log()

    def _log(self) -> None:
        """The connection's access log record (`telemetry.logformat`'s order)."""
        chain = self.chain
        duration = time.monotonic() - self.started
        peer = self.transport.get_extra_info("peername") if self.transport else None
        assert chain.access_log is not None
        chain.access_log.log(
            (
                time.time() - duration,
                duration,
                chain.listener,
                None,
                self.cluster_name,
                self.chosen.endpoint if self.chosen is not None else None,
                (peer[0] if peer else "unknown").encode(),
                None,
                0,
                self.bytes_in,
                self.bytes_out,
                self.error,
                None,
                self.identity,
                chain.source_of(self.identity),
                chain.direction,
                chain.metrics.service,
            ),
            self.identity,
        )

    # -- downstream -> upstream ------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        n = len(data)
        assert self.stats is not None
        self.stats.bytes_received += n
        self.chain.listener_stats.bytes_received += n
        self.bytes_in += n
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)
            self.pending_size += n
            if self.pending_size > PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()

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
        assert self.stats is not None
        self.stats.bytes_sent += n
        self.chain.listener_stats.bytes_sent += n
        self.bytes_out += n
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

    # -- flow control: our transport's buffer governs the upstream's reading -----
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- ending -----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Called about once a second: close the connection after the idle timeout."""
        tcp = self.chain.tcp
        assert tcp is not None
        if tcp.idle_timeout and now - self.last_activity > tcp.idle_timeout:
            self.close()

    def drain(self) -> None:
        """An opaque stream has no request boundary: it finishes on its own or at the deadline."""

    def is_idle(self) -> bool:
        return False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()


class TcpUpstream(Side):
    """The connection to the chosen endpoint."""

    def __init__(self, downstream: TcpDownstream) -> None:
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
        downstream = self.downstream
        stats = downstream.chain.clusters[downstream.cluster_name].stats
        stats.cx_active -= 1
        if exc is not None:
            # A reset upstream resets downstream too, so the client sees the failure.
            downstream.error = downstream.error or "upstream_reset"
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
