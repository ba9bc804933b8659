"""Proxy metrics: plain counters on the hot path, Prometheus text at scrape time.

The request path only increments integers on small slotted objects that it
looked up once (per connection or per route), never a labelled metric by name.
`prometheus_client` sees them through one custom collector, which turns the
counters into metric families when `/metrics` is scraped. Label values are
names from the snapshot (listeners, routes, clusters), so cardinality is
bounded by the configuration, not by traffic.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Latency buckets in seconds, from sub-millisecond (a local hop) to the default route timeout.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class HttpStats:
    """Requests and latency of one (listener, route, cluster)."""

    __slots__ = ("buckets", "by_class", "count", "grpc_statuses", "sum")

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        # gRPC calls by grpc-status ("" when the call ended without one); None: no call
        self.grpc_statuses: dict[str, int] | None = None

    def add(self, other: HttpStats) -> None:
        """Count `other`'s requests in these too (for sums over a label)."""
        for i, n in enumerate(other.by_class):
            self.by_class[i] += n
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n
        self.count += other.count
        self.sum += other.sum
        if other.grpc_statuses is not None:
            statuses = self.grpc_statuses
            if statuses is None:
                statuses = self.grpc_statuses = {}
            for code, n in other.grpc_statuses.items():
                statuses[code] = statuses.get(code, 0) + n

    def grpc(self, status: int | None) -> None:
        statuses = self.grpc_statuses
        if statuses is None:
            statuses = self.grpc_statuses = {}
        key = "" if status is None else str(status)
        statuses[key] = statuses.get(key, 0) + 1

    def record(self, status: int, duration: float) -> None:
        cls = status // 100 - 1
        self.by_class[cls if 0 <= cls < 5 else 4] += 1
        self.buckets[bisect_left(BUCKETS, duration)] += 1
        self.count += 1
        self.sum += duration


class ListenerStats:
    """Downstream connections and bytes of one listener."""

    __slots__ = (
        "abuse",
        "bytes_received",
        "bytes_sent",
        "cx_active",
        "cx_total",
        "protocol_errors",
    )

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        # malformed requests by the status the proxy answered with
        self.protocol_errors: dict[int, int] = {}
        # HTTP/2 connections ended for abuse (GOAWAY ENHANCE_YOUR_CALM), by reason
        self.abuse: dict[str, int] = {}


# Protocol detection times in seconds: a client's first bytes arrive within a round trip;
# the last buckets hold the timeouts of server-speaks-first protocols.
DETECT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


