"""The demo's summary table: each proxy's request, mTLS and authorization metrics, and
the traffic loop's own counts.

Pure functions over Prometheus text (as `GET /metrics` on a proxy's admin listener
returns it) and over counts, so they can be tested without any process running.
Latency percentiles are estimated from histogram buckets the way Prometheus's
`histogram_quantile` does: find the bucket that holds the rank, interpolate linearly.

A request succeeds when it is answered below 400: a 403 from a proxy that refused the
caller is as much a failed call as a 5xx, and the demo's policy example is about those.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "meshling_http_requests_total"
DURATION = "meshling_http_request_duration_seconds"
CONNECTIONS = "meshling_downstream_connections_active"
TLS_HANDSHAKES = "meshling_tls_handshakes_total"
TLS_FAILURES = "meshling_tls_handshake_failures_total"
AUTHZ = "meshling_authz_decisions_total"

# the listeners the control plane builds: `inbound:<port>` and `outbound:<service>`,
# whose cluster is named after the destination service
OUTBOUND_PREFIX = "outbound:"
INBOUND_PREFIX = "inbound:"


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
    def key(self) -> tuple[str, str, str]:
        return (self.listener, self.route, self.cluster)

    @property
    def requests(self) -> float:
        return sum(self.by_class.values())

    @property
    def ok(self) -> float:
        return sum(
            n for status_class, n in self.by_class.items() if status_class[:1] in ("1", "2", "3")
        )

    @property
    def refused(self) -> float:
        return self.by_class.get("4xx", 0.0)

    @property
    def errors(self) -> float:
        return self.by_class.get("5xx", 0.0)

    @property
    def success_rate(self) -> float | None:
        """Share of requests answered below 400; None before the first request."""
        total = self.requests
        return None if total == 0 else self.ok / total

    def quantile(self, q: float) -> float | None:
        bounds = sorted(self.buckets)
        return quantile(q, bounds, [self.buckets[b] for b in bounds])


@dataclass(slots=True)
class TlsCounts:
    """mTLS on one side of a proxy: handshakes completed, and refused."""

    handshakes: float = 0.0
    failures: float = 0.0


@dataclass(slots=True)
class ProxyMetrics:
    rows: list[TrafficRow]
    # listener -> open downstream connections
    connections: dict[str, float]
    # ("downstream", listener) or ("upstream", cluster) -> its mTLS counts; a listener
    # or cluster without TLS has no entry
    tls: dict[tuple[str, str], TlsCounts] = field(default_factory=dict)
    # TrafficPermission rule -> connections it denied
    denied: dict[str, float] = field(default_factory=dict)

    @property
    def requests(self) -> float:
        return sum(row.requests for row in self.rows)

    def row(self, key: tuple[str, str, str]) -> TrafficRow | None:
        return next((r for r in self.rows if r.key == key), None)

    def mtls(self, row: TrafficRow) -> TlsCounts | None:
        """The mTLS counts of the hop a row stands for: the callers' side of an inbound
        listener, the upstream side of an outbound's cluster."""
        if row.listener.startswith(OUTBOUND_PREFIX):
            return self.tls.get(("upstream", row.cluster))
        return self.tls.get(("downstream", row.listener))


