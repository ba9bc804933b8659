"""The control plane's golden-metric aggregation, on a fake clock: windows, counter resets,
quantiles, and the rows of `GET /api/v1/stats`."""

from __future__ import annotations

from typing import Any

import pytest

from meshling.configstream.messages import Stats, StatsRow
from meshling.controlplane.telemetry import (
    COARSE,
    DENSE,
    MIN_SPACING,
    Counts,
    Telemetry,
    quantile,
)

BOUNDS = (0.001, 0.01, 0.1, 1.0)
DP = ("default", "api-1")
SERIES = ("inbound", "web", "api", "default")


def row(
    ok: int,
    failed: int = 0,
    buckets: tuple[int, ...] | None = None,
    *,
    direction: str = "inbound",
    source: str = "web",
    destination: str = "api",
    route: str = "default",
) -> StatsRow:
    if buckets is None:
        buckets = (0, ok + failed, 0, 0, 0)  # all between 1 and 10 ms
    return StatsRow(
        direction, source, destination, route, (0, ok, 0, 0, failed), buckets, 0.005 * (ok + failed)
    )


def stats(*rows: StatsRow, started: float = 1000.0) -> Stats:
    return Stats(started, BOUNDS, rows)


def test_stats_quantile_interpolates_within_the_bucket() -> None:
    # 10 values in (0.01, 0.1]: the median is halfway through that bucket
    assert quantile(0.5, BOUNDS, [0, 0, 10, 0, 0]) == pytest.approx(0.055)
    # 90 fast, 10 slow: p95 is in the slow bucket, p50 in the fast one
    assert quantile(0.5, BOUNDS, [90, 0, 0, 10, 0]) == pytest.approx(0.001 * 50 / 90)
    assert quantile(0.95, BOUNDS, [90, 0, 0, 10, 0]) == pytest.approx(0.1 + 0.9 * 5 / 10)
    # a rank in the unbounded bucket answers the highest bound, as histogram_quantile does
    assert quantile(0.99, BOUNDS, [1, 0, 0, 0, 99]) == 1.0
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0, 0]) is None


def test_stats_increase_over_a_window_uses_the_sample_before_it_as_base() -> None:
    t = Telemetry()
    t.record(DP, "api", stats(row(0)), now=0.0)
    t.record(DP, "api", stats(row(100)), now=100.0)
    t.record(DP, "api", stats(row(150, 10)), now=200.0)
    # window 60 at 200: the base is the sample at 100 (the newest at or before 140)
    counts = t.increase(DP, 60, now=200.0)[("inbound", "web", "api", "default")]
    assert counts.total == 60 and counts.failures == 10
    # window 300 covers everything since the first sample
    assert t.increase(DP, 300, now=200.0)[("inbound", "web", "api", "default")].total == 160
    # nothing new since 200: a window ending later than the last sample's change is empty
    t.record(DP, "api", stats(row(150, 10)), now=260.0)
    assert t.increase(DP, 30, now=260.0) == {}


def test_stats_counter_reset_counts_the_new_process_from_zero() -> None:
    t = Telemetry()
    t.record(DP, "api", stats(row(500), started=1000.0), now=0.0)
    t.record(DP, "api", stats(row(520), started=1000.0), now=5.0)
    # the proxy restarted: a new start time, counters from zero
    t.record(DP, "api", stats(row(7), started=2000.0), now=10.0)
    t.record(DP, "api", stats(row(30), started=2000.0), now=15.0)
    assert t.increase(DP, 60, now=15.0)[("inbound", "web", "api", "default")].total == 20 + 7 + 23
    # counts that went down with the same start time are a reset too
    t.record(DP, "api", stats(row(4), started=2000.0), now=20.0)
    assert t.increase(DP, 60, now=20.0)[("inbound", "web", "api", "default")].total == 54


def test_stats_samples_are_bounded_by_retention_and_spacing() -> None:
    t = Telemetry(retention=900.0)
    for i in range(2000):
        t.record(DP, "api", stats(row(i)), now=float(i))
    ring = t._rings[DP]
    samples = ring.samples()
    # every sample of the last DENSE seconds, one every COARSE seconds before
    assert len(ring.recent) == DENSE + 1
    assert len(samples) <= DENSE + 1 + (900 - DENSE) / COARSE + 2
    assert samples[0].at <= 1999 - 900 < samples[1].at
    # thinning loses no request: a window's increase is exact up to its rounded start
    assert t.increase(DP, 60, now=1999.0)[SERIES].total == 60
    assert t.increase(DP, 600, now=1999.0)[SERIES].total in range(600, 600 + int(COARSE))
    # samples closer than MIN_SPACING replace the last one
    t.record(DP, "api", stats(row(2000)), now=1999.0 + MIN_SPACING / 2)
    assert [s.at for s in ring.recent][-2:] == [1998.0, 1999.0 + MIN_SPACING / 2]
    assert ring.recent[-1].rows[SERIES].requests[1] == 2000


def test_stats_thinning_keeps_the_last_sample_of_each_process() -> None:
    t = Telemetry()
    started = 1.0
    count = 0
    for i in range(600):
        if i % 7 == 0:  # a restart every 7 seconds, each process counting 3 a second
            started, count = started + 1, 0
        count += 3
        t.record(DP, "api", stats(row(count), started=started), now=float(i))
    # thinned beyond DENSE, and yet every request after the first sample is counted
    assert t.increase(DP, 900, now=599.0)[SERIES].total == 3 * 600 - 3
    # a window's start is rounded to a kept sample at most COARSE seconds before it
    assert 3 * 500 <= t.increase(DP, 500, now=599.0)[SERIES].total <= 3 * (500 + COARSE)


