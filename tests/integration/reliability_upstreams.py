"""Real HTTP upstreams whose behaviour a test changes while they run: status, latency,
health-check answer. Each answers with its own port in the body, so a test sees which
endpoint served a request.

Used by the CircuitBreaker, outlier detection, HealthCheck and LoadBalancing tests.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                upstream.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
        body = b"%d\n" % self.port
        request.send_response(status)
        request.send_header("content-length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

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
