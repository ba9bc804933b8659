"""FaultInjection on real inbounds: delays measured, aborts with a status, resets seen by
the client (HTTP and TCP), a paced response measured, percentages and header triggers."""

from __future__ import annotations

import http.client
import socket
import time
from typing import Any

import pytest
import yaml

from meshling.policies.fault_injection import fragment, parse_resource

from .conftest import Nginx, free_port, http_snapshot
from .test_mtls import metric
from .test_tcp_proxy import EchoServer, tcp_snapshot

pytestmark = pytest.mark.integration


def faulty(nginx_port: int, **conf: Any) -> dict[str, Any]:
    doc = http_snapshot(free_port(), free_port(), [nginx_port])
    rule = {"name": "chaos", "identities": ["*"], **conf}
    doc["listeners"][0]["filter_chains"][0]["fault"] = {"rules": [rule]}
    return doc


def get(
    port: int, path: str = "/hello", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.monotonic() - started
    conn.close()
    return response, body, elapsed


def test_fault_delay_holds_the_request(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(faulty(nginx.port, delay={"percentage": 100, "value": "300ms"}))
    response, body, elapsed = get(proxy.port)
    assert (response.status, body) == (200, b"hello from nginx\n")
    # on the 10 ms deadline wheel: never early, at most a tick or two late
    assert 0.3 <= elapsed < 0.45, elapsed
    assert (
        metric(
            proxy.metrics(),
            'meshling_faults_injected_total{fault="delay",listener="in",rule="chaos"}',
        )
        == 1
    )


def test_fault_delay_keeps_the_request_body_and_pipelined_requests(
    start_proxy, nginx: Nginx
) -> None:
    proxy = start_proxy(faulty(nginx.port, delay={"percentage": 100, "value": "100ms"}))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        body = b"x" * 5000
        s.sendall(
            b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 5000\r\n\r\n"
            + body
            + b"GET /hello HTTP/1.1\r\nhost: a\r\n\r\n"
        )
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"nginx\n"):
            chunk = s.recv(65536)
            assert chunk, received
            received += chunk
    assert b"got it" in received and b"hello from nginx" in received


def test_fault_abort_answers_with_the_status(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(faulty(nginx.port, abort={"percentage": 100, "http_status": 503}))
    response, body, _ = get(proxy.port)
    assert response.status == 503
    assert response.getheader("x-meshling-error") == "fault_abort"
    assert body == b"fault abort\n"
    assert metric(proxy.metrics(), "meshling_upstream_connections_total") == 0


def test_fault_abort_percentage_is_about_right(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(faulty(nginx.port, abort={"percentage": 30, "http_status": 500}))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    aborted = 0
    for _ in range(400):
        conn.request("GET", "/hello")
        response = conn.getresponse()
        response.read()
        aborted += response.status == 500
    conn.close()
    # binomial(400, 0.3): mean 120, standard deviation about 9
    assert 84 <= aborted <= 156, aborted


def test_fault_tcp_reset_on_an_http_inbound(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(faulty(nginx.port, abort={"percentage": 100, "tcp_reset": True}))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nhost: a\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(1024)
    assert (
        metric(
            proxy.metrics(),
            'meshling_faults_injected_total{fault="reset",listener="in",rule="chaos"}',
        )
        == 1
    )


def test_fault_tcp_inbound_abort_resets_and_delay_holds(start_proxy) -> None:
    echo = EchoServer()
    try:
        doc = tcp_snapshot(free_port(), free_port(), echo.port)
        chain = doc["listeners"][0]["filter_chains"][0]
        chain["fault"] = {
            "rules": [
                {"name": "db", "identities": ["*"], "abort": {"percentage": 100, "tcp_reset": True}}
            ]
        }
        proxy = start_proxy(doc)
        # the reset may come as soon as the proxy accepts: even before connect() returns
        with (
            pytest.raises(ConnectionResetError),
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s,
        ):
            s.sendall(b"ping")
            s.recv(16)
        chain["fault"] = {
            "rules": [
                {"name": "db", "identities": ["*"], "delay": {"percentage": 100, "value": 0.25}}
            ]
        }
        doc["version"] = "2"
        proxy.write_config(doc)
        deadline = time.monotonic() + 10
        while 'version="2"' not in proxy.metrics():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
            # held for the delay, then passed on (the upper bound allows a loaded machine)
            assert 0.25 <= time.monotonic() - started < 0.75
    finally:
        echo.close()


def test_fault_response_bandwidth_paces_the_body(start_proxy, nginx: Nginx) -> None:
    # 4 MiB at 40 Mbit/s (5 MB/s): about 0.84 s, where unpaced it takes milliseconds
    proxy = start_proxy(faulty(nginx.port, response_bandwidth={"limit": "40mbps"}))
    response, body, elapsed = get(proxy.port, "/big.bin")
    assert response.status == 200 and len(body) == 4 * 1024 * 1024
    expected = len(body) / 5_000_000
    assert expected * 0.9 <= elapsed <= expected * 1.25, elapsed
    # the next response on a fresh connection is paced too (100%), a small one is quick
    _, small, quick = get(proxy.port)
    assert small == b"hello from nginx\n" and quick < 0.2


def test_fault_tcp_bandwidth_paces_what_the_client_receives(start_proxy) -> None:
    echo = EchoServer()
    try:
        doc = tcp_snapshot(free_port(), free_port(), echo.port)
        doc["listeners"][0]["filter_chains"][0]["fault"] = {
            "rules": [{"name": "db", "identities": ["*"], "response_bandwidth": {"limit": "8mbps"}}]
        }
        proxy = start_proxy(doc)
        payload = b"y" * 500_000  # at 1 MB/s: half a second
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            elapsed = time.monotonic() - started
        assert received.startswith(payload)
        assert 0.45 <= elapsed <= 0.7, elapsed
    finally:
        echo.close()


RESOURCE = """
kind: FaultInjection
metadata: {name: api-chaos, mesh: default}
spec:
  sources: [{service: "*"}]
  destinations: [{service: api}]
  conf:
    abort: {percentage: 100, http_status: 418}
    header: {name: x-chaos, value: "on"}
"""


def test_fault_header_trigger_limits_faults_to_marked_requests(start_proxy, nginx: Nginx) -> None:
    resource = parse_resource(yaml.safe_load(RESOURCE), "fault.yaml")
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["listeners"][0]["filter_chains"][0]["fault"] = fragment([resource], "default")
    proxy = start_proxy(doc)
    assert get(proxy.port)[0].status == 200
    assert get(proxy.port, headers={"x-chaos": "off"})[0].status == 200
    assert get(proxy.port, headers={"x-chaos": "on"})[0].status == 418