def test_stats_a_dataplane_that_went_away_counts_until_its_samples_age_out() -> None:
    t = Telemetry(retention=100.0)
    t.record(DP, "api", stats(row(0)), now=0.0)
    t.record(DP, "api", stats(row(40)), now=5.0)
    t.disconnected(DP)
    registered = {"api": (1, 0)}
    body = t.summary("default", 60, 30.0, registered)
    assert body["services"][0]["requests"] == 40
    t.prune(now=200.0)
    assert t.dataplanes("default") == {}
    body = t.summary("default", 60, 200.0, registered)
    assert body["services"] == [
        {
            "service": "api",
            "dataplanes": 1,
            "online": 0,
            "requests": 0,
            "rps": 0.0,
            "success_rate": None,
            "p50_ms": None,
            "p95_ms": None,
            "p99_ms": None,
        }
    ]


def row_of(body: dict[str, Any], service: str) -> dict[str, Any]:
    (found,) = [s for s in body["services"] if s["service"] == service]
    return dict(found)


def test_stats_summary_rows_come_from_inbound_counters() -> None:
    t = Telemetry()
    api2 = ("default", "api-2")
    web = ("default", "web-1")
    for dp in (DP, api2):
        t.record(dp, "api", stats(row(0), row(0, source="unknown")), now=0.0)
    t.record(DP, "api", stats(row(60, 10), row(5, source="unknown")), now=10.0)
    t.record(api2, "api", stats(row(30), row(0, source="unknown")), now=10.0)
    # the caller's outbound view is not counted again
    t.record(web, "web", stats(row(0, direction="outbound", source="web")), now=0.0)
    t.record(web, "web", stats(row(99, direction="outbound", source="web")), now=10.0)
    registered = {"api": (2, 2), "web": (1, 1), "db": (1, 0)}
    body = t.summary("default", 10, 10.0, registered)
    services = {s["service"]: s for s in body["services"]}
    assert list(services) == ["api", "db", "web"]
    api = services["api"]
    assert (api["dataplanes"], api["online"], api["requests"]) == (2, 2, 105)
    assert api["rps"] == 10.5
    assert api["success_rate"] == pytest.approx(95 / 105, abs=1e-4)
    assert 1.0 <= api["p50_ms"] <= 10.0 and api["p99_ms"] <= 10.0
    assert services["web"]["requests"] == 0 and services["db"]["success_rate"] is None
    assert body["routes"] == [
        {"service": "api", "route": "default"}
        | {k: api[k] for k in ("requests", "rps", "success_rate", "p50_ms", "p95_ms", "p99_ms")}
    ]
    edges = {(e["source"], e["destination"]): e for e in body["edges"]}
    assert edges[("web", "api")]["requests"] == 100
    assert edges[("web", "api")]["success_rate"] == 0.9
    assert edges[("unknown", "api")]["requests"] == 5
    # a window longer than the samples: the rate is over the 10 seconds they cover
    assert row_of(t.summary("default", 60, 10.0, registered), "api")["rps"] == 10.5
    assert row_of(t.summary("default", 60, 10.0, registered), "api")["requests"] == 105
    # one service: its rows, and the edges it is on
    only = t.summary("default", 10, 10.0, registered, service="web")
    assert [s["service"] for s in only["services"]] == ["web"]
    assert only["routes"] == []
    assert [(e["source"], e["destination"]) for e in only["edges"]] == [("web", "api")]
    # another mesh sees none of it
    assert t.summary("other", 10, 10.0, {})["services"] == []


def test_stats_counts_of_other_bounds_count_requests_but_not_latency() -> None:
    counts = Counts()
    counts.add((0, 10, 0, 0, 0), BOUNDS, (0, 10, 0, 0, 0), 0.05, None)
    counts.add((0, 10, 0, 0, 0), (0.5,), (10, 0), 1.0, {"0": 3})
    assert counts.total == 20
    assert counts.buckets == [0, 10, 0, 0, 0]
    assert counts.grpc == {"0": 3}


def test_stats_a_proxy_speaks_only_for_its_own_service() -> None:
    t = Telemetry()
    web = ("default", "web-1")
    # web-1 claims inbound requests to api, and outbound calls made by db: both ignored
    lies = (row(0, destination="api"), row(0, direction="outbound", source="db"))
    t.record(web, "web", stats(*lies, row(0, destination="web")), now=0.0)
    lies = (row(50, destination="api"), row(50, direction="outbound", source="db"))
    t.record(web, "web", stats(*lies, row(7, destination="web")), now=5.0)
    assert set(t.increase(web, 60, now=5.0)) == {("inbound", "web", "web", "default")}
    body = t.summary("default", 60, 5.0, {})
    assert [(s["service"], s["requests"]) for s in body["services"]] == [("web", 7)]


def test_stats_rings_of_dataplanes_gone_for_good_are_dropped_without_a_query() -> None:
    t = Telemetry(retention=100.0)
    gone = ("default", "api-9")
    t.record(gone, "api", stats(row(1)), now=0.0)
    t.disconnected(gone)
    for i in range(30):
        t.record(DP, "api", stats(row(i)), now=100.0 + i * 5)
    assert t.dataplanes("default") == {"api-1": "api"}
