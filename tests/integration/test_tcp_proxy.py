"""L4 proxying end to end: bytes, half-close, backpressure, timeouts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from typing import Any

import pytest

from .conftest import blackhole, free_port, wait_for

pytestmark = pytest.mark.integration


def tcp_snapshot(port: int, admin: int, upstream: int, **tcp: Any) -> dict[str, Any]:
    return {
        "version": "1",
        "admin": {"port": admin},
        "listeners": [
            {"name": "tcp", "port": port, "filter_chains": [{"tcp": {"cluster": "up", **tcp}}]}
        ],
        "clusters": [
            {
                "name": "up",
                "connect_timeout": "500ms",
                "endpoints": [{"address": "127.0.0.1", "port": upstream}],
            }
        ],
    }


class EchoServer:
    """Echoes everything; on the client's FIN sends a trailer line and closes its side."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stop = False
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
            digest = hashlib.sha256()
            try:
                while data := conn.recv(65536):
                    digest.update(data)
                    conn.sendall(data)
                conn.sendall(b"|sha256=" + digest.hexdigest().encode())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the proxy closed the connection (idle timeout)

    def close(self) -> None:
        self.server.close()


def test_tcp_proxy_round_trip_and_half_close(start_proxy) -> None:
    echo = EchoServer()
    try:
        proxy = start_proxy(tcp_snapshot(free_port(), free_port(), echo.port))
        payload = os.urandom(2 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            received = bytearray()

            def reader() -> None:
                while chunk := s.recv(65536):
                    received.extend(chunk)

            t = threading.Thread(target=reader)
            t.start()
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive
            t.join(10)
        expected = payload + b"|sha256=" + hashlib.sha256(payload).hexdigest().encode()
        assert bytes(received) == expected
        metrics = proxy.metrics()
        assert 'meshling_tcp_connections_total{cluster="up",listener="tcp"} 1.0' in metrics
    finally:
        echo.close()


def test_tcp_proxy_backpressure_bounds_memory(start_proxy) -> None:
    """A reader that stops reading must stop the writer, not grow the proxy's buffers."""
    sink = socket.create_server(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(sink.accept()[0]), daemon=True).start()
    try:
        proxy = start_proxy(tcp_snapshot(free_port(), free_port(), port))
        rss_before = _rss(proxy.proc.pid)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            s.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 3
            chunk = b"x" * 65536
            while time.monotonic() < deadline and sent < 512 * 1024 * 1024:
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
            # Kernel buffers on both hops plus the proxy's high-water marks: a few MB at most.
            assert sent < 32 * 1024 * 1024, sent
            assert _rss(proxy.proc.pid) - rss_before < 32 * 1024 * 1024
    finally:
        sink.close()
        for c in held:
            c.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_tcp_proxy_connect_failure_closes_client(start_proxy) -> None:
    proxy = start_proxy(tcp_snapshot(free_port(), free_port(), free_port()))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"hello")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
    wait_for(
        lambda: (
            'meshling_upstream_connect_failures_total{cluster="up",reason="refused"} 1.0'
            in proxy.metrics()
        ),
        5,
        "failure metric",
    )


def test_tcp_proxy_idle_timeout_closes_both_sides(start_proxy) -> None:
    echo = EchoServer()
    try:
        proxy = start_proxy(tcp_snapshot(free_port(), free_port(), echo.port, idle_timeout="1s"))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=6) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            started = time.monotonic()
            try:
                rest = s.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest == b"" or rest.startswith(b"|sha256=")
            assert 0.8 < time.monotonic() - started < 4
    finally:
        echo.close()


def test_tcp_proxy_connect_timeout_closes_client(start_proxy) -> None:
    server, fillers = blackhole()
    try:
        proxy = start_proxy(tcp_snapshot(free_port(), free_port(), server.getsockname()[1]))
        started = time.monotonic()
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s,
            contextlib.suppress(ConnectionResetError),
        ):
            assert s.recv(10) == b""
        assert 0.4 < time.monotonic() - started < 3  # connect_timeout is 500ms
        assert (
            'meshling_upstream_connect_failures_total{cluster="up",reason="timeout"} 1.0'
            in proxy.metrics()
        )
    finally:
        server.close()
        for s in fillers:
            s.close()
