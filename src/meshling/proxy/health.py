"""Active health checks: one small task per checked endpoint of the running snapshot.

`HealthCheckers.start` is called with the clusters of each snapshot the proxy switches
to: it cancels the previous snapshot's checks and starts the new ones, so no task
outlives its snapshot, and `stop` ends them all when the proxy drains. An endpoint's
health lives on its `Host`, which outlives snapshots: a new checker goes on from the
last check's time instead of checking everything again at once, and a reload neither
forgets an unhealthy endpoint nor restarts its streak.

Every check is bounded by the policy's `timeout` (connection, request and status line
together), so a hanging endpoint costs one task one timeout per interval. HTTP checks
send `GET <path>` with `Host: <cluster>` and `Connection: close` and read the status line
only; TCP checks pass when the connection opens. gRPC checks make one
`grpc.health.v1.Health/Check` call over HTTP/2 (`grpc_health`, imported only for
clusters that have one). A TLS cluster's checks use its client context (the proxy's
certificate), like its requests; gRPC checks a copy of it that offers ALPN h2.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from meshling.policies.health_check.decide import observe, status_passes

if TYPE_CHECKING:
    from meshling.policies.health_check.snapshot import HealthCheckConfig
    from meshling.proxy.balancer import Host
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.snapshot.model import Endpoint

log = logging.getLogger("meshling.proxy")

# Each wait between two checks of an endpoint is the interval plus up to this share of
# it, so that many proxies checking one endpoint drift apart instead of arriving together.
JITTER = 0.1

# one check of one endpoint of a cluster: whether it passed
Probe = Callable[["Endpoint"], Awaitable[bool]]


class HealthCheckers:
    """The running snapshot's active health checks."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.rnd = rnd
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, clusters: Iterable[ClusterRuntime]) -> None:
        """Check the endpoints of these clusters (the new snapshot's), and stop checking
        the previous snapshot's."""
        self.stop()
        for runtime in clusters:
            check = runtime.config.health_check
            runtime.stats.health_checked = check is not None
            if check is None:
                continue
            hosts = runtime.balancer.hosts
            runtime.stats.endpoints_healthy = sum(h.health.healthy for h in hosts)
            check_one = _probe(runtime, check)
            for host in hosts:
                self.tasks.append(asyncio.ensure_future(self._run(runtime, host, check, check_one)))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()

    async def _run(
        self, runtime: ClusterRuntime, host: Host, check: HealthCheckConfig, check_one: Probe
    ) -> None:
        while True:
            # A new endpoint is checked at once; a known one when its interval is up.
            if host.last_check:
                due = host.last_check + check.interval * (1.0 + JITTER * self.rnd())
                delay = due - self.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            host.last_check = self.clock()
            passed = await check_one(host.endpoint)
            self._observe(runtime, host, check, passed)

    def _observe(
        self, runtime: ClusterRuntime, host: Host, check: HealthCheckConfig, passed: bool
    ) -> None:
        stats = runtime.stats
        result = "passed" if passed else "failed"
        stats.health_checks[result] = stats.health_checks.get(result, 0) + 1
        before = host.health.healthy
        host.health = observe(
            host.health, passed, check.healthy_threshold, check.unhealthy_threshold
        )
        if host.health.healthy != before:
            runtime.group.generation += 1
            stats.endpoints_healthy = sum(h.health.healthy for h in runtime.balancer.hosts)
            log.warning(
                "health check: %s of cluster %s is %s",
                host.endpoint,
                runtime.config.name,
                "healthy" if host.health.healthy else "unhealthy",
            )


def _probe(runtime: ClusterRuntime, check: HealthCheckConfig) -> Probe:
    """How the endpoints of this cluster are checked, prepared once per snapshot."""
    if check.grpc is not None:
        return _grpc_probe(runtime, check)
    tls = runtime.tls
    request = (
        None
        if check.http_path is None
        else (
            f"GET {check.http_path} HTTP/1.1\r\nhost: {runtime.config.name}\r\n"
            "user-agent: meshling-health-check\r\nconnection: close\r\n\r\n"
        ).encode()
    )
    return functools.partial(
        probe, request=request, check=check, context=tls.context if tls is not None else None
    )


def _grpc_probe(runtime: ClusterRuntime, check: HealthCheckConfig) -> Probe:
    from meshling.proxy import grpc_health

    grpc = check.grpc
    assert grpc is not None
    name = runtime.config.name
    authority = grpc.authority or name
    tls = None
    if runtime.config.tls is not None:
        from meshling.proxy.tls import TlsConfigError

        try:
            tls = grpc_health.h2_tls(runtime.config.tls, name)
        except TlsConfigError as exc:
            # The cluster's own context was built from these files a moment ago; if they
            # changed since, its checks fail until the reload that follows the change.
            log.error("health check: cluster %s: no TLS for its gRPC checks: %s", name, exc)

            async def cannot(endpoint: Endpoint) -> bool:
                return False

            return cannot

    async def check_one(endpoint: Endpoint) -> bool:
        verdict = await grpc_health.probe(endpoint, grpc, authority, check.timeout, tls)
        if verdict != grpc_health.PASSED:
            log.debug("health check: %s of cluster %s: %s", endpoint, name, verdict)
        return verdict == grpc_health.PASSED

    return check_one


async def probe(
    endpoint: Endpoint,
    request: bytes | None,
    check: HealthCheckConfig,
    context: ssl.SSLContext | None,
) -> bool:
    """One check of one endpoint: True if it passed within the timeout."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                endpoint.address, endpoint.port, ssl=context
            )
            if request is None:
                return True
            writer.write(request)
            line = await reader.readline()
    except (OSError, TimeoutError, ssl.SSLError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False
    return status_passes(int(parts[1]), check.expected_statuses)
