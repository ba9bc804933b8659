"""Malformed requests: the right 4xx, a closed connection, and nothing forwarded upstream."""

from __future__ import annotations

import socket
import time

import pytest

from .conftest import RecordingUpstream, free_port, http_snapshot

pytestmark = pytest.mark.integration

H = b"Host: example\r\n"

CASES = [
    (
        "cl_and_te",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "two_cl",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    ("cl_list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl_sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("te_unknown", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    ("te_disguised", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    ("te_obs_fold", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n", 400),
    (
        "bad_chunk",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    ("bare_lf", b"GET / HTTP/1.1\n" + H + b"\n", 400),
    ("nul_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("cr_in_value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("obs_fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n  b\r\n\r\n", 400),
    ("space_before_colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    ("no_host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two_hosts", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("long_line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    (
        "big_headers",
        b"GET / HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        + b"\r\n",
        431,
    ),
    (
        "many_headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n",
        431,
    ),
    ("bad_version", b"GET / HTTP/1.7\r\n" + H + b"\r\n", 505),
    ("nul_in_path", b"GET /a%00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("escape_root", b"GET /../../etc/passwd HTTP/1.1\r\n" + H + b"\r\n", None),
]


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


@pytest.mark.parametrize(("name", "data", "status"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request_rejected_and_not_forwarded(
    start_proxy, recording_upstream: RecordingUpstream, name: str, data: bytes, status: int | None
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(data)
        out = read_all(s)
    if status is None:
        # Dot segments above the root are removed, not forwarded: /etc/passwd is what arrives.
        assert out.startswith(b"HTTP/1.1 200"), out
        assert b"GET /etc/passwd HTTP/1.1" in bytes(recording_upstream.received)
        return
    assert out.startswith(f"HTTP/1.1 {status} ".encode()), out
    assert b"connection: close" in out.lower()
    assert b"x-meshling-error:" in out
    time.sleep(0.1)
    assert bytes(recording_upstream.received) == b"", "nothing may reach the upstream"
    metrics = proxy.metrics()
    assert f'meshling_http_protocol_errors_total{{listener="in",status="{status}"}} 1.0' in metrics


def test_malformed_slow_client_gets_408_without_starving_others(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    doc = http_snapshot(
        free_port(),
        free_port(),
        [recording_upstream.port],
        http={"limits": {"header_timeout": "1s"}},
    )
    proxy = start_proxy(doc)
    slow = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    slow.sendall(b"GET / HTTP/1.1\r\nHost: slo")
    # Meanwhile another client is served at once.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as fast:
        fast.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(fast).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    out = read_all(slow)
    slow.close()
    assert out.startswith(b"HTTP/1.1 408"), out
    assert time.monotonic() - started < 4
    assert b"GET / HTTP/1.1\r\nHost: slo" not in bytes(recording_upstream.received)


def test_malformed_internal_headers_are_stripped(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Meshling-Identity: spiffe://evil\r\n"
            b"Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\r\n"
        )
        assert read_all(s).startswith(b"HTTP/1.1 200")
    received = bytes(recording_upstream.received).lower()
    assert b"x-meshling-identity" not in received
    assert b"x-secret" not in received
    assert b"keep-alive:" not in received


def test_malformed_huge_header_stream_is_cut_at_the_limit(
    start_proxy, recording_upstream: RecordingUpstream
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [recording_upstream.port]))
    sent = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(1000):  # up to 64 MB, but the proxy must stop us long before
                s.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = read_all(s)
    assert sent < 8 * 1024 * 1024
    assert time.monotonic() - started < 5
    assert out == b"" or out.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize(
    ("policy", "expect_status", "forwarded"),
    [
        ("keep", 200, b"GET /a%2Fb/c HTTP/1.1"),
        ("unescape", 200, b"GET /a/b/c HTTP/1.1"),
        ("reject", 400, None),
    ],
)
def test_malformed_escaped_slash_policy(
    start_proxy,
    recording_upstream: RecordingUpstream,
    policy: str,
    expect_status: int,
    forwarded: bytes | None,
) -> None:
    doc = http_snapshot(
        free_port(), free_port(), [recording_upstream.port], http={"escaped_slashes": policy}
    )
    proxy = start_proxy(doc)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /a%2fb//./c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = read_all(s)
    assert out.startswith(f"HTTP/1.1 {expect_status} ".encode()), out
    received = bytes(recording_upstream.received)
    if forwarded is None:
        assert received == b""
    else:
        assert received.startswith(forwarded + b"\r\n"), received[:80]
