"""Real HTTP upstreams whose behaviour a test changes while they run: status, latency,
health-check answer. Each answers with its own port in the body, so a test sees which
endpoint served a request.

Used by the CircuitBreaker, outlier detection, HealthCheck and LoadBalancing tests;
`serve` and `answer` also by the upstreams of the control-plane tests.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve(handle: Callable[[BaseHTTPRequestHandler], None]) -> ThreadingHTTPServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 answering every GET with `handle(request)`,
    serving until `shutdown()`; `server_close()` then frees its port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def answer(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """A complete response with a content-length, so the connection can be kept alive."""
    request.send_response(status)
    request.send_header("content-length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


class Upstream:
    """A threaded HTTP/1.1 server on 127.0.0.1: every request but the health path is
    answered with `status` after `delay` seconds; the health path with `health_status`."""

    def __init__(self, health_path: str = "/healthz") -> None:
        self.status = 200
        self.delay = 0.0
        self.health_status = 200
        self.health_path = health_path
        self.hits = 0
        self.health_hits = 0
        self.active = 0
        self.lock = threading.Lock()
        self.server = serve(self.handle)
        self.port = int(self.server.server_address[1])

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        if request.path == self.health_path:
            with self.lock:
                self.health_hits += 1
            status = self.health_status
        else:
            with self.lock:
                self.hits += 1
                self.active += 1
            try:
                if self.delay:
                    time.sleep(self.delay)
            finally:
                with self.lock:
                    self.active -= 1
            status = self.status
        answer(request, status, b"%d\n" % self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(
    port: int, path: str = "/", headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, str, dict[str, str]]:
    """One request on a new connection: status, body, headers (lower-case names)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and rest.rstrip("}") == want:
            return float(value)
    return 0.0
