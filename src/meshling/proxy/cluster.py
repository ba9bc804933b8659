"""Clusters at run time: endpoint choice and per-endpoint connection pools.

Pools are keyed by endpoint and shared by every snapshot the proxy has run,
so a reload that keeps an endpoint keeps its warm keep-alive connections.

A TLS cluster whose own certificate has expired sends nothing new: it reuses no pooled
connection and opens none (`ConnectError` with status 503 and reason
`own_certificate_expired`), until a reload brings a valid certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from meshling.snapshot.model import Cluster, Endpoint, UpstreamTls
from meshling.telemetry.metrics import ClusterStats

if TYPE_CHECKING:
    from meshling.proxy.tls import ClientTls


class Pooled(Protocol):
    """What a pool needs from an upstream connection."""

    idle_since: float

    def usable(self) -> bool: ...
    def close(self) -> None: ...


class RoundRobin:
    """Endpoint choice in turn; a pure decision over the endpoint list."""

    __slots__ = ("_next", "endpoints")

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.endpoints = endpoints
        self._next = 0

    def pick(self) -> Endpoint | None:
        if not self.endpoints:
            return None
        i = self._next
        self._next = (i + 1) % len(self.endpoints)
        return self.endpoints[i]


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

    def pool(self, key: PoolKey) -> EndpointPool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = EndpointPool(key[0])
        return pool

    def sweep(self) -> None:
        now = self.clock()
        for key, pool in list(self.pools.items()):
            pool.sweep(now, self.idle_timeouts.get(key, 60.0))

    def close_all(self) -> None:
        for pool in self.pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()


class ClusterRuntime:
    """One cluster of the running snapshot: its balancer, pools and counters."""

    __slots__ = ("balancer", "config", "loop", "pools", "stats", "tls")

    def __init__(
        self,
        config: Cluster,
        pools: PoolSet,
        stats: ClusterStats,
        tls: ClientTls | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.balancer = RoundRobin(config.endpoints)
        self.pools = pools
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        for endpoint in config.endpoints:
            pools.idle_timeouts[(endpoint, config.tls)] = config.idle_timeout

    def pick(self) -> Endpoint | None:
        return self.balancer.pick()

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
        self, endpoint: Endpoint, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.Protocol:
        """Open a TCP connection, counting failures by reason; raises ConnectError."""
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
                    ssl=tls.context if tls is not None else None,
                ),
                self.config.connect_timeout or None,
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
            try:
                tls.authenticate(transport.get_extra_info("ssl_object"))
            except SvidError as exc:
                transport.abort()
                self._fail("tls")
                raise ConnectError(f"peer identity: {exc}", endpoint) from None
        return protocol

    def _fail(self, reason: str) -> None:
        failures = self.stats.connect_failures
        failures[reason] = failures.get(reason, 0) + 1


class ConnectError(Exception):
    """No connection to an endpoint: why, and the local reply it deserves.

    `status` is 502 when the endpoint failed, 503 when the proxy would not try (its own
    certificate expired); for the latter, `reason` is also the `x-meshling-error`.
    """

    def __init__(self, reason: str, endpoint: Endpoint, status: int = 502) -> None:
        super().__init__(f"connect to {endpoint} failed: {reason}")
        self.reason = reason
        self.endpoint = endpoint
        self.status = status
