"""Prometheus exposition of the proxy's counters through `prometheus_client`.

One custom collector turns the plain counters of `metrics.Metrics` into metric
families when `/metrics` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from meshling.telemetry.metrics import BUCKETS, DETECT_BUCKETS, STATUS_CLASSES, HttpStats, Metrics


def registry(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def _sum(into: dict[Any, HttpStats], key: Any, stats: HttpStats) -> None:
    total = into.get(key)
    if total is None:
        total = into[key] = HttpStats()
    total.add(stats)


def _add_http(
    requests: CounterMetricFamily,
    duration: HistogramMetricFamily,
    grpc: CounterMetricFamily,
    labels: list[str],
    s: HttpStats,
) -> None:
    """One label set's requests by status class, latency histogram and gRPC statuses."""
    for cls, n in zip(STATUS_CLASSES, s.by_class, strict=True):
        if n:
            requests.add_metric([*labels, cls], n)
    if s.grpc_statuses is not None:
        for code, n in list(s.grpc_statuses.items()):
            grpc.add_metric([*labels, code], n)
    cumulative, acc = [], 0
    for bound, n in zip((*map(str, BUCKETS), "+Inf"), s.buckets, strict=True):
        acc += n
        cumulative.append((bound, acc))
    duration.add_metric(labels, cumulative, s.sum)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(
            "meshling_http_requests",
            "HTTP requests completed, by listener, route, cluster and status class.",
            labels=["listener", "route", "cluster", "status_class"],
        )
        duration = HistogramMetricFamily(
            "meshling_http_request_duration_seconds",
            "Time from the request head arriving to the response's last byte sent.",
            labels=["listener", "route", "cluster"],
        )
        grpc = CounterMetricFamily(
            "meshling_grpc_responses",
            "gRPC calls completed, by listener, route, cluster and grpc-status "
            '("" when a call ended without one).',
            labels=["listener", "route", "cluster", "grpc_status"],
        )
        by_route: dict[tuple[str, str, str], HttpStats] = {}
        for (listener, route, cluster, _source), s in list(m.http.items()):
            _sum(by_route, (listener, route, cluster), s)
        golden = m.golden()
        for route_labels, s in by_route.items():
            _add_http(requests, duration, grpc, list(route_labels), s)
        yield requests
        yield duration
        yield grpc

        service_requests = CounterMetricFamily(
            "meshling_service_requests",
            "Golden metrics: requests between services, by direction (inbound: callers of "
            "this proxy's service; outbound: its calls), source and destination service, "
            "route and status class.",
            labels=["direction", "source_service", "destination_service", "route", "status_class"],
        )
        service_duration = HistogramMetricFamily(
            "meshling_service_request_duration_seconds",
            "Golden metrics: request latency between services.",
            labels=["direction", "source_service", "destination_service", "route"],
        )
        service_grpc = CounterMetricFamily(
            "meshling_service_grpc_responses",
            "Golden metrics: gRPC calls between services, by grpc-status.",
            labels=["direction", "source_service", "destination_service", "route", "grpc_status"],
        )
        for service_labels, s in golden.items():
            _add_http(service_requests, service_duration, service_grpc, list(service_labels), s)
        yield service_requests
        yield service_duration
        yield service_grpc

        cx_total = CounterMetricFamily(
            "meshling_downstream_connections",
            "Downstream connections accepted.",
            labels=["listener"],
        )
        cx_active = GaugeMetricFamily(
            "meshling_downstream_connections_active",
            "Open downstream connections.",
            labels=["listener"],
        )
        rx = CounterMetricFamily(
            "meshling_downstream_received_bytes",
            "Bytes received from downstream.",
            labels=["listener"],
        )
        tx = CounterMetricFamily(
            "meshling_downstream_sent_bytes", "Bytes sent to downstream.", labels=["listener"]
        )
        errors = CounterMetricFamily(
            "meshling_http_protocol_errors",
            "Malformed or refused requests, by the status answered.",
            labels=["listener", "status"],
        )
        abuse = CounterMetricFamily(
            "meshling_http2_abuse_goaways",
            "HTTP/2 client connections ended with GOAWAY (ENHANCE_YOUR_CALM), by reason.",
            labels=["listener", "reason"],
        )
        for name, ls in list(m.listeners.items()):
            cx_total.add_metric([name], ls.cx_total)
            cx_active.add_metric([name], ls.cx_active)
            rx.add_metric([name], ls.bytes_received)
            tx.add_metric([name], ls.bytes_sent)
            for status, n in list(ls.protocol_errors.items()):
                errors.add_metric([name, str(status)], n)
            for reason, n in list(ls.abuse.items()):
                abuse.add_metric([name, reason], n)
        yield from (cx_total, cx_active, rx, tx, errors, abuse)

        up_total = CounterMetricFamily(
            "meshling_upstream_connections", "Upstream connections opened.", labels=["cluster"]
        )
        up_active = GaugeMetricFamily(
            "meshling_upstream_connections_active", "Open upstream connections.", labels=["cluster"]
        )
        up_fail = CounterMetricFamily(
            "meshling_upstream_connect_failures",
            "Failed upstream connection attempts, by reason.",
            labels=["cluster", "reason"],
        )
        no_ep = CounterMetricFamily(
            "meshling_upstream_no_endpoint",
            "Requests or connections refused because the cluster had no endpoint.",
            labels=["cluster"],
        )
        timeouts = CounterMetricFamily(
            "meshling_upstream_request_timeouts",
            "Requests that got no complete response within the route timeout.",
            labels=["cluster"],
        )
        up_rx = CounterMetricFamily(
            "meshling_upstream_received_bytes", "Bytes received from upstream.", labels=["cluster"]
        )
        up_tx = CounterMetricFamily(
            "meshling_upstream_sent_bytes", "Bytes sent to upstream.", labels=["cluster"]
        )
        rq_active = GaugeMetricFamily(
            "meshling_upstream_requests_active",
            "Requests in flight to the cluster (what max_requests limits).",
            labels=["cluster"],
        )
        rq_pending = GaugeMetricFamily(
            "meshling_upstream_requests_pending",
            "Requests and connections waiting for an upstream connection to open.",
            labels=["cluster"],
        )
        overflows = CounterMetricFamily(
            "meshling_circuit_breaker_overflows",
            "Requests or connections refused (503) by a circuit breaker limit.",
            labels=["cluster", "limit"],
        )
        ejections = CounterMetricFamily(
            "meshling_outlier_ejections",
            "Endpoints ejected by outlier detection.",
            labels=["cluster"],
        )
        ejected = GaugeMetricFamily(
            "meshling_outlier_ejections_active",
            "Endpoints ejected by outlier detection now.",
            labels=["cluster"],
        )
        ejections_skipped = CounterMetricFamily(
            "meshling_outlier_ejections_skipped",
            "Ejections that max_ejection_percent prevented.",
            labels=["cluster"],
        )
        checks = CounterMetricFamily(
            "meshling_health_checks",
            "Active health checks of the cluster's endpoints, by result.",
            labels=["cluster", "result"],
        )
        healthy = GaugeMetricFamily(
            "meshling_endpoints_healthy",
            "Endpoints passing their active health checks.",
            labels=["cluster"],
        )
        panic = GaugeMetricFamily(
            "meshling_lb_panic",
            "1 while too few endpoints are usable and the balancer uses them all.",
            labels=["cluster"],
        )
        fallbacks = CounterMetricFamily(
            "meshling_lb_hash_fallbacks",
            "Ring-hash requests without their key, sent to a random endpoint.",
            labels=["cluster"],
        )
        for name, cs in list(m.clusters.items()):
            rq_active.add_metric([name], cs.rq_active)
            rq_pending.add_metric([name], cs.rq_pending)
            for limit, n in list(cs.overflows.items()):
                overflows.add_metric([name, limit], n)
            ejections.add_metric([name], cs.ejections_total)
            ejected.add_metric([name], cs.ejections_active)
            ejections_skipped.add_metric([name], cs.ejections_skipped)
            for result, n in list(cs.health_checks.items()):
                checks.add_metric([name, result], n)
            if cs.health_checked:
                healthy.add_metric([name], cs.endpoints_healthy)
            panic.add_metric([name], cs.panic)
            fallbacks.add_metric([name], cs.hash_fallbacks)
        yield from (rq_active, rq_pending, overflows, ejections, ejected, ejections_skipped)
        yield from (checks, healthy, panic, fallbacks)
        for name, cs in list(m.clusters.items()):
            up_total.add_metric([name], cs.cx_total)
            up_active.add_metric([name], cs.cx_active)
            for reason, n in list(cs.connect_failures.items()):
                up_fail.add_metric([name, reason], n)
            no_ep.add_metric([name], cs.no_endpoint)
            timeouts.add_metric([name], cs.timeouts)
            up_rx.add_metric([name], cs.bytes_received)
            up_tx.add_metric([name], cs.bytes_sent)
        yield from (up_total, up_active, up_fail, no_ep, timeouts, up_rx, up_tx)

        tcp_total = CounterMetricFamily(
            "meshling_tcp_connections",
            "TCP connections proxied.",
            labels=["listener", "cluster"],
        )
        tcp_active = GaugeMetricFamily(
            "meshling_tcp_connections_active",
            "Open proxied TCP connections.",
            labels=["listener", "cluster"],
        )
        tcp_rx = CounterMetricFamily(
            "meshling_tcp_received_bytes",
            "Bytes received from downstream on TCP connections.",
            labels=["listener", "cluster"],
        )
        tcp_tx = CounterMetricFamily(
            "meshling_tcp_sent_bytes",
            "Bytes sent to downstream on TCP connections.",
            labels=["listener", "cluster"],
        )
        for (listener, cluster), ts in list(m.tcp.items()):
            tcp_total.add_metric([listener, cluster], ts.cx_total)
            tcp_active.add_metric([listener, cluster], ts.cx_active)
            tcp_rx.add_metric([listener, cluster], ts.bytes_received)
            tcp_tx.add_metric([listener, cluster], ts.bytes_sent)
        yield from (tcp_total, tcp_active, tcp_rx, tcp_tx)

        handshakes = CounterMetricFamily(
            "meshling_tls_handshakes",
            "TLS handshakes completed with a verified peer identity.",
            labels=["direction", "name"],
        )
        failures = CounterMetricFamily(
            "meshling_tls_handshake_failures",
            "TLS handshakes refused, by reason (handshake errors and SVID rules).",
            labels=["direction", "name", "reason"],
        )
        expiry = GaugeMetricFamily(
            "meshling_tls_certificate_expiry_timestamp_seconds",
            "When the proxy's own certificate expires (Unix time).",
            labels=["direction", "name"],
        )
        plaintext = CounterMetricFamily(
            "meshling_tls_plaintext_connections",
            "Connections a permissive listener served without TLS (unauthenticated).",
            labels=["direction", "name"],
        )
        for (direction, name), tls in list(m.tls.items()):
            handshakes.add_metric([direction, name], tls.handshakes)
            if direction == "downstream":
                plaintext.add_metric([direction, name], tls.plaintext)
            for reason, n in list(tls.failures.items()):
                failures.add_metric([direction, name, reason], n)
            expiry.add_metric([direction, name], tls.certificate_expiry)
        yield from (handshakes, failures, expiry, plaintext)

        decisions = CounterMetricFamily(
            "meshling_authz_decisions",
            "TrafficPermission decisions per connection, by result and deciding rule.",
            labels=["listener", "result", "rule"],
        )
        for listener, az in list(m.authz.items()):
            for result, counts in (
                ("allowed", az.allowed),
                ("denied", az.denied),
                ("shadow_denied", az.shadow_denied),
            ):
                for rule, n in list(counts.items()):
                    decisions.add_metric([listener, result, rule], n)
        yield decisions

        limited = CounterMetricFamily(
            "meshling_rate_limited",
            "Requests (429) and TCP connections (closed) refused by a RateLimit, by rule "
            "and the limit that refused them (local, global, tcp).",
            labels=["listener", "rule", "limit"],
        )
        redis_errors = CounterMetricFamily(
            "meshling_rate_limit_redis_errors",
            "Lease requests of a global rate limit that Redis failed or did not answer.",
            labels=["listener", "rule"],
        )
        degraded = GaugeMetricFamily(
            "meshling_rate_limit_degraded",
            "1 while a global rate limit is skipped (Redis unreachable): only the local "
            "limit applies.",
            labels=["listener", "rule"],
        )
        for listener, rl in list(m.rate_limit.items()):
            for (rule, limit), n in list(rl.limited.items()):
                limited.add_metric([listener, rule, limit], n)
            for rule, n in list(rl.redis_errors.items()):
                redis_errors.add_metric([listener, rule], n)
            for rule, n in list(rl.degraded.items()):
                degraded.add_metric([listener, rule], n)
        yield from (limited, redis_errors, degraded)
        faults = CounterMetricFamily(
            "meshling_faults_injected",
            "Faults injected by a FaultInjection, by rule and fault.",
            labels=["listener", "rule", "fault"],
        )
        for listener, fs in list(m.fault.items()):
            for (rule, fault), n in list(fs.injected.items()):
                faults.add_metric([listener, rule, fault], n)
        yield faults
        yield from _detection(m)

        retries = CounterMetricFamily(
            "meshling_http_retries",
            "Attempts after the first, on routes with a Retry policy.",
            labels=["listener", "route", "cluster"],
        )
        retries_skipped = CounterMetricFamily(
            "meshling_http_retries_skipped",
            "Failed attempts the policy would retry but did not, by reason "
            "(budget_exhausted, body_too_large).",
            labels=["listener", "route", "cluster", "reason"],
        )
        per_try = CounterMetricFamily(
            "meshling_http_per_try_timeouts",
            "Attempts that reached their per-try timeout.",
            labels=["listener", "route", "cluster"],
        )
        for (listener, route, cluster), rs in list(m.retry.items()):
            labels = [listener, route, cluster]
            retries.add_metric(labels, rs.retries)
            retries_skipped.add_metric([*labels, "budget_exhausted"], rs.budget_exhausted)
            retries_skipped.add_metric([*labels, "body_too_large"], rs.body_too_large)
            per_try.add_metric(labels, rs.per_try_timeouts)
        yield from (retries, retries_skipped, per_try)
        yield from _mirror(m)

        reloads = CounterMetricFamily(
            "meshling_config_reloads", "Snapshot reloads, by result.", labels=["result"]
        )
        for result, n in m.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        info = GaugeMetricFamily(
            "meshling_snapshot_info", "The running snapshot's version.", labels=["version"]
        )
        info.add_metric([m.snapshot_version], 1)
        yield info
        dropped = CounterMetricFamily(
            "meshling_access_log_dropped",
            "Access log records dropped because a backend fell behind (or is down), by "
            "backend (stdout, file:<path>, tcp:<host>:<port>).",
            labels=["backend"],
        )
        for backend, count in sorted(m.access_log_dropped.items()):
            dropped.add_metric([backend], count)
        yield dropped
        spans = CounterMetricFamily(
            "meshling_trace_spans",
            "Trace spans of sampled requests, by what became of them: exported, failed "
            "(the collector refused them or was unreachable), dropped (the queue was full).",
            labels=["outcome"],
        )
        for outcome, n in list(m.trace_spans.items()):
            spans.add_metric([outcome], n)
        yield spans
        if m.dns_queries is not None:
            dns = CounterMetricFamily(
                "meshling_dns_queries",
                "Queries to the proxy's DNS responder, by result: mesh (answered from the "
                "mesh's names), nxdomain (an unknown name of the mesh), forwarded (relayed "
                "from upstream), error (malformed, not served, or no upstream answered).",
                labels=["result"],
            )
            for result, n in list(m.dns_queries.items()):
                dns.add_metric([result], n)
            yield dns

        cp = m.control_plane
        if cp is None:
            return
        yield GaugeMetricFamily(
            "meshling_control_plane_connected",
            "1 while the config stream to a control plane is open, else 0.",
            value=cp.connected,
        )
        snapshots = CounterMetricFamily(
            "meshling_control_plane_snapshots",
            "Snapshots pushed by the control plane, by result (applied: acked, "
            "rejected: nacked, the previous one kept running).",
            labels=["result"],
        )
        for result, n in cp.snapshots.items():
            snapshots.add_metric([result], n)
        yield snapshots
        certificates = CounterMetricFamily(
            "meshling_certificate_renewals",
            "Certificate requests to the control plane (the first and every renewal), by result.",
            labels=["result"],
        )
        for result, n in cp.certificates.items():
            certificates.add_metric([result], n)
        yield certificates
        yield GaugeMetricFamily(
            "meshling_certificate_expiry_timestamp_seconds",
            "When the proxy's own certificate from the control plane expires (Unix time).",
            value=cp.certificate_expiry,
        )


