"""Clusters at run time: endpoint choice, circuit breaking and per-endpoint connection pools.

Pools are keyed by endpoint and shared by every snapshot the proxy has run,
so a reload that keeps an endpoint keeps its warm keep-alive connections.

Endpoint choice is the `Balancer`'s (`proxy/balancer.py`): load balancing, outlier
detection and health. The circuit breaker's limits count in the cluster's `ClusterStats`,
which every snapshot's runtime of the cluster shares: requests in flight
(`max_requests`, checked by `admit` before an endpoint is picked), requests waiting for a
connection (`max_pending_requests`) and connections open or opening
(`max_connections`), both checked by `connect`. A request over a limit gets a 503 naming
it (`ConnectError` with status 503 from `connect`).

A TLS cluster whose own certificate has expired sends nothing new: it reuses no pooled
connection and opens none (`ConnectError` with status 503 and reason
`own_certificate_expired`), until a reload brings a valid certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from meshling.proxy.balancer import Balancer, Host, HostGroup
from meshling.snapshot.model import Cluster, Endpoint, UpstreamTls
from meshling.telemetry.metrics import ClusterStats

if TYPE_CHECKING:
    from meshling.proxy.retry import RouteRetries
    from meshling.proxy.tls import ClientTls


class Pooled(Protocol):
    """What a pool needs from an upstream connection."""

    idle_since: float

    def usable(self) -> bool: ...
    def close(self) -> None: ...


class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used first."""

    __slots__ = ("endpoint", "idle")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.idle: list[Pooled] = []

    def take(self, now: float, idle_timeout: float) -> Pooled | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable() and now - conn.idle_since < idle_timeout:
                return conn
            conn.close()
        return None

    def put(self, conn: Pooled, now: float, max_idle: int) -> bool:
        if len(self.idle) >= max_idle:
            return False
        conn.idle_since = now
        self.idle.append(conn)
        return True

    def discard(self, conn: Pooled) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float, idle_timeout: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.usable() and now - conn.idle_since < idle_timeout:
                keep.append(conn)
            else:
                conn.close()
        self.idle = keep


# Connections are pooled per endpoint and per TLS configuration: a reload that turns
# TLS on, or expects another identity, never reuses a connection made under the old
# terms. Rotated certificate files keep their paths, so their connections stay pooled.
PoolKey = tuple[Endpoint, UpstreamTls | None]


