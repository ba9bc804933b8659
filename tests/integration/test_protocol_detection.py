"""Ports declared `auto` end to end: a real proxy process tells HTTP/1 (curl, to nginx),
opaque TCP, a server-speaks-first protocol and HTTP/2 with prior knowledge apart."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Nginx, free_port, nginx_binary, wait_for

pytestmark = pytest.mark.integration

DETECT_TIMEOUT = 0.2


def auto_snapshot(port: int, admin: int, web: int, opaque: int) -> dict[str, Any]:
    """One auto listener: HTTP/1 routed to cluster `web`, everything else to `opaque`."""
    route_config = {
        "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [{"name": "all", "cluster": "web"}]}
        ]
    }
    return {
        "version": "1",
        "admin": {"port": admin},
        "listeners": [
            {
                "name": "auto",
                "port": port,
                "filter_chains": [
                    {
                        "protocol": "auto",
                        "detect_timeout": f"{int(DETECT_TIMEOUT * 1000)}ms",
                        "http": {"route_config": route_config},
                        "tcp": {"cluster": "opaque"},
                    }
                ],
            }
        ],
        "clusters": [
            {"name": "web", "endpoints": [{"address": "127.0.0.1", "port": web}]},
            {"name": "opaque", "endpoints": [{"address": "127.0.0.1", "port": opaque}]},
        ],
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition; 0 when it is absent."""
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("curl")
    assert binary, "curl is not installed"
    return subprocess.run([binary, "-sS", *args], capture_output=True, timeout=20, check=False)


class LineServer:
    """A TCP upstream that echoes what it receives, after a banner if it speaks first."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.banner:
                    conn.sendall(self.banner)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def line_server() -> Iterator[LineServer]:
    server = LineServer()
    yield server
    server.close()


@pytest.fixture
def nginx_h2() -> Iterator[int]:
    """nginx speaking cleartext HTTP/2 with prior knowledge only (h2c, no upgrade)."""
    root = Path(tempfile.mkdtemp(prefix="meshling-nginx-h2-"))
    port = free_port()
    (root / "nginx.conf").write_text(
        f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} http2;
        location = /hello {{ default_type text/plain; return 200 "hello over h2\\n"; }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(root), "-c", str(root / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 10, "nginx h2")
    yield port
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(root, ignore_errors=True)


def test_auto_port_serves_http1_on_the_http_path(
    start_proxy, nginx: Nginx, line_server: LineServer
) -> None:
    proxy = start_proxy(auto_snapshot(free_port(), free_port(), nginx.port, line_server.port))
    for _ in range(3):
        result = curl("--http1.1", proxy.url + "/hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from nginx\n"
    metrics = proxy.metrics()
    # parsed and routed: the HTTP metrics of the listener count the requests
    assert metric(metrics, "meshling_http_requests_total", listener="auto", status_class="2xx") == 3
    assert metric(metrics, "meshling_protocol_detections_total", protocol="http1") == 3
    assert metric(metrics, "meshling_protocol_detection_timeouts_total", listener="auto") == 0
    assert metric(metrics, "meshling_protocol_detection_duration_seconds_count") == 3


def test_auto_port_passes_opaque_bytes_through(
    start_proxy, nginx: Nginx, line_server: LineServer
) -> None:
    proxy = start_proxy(auto_snapshot(free_port(), free_port(), nginx.port, line_server.port))
    payload = b"\x00\x01opaque" + os.urandom(256 * 1024)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "closed early"
            received.extend(chunk)
    assert bytes(received) == payload
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_protocol_detections_total", protocol="opaque") == 1
    assert metric(metrics, "meshling_tcp_connections_total", cluster="opaque") == 1
    assert metric(metrics, "meshling_http_requests_total") == 0


def test_auto_port_serves_server_speaks_first_after_the_timeout(start_proxy, nginx: Nginx) -> None:
    banner = LineServer(banner=b"220 ready\r\n")
    try:
        proxy = start_proxy(auto_snapshot(free_port(), free_port(), nginx.port, banner.port))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            started = time.monotonic()
            assert s.recv(64) == b"220 ready\r\n"
            waited = time.monotonic() - started
            s.sendall(b"QUIT\r\n")
            assert s.recv(64) == b"QUIT\r\n"
        # the client said nothing: the proxy waited out the detection timeout, then TCP
        assert waited >= DETECT_TIMEOUT * 0.9
        assert waited < DETECT_TIMEOUT + 2
        metrics = proxy.metrics()
        assert metric(metrics, "meshling_protocol_detection_timeouts_total", listener="auto") == 1
        assert metric(metrics, "meshling_protocol_detections_total", protocol="opaque") == 1
        assert (
            metric(
                metrics,
                "meshling_protocol_detection_duration_seconds_bucket",
                listener="auto",
                le="0.1",
            )
            == 0
        )
    finally:
        banner.close()


def test_auto_port_serves_http2_prior_knowledge_with_the_http_filter(
    start_proxy, nginx: Nginx, nginx_h2: int
) -> None:
    proxy = start_proxy(auto_snapshot(free_port(), free_port(), nginx.port, nginx_h2))
    result = curl("--http2-prior-knowledge", "-w", "|%{http_version}", proxy.url + "/hello")
    assert result.returncode == 0, result.stderr
    # routed per request to the http filter's cluster (an HTTP/1.1 nginx), not passed
    # through to the tcp filter's HTTP/2 server
    assert result.stdout == b"hello from nginx\n|2"
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_protocol_detections_total", protocol="h2") == 1
    assert metric(metrics, "meshling_http_requests_total") == 1
    assert metric(metrics, "meshling_tcp_connections_total", cluster="opaque") == 0


def test_auto_port_closes_quietly_when_the_client_leaves_before_speaking(
    start_proxy, nginx: Nginx, line_server: LineServer
) -> None:
    proxy = start_proxy(auto_snapshot(free_port(), free_port(), nginx.port, line_server.port))
    socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    result = curl("--http1.1", proxy.url + "/hello")
    assert result.stdout == b"hello from nginx\n"
    metrics = proxy.metrics()
    assert metric(metrics, "meshling_protocol_detections_total", protocol="opaque") == 0
    assert metric(metrics, "meshling_protocol_detections_total", protocol="http1") == 1


def test_auto_port_reloads_to_a_declared_protocol_and_back(
    start_proxy, nginx: Nginx, line_server: LineServer
) -> None:
    document = auto_snapshot(free_port(), free_port(), nginx.port, line_server.port)
    proxy = start_proxy(document)
    chain = document["listeners"][0]["filter_chains"][0]
    for reloads, protocol in enumerate(("http", "auto"), start=1):
        document["version"] = str(reloads + 1)
        if protocol == "http":
            document["listeners"][0]["filter_chains"] = [{"http": chain["http"]}]
        else:
            document["listeners"][0]["filter_chains"] = [chain]
        proxy.write_config(document)
        wait_for(
            lambda n=reloads: (
                metric(proxy.metrics(), "meshling_config_reloads_total", result="ok") == n
            ),
            10,
            "reload",
        )
        result = curl("--http1.1", proxy.url + "/hello")
        assert result.stdout == b"hello from nginx\n", result.stderr
    # detection is back: opaque bytes reach the TCP cluster again
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"\x00ping")
        assert s.recv(64) == b"\x00ping"
