"""The golden metrics' view of a proxy's counters: by direction and service pair, summed
over listeners and clusters, subsets counted as their service, unknown callers named."""

from __future__ import annotations

from meshling.telemetry.metrics import Metrics


def samples(text: str, name: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


def test_golden_metrics_by_service_pair() -> None:
    metrics = Metrics()
    metrics.service = "web"
    metrics.directions = {"outbound:api": "outbound", "inbound:8080": "inbound"}
    for cluster, status in (("api", 200), ("api~version=v2", 200), ("api~version=v2", 503)):
        metrics.http_stats("outbound:api", "all", cluster).record(status, 0.01)
    metrics.http_stats("inbound:8080", "all", "local:80", "gateway").record(200, 0.02)
    metrics.http_stats("inbound:8080", "all", "local:80", "").record(404, 0.02)
    # a listener of no known direction is in the per-listener metrics only
    metrics.http_stats("admin-ish", "all", "x").record(200, 0.01)
    text = metrics.render().decode()
    golden = samples(text, "meshling_service_requests_total")
    assert golden == {
        'meshling_service_requests_total{destination_service="api",direction="outbound",'
        'route="all",source_service="web",status_class="2xx"}': 2.0,
        'meshling_service_requests_total{destination_service="api",direction="outbound",'
        'route="all",source_service="web",status_class="5xx"}': 1.0,
        'meshling_service_requests_total{destination_service="web",direction="inbound",'
        'route="all",source_service="gateway",status_class="2xx"}': 1.0,
        'meshling_service_requests_total{destination_service="web",direction="inbound",'
        'route="all",source_service="unknown",status_class="4xx"}': 1.0,
    }
    # the per-listener family sums the callers of one (listener, route, cluster)
    per_route = samples(text, "meshling_http_requests_total")
    key = (
        'meshling_http_requests_total{cluster="local:80",listener="inbound:8080",'
        'route="all",status_class="2xx"}'
    )
    assert per_route[key] == 1.0
    count = samples(text, "meshling_service_request_duration_seconds_count")
    assert (
        count[
            'meshling_service_request_duration_seconds_count{destination_service="api",'
            'direction="outbound",route="all",source_service="web"}'
        ]
        == 3.0
    )