def _detection(m: Metrics) -> Iterator[Metric]:
    detections = CounterMetricFamily(
        "meshling_protocol_detections",
        "Connections to a protocol: auto listener, by the protocol detected "
        "(http1, h2, tls, opaque).",
        labels=["listener", "protocol"],
    )
    timeouts = CounterMetricFamily(
        "meshling_protocol_detection_timeouts",
        "Connections whose client sent nothing decisive within the detection timeout "
        "(served as TCP).",
        labels=["listener"],
    )
    duration = HistogramMetricFamily(
        "meshling_protocol_detection_duration_seconds",
        "Time from accepting a connection to knowing its protocol (or timing out).",
        labels=["listener"],
    )
    for listener, ds in list(m.detection.items()):
        for protocol, n in list(ds.detected.items()):
            detections.add_metric([listener, protocol], n)
        timeouts.add_metric([listener], ds.timeouts)
        cumulative, acc = [], 0
        for bound, n in zip((*map(str, DETECT_BUCKETS), "+Inf"), ds.buckets, strict=True):
            acc += n
            cumulative.append((bound, acc))
        duration.add_metric([listener], cumulative, ds.sum)
    yield from (detections, timeouts, duration)


def _mirror(m: Metrics) -> Iterator[Metric]:
    copies = CounterMetricFamily(
        "meshling_http_mirror_requests",
        "Request copies for a mirror cluster, by outcome (sent, failed, timeout, "
        "skipped_body_too_large, skipped_overflow, skipped_no_endpoint, skipped_incomplete).",
        labels=["cluster", "outcome"],
    )
    active = GaugeMetricFamily(
        "meshling_http_mirror_requests_active",
        "Request copies for a mirror cluster being kept or awaiting their response.",
        labels=["cluster"],
    )
    for cluster, ms in list(m.mirror.items()):
        for outcome, n in list(ms.outcomes.items()):
            copies.add_metric([cluster, outcome], n)
        active.add_metric([cluster], ms.active)
    yield from (copies, active)
