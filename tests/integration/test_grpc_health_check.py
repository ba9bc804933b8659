"""gRPC health checks end to end: a real proxy checks real grpcio servers with
`grpc.health.v1.Health/Check`. An endpoint whose service turns NOT_SERVING leaves the
rotation of the proxy's TCP listener (gRPC calls through it reach only the other one)
and comes back when it serves again; servers that do not know the service, have no
health service, speak HTTP/1 or never answer fail their checks; over mutual TLS the
check offers h2 and checks the server's SPIFFE identity."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .conftest import blackhole, free_port, wait_for
from .reliability_upstreams import Upstream, metric
from .test_mtls import Files, Pki

pytestmark = pytest.mark.integration

SERVICE = "shop.v1.Orders"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHECK = {
    "interval": "200ms",
    "timeout": "150ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "grpc": {"service": SERVICE},
}
# no HTTP proxy from the environment between the test's client and the proxy
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class CountingHealth(health.HealthServicer):  # type: ignore[misc]
    """The stock health service, counting the Check calls it answers, each after
    `delay` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.delay = 0.0

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return super().Check(request, context)


class GrpcUpstream:
    """A threaded grpcio server on 127.0.0.1: the standard health service (unless
    `with_health` is False) and `/test.Who/Port`, which answers with its own port."""

    def __init__(self, *, with_health: bool = True, tls: Files | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = CountingHealth()
        if with_health:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(Path(tls.key).read_bytes(), Path(tls.certificate).read_bytes())],
                root_certificates=Path(tls.trust_bundle).read_bytes(),
                require_client_auth=True,
            )
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        port = str(self.port).encode()

        def who(request: bytes, context: grpc.ServicerContext) -> bytes:
            return port

        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Who", {"Port": grpc.unary_unary_rpc_method_handler(who)}
                ),
            )
        )
        self.server.start()

    def set(self, status: Any) -> None:
        self.health.set(SERVICE, status)

    def close(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture
def grpc_upstreams() -> Iterator[list[GrpcUpstream]]:
    started: list[GrpcUpstream] = []
    yield started
    for upstream in started:
        upstream.close()


def snapshot(clusters: dict[str, tuple[list[int], dict[str, Any]]]) -> dict[str, Any]:
    """A TCP listener to the first cluster; every cluster has one health check."""
    return {
        "version": "1",
        "drain_timeout": "2s",
        "admin": {"address": "127.0.0.1", "port": free_port(), "token": "secret"},
        "listeners": [
            {
                "name": "in",
                "address": "127.0.0.1",
                "port": free_port(),
                "filter_chains": [{"tcp": {"cluster": next(iter(clusters))}}],
            }
        ],
        "clusters": [
            {
                "name": name,
                "connect_timeout": "1s",
                "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports],
                **extra,
            }
            for name, (ports, extra) in clusters.items()
        ],
    }


def healthy(proxy: Any, cluster: str = "up") -> float:
    return metric(proxy.metrics(), "meshling_endpoints_healthy", cluster=cluster)


def checks(proxy: Any, cluster: str, result: str) -> float:
    return metric(proxy.metrics(), "meshling_health_checks_total", cluster=cluster, result=result)


def served_by(port: int, n: int) -> Counter[int]:
    """Which backend answered each of `n` gRPC calls through the proxy, one connection
    (one channel) per call, as the TCP listener balances connections."""
    seen: Counter[int] = Counter()
    for _ in range(n):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            seen[int(channel.unary_unary("/test.Who/Port")(b"", timeout=5))] += 1
    return seen


def test_grpc_health_not_serving_endpoint_leaves_rotation_and_comes_back(
    start_proxy, grpc_upstreams: list[GrpcUpstream]
) -> None:
    a, b = GrpcUpstream(), GrpcUpstream()
    grpc_upstreams += [a, b]
    a.set(SERVING)
    b.set(SERVING)
    proxy = start_proxy(snapshot({"up": ([a.port, b.port], {"health_check": CHECK})}))
    wait_for(lambda: checks(proxy, "up", "passed") >= 2, 5, "first checks")
    assert healthy(proxy) == 2
    assert set(served_by(proxy.port, 6)) == {a.port, b.port}

    a.set(NOT_SERVING)
    wait_for(lambda: healthy(proxy) == 1, 5, "a to turn unhealthy")
    assert set(served_by(proxy.port, 6)) == {b.port}

    a.set(SERVING)
    wait_for(lambda: healthy(proxy) == 2, 5, "a to come back")
    assert set(served_by(proxy.port, 6)) == {a.port, b.port}
    assert checks(proxy, "up", "failed") >= 2


def test_grpc_health_fails_without_the_service_or_a_grpc_health_server(
    start_proxy, grpc_upstreams: list[GrpcUpstream]
) -> None:
    serving, unknown, plain = GrpcUpstream(), GrpcUpstream(), GrpcUpstream(with_health=False)
    slow = GrpcUpstream()
    grpc_upstreams += [serving, unknown, plain, slow]
    serving.set(SERVING)  # `unknown` serves as a whole, but knows nothing of SERVICE
    slow.set(SERVING)
    slow.health.delay = 0.5  # longer than the check's timeout
    http1 = Upstream()
    hole, fillers = blackhole()
    whole_server = dict(CHECK, grpc={})
    try:
        proxy = start_proxy(
            snapshot(
                {
                    "serving": ([serving.port], {"health_check": CHECK}),
                    "unknown": ([unknown.port], {"health_check": CHECK}),
                    "whole": ([unknown.port], {"health_check": whole_server}),
                    "no-health-service": ([plain.port], {"health_check": CHECK}),
                    "http1": ([http1.port], {"health_check": CHECK}),
                    "hanging": ([hole.getsockname()[1]], {"health_check": CHECK}),
                    "slow": ([slow.port], {"health_check": CHECK}),
                }
            )
        )
        failing = ("unknown", "no-health-service", "http1", "hanging", "slow")
        wait_for(lambda: all(checks(proxy, c, "failed") >= 2 for c in failing), 5, "failed checks")
        text = proxy.metrics()
        for cluster in failing:
            assert f'meshling_endpoints_healthy{{cluster="{cluster}"}} 0.0' in text, cluster
            assert (
                metric(text, "meshling_health_checks_total", cluster=cluster, result="passed") == 0
            )
        wait_for(lambda: checks(proxy, "whole", "passed") >= 2, 5, "the whole server's checks")
        assert healthy(proxy, "serving") == 1 and healthy(proxy, "whole") == 1
        assert checks(proxy, "serving", "failed") == checks(proxy, "whole", "failed") == 0
        assert slow.health.calls >= 2  # it was asked, and answered too late
    finally:
        http1.close()
        hole.close()
        for s in fillers:
            s.close()


def test_grpc_health_over_mutual_tls(
    start_proxy, grpc_upstreams: list[GrpcUpstream], tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    upstream = GrpcUpstream(tls=pki.issue("orders"))
    grpc_upstreams.append(upstream)
    upstream.set(SERVING)
    caller = pki.issue("web")
    proxy = start_proxy(
        snapshot(
            {
                # the cluster's ALPN is http/1.1 (the default): the check offers h2 itself
                "orders": (
                    [upstream.port],
                    {
                        "tls": caller.tls(identity="spiffe://default/orders"),
                        "health_check": CHECK,
                    },
                ),
                "impostor": (
                    [upstream.port],
                    {
                        "tls": caller.tls(identity="spiffe://default/payments"),
                        "health_check": CHECK,
                    },
                ),
            }
        )
    )
    wait_for(lambda: checks(proxy, "orders", "passed") >= 2, 5, "checks over mTLS")
    wait_for(lambda: checks(proxy, "impostor", "failed") >= 2, 5, "the wrong identity to fail")
    assert healthy(proxy, "orders") == 1 and checks(proxy, "orders", "failed") == 0
    assert healthy(proxy, "impostor") == 0 and checks(proxy, "impostor", "passed") == 0
    upstream.set(NOT_SERVING)
    wait_for(lambda: healthy(proxy, "orders") == 0, 5, "orders to turn unhealthy")


def test_grpc_health_checks_stop_on_drain(start_proxy, grpc_upstreams: list[GrpcUpstream]) -> None:
    upstream = GrpcUpstream()
    grpc_upstreams.append(upstream)
    upstream.set(SERVING)
    proxy = start_proxy(snapshot({"up": ([upstream.port], {"health_check": CHECK})}))
    wait_for(lambda: upstream.health.calls >= 2, 5, "checks")
    assert proxy.stop() == 0
    stopped = upstream.health.calls
    time.sleep(0.5)
    assert upstream.health.calls == stopped


def test_grpc_health_through_a_peer_proxy_tcp_inbound(
    start_proxy, grpc_upstreams: list[GrpcUpstream], tmp_path: Path
) -> None:
    """In a mutual TLS mesh the endpoint is the service's proxy: a TCP inbound ends TLS
    (it does not choose h2, so the check goes on with prior knowledge) and passes the
    HTTP/2 bytes through to the gRPC server behind it."""
    pki = Pki(tmp_path)
    upstream = GrpcUpstream()
    grpc_upstreams.append(upstream)
    upstream.set(SERVING)
    inbound = snapshot({"app": ([upstream.port], {})})
    inbound["listeners"][0]["filter_chains"][0]["tls"] = pki.issue("orders").tls()
    start_proxy(inbound)
    inbound_port = inbound["listeners"][0]["port"]
    caller = start_proxy(
        snapshot(
            {
                "orders": (
                    [inbound_port],
                    {
                        "tls": pki.issue("web").tls(identity="spiffe://default/orders"),
                        "health_check": CHECK,
                    },
                )
            }
        )
    )
    wait_for(lambda: checks(caller, "orders", "passed") >= 2, 5, "checks through the inbound")
    assert checks(caller, "orders", "failed") == 0
    upstream.set(NOT_SERVING)
    wait_for(lambda: healthy(caller, "orders") == 0, 5, "orders to turn unhealthy")
