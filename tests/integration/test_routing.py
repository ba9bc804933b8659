"""Weighted clusters with real processes: a split over two upstreams, and weights shifted
by rewriting the snapshot while requests keep flowing."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from typing import Any

import pytest

from .conftest import RecordingUpstream, free_port, http_snapshot, wait_for

pytestmark = pytest.mark.integration


def _upstream(body: bytes) -> RecordingUpstream:
    upstream = RecordingUpstream(free_port())
    upstream.response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    upstream.serve()
    return upstream


def _split_snapshot(
    port: int, admin: int, first: int, second: int, weights: tuple[int, int], version: str
) -> dict[str, Any]:
    clusters = [
        {"name": name, "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": p}]}
        for name, p in (("first", first), ("second", second))
    ]
    split = [
        {"cluster": "first", "weight": weights[0]},
        {"cluster": "second", "weight": weights[1]},
    ]
    routes = [{"name": "split", "weighted_clusters": split}]
    return http_snapshot(port, admin, [], version=version, routes=routes, clusters=clusters)


class CountingLoad:
    """Keep-alive clients sending requests until stopped, counting answers by body."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.bodies: Counter[bytes] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                with self.lock:
                    if response.status == 200:
                        self.bodies[body] += 1
                    else:
                        self.failures.append(f"{response.status} {body!r}")
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.close()

    def snapshot(self) -> Counter[bytes]:
        with self.lock:
            return Counter(self.bodies)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _only_second(load: CountingLoad) -> bool:
    before = load.snapshot()
    time.sleep(0.3)
    after = load.snapshot()
    return after[b"first"] == before[b"first"] and after[b"second"] > before[b"second"] + 50