class PoolSet:
    """Every connection pool of the proxy, with a periodic sweep of stale connections."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pools: dict[PoolKey, EndpointPool] = {}
        self.idle_timeouts: dict[PoolKey, float] = {}
        # HTTP/2 connections (`proxy.http2.H2Upstream`), shared by many requests at once,
        # and the connections being opened (waited for instead of opening another)
        self.multiplexed: dict[PoolKey, list[Any]] = {}
        self.opening: dict[PoolKey, asyncio.Future[None]] = {}

    def pool(self, key: PoolKey) -> EndpointPool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = EndpointPool(key[0])
        return pool

    def sweep(self) -> None:
        now = self.clock()
        for key, pool in list(self.pools.items()):
            pool.sweep(now, self.idle_timeouts.get(key, 60.0))
        for key, conns in list(self.multiplexed.items()):
            timeout = self.idle_timeouts.get(key, 60.0)
            for conn in list(conns):
                if not conn.streams and now - conn.idle_since >= timeout:
                    conn.close()
                    conns.remove(conn)

    def close_all(self) -> None:
        for pool in self.pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
        for conns in self.multiplexed.values():
            for conn in conns:
                conn.close()
        self.multiplexed.clear()


class ClusterRuntime:
    """One cluster of the running snapshot: its balancer, pools and counters."""

    __slots__ = (
        "balancer",
        "config",
        "group",
        "loop",
        "max_connections",
        "max_pending",
        "max_requests",
        "pools",
        "retries",
        "stats",
        "tls",
    )

    def __init__(
        self,
        config: Cluster,
        pools: PoolSet,
        stats: ClusterStats,
        tls: ClientTls | None = None,
        group: HostGroup | None = None,
        zone: str | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        # the endpoints' standing, shared with the cluster's runtimes of other snapshots
        self.group = group if group is not None else HostGroup(config.name, stats)
        self.balancer = Balancer(config, self.group, zone)
        breaker = config.circuit_breaker
        # 0: no limit (no CircuitBreaker)
        self.max_connections = breaker.max_connections if breaker is not None else 0
        self.max_pending = breaker.max_pending_requests if breaker is not None else 0
        self.max_requests = breaker.max_requests if breaker is not None else 0
        self.pools = pools
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        # the retry budget and counters of each route to this cluster with a Retry
        # policy, by route name (`proxy.retry`); a reload starts the budgets afresh
        self.retries: dict[str, RouteRetries] = {}
        for endpoint in config.endpoints:
            pools.idle_timeouts[(endpoint, config.tls)] = config.idle_timeout

    def pick(
        self, headers: Sequence[tuple[bytes, bytes]] | None = None, peer: bytes = b""
    ) -> Endpoint | None:
        """The balancer's endpoint for a request (its headers; the client's address),
        counting nothing: for a choice whose outcome `report` receives, or none."""
        host = self.balancer.pick(headers, peer)
        return None if host is None else host.endpoint

    # -- the circuit breaker and the balancer's accounting --------------------------------
    def admit(self) -> str | None:
        """Count a request in flight; the reason (`x-meshling-error`) if max_requests
        refuses it. Every admitted request ends with `finished`."""
        stats = self.stats
        if self.max_requests and stats.rq_active >= self.max_requests:
            self._overflow("max_requests")
            return "circuit_breaker_max_requests"
        stats.rq_active += 1
        return None

    def choose(
        self, headers: Sequence[tuple[bytes, bytes]] | None = None, peer: bytes = b""
    ) -> Host | None:
        """The balancer's host for an admitted request, counted in flight on it (least
        request, ewma) until `finished`."""
        host = self.balancer.pick(headers, peer)
        if host is not None:
            host.active += 1
        return host

    def choose_other(self, chosen: Host | None, tried: Collection[Endpoint]) -> Host | None:
        """The host for a retry of an admitted request, avoiding the endpoints it `tried`
        while others are usable; the request's in-flight count moves from `chosen` (the
        host it was counted on) to the new one, which `finished` then receives."""
        host = self.balancer.pick_other(tried)
        if host is not None:
            if chosen is not None:
                chosen.active -= 1
            host.active += 1
        return host

    def finished(
        self,
        chosen: Host | None,
        endpoint: Endpoint | None,
        status: int,
        error: str | None,
        started: float,
    ) -> None:
        """An admitted request ended: `status` and the proxy's `error` as the client got
        them, from `endpoint` (the last one tried; `chosen` unless a retry moved on)."""
        self.stats.rq_active -= 1
        host = chosen
        if chosen is not None:
            chosen.active -= 1
            if endpoint is not chosen.endpoint:
                host = self.group.hosts.get(endpoint) if endpoint is not None else None
        elif endpoint is not None:
            host = self.group.hosts.get(endpoint)
        if host is not None:
            self.balancer.report(host, status, error, time.monotonic() - started)

    def report(self, endpoint: Endpoint, status: int, error: str | None, latency: float) -> None:
        """The outcome of one attempt that is not the request's last (a retried failure),
        for outlier detection and latency estimates."""
        host = self.group.hosts.get(endpoint)
        if host is not None:
            self.balancer.report(host, status, error, latency)

    def _overflow(self, limit: str) -> None:
        overflows = self.stats.overflows
        overflows[limit] = overflows.get(limit, 0) + 1

    def take_idle(self, endpoint: Endpoint) -> Pooled | None:
        tls = self.tls
        if tls is not None and tls.own.expired(time.time()):
            return None  # `connect` refuses, and counts
        return self.pools.pool((endpoint, self.config.tls)).take(
            self.pools.clock(), self.config.idle_timeout
        )

    def release(self, endpoint: Endpoint, conn: Pooled) -> bool:
        """Keep a connection for reuse; False when the pool is full (caller closes it)."""
        return self.pools.pool((endpoint, self.config.tls)).put(
            conn, self.pools.clock(), self.config.max_idle_per_endpoint
        )

    def forget(self, endpoint: Endpoint, conn: Pooled) -> None:
        pool = self.pools.pools.get((endpoint, self.config.tls))
        if pool is not None:
            pool.discard(conn)

    async def connect(
        self,
        endpoint: Endpoint,
        factory: Callable[[], asyncio.Protocol],
        timeout: float = 0.0,
        *,
        http2: bool = False,
    ) -> asyncio.Protocol:
        """Open a TCP connection, counting failures by reason; raises ConnectError.

        `http2`: a TLS connection offers ALPN "h2" (and must get it) instead of
        "http/1.1".

        `timeout` is a route's or chain's own connect timeout (Timeout policy); 0 takes
        the cluster's. Over the circuit breaker's max_pending_requests or max_connections
        the connection is not tried (ConnectError with status 503 naming the limit).
        """
        stats = self.stats
        if self.max_pending:
            if stats.rq_pending >= self.max_pending:
                self._overflow("max_pending_requests")
                raise ConnectError("circuit_breaker_max_pending_requests", endpoint, status=503)
            if stats.cx_active + stats.rq_pending >= self.max_connections:
                self._overflow("max_connections")
                raise ConnectError("circuit_breaker_max_connections", endpoint, status=503)
        stats.rq_pending += 1
        try:
            return await self._open(endpoint, factory, timeout, http2)
        finally:
            stats.rq_pending -= 1

    async def _open(
        self,
        endpoint: Endpoint,
        factory: Callable[[], asyncio.Protocol],
        timeout: float,
        http2: bool = False,
    ) -> asyncio.Protocol:
        tls = self.tls
        if tls is not None and tls.own.expired(time.time()):
            from meshling.proxy.tls import OWN_CERTIFICATE_EXPIRED

            # Fail closed: no handshake with a certificate the peer must refuse.
            tls.own.refuse()
            self._fail("tls")
            raise ConnectError(OWN_CERTIFICATE_EXPIRED, endpoint, status=503)
        try:
            transport, protocol = await asyncio.wait_for(
                self.loop.create_connection(
                    factory,
                    endpoint.address,
                    endpoint.port,
                    ssl=(tls.h2_context() if http2 else tls.context) if tls is not None else None,
                ),
                timeout or self.config.connect_timeout or None,
            )
        except TimeoutError:
            self._fail("timeout")
            raise ConnectError("timeout", endpoint) from None
        except ConnectionRefusedError:
            self._fail("refused")
            raise ConnectError("refused", endpoint) from None
        except ssl.SSLError as exc:
            from meshling.proxy.tls import handshake_failure_reason

            assert tls is not None
            tls.stats.fail(handshake_failure_reason(exc))
            self._fail("tls")
            raise ConnectError(f"TLS handshake: {exc.reason}", endpoint) from None
        except OSError as exc:
            self._fail("error")
            raise ConnectError(exc.strerror or "error", endpoint) from None
        if tls is not None:
            from meshling.identity import SvidError

            # OpenSSL checked the chain; the SPIFFE rules and the expected identity are ours.
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                tls.authenticate(ssl_object)
            except SvidError as exc:
                transport.abort()
                self._fail("tls")
                raise ConnectError(f"peer identity: {exc}", endpoint) from None
            if http2 and ssl_object.selected_alpn_protocol() != "h2":
                transport.abort()
                self._fail("tls")
                raise ConnectError("the peer does not speak HTTP/2 (ALPN)", endpoint)
        return protocol

    def _fail(self, reason: str) -> None:
        failures = self.stats.connect_failures
        failures[reason] = failures.get(reason, 0) + 1


class ConnectError(Exception):
    """No connection to an endpoint: why, and the local reply it deserves.

    `status` is 502 when the endpoint failed, 503 when the proxy would not try (its own
    certificate expired, a circuit breaker limit); for the latter, `reason` is also the
    `x-meshling-error`.
    """

    def __init__(self, reason: str, endpoint: Endpoint, status: int = 502) -> None:
        super().__init__(f"connect to {endpoint} failed: {reason}")
        self.reason = reason
        self.endpoint = endpoint
        self.status = status
