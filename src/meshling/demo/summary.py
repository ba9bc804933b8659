"""The demo's summary table: each proxy's request metrics, and the traffic loop's own.

Pure functions over Prometheus text (as `GET /metrics` on a proxy's admin listener
returns it) and over counts, so they can be tested without any process running.
Latency percentiles are estimated from histogram buckets the way Prometheus's
`histogram_quantile` does: find the bucket that holds the rank, interpolate linearly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "meshling_http_requests_total"
DURATION = "meshling_http_request_duration_seconds"
CONNECTIONS = "meshling_downstream_connections_active"


@dataclass(slots=True)
class TrafficRow:
    """Requests of one listener -> route -> cluster path through one proxy."""

    listener: str
    route: str
    cluster: str
    # status class ("2xx", "5xx", ...) -> requests
    by_class: dict[str, float] = field(default_factory=dict)
    # cumulative histogram: upper bound -> observations at or below it
    buckets: dict[float, float] = field(default_factory=dict)

    @property
    def requests(self) -> float:
        return sum(self.by_class.values())

    @property
    def errors(self) -> float:
        return self.by_class.get("5xx", 0.0)

    @property
    def success_rate(self) -> float | None:
        """Share of requests not answered with a 5xx; None before the first request."""
        total = self.requests
        return None if total == 0 else (total - self.errors) / total

    def quantile(self, q: float) -> float | None:
        bounds = sorted(self.buckets)
        return quantile(q, bounds, [self.buckets[b] for b in bounds])


@dataclass(slots=True)
class ProxyMetrics:
    rows: list[TrafficRow]
    # listener -> open downstream connections
    connections: dict[str, float]

    @property
    def requests(self) -> float:
        return sum(row.requests for row in self.rows)


def parse_metrics(text: str) -> ProxyMetrics:
    """The demo's view of one proxy's Prometheus exposition."""
    rows: dict[tuple[str, str, str], TrafficRow] = {}
    connections: dict[str, float] = {}

    def row(labels: dict[str, str]) -> TrafficRow:
        key = (labels.get("listener", ""), labels.get("route", ""), labels.get("cluster", ""))
        if key not in rows:
            rows[key] = TrafficRow(*key)
        return rows[key]

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == REQUESTS:
                status_class = labels.get("status_class", "?")
                found = row(labels)
                found.by_class[status_class] = found.by_class.get(status_class, 0.0) + sample.value
            elif sample.name == DURATION + "_bucket":
                bound = float(labels["le"])
                found = row(labels)
                found.buckets[bound] = found.buckets.get(bound, 0.0) + sample.value
            elif sample.name == CONNECTIONS:
                listener = labels.get("listener", "")
                connections[listener] = connections.get(listener, 0.0) + sample.value
    ordered = sorted(rows.values(), key=lambda r: (r.listener, r.route, r.cluster))
    return ProxyMetrics(rows=ordered, connections=connections)


def quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float | None:
    """The q-quantile of a cumulative histogram (bounds ascending, the last may be +Inf)."""
    if not bounds or not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    i = bisect.bisect_left(cumulative, rank)
    i = min(i, len(bounds) - 1)
    upper = bounds[i]
    if math.isinf(upper):
        # the rank is beyond the largest finite bound: that bound is all that is known
        finite = [b for b in bounds if not math.isinf(b)]
        return finite[-1] if finite else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    in_bucket = cumulative[i] - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


class LatencyHistogram:
    """Client-side latencies in fixed buckets: constant memory however long the run."""

    # 0.5 ms .. ~16 s, four buckets per doubling
    BOUNDS: tuple[float, ...] = (*(0.0005 * 2 ** (i / 4) for i in range(61)), math.inf)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1

    def quantile(self, q: float) -> float | None:
        cumulative: list[float] = []
        total = 0.0
        for count in self.counts:
            total += count
            cumulative.append(total)
        return quantile(q, self.BOUNDS, cumulative)


@dataclass(slots=True)
class TrafficCounts:
    """What the traffic loop saw from the client side of the mesh."""

    sent: int = 0
    # HTTP status -> responses
    statuses: dict[int, int] = field(default_factory=dict)
    # requests that got no HTTP response (refused, reset, timed out)
    failures: int = 0
    # requests not sent because too many were still waiting for an answer
    skipped: int = 0
    # api instance that answered (as web reports it) -> responses
    api_instances: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    last_failure: str = ""

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if status < 500)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.0f}s"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    body = [list(header), *map(list, lines)]
    widths = [max(len(line[i]) for line in body) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        # names left-aligned, numbers right-aligned
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [render(line) for line in body]


def render(
    title: str,
    proxies: dict[str, ProxyMetrics | str],
    traffic: TrafficCounts,
    previous: dict[str, ProxyMetrics | str] | None = None,
    interval: float | None = None,
) -> str:
    """The summary block: one line per proxy listener path, then the client's counts.

    `proxies` maps a proxy's name to its metrics, or to why they could not be read.
    With `previous` (empty: since the start) and `interval`, a rate column shows requests
    per second over that time.
    """
    lines = [title]
    rows: list[list[str]] = []
    for name, metrics in proxies.items():
        if isinstance(metrics, str):
            rows.append([name, "-", f"(metrics unavailable: {metrics})", *[""] * 7])
            continue
        if not metrics.rows:
            rows.append([name, "-", "(no requests yet)", *[""] * 7])
        before = previous.get(name) if previous else None
        for row in metrics.rows:
            rate = "-"
            if previous is not None and interval:
                earlier = 0.0
                if isinstance(before, ProxyMetrics):
                    key = (row.listener, row.route, row.cluster)
                    earlier = next(
                        (
                            r.requests
                            for r in before.rows
                            if (r.listener, r.route, r.cluster) == key
                        ),
                        0.0,
                    )
                rate = f"{(row.requests - earlier) / interval:.1f}"
            rows.append(
                [
                    name,
                    row.listener,
                    f"{row.route} -> {row.cluster}",
                    f"{row.requests:.0f}",
                    rate,
                    _percent(row.success_rate),
                    f"{row.errors:.0f}",
                    _ms(row.quantile(0.5)),
                    _ms(row.quantile(0.99)),
                    f"{metrics.connections.get(row.listener, 0):.0f}",
                ]
            )
    header = ["proxy", "listener", "route -> cluster", "requests", "rps", "success"]
    header += ["5xx", "p50", "p99", "conns"]
    lines += ["  " + line for line in _table(header, rows)]
    codes = ", ".join(f"{status}: {n}" for status, n in sorted(traffic.statuses.items()))
    answered = traffic.answered
    success = traffic.ok / answered if answered else None
    lines.append(
        f"  client: sent {traffic.sent}, answered {answered} ({codes or 'none yet'}), "
        f"success {_percent(success)}, no answer {traffic.failures}, "
        f"skipped {traffic.skipped}, p50 {_ms(traffic.latency.quantile(0.5))}, "
        f"p99 {_ms(traffic.latency.quantile(0.99))}"
    )
    if traffic.api_instances:
        total = sum(traffic.api_instances.values())
        split = ", ".join(
            f"{instance} {n / total * 100:.0f}%"
            for instance, n in sorted(traffic.api_instances.items())
        )
        lines.append(f"  api answers by instance: {split}")
    if traffic.last_failure:
        lines.append(f"  last client failure: {traffic.last_failure}")
    return "\n".join(lines)
