"""HTTP/1.1 apps, multiplexed HTTP/2 between proxies: many client connections to the
outbound proxy become streams of one mTLS HTTP/2 connection to the inbound proxy, which
turns them back into HTTP/1.1 for nginx. Bodies both ways, chunked uploads, HEAD, the
mesh's fields, and the connection count between the proxies."""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Nginx, free_port, http_snapshot, wait_for
from .test_mtls import Pki, metric

pytestmark = pytest.mark.integration


def multiplexed_hop(start_proxy, pki: Pki, nginx_port: int) -> tuple[Any, Any]:
    inbound = http_snapshot(free_port(), free_port(), [nginx_port])
    inbound["listeners"][0]["filter_chains"][0]["tls"] = pki.issue("api").tls()
    api = start_proxy(inbound)
    outbound = http_snapshot(free_port(), free_port(), [api.port])
    outbound["clusters"][0]["tls"] = pki.issue("web").tls(identity="spiffe://default/api")
    outbound["clusters"][0]["protocol"] = "http2"
    web = start_proxy(outbound)
    return web, api


def request(
    port: int, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_http1_requests_share_one_http2_connection(start_proxy, pki: Pki, nginx: Nginx) -> None:
    web, api = multiplexed_hop(start_proxy, pki, nginx.port)
    status, headers, body = request(web.port, "GET", "/echo-headers")
    assert status == 200
    assert b"id=spiffe://default/web" in body and b"xfp=http " in body
    # a 4 MiB response (close-delimited by nothing: nginx gives its length)
    status, headers, body = request(web.port, "GET", "/big.bin")
    assert status == 200 and len(body) == 4 * 1024 * 1024
    assert body == (Path(nginx.root) / "www" / "big.bin").read_bytes()
    # uploads: with a length, and chunked (a generator body)
    assert request(web.port, "POST", "/upload", b"x" * 300_000)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    conn.request("POST", "/upload", body=iter([b"a" * 1000] * 50), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200, (response.getheaders(), response.read())
    conn.close()
    status, headers, body = request(web.port, "HEAD", "/big.bin")
    assert status == 200 and body == b"" and headers["content-length"] == str(4 * 1024 * 1024)
    # keep-alive to the client: several requests on one connection
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    for _ in range(5):
        conn.request("GET", "/hello")
        assert conn.getresponse().read() == b"hello from nginx\n"
    conn.close()

    # 40 clients at once, each on its own connection
    failures: list[str] = []

    def client() -> None:
        for _ in range(25):
            status, _, body = request(web.port, "GET", "/hello")
            if status != 200 or body != b"hello from nginx\n":
                failures.append(f"{status} {body[:80]!r}")

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    text = web.metrics()
    assert metric(text, 'meshling_downstream_connections_total{listener="in"}') >= 1000
    # ... and between the proxies, one connection and one handshake
    assert metric(text, 'meshling_upstream_connections_total{cluster="up"}') == 1
    assert metric(api.metrics(), 'meshling_downstream_connections_total{listener="in"}') == 1


def test_errors_through_the_multiplexed_hop(start_proxy, pki: Pki, nginx: Nginx) -> None:
    web, _ = multiplexed_hop(start_proxy, pki, free_port())  # nothing listens behind api
    status, headers, _ = request(web.port, "GET", "/hello")
    assert status == 502
    assert headers["x-meshling-error"] == "upstream_connect_failure"
    # the hop itself is down: the outbound answers
    doc = http_snapshot(free_port(), free_port(), [free_port()])
    doc["clusters"][0]["protocol"] = "http2"
    alone = start_proxy(doc)
    status, headers, _ = request(alone.port, "GET", "/hello")
    assert status == 502 and headers["x-meshling-error"] == "upstream_connect_failure"


def test_a_route_with_per_try_timeouts_keeps_its_own_http1_connection(
    start_proxy, pki: Pki
) -> None:
    """Per-try and idle timeouts time HTTP/1.1 attempts: such a route's requests travel
    on pooled HTTP/1.1 connections to the peer proxy instead of multiplexed streams."""
    from .reliability_upstreams import Upstream, get

    slow = Upstream()
    try:
        slow.delay = 1.0
        web, _ = multiplexed_hop(start_proxy, pki, slow.port)
        document = yaml.safe_load(web.config.read_text())
        route = document["listeners"][0]["filter_chains"][0]["http"]["route_config"]
        route["virtual_hosts"][0]["routes"][0]["timeout"] = {"request": "5s", "per_try": "300ms"}
        document["version"] = "2"
        web.write_config(document)
        wait_for(
            lambda: get(web.port, "/")[2].get("x-meshling-error") == "upstream_per_try_timeout",
            10,
            "the per-try timeout",
        )
        started = time.monotonic()
        status, _, headers = get(web.port, "/")
        assert status == 504 and headers["x-meshling-error"] == "upstream_per_try_timeout"
        assert time.monotonic() - started < 0.9
    finally:
        slow.close()