class DetectionStats:
    """Protocol detection on one `auto` listener: results, timeouts, time taken."""

    __slots__ = ("buckets", "count", "detected", "sum", "timeouts")

    def __init__(self) -> None:
        # connections by the protocol they were told to speak
        self.detected: dict[str, int] = {}
        # connections whose client sent nothing decisive in time (served as TCP)
        self.timeouts = 0
        self.buckets = [0] * (len(DETECT_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def record(self, protocol: str, duration: float, timed_out: bool) -> None:
        self.detected[protocol] = self.detected.get(protocol, 0) + 1
        self.timeouts += timed_out
        self.buckets[bisect_left(DETECT_BUCKETS, duration)] += 1
        self.count += 1
        self.sum += duration


class ClusterStats:
    """Upstream connections of one cluster, and the failures that never reached an endpoint."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "connect_failures",
        "cx_active",
        "cx_total",
        "ejections_active",
        "ejections_skipped",
        "ejections_total",
        "endpoints_healthy",
        "hash_fallbacks",
        "health_checked",
        "health_checks",
        "no_endpoint",
        "overflows",
        "panic",
        "rq_active",
        "rq_pending",
        "timeouts",
    )

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        # by reason: "refused", "timeout", "error"
        self.connect_failures: dict[str, int] = {}
        self.no_endpoint = 0
        self.timeouts = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        # requests in flight, and those waiting for a connection to open (the circuit
        # breaker's counts, shared by every snapshot's runtime of the cluster)
        self.rq_active = 0
        self.rq_pending = 0
        # refused by a circuit breaker limit: "max_connections", "max_pending_requests",
        # "max_requests"
        self.overflows: dict[str, int] = {}
        # outlier detection: ejections so far, endpoints out now, and ejections that
        # max_ejection_percent prevented
        self.ejections_total = 0
        self.ejections_active = 0
        self.ejections_skipped = 0
        # active health checks by result ("passed", "failed"), and endpoints healthy now
        self.health_checks: dict[str, int] = {}
        self.health_checked = False
        self.endpoints_healthy = 0
        # 1 while too few endpoints are usable and the balancer uses them all
        self.panic = 0
        # ring-hash requests without their key, sent to a random endpoint instead
        self.hash_fallbacks = 0


class TcpStats:
    """Connections and bytes forwarded by one TCP filter chain."""

    __slots__ = ("bytes_received", "bytes_sent", "cx_active", "cx_total")

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        self.bytes_received = 0  # from downstream
        self.bytes_sent = 0  # to downstream


class TlsStats:
    """Handshakes of one TLS listener chain ("downstream") or cluster ("upstream")."""

    __slots__ = ("certificate_expiry", "failures", "handshakes", "plaintext")

    def __init__(self) -> None:
        self.handshakes = 0
        # connections a permissive listener served without TLS
        self.plaintext = 0
        # by reason: a handshake error, or an SVID rule the peer's certificate broke
        self.failures: dict[str, int] = {}
        # the proxy's own certificate's notAfter, as a Unix time
        self.certificate_expiry = 0.0

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class AuthzStats:
    """TrafficPermission decisions of one listener, by the rule that decided."""

    __slots__ = ("allowed", "denied", "shadow_denied")

    def __init__(self) -> None:
        self.allowed: dict[str, int] = {}
        self.denied: dict[str, int] = {}
        # allowed, but a shadow (audit) rule would have denied
        self.shadow_denied: dict[str, int] = {}


class RetryStats:
    """Retries of one (listener, route, cluster) with a Retry policy."""

    __slots__ = ("body_too_large", "budget_exhausted", "per_try_timeouts", "retries")

    def __init__(self) -> None:
        # attempts after the first
        self.retries = 0
        # retries the policy allowed and the budget refused (the failure was the answer)
        self.budget_exhausted = 0
        # failures not retried because the request body was over the policy's max_body
        self.body_too_large = 0
        # attempts that reached their per-try timeout
        self.per_try_timeouts = 0


class MirrorStats:
    """Request copies for one mirror cluster (`proxy.mirror`): by outcome, and in flight."""

    __slots__ = ("active", "outcomes")

    def __init__(self) -> None:
        # copies being kept (their request still arriving) or sent and not yet answered
        self.active = 0
        # by outcome: "sent" (answered below 500), "failed", "timeout", and the copies
        # not sent: "skipped_body_too_large", "skipped_overflow", "skipped_no_endpoint",
        # "skipped_incomplete"
        self.outcomes: dict[str, int] = {}

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class RateLimitStats:
    """RateLimit refusals of one listener, by rule, and the state of its global limits."""

    __slots__ = ("degraded", "limited", "redis_errors")

    def __init__(self) -> None:
        # refused, by (rule, limit): limit "local", "global" (HTTP 429) or "tcp" (closed)
        self.limited: dict[tuple[str, str], int] = {}
        # lease requests to Redis that failed, by rule
        self.redis_errors: dict[str, int] = {}
        # 1 while a rule's global limit is skipped because Redis is unreachable
        self.degraded: dict[str, int] = {}


class FaultStats:
    """FaultInjection faults injected on one listener, by rule and fault."""

    __slots__ = ("injected",)

    def __init__(self) -> None:
        # by (rule, fault): fault "abort", "reset", "delay" or "bandwidth"
        self.injected: dict[tuple[str, str], int] = {}


class ControlPlaneStats:
    """A proxy's link to its control plane: the stream, snapshots and certificates."""

    __slots__ = ("certificate_expiry", "certificates", "connected", "snapshots")

    def __init__(self) -> None:
        # 1 while a config stream is open
        self.connected = 0
        # pushed snapshots, "applied" (acked) or "rejected" (nacked)
        self.snapshots: dict[str, int] = {"applied": 0, "rejected": 0}
        # certificate requests (the first and every renewal), "ok" or "failed"
        self.certificates: dict[str, int] = {"ok": 0, "failed": 0}
        # the proxy's own certificate's notAfter, as a Unix time (0: none yet)
        self.certificate_expiry = 0.0


class Metrics:
    """All of one proxy's counters, and their Prometheus exposition."""

    def __init__(self) -> None:
        # by listener, route, cluster and the calling service (inbound listeners; "" else)
        self.http: dict[tuple[str, str, str, str], HttpStats] = {}
        # the golden metrics' view: the proxy's own service, and each listener's direction
        self.service = ""
        self.directions: dict[str, str] = {}
        self.listeners: dict[str, ListenerStats] = {}
        self.clusters: dict[str, ClusterStats] = {}
        self.tcp: dict[tuple[str, str], TcpStats] = {}
        self.tls: dict[tuple[str, str], TlsStats] = {}
        self.authz: dict[str, AuthzStats] = {}
        self.rate_limit: dict[str, RateLimitStats] = {}
        self.fault: dict[str, FaultStats] = {}
        self.detection: dict[str, DetectionStats] = {}
        self.retry: dict[tuple[str, str, str], RetryStats] = {}
        self.mirror: dict[str, MirrorStats] = {}
        self.reloads: dict[str, int] = {"ok": 0, "rejected": 0}
        self.snapshot_version = ""
        # access log records dropped, by backend (`AccessLogBackend.label`)
        self.access_log_dropped: dict[str, int] = {}
        # spans by outcome (telemetry.otlp): exported, failed (the collector refused or
        # was unreachable), dropped (the export queue was full); written by its thread
        self.trace_spans: dict[str, int] = {"exported": 0, "failed": 0, "dropped": 0}
        # only with a control plane (`meshling proxy run --cp`)
        self.control_plane: ControlPlaneStats | None = None
        # DNS queries by result (mesh, forwarded, nxdomain, error); None while the
        # snapshot has no DNS responder (`meshling.dns.server`)
        self.dns_queries: dict[str, int] | None = None
        # the active taps (`meshling.proxy.tap.Taps`), None while there is none: the
        # request path checks this one attribute and does nothing more
        self.tap: Any = None
        # prometheus_client is imported at the first scrape, not at start-up: it is
        # the largest import of the proxy, and an unscraped proxy does not need it.
        self._registry: Any = None

    def http_stats(self, listener: str, route: str, cluster: str, source: str = "") -> HttpStats:
        key = (listener, route, cluster, source)
        stats = self.http.get(key)
        if stats is None:
            stats = self.http[key] = HttpStats()
        return stats

    def listener_stats(self, name: str) -> ListenerStats:
        stats = self.listeners.get(name)
        if stats is None:
            stats = self.listeners[name] = ListenerStats()
        return stats

    def cluster_stats(self, name: str) -> ClusterStats:
        stats = self.clusters.get(name)
        if stats is None:
            stats = self.clusters[name] = ClusterStats()
        return stats

    def tcp_stats(self, listener: str, cluster: str) -> TcpStats:
        key = (listener, cluster)
        stats = self.tcp.get(key)
        if stats is None:
            stats = self.tcp[key] = TcpStats()
        return stats

    def tls_stats(self, direction: str, name: str) -> TlsStats:
        key = (direction, name)
        stats = self.tls.get(key)
        if stats is None:
            stats = self.tls[key] = TlsStats()
        return stats

    def authz_stats(self, listener: str) -> AuthzStats:
        stats = self.authz.get(listener)
        if stats is None:
            stats = self.authz[listener] = AuthzStats()
        return stats

    def retry_stats(self, listener: str, route: str, cluster: str) -> RetryStats:
        key = (listener, route, cluster)
        stats = self.retry.get(key)
        if stats is None:
            stats = self.retry[key] = RetryStats()
        return stats

    def mirror_stats(self, cluster: str) -> MirrorStats:
        stats = self.mirror.get(cluster)
        if stats is None:
            stats = self.mirror[cluster] = MirrorStats()
        return stats

    def rate_limit_stats(self, listener: str) -> RateLimitStats:
        stats = self.rate_limit.get(listener)
        if stats is None:
            stats = self.rate_limit[listener] = RateLimitStats()
        return stats

    def fault_stats(self, listener: str) -> FaultStats:
        stats = self.fault.get(listener)
        if stats is None:
            stats = self.fault[listener] = FaultStats()
        return stats

    def detection_stats(self, listener: str) -> DetectionStats:
        stats = self.detection.get(listener)
        if stats is None:
            stats = self.detection[listener] = DetectionStats()
        return stats

    def golden(self) -> dict[tuple[str, str, str, str], HttpStats]:
        """The golden metrics: requests summed by (direction, source service, destination
        service, route). Inbound listeners count callers of this proxy's service (by their
        verified identity, "unknown" for plaintext ones); outbound listeners count this
        service's calls, by the service of the cluster picked. Listeners without a
        direction are left out."""
        golden: dict[tuple[str, str, str, str], HttpStats] = {}
        own = self.service or "unknown"
        for (listener, route, cluster, source), s in list(self.http.items()):
            direction = self.directions.get(listener)
            if direction == "inbound":
                key = (direction, source or "unknown", own, route)
            elif direction == "outbound":
                # a subset's cluster (`api~version=v2`) is its service's
                key = (direction, own, cluster.split("~", 1)[0], route)
            else:
                continue
            total = golden.get(key)
            if total is None:
                total = golden[key] = HttpStats()
            total.add(s)
        return golden

    def render(self) -> bytes:
        """The Prometheus text exposition of every counter."""
        from meshling.telemetry.exposition import render

        if self._registry is None:
            from meshling.telemetry.exposition import registry

            self._registry = registry(self)
        return render(self._registry)
