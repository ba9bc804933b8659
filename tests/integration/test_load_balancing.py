"""Load balancing end to end: a real proxy in front of real upstreams of different
speeds and zones; least request and EWMA send most traffic to the fast endpoint, ring
hash keeps a key on one endpoint, and the local zone is preferred while healthy."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import free_port, http_snapshot, wait_for
from .reliability_upstreams import Upstream, get, metric

pytestmark = pytest.mark.integration


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    started = [Upstream() for _ in range(3)]
    yield started
    for upstream in started:
        upstream.close()


def snapshot(
    upstreams: list[Upstream],
    lb: dict[str, Any],
    zones: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
    **cluster: Any,
) -> dict[str, Any]:
    endpoints = []
    for i, u in enumerate(upstreams):
        endpoint: dict[str, Any] = {"address": "127.0.0.1", "port": u.port}
        if zones:
            endpoint["zone"] = zones[i]
        endpoints.append(endpoint)
    return http_snapshot(
        free_port(),
        free_port(),
        [],
        clusters=[{"name": "up", "endpoints": endpoints, "load_balancing": lb, **cluster}],
        extra=extra,
    )


def load(port: int, clients: int, each: int) -> Counter[int]:
    """`clients` concurrent clients sending `each` requests one after the other."""
    served: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(each):
            status, body, _ = get(port)
            assert status == 200
            with lock:
                served[int(body)] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served


@pytest.mark.parametrize("policy", ["least_request", "ewma"])
def test_load_balancing_prefers_the_fast_endpoint(start_proxy, upstreams, policy) -> None:
    fast, slow = upstreams[:2]
    slow.delay = 0.2
    proxy = start_proxy(snapshot([fast, slow], {"policy": policy}))
    served = load(proxy.port, 6, 10)
    assert sum(served.values()) == 60
    # round robin would give each 30; the slow one holds its requests longer, so it is
    # picked only when it has no more in flight than the fast one
    assert served[fast.port] >= 2 * served[slow.port], served


def test_load_balancing_ring_hash_keeps_a_key_on_one_endpoint(start_proxy, upstreams) -> None:
    lb = {"policy": "ring_hash", "hash_on": {"header": "x-user"}}
    proxy = start_proxy(snapshot(upstreams, lb))
    owners = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"):
        seen = {get(proxy.port, headers={"x-user": user})[1] for _ in range(5)}
        assert len(seen) == 1, (user, seen)
        owners[user] = seen.pop()
    assert len(set(owners.values())) >= 2  # the keys spread over the endpoints
    # no header: any endpoint answers, and the miss is counted
    assert get(proxy.port)[0] == 200
    assert metric(proxy.metrics(), "meshling_lb_hash_fallbacks_total", cluster="up") == 1


def test_load_balancing_ring_hash_on_cookie(start_proxy, upstreams) -> None:
    lb = {"policy": "ring_hash", "hash_on": {"cookie": "session"}}
    proxy = start_proxy(snapshot(upstreams, lb))
    for session in ("s1", "s2", "s3"):
        cookie = {"cookie": f"theme=dark; session={session}"}
        assert len({get(proxy.port, headers=cookie)[1] for _ in range(5)}) == 1


def test_load_balancing_prefers_the_local_zone_while_healthy(start_proxy, upstreams) -> None:
    a, b, c = upstreams
    check = {
        "interval": "200ms",
        "timeout": "150ms",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
        "panic_threshold": 0,
        "http": {"path": "/healthz"},
    }
    document = snapshot(
        upstreams,
        {"policy": "round_robin", "prefer_local_zone": True},
        zones=("east", "west", "east"),
        extra={"zone": "west"},
        health_check=check,
    )
    proxy = start_proxy(document)
    assert set(load(proxy.port, 1, 6)) == {b.port}
    b.health_status = 503
    wait_for(
        lambda: metric(proxy.metrics(), "meshling_endpoints_healthy", cluster="up") == 2,
        5,
        "the local endpoint unhealthy",
    )
    assert set(load(proxy.port, 1, 6)) == {a.port, c.port}
    b.health_status = 200
    wait_for(
        lambda: metric(proxy.metrics(), "meshling_endpoints_healthy", cluster="up") == 3,
        5,
        "the local endpoint back",
    )
    assert set(load(proxy.port, 1, 6)) == {b.port}


def test_load_balancing_random_reaches_every_endpoint(start_proxy, upstreams) -> None:
    proxy = start_proxy(snapshot(upstreams, {"policy": "random"}))
    served = load(proxy.port, 1, 60)
    assert set(served) == {u.port for u in upstreams}


@pytest.mark.parametrize("policy", ["least_request", "ewma"])
def test_a_retry_goes_to_an_endpoint_not_yet_tried(start_proxy, policy: str) -> None:
    """Two choices by least in flight keep drawing an endpoint that fails fast; a retry
    must pass over every endpoint the request already failed on."""
    from concurrent.futures import ThreadPoolExecutor

    slow, failing = Upstream(), Upstream()
    try:
        slow.delay = 0.1
        failing.status = 503
        document = http_snapshot(
            free_port(),
            free_port(),
            [],
            routes=[
                {
                    "name": "all",
                    "cluster": "up",
                    "retry": {
                        "max_attempts": 3,
                        "backoff": {"base": "1ms", "max": "2ms"},
                        "budget": {"ratio": 1.0, "min_per_second": 1000},
                    },
                }
            ],
            clusters=[
                {
                    "name": "up",
                    "endpoints": [
                        {"address": "127.0.0.1", "port": u.port} for u in (slow, failing)
                    ],
                    "load_balancing": {"policy": policy},
                }
            ],
        )
        proxy = start_proxy(document)
        with ThreadPoolExecutor(8) as pool:
            statuses = Counter(pool.map(lambda _: get(proxy.port)[0], range(80)))
        # every request that met the failing endpoint was retried on the slow one
        assert statuses == {200: 80}, statuses
        assert slow.hits == 80
    finally:
        slow.close()
        failing.close()
