"""Request mirroring with a real proxy process: the copies a mirror backend receives, a
mirror that is down, slow, resetting or failing (the caller sees none of it), the share
of requests copied, and bodies over the copy's limit."""

from __future__ import annotations

import http.client
import re
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import free_port, http_snapshot, wait_for

pytestmark = pytest.mark.integration

BODY_LIMIT = 64 * 1024


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpPeer:
    """A threaded HTTP/1.1 server (keep-alive, Content-Length and chunked request
    bodies) that records every request and answers `status` with `body`."""

    body: bytes
    status: int = 200
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> HttpPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # the head and the body go out in two writes: no waiting for an ACK between
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("content-length", 0)))

            def _serve(self) -> None:
                body = self._read_body()
                with peer.lock:
                    peer.requests.append(
                        Received(
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                self.send_response(peer.status)
                self.send_header("content-length", str(len(peer.body)))
                self.end_headers()
                self.wfile.write(peer.body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class SilentPeer:
    """Accepts connections and reads what comes, never answering (or, with `reset`,
    resets each connection as soon as a request arrives)."""

    def __init__(self, *, reset: bool = False) -> None:
        self.reset = reset
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def peers() -> Iterator[list[Any]]:
    """Peers to close when the test ends."""
    started: list[Any] = []
    yield started
    for peer in started:
        peer.close()


def _cluster(name: str, port: int, connect_timeout: str = "1s") -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": connect_timeout,
        "endpoints": [{"address": "127.0.0.1", "port": port}],
    }


def mirror_counts(metrics: str, cluster: str) -> dict[str, int]:
    """meshling_http_mirror_requests_total of one cluster, by outcome."""
    labels = re.escape(f'{{cluster="{cluster}",outcome="') + r'([a-z_]+)"\} ([0-9.e+]+)$'
    pattern = re.compile(r"^meshling_http_mirror_requests_total" + labels, re.M)
    return {outcome: int(float(n)) for outcome, n in pattern.findall(metrics)}


def active(metrics: str, cluster: str) -> int:
    labels = re.escape(f'{{cluster="{cluster}"}}') + r" ([0-9.e+]+)$"
    found = re.search(r"^meshling_http_mirror_requests_active" + labels, metrics, re.M)
    return int(float(found.group(1))) if found else 0


def test_mirror_backend_receives_the_copy_and_the_caller_the_primarys_answer(
    start_proxy, peers
) -> None:
    primary = HttpPeer(b"primary").start()
    shadow = HttpPeer(b"shadow answer", status=201).start()
    peers.extend([primary, shadow])
    port, admin = free_port(), free_port()
    routes = [
        {
            "name": "v1",
            "match": {"path": {"prefix": "/v1/"}},
            "cluster": "primary",
            "rewrite": {"prefix": "/api/"},
            "request_headers": {"set": {"x-route": "v1"}},
            "mirror": {"cluster": "shadow"},
        },
        {"name": "rest", "cluster": "primary"},
    ]
    clusters = [_cluster("primary", primary.port), _cluster("shadow", shadow.port)]
    proxy = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(
        "POST",
        "/v1/items?color=red",
        body=b"hello mirror",
        headers={"host": "shop.example:8080", "x-custom": "kept", "x-request-id": "rid-1"},
    )
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    conn.request("GET", "/v1/list", headers={"host": "shop.example"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    # a chunked body arrives whole, framed by its length
    conn.request(
        "PUT",
        "/v1/items/7",
        body=iter([b"first ", b"second ", b"third"]),
        encode_chunked=True,
        headers={"host": "shop.example"},
    )
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    # a route without a mirror copies nothing
    conn.request("GET", "/other", headers={"host": "shop.example"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    conn.close()

    wait_for(lambda: len(shadow.received()) == 3, 5, "three copies")
    # copies travel on their own connections: they may arrive in any order
    by_method = {copy.method: copy for copy in shadow.received()}
    post, get, put = by_method["POST"], by_method["GET"], by_method["PUT"]
    assert (post.method, post.path, post.body) == ("POST", "/api/items?color=red", b"hello mirror")
    assert post.headers["host"] == "shop.example-shadow:8080"
    assert post.headers["x-custom"] == "kept" and post.headers["x-route"] == "v1"
    assert post.headers["x-request-id"] == "rid-1"
    assert post.headers["content-length"] == "12"
    assert (get.method, get.path, get.body) == ("GET", "/api/list", b"")
    assert get.headers["host"] == "shop.example-shadow"
    assert (put.method, put.path, put.body) == ("PUT", "/api/items/7", b"first second third")
    assert put.headers["content-length"] == "18" and "transfer-encoding" not in put.headers
    # the primary saw the requests as they were, its own Host
    originals = primary.received()
    assert [r.path for r in originals] == [
        "/api/items?color=red",
        "/api/list",
        "/api/items/7",
        "/other",
    ]
    assert originals[0].headers["host"] == "shop.example:8080"
    assert originals[0].body == b"hello mirror" and originals[2].body == b"first second third"
    wait_for(lambda: mirror_counts(proxy.metrics(), "shadow") == {"sent": 3}, 5, "counted")
    assert active(proxy.metrics(), "shadow") == 0


def _latencies(port: int, path: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    took = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", path, body=b"payload", headers={"host": "shop"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"primary")
        took.append(time.perf_counter() - started)
    conn.close()
    return took


def test_mirror_down_slow_resetting_or_failing_changes_nothing_for_the_caller(
    start_proxy, peers
) -> None:
    primary = HttpPeer(b"primary").start()
    failing = HttpPeer(b"boom", status=503).start()
    slow, resetting = SilentPeer(), SilentPeer(reset=True)
    peers.extend([primary, failing, slow, resetting])
    port, admin = free_port(), free_port()
    down = free_port()  # nothing listens: connections are refused
    mirrors = {"down": down, "slow": slow.port, "reset": resetting.port, "failing": failing.port}
    routes = [
        {
            "name": name,
            "match": {"path": {"prefix": f"/{name}"}},
            "cluster": "primary",
            # the copy's deadline is the route's: a slow mirror holds a copy this long
            "timeout": "500ms",
            "mirror": {"cluster": name},
        }
        for name in mirrors
    ]
    routes.append({"name": "plain", "cluster": "primary", "timeout": "500ms"})
    clusters = [_cluster("primary", primary.port)]
    clusters += [_cluster(name, p, "200ms") for name, p in mirrors.items()]
    proxy = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
    _latencies(port, "/plain", 20)  # warm up

    n = 150
    plain: list[float] = []
    mirrored: dict[str, list[float]] = {name: [] for name in mirrors}
    for _ in range(3):  # interleaved, so that the machine's load falls on all alike
        plain += _latencies(port, "/plain", n // 3)
        for name in mirrors:
            mirrored[name] += _latencies(port, f"/{name}", n // 3)
    base = statistics.median(plain)
    report = {name: round(statistics.median(t) * 1000, 2) for name, t in mirrored.items()}
    print(f"median latency: plain {base * 1000:.2f} ms, mirrored {report} ms")
    for name, took in mirrored.items():
        # every request answered 200 by the primary (checked above), and as fast
        assert statistics.median(took) < base + 0.005, (name, report)
        assert max(took) < 0.45, (name, max(took))  # none waited out the copy's 500 ms

    def settled() -> bool:
        metrics = proxy.metrics()
        return all(
            sum(mirror_counts(metrics, name).values()) == n and active(metrics, name) == 0
            for name in mirrors
        )

    wait_for(settled, 10, "every copy ended")
    metrics = proxy.metrics()
    counts = {name: mirror_counts(metrics, name) for name in mirrors}
    print(f"mirror outcomes: {counts}")
    assert counts["down"] == {"failed": n}
    assert counts["failing"] == {"failed": n}
    assert set(counts["reset"]) == {"failed"}
    # copies wait out their deadline; beyond 100 in flight, they are not sent
    assert counts["slow"]["timeout"] > 0
    assert set(counts["slow"]) <= {"timeout", "skipped_overflow"}
    assert re.search(
        r'meshling_upstream_connect_failures_total\{cluster="down",reason="refused"\}', metrics
    )
    assert proxy.proc.poll() is None and "Traceback" not in proxy.logs()
    assert len(primary.received()) == 20 + n * 5


def test_mirror_percent_copies_that_share_of_requests(start_proxy, peers) -> None:
    primary = HttpPeer(b"primary").start()
    shadow = HttpPeer(b"").start()
    peers.extend([primary, shadow])
    port, admin = free_port(), free_port()
    routes = [{"name": "all", "cluster": "primary", "mirror": {"cluster": "shadow", "percent": 30}}]
    clusters = [_cluster("primary", primary.port), _cluster("shadow", shadow.port)]
    proxy = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    n = 1000
    for i in range(n):
        conn.request("GET", f"/item/{i}", headers={"host": "shop"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"primary")
    conn.close()

    def settled() -> bool:
        sent = mirror_counts(proxy.metrics(), "shadow").get("sent", 0)
        return sent == len(shadow.received()) and active(proxy.metrics(), "shadow") == 0

    time.sleep(0.2)
    wait_for(settled, 10, "copies counted")
    copies = shadow.received()
    print(f"30% of {n}: {len(copies)} copies")
    # 1000 draws of p=0.3: one standard deviation is 14.5 copies; this is four
    assert abs(len(copies) - 300) <= 60, len(copies)
    assert mirror_counts(proxy.metrics(), "shadow") == {"sent": len(copies)}
    assert len({c.path for c in copies}) == len(copies)  # each copy once
    assert all(c.headers["host"] == "shop-shadow" for c in copies)


def test_mirror_skips_bodies_over_its_limit_and_counts_them(start_proxy, peers) -> None:
    primary = HttpPeer(b"primary").start()
    shadow = HttpPeer(b"").start()
    peers.extend([primary, shadow])
    port, admin = free_port(), free_port()
    routes = [{"name": "all", "cluster": "primary", "mirror": {"cluster": "shadow"}}]
    clusters = [_cluster("primary", primary.port), _cluster("shadow", shadow.port)]
    proxy = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    big = b"b" * (BODY_LIMIT + 1)
    fits = b"f" * BODY_LIMIT
    # over the limit by Content-Length (seen in the head), and chunked (seen as it streams)
    conn.request("POST", "/big", body=big, headers={"host": "shop"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    pieces = [big[i : i + 8192] for i in range(0, len(big), 8192)]
    conn.request(
        "POST", "/big-chunked", body=iter(pieces), encode_chunked=True, headers={"host": "shop"}
    )
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    conn.request("POST", "/fits", body=fits, headers={"host": "shop"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"primary")
    conn.close()

    wait_for(lambda: len(shadow.received()) == 1, 5, "the copy that fits")
    time.sleep(0.2)
    (copy,) = shadow.received()
    assert (copy.path, copy.body) == ("/fits", fits)
    # the originals went through whole
    assert [(r.path, len(r.body)) for r in primary.received()] == [
        ("/big", len(big)),
        ("/big-chunked", len(big)),
        ("/fits", len(fits)),
    ]
    wait_for(
        lambda: (
            mirror_counts(proxy.metrics(), "shadow") == {"sent": 1, "skipped_body_too_large": 2}
        ),
        5,
        "counted",
    )
    assert active(proxy.metrics(), "shadow") == 0


def test_mirror_to_a_tls_cluster_uses_its_identity_and_keeps_its_connection(
    start_proxy, peers, tmp_path
) -> None:
    from .test_mtls import Pki

    pki = Pki(tmp_path)
    primary = HttpPeer(b"primary").start()
    shadow = HttpPeer(b"").start()
    peers.extend([primary, shadow])
    # the shadow service behind its own proxy, which takes mTLS only
    document = http_snapshot(free_port(), free_port(), [shadow.port])
    document["listeners"][0]["filter_chains"][0]["tls"] = pki.issue("api-shadow").tls(mode="strict")
    shadow_proxy = start_proxy(document)
    port, admin = free_port(), free_port()
    mirror_cluster = _cluster("shadow", shadow_proxy.port)
    mirror_cluster["tls"] = pki.issue("web").tls(identity="spiffe://default/api-shadow")
    routes = [{"name": "all", "cluster": "primary", "mirror": {"cluster": "shadow"}}]
    clusters = [_cluster("primary", primary.port), mirror_cluster]
    web = start_proxy(http_snapshot(port, admin, [], routes=routes, clusters=clusters))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    n = 50
    for i in range(n):
        conn.request("GET", f"/item/{i}", headers={"host": "shop"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"primary")
        # the copy counted is back in the pool: the next one finds its connection there
        wait_for(lambda k=i + 1: mirror_counts(web.metrics(), "shadow").get("sent") == k, 5, "copy")
    conn.close()

    assert len(shadow.received()) == n
    copies = shadow.received()
    assert {c.headers["host"] for c in copies} == {"shop-shadow"}
    # the shadow's proxy verified the copies came from web's proxy
    assert {c.headers["x-meshling-peer-identity"] for c in copies} == {"spiffe://default/web"}
    assert mirror_counts(web.metrics(), "shadow") == {"sent": n}
    # copies one after another share one connection: one handshake
    handshakes = re.search(
        r'^meshling_tls_handshakes_total\{direction="upstream",name="shadow"\} ([0-9.e+]+)$',
        web.metrics(),
        re.M,
    )
    assert handshakes is not None and float(handshakes.group(1)) == 1


def test_mirror_copies_requests_of_http2_clients(start_proxy, peers, tmp_path: Path) -> None:
    """A client speaking HTTP/2 (curl with prior knowledge): the copy goes out like
    every copy, as an HTTP/1.1 request with the stream's method, path, fields and body."""
    primary = HttpPeer(b"primary").start()
    shadow = HttpPeer(b"shadow").start()
    peers.extend([primary, shadow])
    routes = [{"name": "all", "cluster": "primary", "mirror": {"cluster": "shadow"}}]
    clusters = [_cluster("primary", primary.port), _cluster("shadow", shadow.port)]
    proxy = start_proxy(
        http_snapshot(free_port(), free_port(), [], routes=routes, clusters=clusters)
    )
    body = tmp_path / "body"
    body.write_bytes(b"h2 body")
    for args in ([], ["--data-binary", f"@{body}", "-H", "content-type: text/plain"]):
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--http2-prior-knowledge",
                *args,
                "-H",
                "x-custom: kept",
                proxy.url + "/h2/path?q=1",
            ],
            capture_output=True,
            check=False,
        )
        assert out.stdout == b"primary", out.stderr
    wait_for(lambda: len(shadow.received()) == 2, 5, "two copies")
    by_method = {copy.method: copy for copy in shadow.received()}
    get, post = by_method["GET"], by_method["POST"]
    assert (get.path, get.body) == ("/h2/path?q=1", b"")
    assert (post.path, post.body) == ("/h2/path?q=1", b"h2 body")
    assert post.headers["x-custom"] == "kept"
    assert post.headers["host"].endswith("-shadow:" + str(proxy.port))
    assert post.headers["x-request-id"] == primary.received()[-1].headers["x-request-id"]
