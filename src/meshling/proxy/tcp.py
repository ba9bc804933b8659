"""L4 proxying: the TCP filter chain's connection, from a downstream to a cluster.

The byte pipe itself (pending bytes, flow control, half-close) is `proxy.forward`'s;
this module adds what a cluster asks of a connection: the inbound policies (identity,
authorization, rate limit, faults), the circuit breaker and the balancer's choice of
endpoint, statistics, the access log, and the idle timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from meshling.proxy.cluster import ConnectError
from meshling.proxy.forward import ForwardDownstream, ForwardUpstream

if TYPE_CHECKING:
    from meshling.proxy.balancer import Host
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.listener import ChainRuntime, ConnectionSet
    from meshling.telemetry.metrics import TcpStats


class TcpDownstream(ForwardDownstream):
    """The accepted connection; opens the upstream and forwards to it."""

    def __init__(self, chain: ChainRuntime, connections: ConnectionSet) -> None:
        super().__init__(chain, connections)
        # per-connection
        self.stats: TcpStats | None = None
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
        super().connection_made(transport)
        assert self.transport is not None
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
                endpoint, lambda: ForwardUpstream(self), tcp.connect_timeout
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
        assert isinstance(protocol, ForwardUpstream)
        self.attach(protocol)
        if self.upstream is protocol:  # counted while attached (see upstream_lost)
            cluster.stats.cx_total += 1
            cluster.stats.cx_active += 1

    def finished(self) -> None:
        assert self.stats is not None
        self.stats.cx_active -= 1
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

    # -- statistics of the forwarded bytes ----------------------------------------
    def received(self, n: int) -> None:
        assert self.stats is not None
        self.stats.bytes_received += n
        self.bytes_in += n

    def sent(self, n: int) -> None:
        assert self.stats is not None
        self.stats.bytes_sent += n
        self.bytes_out += n

    def upstream_lost(self, upstream: ForwardUpstream, exc: Exception | None) -> None:
        if upstream is self.upstream:
            self.chain.clusters[self.cluster_name].stats.cx_active -= 1
        if exc is not None:
            self.error = self.error or "upstream_reset"
        super().upstream_lost(upstream, exc)

    # -- ending -----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Called about once a second: close the connection after the idle timeout."""
        tcp = self.chain.tcp
        assert tcp is not None
        if tcp.idle_timeout and now - self.last_activity > tcp.idle_timeout:
            self.close()