def parse_metrics(text: str) -> ProxyMetrics:
    """The demo's view of one proxy's Prometheus exposition."""
    rows: dict[tuple[str, str, str], TrafficRow] = {}
    connections: dict[str, float] = {}
    tls: dict[tuple[str, str], TlsCounts] = {}
    denied: dict[str, float] = {}

    def row(labels: dict[str, str]) -> TrafficRow:
        key = (labels.get("listener", ""), labels.get("route", ""), labels.get("cluster", ""))
        if key not in rows:
            rows[key] = TrafficRow(*key)
        return rows[key]

    def side(labels: dict[str, str]) -> TlsCounts:
        key = (labels.get("direction", ""), labels.get("name", ""))
        if key not in tls:
            tls[key] = TlsCounts()
        return tls[key]

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
            elif sample.name == TLS_HANDSHAKES:
                side(labels).handshakes += sample.value
            elif sample.name == TLS_FAILURES:
                side(labels).failures += sample.value
            elif sample.name == AUTHZ and labels.get("result") == "denied":
                rule = labels.get("rule", "")
                denied[rule] = denied.get(rule, 0.0) + sample.value
    ordered = sorted(rows.values(), key=lambda r: r.key)
    return ProxyMetrics(rows=ordered, connections=connections, tls=tls, denied=denied)


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
        return sum(n for status, n in self.statuses.items() if status < 400)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.0f}s"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]], names: int) -> list[str]:
    body = [list(header), *map(list, lines)]
    widths = [max(len(line[i]) for line in body) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        # names left-aligned, numbers right-aligned
        cells = [
            cell.ljust(width) if i < names else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [render(line) for line in body]


def _mtls(counts: TlsCounts | None) -> str:
    if counts is None:
        return "off"
    text = f"{counts.handshakes:.0f}"
    if counts.failures:
        text += f" ({counts.failures:.0f} refused)"
    return text


@dataclass(slots=True)
class ServiceCalls:
    """Calls to one service as its callers saw them: answered below 400, and all."""

    ok: float = 0.0
    total: float = 0.0
    # who called: the client, or the proxies whose outbounds were used
    callers: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float | None:
        return None if self.total == 0 else self.ok / self.total


def calls_by_service(
    proxies: Mapping[str, ProxyMetrics | str],
    previous: Mapping[str, ProxyMetrics | str] | None = None,
) -> dict[str, ServiceCalls]:
    """Per destination service, the calls made through the proxies' outbounds (since
    `previous`, when given); an outbound's cluster is named after its service."""
    services: dict[str, ServiceCalls] = {}
    for name, metrics in proxies.items():
        if isinstance(metrics, str):
            continue
        before = previous.get(name) if previous else None
        for row in metrics.rows:
            if not row.listener.startswith(OUTBOUND_PREFIX):
                continue
            earlier = before.row(row.key) if isinstance(before, ProxyMetrics) else None
            calls = services.setdefault(row.cluster, ServiceCalls())
            calls.ok += row.ok - (earlier.ok if earlier else 0.0)
            calls.total += row.requests - (earlier.requests if earlier else 0.0)
            if name not in calls.callers:
                calls.callers.append(name)
    return services


def render(
    title: str,
    proxies: dict[str, ProxyMetrics | str],
    traffic: TrafficCounts,
    previous: dict[str, ProxyMetrics | str] | None = None,
    interval: float | None = None,
    *,
    entry: str = "web",
    previous_statuses: Mapping[int, int] | None = None,
) -> str:
    """The summary block: one line per proxy listener path, success by service, then the
    client's counts.

    `proxies` maps a proxy's name to its metrics, or to why they could not be read.
    With `previous` (empty: since the start) and `interval`, a rate column shows requests
    per second over that time, and the success by service covers that time only
    (`previous_statuses`: the client's status counts at its start). `entry` is the
    service the client calls.
    """
    lines = [title]
    rows: list[list[str]] = []
    for name, metrics in proxies.items():
        if isinstance(metrics, str):
            rows.append([name, "-", f"(metrics unavailable: {metrics})", *[""] * 8])
            continue
        if not metrics.rows:
            rows.append([name, "-", "(no requests yet)", *[""] * 8])
        before = previous.get(name) if previous else None
        for row in metrics.rows:
            rate = "-"
            if previous is not None and interval:
                earlier = before.row(row.key) if isinstance(before, ProxyMetrics) else None
                rate = f"{(row.requests - (earlier.requests if earlier else 0.0)) / interval:.1f}"
            rows.append(
                [
                    name,
                    row.listener,
                    f"-> {row.cluster}",
                    f"{row.requests:.0f}",
                    rate,
                    _percent(row.success_rate),
                    f"{row.refused:.0f}",
                    f"{row.errors:.0f}",
                    _ms(row.quantile(0.5)),
                    _ms(row.quantile(0.99)),
                    _mtls(metrics.mtls(row)),
                ]
            )
    header = ["proxy", "listener", "cluster", "requests", "rps", "success", "4xx", "5xx"]
    header += ["p50", "p99", "mTLS handshakes"]
    lines += ["  " + line for line in _table(header, rows, names=3)]

    # success by service, as each service's callers saw it
    windowed = previous is not None and interval is not None
    client = ServiceCalls(callers=["client"])
    for status, n in traffic.statuses.items():
        n -= (previous_statuses or {}).get(status, 0) if windowed else 0
        client.total += n
        client.ok += n if status < 400 else 0
    called = calls_by_service(proxies, previous if windowed else None)
    services = {entry: client, **dict(sorted(called.items()))}
    parts = [
        f"{service} {_percent(calls.success_rate)} of {calls.total:.0f} "
        f"(from {', '.join(calls.callers)})"
        for service, calls in services.items()
    ]
    span = f"last {interval:g}s" if previous and interval else "since the start"
    lines.append(f"  success by service ({span}): " + "; ".join(parts))

    denials = {
        name: metrics.denied
        for name, metrics in proxies.items()
        if isinstance(metrics, ProxyMetrics) and metrics.denied
    }
    if denials:
        rules = sorted({rule for denied in denials.values() for rule in denied})
        counts = ", ".join(f"{name} {sum(denied.values()):.0f}" for name, denied in denials.items())
        lines.append(
            f"  connections denied by TrafficPermission: {counts} (rule {', '.join(rules)})"
        )

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
