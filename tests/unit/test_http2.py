"""The sans-I/O parts of HTTP/2 proxying: request heads, field translation, gRPC rules
and the abuse budgets, driven by a fake clock."""

from __future__ import annotations

import pytest

from meshling.http2 import grpc
from meshling.http2.guard import FloodGuard
from meshling.http2.headers import HeaderError, request_head, response_fields, to_http2
from meshling.snapshot.model import Http2Limits

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api"), (b":path", b"/a?b=1")]


def test_request_head_splits_pseudo_fields_and_joins_cookies() -> None:
    head = request_head([*BASE, (b"cookie", b"a=1"), (b"x-y", b"z"), (b"cookie", b"b=2")])
    assert (head.method, head.authority, head.path, head.query) == (b"GET", b"api", b"/a", b"b=1")
    assert head.headers == [(b"x-y", b"z"), (b"cookie", b"a=1; b=2")]
    assert head.target == b"/a?b=1"
    assert not head.grpc


def test_request_head_takes_host_without_authority_and_sees_grpc() -> None:
    block = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/s/M"),
        (b"host", b"svc"),
        (b"content-type", b"application/grpc+proto"),
        (b"content-length", b"5"),
    ]
    head = request_head(block)
    assert head.authority == b"svc" and head.grpc and head.content_length == 5


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (BASE[1:], "missing :method"),
        ([(b":method", b"GET"), (b":scheme", b"http")], "missing :path or :scheme"),
        ([(b":method", b"CONNECT"), (b":authority", b"x:1")], "CONNECT not supported"),
        ([*BASE[:3], (b":path", b"nope")], "invalid :path"),
        ([*BASE, (b":protocol", b"websocket")], "pseudo-header :protocol not allowed"),
        ([*BASE, (b"content-length", b"x")], "invalid content-length"),
        ([*BASE, (b"content-length", b"1"), (b"content-length", b"1")], "invalid content-length"),
    ],
)
def test_request_head_refuses(block: list[tuple[bytes, bytes]], reason: str) -> None:
    with pytest.raises(HeaderError) as err:
        request_head(block)
    assert err.value.reason == reason


def test_to_http2_drops_connection_specific_fields_but_keeps_te_trailers() -> None:
    fields = [
        (b"connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"te", b"gzip"),
        (b"transfer-encoding", b"chunked"),
        (b"host", b"x"),
        (b"x-a", b"1"),
    ]
    assert to_http2(fields) == [(b"te", b"trailers"), (b"x-a", b"1")]


def test_response_fields() -> None:
    assert response_fields([(b":status", b"204"), (b"x", b"1")]) == (204, [(b"x", b"1")])
    assert response_fields([(b":status", b"bad")])[0] == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"250m", 0.25),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"5u", 5e-6),
        (b"7n", 7e-9),
        (b"123456789S", None),
        (b"S", None),
        (b"1x", None),
        (b"-1S", None),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float | None) -> None:
    assert grpc.parse_timeout(value) == (pytest.approx(seconds) if seconds else None)


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (404, "route_not_found", grpc.UNIMPLEMENTED),
        (503, "no_endpoint", grpc.UNAVAILABLE),
        (502, "upstream_reset", grpc.UNAVAILABLE),
        (504, "upstream_timeout", grpc.DEADLINE_EXCEEDED),
        (403, "permission_denied", grpc.PERMISSION_DENIED),
        (429, "rate_limited", grpc.UNAVAILABLE),
        (400, "bad", grpc.INTERNAL),
        (418, "teapot", grpc.UNKNOWN),
    ],
)
def test_local_reply_status(status: int, reason: str, code: int) -> None:
    block = grpc.local_reply(status, reason)
    assert (b":status", b"200") in block
    assert grpc.status_of(block) == code
    assert (b"x-meshling-error", reason.encode()) in block


def test_status_of() -> None:
    assert grpc.status_of([(b"grpc-status", b"14")]) == 14
    assert grpc.status_of([(b"grpc-status", b"x")]) is None
    assert grpc.status_of([]) is None


def test_flood_guard_counts_per_window() -> None:
    guard = FloodGuard(Http2Limits(max_resets=3, max_control_frames=5, window=10.0), now=0.0)
    for _ in range(4):
        guard.opened_stream(1.0)
    assert not any(guard.reset(1.0) for _ in range(3))
    assert guard.reset(2.0) and guard.tripped == "rapid_reset"
    guard = FloodGuard(Http2Limits(max_resets=3, max_control_frames=5, window=10.0), now=0.0)
    assert not guard.control(1.0, 5)
    # a new window starts the count again
    assert not guard.control(11.0, 5)
    assert guard.control(12.0) and guard.tripped == "control_frame_flood"


def test_flood_guard_spares_a_peer_that_cancels_among_many_streams() -> None:
    limits = Http2Limits(max_resets=3, max_control_frames=5, window=10.0)
    guard = FloodGuard(limits, now=0.0)
    for _ in range(20):
        guard.opened_stream(1.0)
    # 5 cancelled out of 20: over max_resets, but not most of what the client opened
    assert not any(guard.reset(2.0) for _ in range(5))
    assert not any(guard.reset(2.0) for _ in range(5))
    assert guard.reset(2.0)  # 11 of 20: most of them
