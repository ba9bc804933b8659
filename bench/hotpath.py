"""Micro-benchmark of the proxy's HTTP hot path in Python alone, without sockets.

One request and its response go through `HttpDownstream`, `Exchange` and a
pooled `HttpUpstream` over fake transports, so the figure is the proxy's own
CPU per request with no syscalls and no event-loop wake-ups. Run it with
`--profile` to see where that time goes. `--policies` configures every reliability
policy as `bench/run.py`'s `meshling-http+policies` does (none of them firing; the
health check is configured but its task is not started here), with that balancer.

    .venv/bin/python bench/hotpath.py [--requests N] [--profile] [--policies least_request]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from run import LB_POLICIES, policy_fragments

from meshling.proxy.cluster import ClusterRuntime, PoolSet
from meshling.proxy.deadlines import Deadlines
from meshling.proxy.http import HttpDownstream, HttpUpstream
from meshling.proxy.listener import ChainRuntime
from meshling.snapshot import from_dict
from meshling.telemetry.metrics import Metrics

REQUEST = (
    b"GET /api/v1/items?id=7 HTTP/1.1\r\nHost: api.local:8080\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)


class FakeTransport:
    """Records writes; the minimum of asyncio.Transport the protocols use."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(requests: int, profile: bool, lb_policy: str | None) -> float:
    route: dict[str, Any] = {"name": "all", "cluster": "up"}
    filter_chain: dict[str, Any] = {
        "http": {
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]
            }
        }
    }
    cluster: dict[str, Any] = {"name": "up", "endpoints": [{"address": "127.0.0.1", "port": 2}]}
    if lb_policy is not None:
        fragments = policy_fragments(lb_policy)
        route.update(fragments["route"])
        cluster.update(fragments["cluster"])
        filter_chain.update(fragments["chain"])
    snapshot = from_dict(
        {
            "version": "1",
            "listeners": [{"name": "in", "port": 1, "filter_chains": [filter_chain]}],
            "clusters": [cluster],
        }
    )
    metrics = Metrics()
    pools = PoolSet()
    clusters = {"up": ClusterRuntime(snapshot.clusters["up"], pools, metrics.cluster_stats("up"))}
    chain = ChainRuntime(snapshot.listeners[0], clusters, metrics, None, "1", Deadlines())
    downstream = HttpDownstream(chain, set())
    downstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    endpoint = snapshot.clusters["up"].endpoints[0]
    upstream = HttpUpstream(clusters["up"], endpoint)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    clusters["up"].release(endpoint, upstream)

    def one() -> None:
        downstream.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    for _ in range(requests):
        one()
    elapsed = time.perf_counter() - started
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    assert downstream.exchange is None, "the exchange did not complete"
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--policies",
        metavar="BALANCER",
        choices=LB_POLICIES,
        help="every reliability policy configured, none firing, with this balancer: "
        + ", ".join(LB_POLICIES),
    )
    args = parser.parse_args()
    micros = asyncio.run(run(args.requests, args.profile, args.policies))
    which = f"with the policies ({args.policies})" if args.policies else "bare"
    print(f"proxy Python work per request, {which}: {micros:.2f} us (no syscalls)")


if __name__ == "__main__":
    main()
