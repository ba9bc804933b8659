"""CircuitBreaker limits end to end: a real proxy process in front of real, slow
upstreams; a request over a limit is answered at once with 503 naming the limit."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import free_port, http_snapshot, wait_for
from .reliability_upstreams import Upstream, get, metric

pytestmark = pytest.mark.integration


@pytest.fixture
def slow() -> Iterator[Upstream]:
    upstream = Upstream()
    upstream.delay = 1.0
    yield upstream
    upstream.close()


def snapshot(upstream: Upstream, breaker: dict[str, Any]) -> dict[str, Any]:
    return http_snapshot(
        free_port(),
        free_port(),
        [],
        clusters=[
            {
                "name": "up",
                "endpoints": [{"address": "127.0.0.1", "port": upstream.port}],
                "circuit_breaker": breaker,
            }
        ],
    )


def in_background(port: int, n: int) -> tuple[list[threading.Thread], list[int]]:
    statuses: list[int] = []

    def one() -> None:
        statuses.append(get(port)[0])

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, statuses


def test_circuit_breaker_max_requests_overflow_gets_503_at_once(start_proxy, slow) -> None:
    proxy = start_proxy(snapshot(slow, {"max_requests": 2}))
    threads, statuses = in_background(proxy.port, 2)
    wait_for(lambda: slow.active == 2, 5, "two requests at the upstream")
    started = time.monotonic()
    status, body, headers = get(proxy.port)
    assert time.monotonic() - started < 0.5  # not queued behind the slow ones
    assert status == 503
    assert headers["x-meshling-error"] == "circuit_breaker_max_requests"
    assert "circuit breaker max requests" in body
    for t in threads:
        t.join()
    assert statuses == [200, 200]
    # the count went back down: the next request goes through
    assert get(proxy.port)[0] == 200
    metrics = proxy.metrics()
    assert (
        metric(
            metrics, "meshling_circuit_breaker_overflows_total", cluster="up", limit="max_requests"
        )
        == 1
    )
    assert metric(metrics, "meshling_upstream_requests_active", cluster="up") == 0


def test_circuit_breaker_max_connections_overflow(start_proxy, slow) -> None:
    proxy = start_proxy(snapshot(slow, {"max_connections": 1}))
    threads, statuses = in_background(proxy.port, 1)
    wait_for(lambda: slow.active == 1, 5, "a request at the upstream")
    # the one connection is busy: a second request would need another
    status, _, headers = get(proxy.port)
    assert status == 503
    assert headers["x-meshling-error"] == "circuit_breaker_max_connections"
    for t in threads:
        t.join()
    assert statuses == [200]
    # the pooled connection is reused: within the limit
    assert get(proxy.port)[0] == 200


def test_circuit_breaker_max_pending_requests_overflow(start_proxy) -> None:
    # An endpoint whose accept queue is full: connections hang while they open.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(server.getsockname())
        fillers.append(s)
    time.sleep(0.1)
    try:
        document = http_snapshot(
            free_port(),
            free_port(),
            [],
            clusters=[
                {
                    "name": "up",
                    "connect_timeout": "2s",
                    "endpoints": [{"address": "127.0.0.1", "port": server.getsockname()[1]}],
                    "circuit_breaker": {"max_pending_requests": 1},
                }
            ],
        )
        proxy = start_proxy(document)
        threads, statuses = in_background(proxy.port, 1)
        wait_for(
            lambda: (
                metric(proxy.metrics(), "meshling_upstream_requests_pending", cluster="up") == 1
            ),
            5,
            "one request waiting for its connection",
        )
        status, _, headers = get(proxy.port)
        assert status == 503
        assert headers["x-meshling-error"] == "circuit_breaker_max_pending_requests"
        for t in threads:
            t.join()
        assert statuses == [502]  # the waiting one's connection timed out
    finally:
        for s in fillers:
            s.close()
        server.close()


def test_circuit_breaker_limits_tcp_connections(start_proxy, slow) -> None:
    document = snapshot(slow, {"max_requests": 1})
    document["listeners"][0]["filter_chains"] = [{"tcp": {"cluster": "up"}}]
    proxy = start_proxy(document)
    first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        first.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        wait_for(lambda: slow.active == 1, 5, "the first connection's request")
        second = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        # over the limit: closed (reset) without a byte forwarded
        with second, contextlib.suppress(ConnectionResetError):
            assert second.recv(100) == b""
        assert first.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        first.close()
    metrics = proxy.metrics()
    assert (
        metric(
            metrics, "meshling_circuit_breaker_overflows_total", cluster="up", limit="max_requests"
        )
        == 1
    )
