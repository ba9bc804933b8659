"""Outlier detection end to end: a real upstream that starts failing is ejected from
the load balancer, and comes back after the ejection time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

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


def test_outlier_ejects_a_failing_endpoint_and_returns_it(start_proxy, upstreams) -> None:
    _, bad, good2 = upstreams
    document = http_snapshot(
        free_port(),
        free_port(),
        [],
        clusters=[
            {
                "name": "up",
                "endpoints": [{"address": "127.0.0.1", "port": u.port} for u in upstreams],
                "circuit_breaker": {
                    "outlier_detection": {
                        "consecutive_5xx": 3,
                        "base_ejection_time": "1500ms",
                        "max_ejection_percent": 34,
                    }
                },
            }
        ],
    )
    proxy = start_proxy(document)
    bad.status = 500
    statuses = Counter(get(proxy.port)[0] for _ in range(12))
    # round robin: the bad endpoint's third 500 ejects it (9 requests in)
    assert statuses[500] == 3
    assert bad.hits == 3
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_outlier_ejections_total", cluster="up") == 1
    assert metric(metrics, "meshling_outlier_ejections_active", cluster="up") == 1
    ejected_at = time.monotonic()
    for _ in range(20):
        assert get(proxy.port)[0] == 200
    assert bad.hits == 3
    # the other good endpoint failing too cannot eject it: 2 of 3 is over 34%
    good2.status = 503
    for _ in range(10):
        get(proxy.port)
    assert metric(proxy.metrics(), "meshling_outlier_ejections_total", cluster="up") == 1
    assert metric(proxy.metrics(), "meshling_outlier_ejections_skipped_total", cluster="up") >= 1
    good2.status = 200
    # after the ejection time the endpoint is back (fixed in the meantime)
    bad.status = 200
    wait_for(
        lambda: metric(proxy.metrics(), "meshling_outlier_ejections_active", cluster="up") == 0,
        5,
        "the ejection to end",
    )
    assert time.monotonic() - ejected_at >= 1.4
    before = bad.hits
    for _ in range(6):
        assert get(proxy.port)[0] == 200
    assert bad.hits == before + 2


def test_outlier_counts_connect_failures_as_gateway_failures(start_proxy, upstreams) -> None:
    good = upstreams[0]
    dead = free_port()  # nothing listens there
    document = http_snapshot(
        free_port(),
        free_port(),
        [],
        clusters=[
            {
                "name": "up",
                "endpoints": [
                    {"address": "127.0.0.1", "port": good.port},
                    {"address": "127.0.0.1", "port": dead},
                ],
                "circuit_breaker": {
                    "outlier_detection": {
                        "consecutive_5xx": 0,
                        "consecutive_gateway_failures": 2,
                        "base_ejection_time": "30s",
                    }
                },
            }
        ],
    )
    proxy = start_proxy(document)
    statuses = Counter(get(proxy.port)[0] for _ in range(4))
    assert statuses == {200: 2, 502: 2}
    # ejected: every request now reaches the live endpoint
    assert all(get(proxy.port)[0] == 200 for _ in range(10))


def test_retried_failures_still_eject_the_endpoint(start_proxy, upstreams) -> None:
    """A retry hides a failing endpoint from the client, not from outlier detection:
    every failed attempt counts, so the endpoint is ejected while callers see only 200s."""
    _, bad, _ = upstreams
    document = http_snapshot(
        free_port(),
        free_port(),
        [],
        routes=[
            {
                "name": "all",
                "cluster": "up",
                "retry": {"max_attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}},
            }
        ],
        clusters=[
            {
                "name": "up",
                "endpoints": [{"address": "127.0.0.1", "port": u.port} for u in upstreams],
                "circuit_breaker": {
                    "outlier_detection": {
                        "consecutive_5xx": 3,
                        "base_ejection_time": "30s",
                        "max_ejection_percent": 34,
                    }
                },
            }
        ],
    )
    proxy = start_proxy(document)
    bad.status = 503
    statuses = Counter(get(proxy.port)[0] for _ in range(30))
    assert statuses == {200: 30}
    # the third failed attempt ejected it: it saw three requests and no more
    assert bad.hits == 3
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_outlier_ejections_total", cluster="up") == 1
    assert metric(metrics, "meshling_outlier_ejections_active", cluster="up") == 1
