"""HTTP/1.1 proxying end to end: real proxy process, real curl, real nginx upstream."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import (
    Nginx,
    RecordingUpstream,
    blackhole,
    free_port,
    http_get,
    http_snapshot,
    wait_for,
)

pytestmark = pytest.mark.integration


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("curl")
    assert binary, "curl is not installed"
    return subprocess.run([binary, "-sS", *args], capture_output=True, timeout=timeout, check=False)


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_http_proxy_forwards_to_nginx_with_curl(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    result = curl("-i", proxy.url + "/hello")
    assert result.returncode == 0, result.stderr
    assert b"HTTP/1.1 200" in result.stdout
    assert result.stdout.endswith(b"hello from nginx\n")


def test_http_proxy_sets_forwarding_headers(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    out = curl(proxy.url + "/echo-headers", "-H", "X-Forwarded-For: 203.0.113.9").stdout.decode()
    assert "xff=203.0.113.9, 127.0.0.1 " in out
    assert "xfp=http " in out
    rid = out.split("rid=")[1].split()[0]
    assert len(rid) >= 16
    out2 = curl(proxy.url + "/echo-headers", "-H", "X-Request-Id: abc-123").stdout.decode()
    assert "rid=abc-123 " in out2


def test_http_proxy_streams_large_download_and_upload(
    start_proxy, nginx: Nginx, tmp_path: Path
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    out = tmp_path / "big.bin"
    result = curl("-o", str(out), proxy.url + "/big.bin")
    assert result.returncode == 0, result.stderr
    expected = (nginx.root / "www" / "big.bin").read_bytes()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(expected).digest()
    # chunked upload through the proxy, to nginx which proxies it on to itself
    upload = tmp_path / "up.bin"
    upload.write_bytes(b"x" * (3 * 1024 * 1024))
    result = curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", proxy.url + "/upload"
    )
    assert result.stdout == b"got it\n", result.stderr
    # content-length upload with Expect: 100-continue (curl sends it for large bodies)
    result = curl("-v", "--data-binary", f"@{upload}", proxy.url + "/upload")
    assert result.stdout == b"got it\n"
    assert b"100 Continue" in result.stderr


def test_http_proxy_keeps_upstream_connections_alive(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    for _ in range(30):
        assert http_get(proxy.url + "/hello")[0] == 200
    metrics = proxy.metrics()
    opened = [
        line
        for line in metrics.splitlines()
        if line.startswith('meshling_upstream_connections_total{cluster="up"}')
    ]
    assert opened and float(opened[0].split()[-1]) <= 2, opened
    assert (
        'meshling_http_requests_total{cluster="up",listener="in",route="all",status_class="2xx"} 30.0'
        in metrics
    )


def test_http_proxy_round_robins_endpoints(start_proxy) -> None:
    upstreams = [RecordingUpstream(free_port()) for _ in range(3)]
    for i, u in enumerate(upstreams):
        u.response = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n" + str(i).encode()
        u.serve()
    try:
        proxy = start_proxy(http_snapshot(free_port(), free_port(), [u.port for u in upstreams]))
        seen = [http_get(proxy.url + "/")[1] for _ in range(9)]
        assert sorted(seen) == [b"0"] * 3 + [b"1"] * 3 + [b"2"] * 3
    finally:
        for u in upstreams:
            u.close()


def test_http_proxy_routes_by_path_method_and_header(start_proxy, nginx: Nginx) -> None:
    other = RecordingUpstream(free_port())
    other.response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother"
    other.serve()
    try:
        doc = http_snapshot(
            free_port(),
            free_port(),
            [],
            routes=[
                {
                    "name": "canary",
                    "cluster": "other",
                    "match": {"headers": [{"name": "x-canary", "exact": "yes"}]},
                },
                {
                    "name": "posts",
                    "cluster": "other",
                    "match": {"methods": ["POST"], "path": {"exact": "/hello"}},
                },
                {"name": "nginx", "cluster": "nginx", "match": {"path": {"prefix": "/"}}},
            ],
            clusters=[
                {"name": "nginx", "endpoints": [{"address": "127.0.0.1", "port": nginx.port}]},
                {"name": "other", "endpoints": [{"address": "127.0.0.1", "port": other.port}]},
            ],
        )
        proxy = start_proxy(doc)
        assert curl(proxy.url + "/hello").stdout == b"hello from nginx\n"
        assert curl(proxy.url + "/hello", "-H", "X-Canary: yes").stdout == b"other"
        assert curl("-X", "POST", proxy.url + "/hello").stdout == b"other"
    finally:
        other.close()


def test_http_proxy_error_responses_name_the_reason(start_proxy) -> None:
    dead = free_port()
    doc = http_snapshot(
        free_port(),
        free_port(),
        [],
        routes=[
            {"name": "dead", "cluster": "dead", "match": {"path": {"prefix": "/dead"}}},
            {"name": "empty", "cluster": "empty", "match": {"path": {"prefix": "/empty"}}},
        ],
        clusters=[
            {"name": "dead", "endpoints": [{"address": "127.0.0.1", "port": dead}]},
            {"name": "empty", "endpoints": []},
        ],
    )
    proxy = start_proxy(doc)
    for path, status, reason in [
        ("/dead", 502, "upstream_connect_failure"),
        ("/empty", 503, "no_endpoint"),
        ("/nowhere", 404, "route_not_found"),
    ]:
        out = curl("-i", proxy.url + path).stdout
        assert out.startswith(f"HTTP/1.1 {status}".encode()), out
        assert f"x-meshling-error: {reason}".encode() in out


def test_http_proxy_times_out_slow_upstream_with_504(start_proxy) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                conn, _ = silent.accept()
                accepted.append(conn)
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        doc = http_snapshot(
            free_port(),
            free_port(),
            [port],
            routes=[{"name": "slow", "cluster": "up", "timeout": "300ms"}],
        )
        proxy = start_proxy(doc)
        started = time.monotonic()
        out = curl("-i", proxy.url + "/").stdout
        elapsed = time.monotonic() - started
        assert out.startswith(b"HTTP/1.1 504"), out
        assert b"x-meshling-error: upstream_timeout" in out
        assert 0.25 < elapsed < 2.0
        # the upstream saw its connection end: the request was cancelled
        wait_for(
            lambda: (
                bool(accepted) and accepted[0].recv(65536, socket.MSG_DONTWAIT) == b""
                if _readable(accepted[0])
                else False
            ),
            5,
            "upstream close",
        )
    finally:
        silent.close()
        for c in accepted:
            c.close()


def _readable(conn: socket.socket) -> bool:
    import select

    return bool(select.select([conn], [], [], 0)[0])


def test_http_proxy_upstream_reset_is_502(start_proxy) -> None:
    upstream = RecordingUpstream(free_port())
    upstream.response = b"HTTP/1.1 200 OK\r\ncontent-len"  # then the thread closes after 5s idle
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-len")
            conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        proxy = start_proxy(http_snapshot(free_port(), free_port(), [port]))
        out = curl("-i", proxy.url + "/").stdout
        assert out.startswith(b"HTTP/1.1 502"), out
    finally:
        server.close()


def test_http_proxy_websocket_upgrade_passthrough(start_proxy) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            assert b"upgrade: websocket" in head.lower()
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    try:
        proxy = start_proxy(http_snapshot(free_port(), free_port(), [port]))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            for word in (b"hello", b"mesh"):
                s.sendall(word)
                got = b""
                while len(got) < len(word):
                    got += s.recv(4096)
                assert got == word.upper()
    finally:
        server.close()


def test_http_proxy_pipelined_requests_answer_in_order(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    request = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /echo-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_request(proxy.port, request * 5 + last)
    assert out.count(b"HTTP/1.1 200") == 6
    assert out.count(b"hello from nginx\n") == 5
    assert out.rstrip().endswith(b"conn=")


def test_http_proxy_http10_client_gets_close_delimited_or_length(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    out = raw_request(proxy.port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in out.lower()
    assert out.endswith(b"hello from nginx\n")


def test_http_proxy_access_log_writes_json_lines(start_proxy, nginx: Nginx, tmp_path: Path) -> None:
    import json

    log = tmp_path / "access.log"
    doc = http_snapshot(
        free_port(),
        free_port(),
        [nginx.port],
        extra={
            "access_log": {
                "path": str(log),
                "fields": [
                    "method",
                    "path",
                    "status",
                    "route",
                    "bytes_sent",
                    "error",
                    "request_id",
                ],
            }
        },
    )
    proxy = start_proxy(doc)
    assert http_get(proxy.url + "/hello")[0] == 200
    assert http_get(proxy.url + "/missing-file")[0] == 404
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, 5, "access log lines")
    first, second = (json.loads(line) for line in log.read_text().splitlines()[:2])
    assert first["method"] == "GET" and first["path"] == "/hello" and first["status"] == 200
    assert first["bytes_sent"] == len(b"hello from nginx\n") and first["error"] is None
    assert first["request_id"]
    assert set(first) == {"method", "path", "status", "route", "bytes_sent", "error", "request_id"}
    assert second["status"] == 404 and second["route"] == "all"
    # rotation: the file is moved away and the proxy reopens its path
    log.rename(tmp_path / "access.log.1")
    time.sleep(1.2)
    assert http_get(proxy.url + "/hello")[0] == 200
    wait_for(lambda: log.exists() and "/hello" in log.read_text(), 5, "reopened access log")


def test_http_proxy_connect_timeout_is_502(start_proxy) -> None:
    server, fillers = blackhole()
    try:
        doc = http_snapshot(free_port(), free_port(), [])
        doc["clusters"] = [
            {
                "name": "up",
                "connect_timeout": "300ms",
                "endpoints": [{"address": "127.0.0.1", "port": server.getsockname()[1]}],
            }
        ]
        proxy = start_proxy(doc)
        started = time.monotonic()
        out = curl("-i", proxy.url + "/").stdout
        assert out.startswith(b"HTTP/1.1 502"), out
        assert b"x-meshling-error: upstream_connect_failure" in out
        assert 0.25 < time.monotonic() - started < 2
        assert (
            'meshling_upstream_connect_failures_total{cluster="up",reason="timeout"} 1.0'
            in proxy.metrics()
        )
    finally:
        server.close()
        for s in fillers:
            s.close()


def test_http_proxy_chunked_response_trailers_pass_through(start_proxy) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n"
            )
            time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    try:
        proxy = start_proxy(http_snapshot(free_port(), free_port(), [port]))
        out = raw_request(
            proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n"
        )
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n"
    finally:
        server.close()


def test_http_proxy_request_trailers_and_chunks_reach_upstream(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    out = raw_request(
        proxy.port,
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200")
    received = bytes(recording_upstream.received)
    assert b"transfer-encoding: chunked\r\n" in received
    assert received.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 9\r\n\r\n")


def test_http_proxy_h2c_upgrade_switches_to_http2(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    import h2.config
    import h2.connection
    import h2.events

    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
        )
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 101"), first
        head, _, rest = first.partition(b"\r\n\r\n")
        assert b"upgrade: h2c" in head.lower()
        s.sendall(client.data_to_send())
        # the answer to the upgrade request is stream 1, over HTTP/2
        status, ended, data = None, False, rest
        while not ended:
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            s.sendall(client.data_to_send())
            if not ended:
                data = s.recv(65536)
                assert data, "closed before the answer"
        assert status == b"200"
    received = bytes(recording_upstream.received).lower()
    assert received.startswith(b"get /a http/1.1")
    assert b"upgrade" not in received and b"http2-settings" not in received


def test_http_proxy_refused_upgrade_is_relayed_then_closed(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    recording_upstream.response = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 4\r\n\r\nnope"
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    out = raw_request(
        proxy.port,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 403"), out
    assert b"connection: close" in out.lower()
    assert out.endswith(b"nope")
