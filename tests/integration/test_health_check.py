"""Active health checks end to end: a real proxy checks real upstreams; an endpoint
whose health path fails leaves the rotation and comes back, panic keeps traffic flowing,
reloads do not multiply the checks, and a drain stops them."""

from __future__ import annotations

import time
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
    upstreams: list[Upstream], check: dict[str, Any], version: str = "1"
) -> dict[str, Any]:
    return http_snapshot(
        free_port(),
        free_port(),
        [],
        version=version,
        clusters=[
            {
                "name": "up",
                "endpoints": [{"address": "127.0.0.1", "port": u.port} for u in upstreams],
                "health_check": check,
            }
        ],
    )


HTTP_CHECK = {
    "interval": "200ms",
    "timeout": "150ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
    "panic_threshold": 50,
    "http": {"path": "/healthz"},
}


def served_by(port: int, n: int) -> Counter[int]:
    return Counter(int(get(port)[1]) for _ in range(n))


def healthy(proxy: Any) -> float:
    return metric(proxy.metrics(), "meshling_endpoints_healthy", cluster="up")


def test_health_check_failing_endpoint_leaves_rotation_and_comes_back(
    start_proxy, upstreams
) -> None:
    a, b, c = upstreams
    proxy = start_proxy(snapshot(upstreams, HTTP_CHECK))
    wait_for(lambda: all(u.health_hits >= 1 for u in upstreams), 5, "first checks")
    assert set(served_by(proxy.port, 6)) == {a.port, b.port, c.port}
    b.health_status = 503
    wait_for(lambda: healthy(proxy) == 2, 5, "b to turn unhealthy")
    assert set(served_by(proxy.port, 10)) == {a.port, c.port}
    b.health_status = 200
    wait_for(lambda: healthy(proxy) == 3, 5, "b to come back")
    assert set(served_by(proxy.port, 6)) == {a.port, b.port, c.port}
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_health_checks_total", cluster="up", result="failed") >= 2
    assert metric(metrics, "meshling_health_checks_total", cluster="up", result="passed") >= 3


def test_health_check_hanging_endpoint_fails_by_timeout(start_proxy, upstreams) -> None:
    a, b, c = upstreams
    check = dict(HTTP_CHECK, http={"path": "/slow"})
    for u in upstreams:
        u.health_path = "/slow"
    b.health_path = "/never"  # /slow is an ordinary request on b, and it is slow
    b.delay = 1.0
    proxy = start_proxy(snapshot(upstreams, check))
    wait_for(lambda: healthy(proxy) == 2, 5, "b to fail its checks by timeout")
    b.delay = 0.0
    assert set(served_by(proxy.port, 6)) == {a.port, c.port}


def test_health_check_panic_keeps_traffic_flowing(start_proxy, upstreams) -> None:
    a, b, c = upstreams
    proxy = start_proxy(snapshot(upstreams, HTTP_CHECK))
    a.health_status = 500
    wait_for(lambda: healthy(proxy) == 2, 5, "a unhealthy")
    assert metric(proxy.metrics(), "meshling_lb_panic", cluster="up") == 0
    b.health_status = 500
    wait_for(lambda: healthy(proxy) == 1, 5, "b unhealthy")
    # one of three healthy (33% < 50%): every endpoint takes traffic again
    assert set(served_by(proxy.port, 6)) == {a.port, b.port, c.port}
    assert metric(proxy.metrics(), "meshling_lb_panic", cluster="up") == 1


def test_health_check_tcp_connect(start_proxy, upstreams) -> None:
    a, b, c = upstreams
    proxy = start_proxy(snapshot(upstreams, {"interval": "200ms", "timeout": "100ms", "tcp": {}}))
    wait_for(lambda: healthy(proxy) == 3, 5, "all healthy")
    c.close()  # nothing listens there any more
    wait_for(lambda: healthy(proxy) == 2, 5, "c unhealthy")
    assert set(served_by(proxy.port, 6)) == {a.port, b.port}


def test_health_check_reloads_do_not_multiply_checks_and_drain_stops_them(
    start_proxy, upstreams
) -> None:
    a = upstreams[0]
    document = snapshot(upstreams, HTTP_CHECK)
    proxy = start_proxy(document)
    for version in range(2, 7):
        document["version"] = str(version)
        proxy.write_config(document)
        wait_for(lambda v=version: f'version="{v}"' in proxy.metrics(), 10, f"reload to {version}")
    start = a.health_hits
    time.sleep(1.0)
    # one check every 200-220 ms: at most 5-6 a second, whatever the reloads
    assert a.health_hits - start <= 7
    assert proxy.stop() == 0
    stopped = a.health_hits
    time.sleep(0.5)
    assert a.health_hits == stopped
