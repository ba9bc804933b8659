"""The global rate limit: three real proxies sharing one limit through a real Redis, and
each falling back to its local limit when Redis goes away.

Redis is the one on 127.0.0.1:6379 when it answers; otherwise (and always for the test
that stops it) a `redis-server` of the test's own, on a free port, stopped by PID. Every
test uses a key of its own, so runs never share a bucket.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Nginx, free_port, http_snapshot, wait_for
from .test_mtls import metric

pytestmark = pytest.mark.integration

LIMIT = 100  # requests a second, shared by the three proxies
LOCAL = 50  # each proxy's own limit, and what is left of the limit without Redis


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server of the test's own: no persistence, loopback only."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.fail("redis-server is not installed: run scripts/install-peers")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: redis_answers(self.port), 10, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """127.0.0.1:6379 if it answers, else a server of our own."""
    if redis_answers(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server = RedisServer(tmp_path)
    yield server.url
    server.stop()


def shared(nginx_port: int, redis: str, key: str) -> dict[str, Any]:
    doc = http_snapshot(free_port(), free_port(), [nginx_port])
    doc["listeners"][0]["filter_chains"][0]["rate_limit"] = {
        "rules": [
            {
                "name": "api",
                "identities": ["*"],
                "local": {"requests": LOCAL, "interval": "1s", "burst": 10},
                "global": {"redis": redis, "requests": LIMIT, "interval": "1s", "key": key},
            }
        ]
    }
    return doc


def hammer(ports: list[int], seconds: float, per_port: int = 4) -> tuple[Counter[Any], float]:
    """Keep-alive GETs from `per_port` threads per proxy, as fast as they go, for `seconds`.
    Returns the count of (port, status) and the time it really took."""
    counts: Counter[Any] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(port: int) -> None:
        mine: Counter[Any] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while time.monotonic() < stop:
            try:
                conn.request("GET", "/hello")
                response = conn.getresponse()
                response.read()
                mine[(port, response.status)] += 1
            except (OSError, http.client.HTTPException) as exc:
                mine[(port, type(exc).__name__)] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.close()
        with lock:
            counts.update(mine)

    started = time.monotonic()
    threads = [
        threading.Thread(target=client, args=(port,)) for port in ports for _ in range(per_port)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, time.monotonic() - started


def admitted(counts: Counter[Any], port: int | None = None) -> int:
    return sum(n for (p, status), n in counts.items() if status == 200 and port in (None, p))


def others(counts: Counter[Any]) -> dict[Any, int]:
    return {k: n for k, n in counts.items() if k[1] not in (200, 429)}


def test_rate_limit_global_three_proxies_share_one_limit(
    start_proxy, nginx: Nginx, redis_url: str
) -> None:
    key = f"test-{uuid.uuid4().hex}"
    proxies = [start_proxy(shared(nginx.port, redis_url, key)) for _ in range(3)]
    ports = [p.port for p in proxies]
    counts, elapsed = hammer(ports, 5.0)
    total = admitted(counts)
    offered = sum(counts.values())
    rate = total / elapsed
    print(f"offered {offered / elapsed:.0f}/s, admitted {rate:.1f}/s: {dict(counts)}")
    assert offered / elapsed > 5 * LIMIT, "the load must be well above the limit"
    assert LIMIT * 0.9 <= rate <= LIMIT * 1.1, rate
    assert not others(counts), others(counts)
    # none more than its local limit. The shares need not be equal: leases go to whichever
    # proxy asks first when the shared bucket refills, and under equal demand one proxy can
    # get little (a known unfairness of leasing; the total is what the limit promises).
    for port in ports:
        assert admitted(counts, port) / elapsed <= LOCAL * 1.1
    refused = sum(
        metric(p.metrics(), 'meshling_rate_limited_total{limit="global",listener="in",rule="api"}')
        for p in proxies
    )
    assert refused > 0


def test_rate_limit_global_degrades_to_the_local_limit_without_redis(
    start_proxy, nginx: Nginx, own_redis: RedisServer
) -> None:
    key = f"test-{uuid.uuid4().hex}"
    proxies = [start_proxy(shared(nginx.port, own_redis.url, key)) for _ in range(3)]
    ports = [p.port for p in proxies]
    counts, elapsed = hammer(ports, 2.0)
    assert LIMIT * 0.85 <= admitted(counts) / elapsed <= LIMIT * 1.15
    own_redis.stop()
    counts, elapsed = hammer(ports, 3.0)
    print(f"without Redis: {dict(counts)} in {elapsed:.2f}s")
    # nothing but admitted requests and 429s: a lost Redis is never an error
    assert not others(counts), others(counts)
    for port in ports:
        rate = admitted(counts, port) / elapsed
        # the local limit (50/s, burst 10) is all that holds now
        assert LOCAL * 0.85 <= rate <= LOCAL * 1.15, (port, rate)
    for proxy in proxies:
        text = proxy.metrics()
        assert metric(text, 'meshling_rate_limit_degraded{listener="in",rule="api"}') == 1
        assert metric(text, 'meshling_rate_limit_redis_errors_total{listener="in",rule="api"}') >= 1
        # logged once per outage, however many retries failed
        assert proxy.logs().count("unreachable") == 1, proxy.logs()
