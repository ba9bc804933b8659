"""Golden metrics scraped by a real Prometheus: two proxies over mTLS (web's outbound,
api's inbound) carry a known mix of requests, Prometheus scrapes both admin listeners, and
PromQL answers the success rate and the p99 latency per service pair with the values the
proxies' own counters give."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import Nginx, free_port, http_get, http_snapshot, wait_for
from .test_mtls import Pki

pytestmark = pytest.mark.integration


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("prometheus is not installed: run scripts/install-peers")
    return found


class Prometheus:
    """`prometheus` on 127.0.0.1 with a temporary config and storage, stopped by PID."""

    def __init__(self, root: Path, targets: list[int]) -> None:
        self.port = free_port()
        config = root / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "meshling",
                            "static_configs": [
                                {"targets": [f"127.0.0.1:{port}" for port in targets]}
                            ],
                        }
                    ],
                }
            )
        )
        self.log = (root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def value(self, promql: str) -> float | None:
        try:
            result = self.query(promql)
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_prometheus_answers_success_rate_and_p99_per_service(
    start_proxy, pki: Pki, nginx: Nginx, tmp_path: Path
) -> None:
    inbound = http_snapshot(free_port(), free_port(), [nginx.port])
    inbound["service"] = "api"
    inbound["listeners"][0]["direction"] = "inbound"
    inbound["listeners"][0]["filter_chains"][0]["tls"] = pki.issue("api").tls()
    api = start_proxy(inbound)
    routes = [
        {"name": "broken", "match": {"path": {"prefix": "/broken"}}, "cluster": "nowhere"},
        {"name": "all", "cluster": "api"},
    ]
    clusters = [
        {
            "name": "api",
            "endpoints": [{"address": "127.0.0.1", "port": api.port}],
            "tls": pki.issue("web").tls(identity="spiffe://default/api"),
        },
        {"name": "nowhere", "endpoints": [{"address": "127.0.0.1", "port": free_port()}]},
    ]
    outbound = http_snapshot(free_port(), free_port(), [], routes=routes, clusters=clusters)
    outbound["service"] = "web"
    outbound["listeners"][0]["direction"] = "outbound"
    web = start_proxy(outbound)

    # 160 answered (nginx: 120 x 200, 40 x 404) and 40 failed (502) calls of web
    for path, count in (("/hello", 120), ("/missing", 40), ("/broken", 40)):
        for _ in range(count):
            http_get(web.url + path)

    prometheus = Prometheus(tmp_path, [web.admin_port, api.admin_port])
    try:
        pair = 'source_service="web",destination_service="api"'
        total = f'sum(meshling_service_requests_total{{direction="outbound",{pair}}})'
        wait_for(lambda: prometheus.value(total) == 160, 30, "Prometheus scraped web's proxy")
        # success rate, as Linkerd counts it: not a 5xx
        outbound_all = 'meshling_service_requests_total{direction="outbound",source_service="web"}'
        success = prometheus.value(
            f'sum(meshling_service_requests_total{{direction="outbound",source_service="web",'
            f'status_class!="5xx"}}) / sum({outbound_all})'
        )
        assert success == pytest.approx(160 / 200)
        # per destination: "nowhere" is a service of its own, all of it failing
        by_destination = {
            r["metric"]["destination_service"]: float(r["value"][1])
            for r in prometheus.query(f"sum by (destination_service) ({outbound_all})")
        }
        assert by_destination == {"api": 160.0, "nowhere": 40.0}
        # api's proxy sees the same calls coming in, from web (its verified identity)
        inbound_total = f'sum(meshling_service_requests_total{{direction="inbound",{pair}}})'
        wait_for(lambda: prometheus.value(inbound_total) == 160, 30, "api's proxy scraped")
        # p99 latency of web -> api, against the quantile of the proxy's own buckets
        p99 = prometheus.value(
            "histogram_quantile(0.99, sum by (le) (meshling_service_request_duration_seconds_bucket"
            f'{{direction="outbound",{pair}}}))'
        )
        assert p99 is not None and p99 == pytest.approx(
            own_quantile(web.metrics(), 0.99, pair), rel=1e-6
        )
        assert 0 < p99 < 1.0
        # every query of the shipped Grafana dashboard is valid PromQL on these metrics,
        # and the golden panels find data
        for title, expr in dashboard_queries():
            prometheus.query(expr)
            if "service_requests" in expr and "inbound" not in expr:
                # rate() needs two scrapes in its window
                wait_for(lambda e=expr: bool(prometheus.query(e)), 15, f"data for {title}")
    finally:
        prometheus.stop()


DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "meshling-golden.json"


def dashboard_queries() -> list[tuple[str, str]]:
    """The dashboard's PromQL, with its variables as Grafana would fill them in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$source", ".*")
                .replace("$destination", ".*")
            )
            out.append((panel["title"], expr))
    return out


def own_quantile(text: str, q: float, pair: str) -> float:
    """The q-quantile of the outbound web->api histogram in a /metrics text, worked out
    the way PromQL's histogram_quantile does (linear within the bucket)."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("meshling_service_request_duration_seconds_bucket{") and all(
            label in line for label in (*pair.split(","), 'direction="outbound"')
        ):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1]))
            )
    buckets.sort()
    total = buckets[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    raise AssertionError("empty histogram")
