"""How `meshling stat` and `meshling tap` print the API's answers."""

from __future__ import annotations

import pytest

from meshling.controlplane.stat_view import parse_seconds, stat_table, tap_end, tap_line

BODY = {
    "services": [
        {
            "service": "api",
            "dataplanes": 2,
            "online": 1,
            "requests": 100,
            "rps": 1.667,
            "success_rate": 0.9,
            "p50_ms": 1.25,
            "p95_ms": 4.0,
            "p99_ms": 42.0,
        },
        {
            "service": "web",
            "dataplanes": 1,
            "online": 1,
            "requests": 0,
            "rps": 0.0,
            "success_rate": None,
            "p50_ms": None,
            "p95_ms": None,
            "p99_ms": None,
        },
    ],
    "routes": [
        {
            "service": "api",
            "route": "default",
            "requests": 100,
            "rps": 1.667,
            "success_rate": 0.9,
            "p50_ms": 1.25,
            "p95_ms": 4.0,
            "p99_ms": 42.0,
        }
    ],
}


def test_stats_view_table_by_service_and_by_route() -> None:
    assert stat_table(BODY).splitlines() == [
        "NAME   MESHED   SUCCESS   RPS      LATENCY_P50   LATENCY_P95   LATENCY_P99",
        "api    1/2      90.00%    1.7rps   1.2ms         4.0ms         42ms",
        "web    1/1      -         0.0rps   -             -             -",
    ]
    assert stat_table(BODY, "route").splitlines()[1].split() == [
        "default",
        "api",
        "90.00%",
        "1.7rps",
        "1.2ms",
        "4.0ms",
        "42ms",
    ]


def test_stats_view_tap_line_and_end() -> None:
    event = {
        "request_id": "r1",
        "dataplane": "api-1",
        "direction": "inbound",
        "source": "web",
        "destination": "api",
        "method": "GET",
        "authority": "api",
        "path": "/x",
        "status": 503,
        "duration_ms": 3.21,
        "route": "default",
        "grpc_status": None,
    }
    assert tap_line(event) == (
        "req id=r1 dp=api-1 dir=inbound src=web dst=api :method=GET :authority=api "
        ":path=/x status=503 latency=3.2ms route=default"
    )
    assert tap_line(event | {"grpc_status": 14}).endswith(" grpc-status=14")
    assert tap_end({"end": "max", "events": 5, "dropped": 1}) == (
        "tap ended: it reached --max; 5 events, 1 dropped"
    )


def test_stats_view_parse_seconds() -> None:
    assert parse_seconds("60", "--window") == 60
    assert parse_seconds("90s", "--window") == 90
    assert parse_seconds("5m", "--window") == 300
    assert parse_seconds("1h", "--duration") == 3600
    for bad in ("", "0", "-5s", "5d", "soon"):
        with pytest.raises(ValueError, match="--window: expected a duration"):
            parse_seconds(bad, "--window")