def test_routing_weighted_split_follows_the_weights(start_proxy) -> None:
    first, second = _upstream(b"first"), _upstream(b"second")
    try:
        port, admin = free_port(), free_port()
        start_proxy(_split_snapshot(port, admin, first.port, second.port, (90, 10), "1"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        counts: Counter[bytes] = Counter()
        for _ in range(3000):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200
            counts[response.read()] += 1
        conn.close()
        assert counts[b"first"] + counts[b"second"] == 3000
        print(f"90/10 split: {dict(counts)}")
        # 3000 draws of p=0.9: one standard deviation is 0.55%
        assert counts[b"first"] / 3000 == pytest.approx(0.9, abs=0.03), counts
    finally:
        first.close()
        second.close()


def test_routing_shifting_weights_under_load_fails_nothing(start_proxy) -> None:
    first, second = _upstream(b"first"), _upstream(b"second")
    try:
        port, admin = free_port(), free_port()
        proxy = start_proxy(_split_snapshot(port, admin, first.port, second.port, (100, 0), "1"))
        load = CountingLoad(port)
        try:
            wait_for(lambda: load.snapshot()[b"first"] > 200, 10, "traffic on first")
            assert load.snapshot()[b"second"] == 0
            proxy.write_config(_split_snapshot(port, admin, first.port, second.port, (50, 50), "2"))
            # 50/50 is running once second answers, and first still does
            wait_for(lambda: load.snapshot()[b"second"] > 200, 10, "traffic on second")
            halfway = load.snapshot()
            wait_for(lambda: load.snapshot()[b"first"] > halfway[b"first"] + 200, 10, "first too")
            proxy.write_config(_split_snapshot(port, admin, first.port, second.port, (0, 100), "3"))
            # 0/100 is running once first stops answering while second goes on
            wait_for(lambda: _only_second(load), 10, "traffic on second only")
            settled = load.snapshot()
            wait_for(lambda: load.snapshot()[b"second"] > settled[b"second"] + 500, 10, "more")
            assert load.snapshot()[b"first"] == settled[b"first"]
        finally:
            load.finish()
        assert load.failures == []
        total = load.snapshot()
        print(f"shift under load: {dict(total)}, failures {len(load.failures)}")
    finally:
        first.close()
        second.close()


class CountingEcho:
    """Echoes each connection's bytes back, then closes; counts connections."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def test_routing_tcp_weighted_split_per_connection(start_proxy) -> None:
    echoes = CountingEcho(), CountingEcho()
    try:
        port, admin = free_port(), free_port()
        split = [
            {"cluster": "first", "weight": 75},
            {"cluster": "second", "weight": 25},
        ]
        start_proxy(
            {
                "version": "1",
                "admin": {"port": admin},
                "listeners": [
                    {
                        "name": "tcp",
                        "port": port,
                        "filter_chains": [{"tcp": {"weighted_clusters": split}}],
                    }
                ],
                "clusters": [
                    {
                        "name": name,
                        "connect_timeout": "500ms",
                        "endpoints": [{"address": "127.0.0.1", "port": echo.port}],
                    }
                    for name, echo in zip(("first", "second"), echoes, strict=True)
                ],
            }
        )
        n = 800
        for i in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"ping %d" % i)
                client.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := client.recv(65536):
                    received += chunk
                assert received == b"ping %d" % i
        wait_for(lambda: echoes[0].connections + echoes[1].connections == n, 5, "all counted")
        print(f"75/25 TCP split: {echoes[0].connections}/{echoes[1].connections}")
        # 800 draws of p=0.75: one standard deviation is 1.5%
        assert echoes[0].connections / n == pytest.approx(0.75, abs=0.06)
    finally:
        for echo in echoes:
            echo.close()


def test_routing_query_match_and_header_edits(start_proxy) -> None:
    first, second = _upstream(b"first"), _upstream(b"second")
    second.response = (
        b"HTTP/1.1 200 OK\r\nserver: app\r\nx-version: 1\r\ncontent-length: 6\r\n\r\nsecond"
    )
    try:
        port, admin = free_port(), free_port()
        clusters = [
            {"name": n, "connect_timeout": "1s", "endpoints": [{"address": "127.0.0.1", "port": p}]}
            for n, p in (("first", first.port), ("second", second.port))
        ]
        routes = [
            {
                "name": "beta",
                "match": {"query": [{"name": "beta", "exact": "on"}]},
                "cluster": "second",
                "request_headers": {"set": {"x-canary": "1"}, "remove": ["x-debug"]},
                "response_headers": {"add": {"x-route": "beta"}, "remove": ["server"]},
            },
            {"name": "rest", "cluster": "first"},
        ]
        proxy = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/x?beta=on", headers={"x-debug": "secret", "x-canary": "0"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"second")
        assert response.getheader("x-route") == "beta"
        assert response.getheader("server") is None
        assert response.getheader("x-version") == "1"
        received = bytes(second.received).lower()
        assert b"x-canary: 1\r\n" in received and b"x-canary: 0" not in received
        assert b"x-debug" not in received
        conn.request("GET", "/x?beta=off")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"first")
        assert response.getheader("x-route") is None
        conn.close()
        assert proxy.proc.poll() is None
    finally:
        first.close()
        second.close()


def test_routing_direct_response_redirect_and_rewrite(start_proxy) -> None:
    upstream = _upstream(b"up")
    try:
        port, admin = free_port(), free_port()
        routes = [
            {
                "name": "closed",
                "match": {"path": {"prefix": "/closed"}},
                "direct_response": {"status": 503, "body": "closed for maintenance\n"},
            },
            {
                "name": "empty",
                "match": {"path": {"exact": "/empty"}},
                "direct_response": {"status": 204},
            },
            {
                "name": "moved",
                "match": {"path": {"prefix": "/moved"}},
                "redirect": {"host": "new.example", "path": "/landing", "status": 302},
            },
            {
                "name": "tls",
                "match": {"path": {"prefix": "/secure"}},
                "redirect": {"scheme": "https"},
            },
            {
                "name": "v1",
                "match": {"path": {"prefix": "/v1/"}},
                "cluster": "up",
                "rewrite": {"prefix": "/api/v2/"},
            },
            {"name": "rest", "cluster": "up"},
        ]
        proxy = start_proxy(http_snapshot(port, admin, [upstream.port], routes=routes))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/closed/now", headers={"host": "shop:8080"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (503, b"closed for maintenance\n")
        assert response.getheader("content-type") == "text/plain"
        assert response.getheader("content-length") == "23"
        conn.request("POST", "/empty", body=b"ignored")
        response = conn.getresponse()
        assert (response.status, response.read()) == (204, b"")
        conn.request("GET", "/moved/x?a=1&b=2", headers={"host": "shop:8080"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (302, b"")
        assert response.getheader("location") == "http://new.example:8080/landing?a=1&b=2"
        conn.request("GET", "/secure/page?k=v", headers={"host": "shop"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (301, b"")
        assert response.getheader("location") == "https://shop/secure/page?k=v"
        assert upstream.connections == 0 and not upstream.received
        # the keep-alive connection still forwards: the matched prefix is rewritten
        conn.request("GET", "/v1/users/7?full=1")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"up")
        assert bytes(upstream.received).startswith(b"GET /api/v2/users/7?full=1 HTTP/1.1\r\n")
        conn.request("GET", "/v1x")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"up")
        assert b"GET /v1x HTTP/1.1\r\n" in bytes(upstream.received)
        conn.close()
        assert proxy.proc.poll() is None
    finally:
        upstream.close()
