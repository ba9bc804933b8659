"""Reload, drain and admin: the proxy's lifecycle with real processes and signals."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
import urllib.request

import pytest

from .conftest import Nginx, RecordingUpstream, free_port, http_get, http_snapshot, wait_for

pytestmark = pytest.mark.integration


class Load:
    """Keep-alive clients sending requests until stopped; bounded by count and time."""

    def __init__(
        self, port: int, clients: int = 4, seconds: float = 15.0, path: str = "/hello"
    ) -> None:
        self.port = port
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: set[bytes] = set()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + seconds
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        sent = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline and sent < 100_000:
            sent += 1
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                if response.status == 200:
                    self.ok += 1
                    self.bodies.add(body)
                else:
                    self.failures.append(f"{response.status} {body!r}")
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_lifecycle_sighup_reload_under_load_fails_nothing(start_proxy, nginx: Nginx) -> None:
    other = RecordingUpstream(free_port())
    other.response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother"
    other.serve()
    try:
        port, admin = free_port(), free_port()
        docs = [
            http_snapshot(port, admin, [nginx.port], version="a"),
            http_snapshot(port, admin, [other.port], version="b"),
        ]
        proxy = start_proxy(docs[0])
        load = Load(proxy.port)
        for i in range(1, 7):
            time.sleep(0.4)
            proxy.write_config(docs[i % 2])
            proxy.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        assert load.bodies == {b"hello from nginx\n", b"other"}
        assert 'meshling_config_reloads_total{result="ok"}' in proxy.metrics()
    finally:
        other.close()


def test_lifecycle_invalid_reload_keeps_running_snapshot(start_proxy, nginx: Nginx) -> None:
    port, admin = free_port(), free_port()
    proxy = start_proxy(http_snapshot(port, admin, [nginx.port], version="good"))
    bad = http_snapshot(port, admin, [nginx.port], version="bad")
    bad["clusters"][0]["endpoints"][0]["port"] = "eighty"
    proxy.write_config(bad)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: 'meshling_config_reloads_total{result="rejected"}' in proxy.metrics(),
        5,
        "rejection",
    )
    assert http_get(proxy.url + "/hello") == (200, b"hello from nginx\n")
    status, body = http_get(proxy.admin + "/config")
    assert status == 200 and b'"version": "good"' in body
    assert "clusters[0].endpoints[0].port: expected an integer" in proxy.logs()


def test_lifecycle_file_change_reloads_without_signal(start_proxy, nginx: Nginx) -> None:
    port, admin = free_port(), free_port()
    proxy = start_proxy(http_snapshot(port, admin, [nginx.port], version="v1"))
    proxy.write_config(http_snapshot(port, admin, [nginx.port], version="v2"))
    wait_for(
        lambda: b'"version": "v2"' in http_get(proxy.admin + "/config")[1], 5, "file watch reload"
    )


def test_lifecycle_sigterm_drains_in_flight_requests(start_proxy) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def slow_upstream() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            time.sleep(1.0)  # the request is in flight while the proxy is told to stop
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")

    threading.Thread(target=slow_upstream, daemon=True).start()
    try:
        proxy = start_proxy(http_snapshot(free_port(), free_port(), [port]))
        result: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: result.append(http_get(proxy.url + "/", timeout=5)))
        t.start()
        time.sleep(0.3)
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # no longer accepting
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        t.join(5)
        assert result == [(200, b"slow")]
        assert proxy.proc.wait(10) == 0
    finally:
        server.close()


def test_lifecycle_admin_endpoints(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    assert http_get(proxy.admin + "/live")[0] == 200
    assert http_get(proxy.admin + "/nope")[0] == 404
    # drain needs POST and the token
    assert http_get(proxy.admin + "/drain")[0] == 405
    request = urllib.request.Request(proxy.admin + "/drain", method="POST")
    try:
        urllib.request.urlopen(request, timeout=2)
        raise AssertionError("drain without a token must be refused")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    assert proxy.proc.poll() is None
    request.add_header("Authorization", "Bearer secret")
    with urllib.request.urlopen(request, timeout=2) as response:
        assert response.status == 202
    assert proxy.proc.wait(10) == 0


def test_lifecycle_keepalive_clients_closed_on_drain(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/hello")
    assert conn.getresponse().read() == b"hello from nginx\n"
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 3, "an idle keep-alive connection must not hold the drain"
    conn.close()
