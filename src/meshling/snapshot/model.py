"""The snapshot model: everything one proxy runs, in Envoy's vocabulary.

A snapshot is the one contract between the control plane and the data plane:
listeners -> filter chains -> routes -> clusters -> endpoints. It is immutable
(frozen dataclasses), versioned, and built only through `snapshot.load`, which
validates every field and names the field path of anything wrong.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

    from meshling.policies.circuit_breaker.snapshot import CircuitBreakerConfig
    from meshling.policies.fault_injection.snapshot import FaultConfig
    from meshling.policies.health_check.snapshot import HealthCheckConfig
    from meshling.policies.load_balancing.snapshot import LoadBalancingConfig
    from meshling.policies.rate_limit.snapshot import RateLimitConfig
    from meshling.policies.retry.snapshot import RetryPolicy
    from meshling.policies.timeout.snapshot import Timeouts
    from meshling.policies.traffic_permission.snapshot import AuthzConfig
    from meshling.tracing.span import TraceTag

PathMatchKind = Literal["exact", "prefix", "regex"]
HeaderMatchKind = Literal["exact", "prefix", "regex", "present"]
EscapedSlashes = Literal["keep", "reject", "unescape"]
LbPolicy = Literal["round_robin"]
Protocol = Literal["http", "tcp"]
# what a cluster's endpoints speak: HTTP/1.1, HTTP/2, or whatever the client spoke
UpstreamProtocol = Literal["http1", "http2", "downstream"]
ChainProtocol = Literal["http", "tcp", "auto"]
Direction = Literal["inbound", "outbound"]
# Long enough for a client's first write after connecting, short enough to add little to
# the first connection of a server-speaks-first protocol, which waits this out.
DETECT_TIMEOUT = 0.3


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream address of a cluster."""

    address: str
    port: int
    # the locality the endpoint runs in, for zone-aware load balancing; None: unknown
    zone: str | None = None

    def __str__(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A proxy's certificate chain and key, and the roots it trusts (PEM files)."""

    certificate: str
    key: str
    trust_bundle: str


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """Mutual TLS to a cluster's endpoints (other proxies)."""

    files: TlsFiles
    # the SPIFFE ID every endpoint must present; None accepts any identity of the bundle
    identity: str | None = None
    alpn: tuple[str, ...] = ("http/1.1",)


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    """Mutual TLS on an inbound filter chain.

    strict: only mTLS; plaintext or a client without a certificate fails the handshake.
    permissive: mTLS and plaintext on one port, told apart by the first bytes;
    plaintext callers are unauthenticated.
    """

    files: TlsFiles
    mode: Literal["strict", "permissive"] = "strict"
    # how long a permissive listener waits for a client's first bytes
    detect_timeout: float = 5.0
    handshake_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Cluster:
    """A named group of interchangeable endpoints and how to connect to them."""

    name: str
    endpoints: tuple[Endpoint, ...]
    # seconds to establish a TCP connection before the attempt fails (502)
    connect_timeout: float = 1.0
    lb_policy: LbPolicy = "round_robin"
    # idle keep-alive connections kept per endpoint, and how long each may stay idle; a cap
    # below the usual concurrency makes connections churn, so it is generous by default
    max_idle_per_endpoint: int = 1024
    idle_timeout: float = 60.0
    tls: UpstreamTls | None = None
    # limits and outlier detection (CircuitBreaker); None: neither
    circuit_breaker: CircuitBreakerConfig | None = None
    # active checks of the endpoints (HealthCheck); None: endpoints are not checked
    health_check: HealthCheckConfig | None = None
    # how an endpoint is picked (LoadBalancing); None: round robin
    load_balancing: LoadBalancingConfig | None = None
    # HTTP/1.1 (pooled connections), HTTP/2 (multiplexed: a few long-lived connections
    # per endpoint; ALPN "h2" over TLS), or the protocol the client's request came in
    protocol: UpstreamProtocol = "http1"


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathMatchKind
    value: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: bytes  # lower-case
    kind: HeaderMatchKind
    value: str = ""
    invert: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """A query parameter (decoded; several of one name: any of them may match)."""

    name: str
    kind: HeaderMatchKind
    value: str = ""
    pattern: re.Pattern[str] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch = PathMatch("prefix", "/")
    methods: frozenset[bytes] = frozenset()  # empty: any method
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()  # empty: the query is not read


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Changes to the header fields of a request or response (lower-case names): drop
    the fields named by `remove` and `set`, then append `set` and `add`."""

    # appended, keeping the fields of the same name
    add: tuple[tuple[bytes, bytes], ...] = ()
    # replacing every field of the same name
    set: tuple[tuple[bytes, bytes], ...] = ()
    # dropped
    remove: frozenset[bytes] = frozenset()
    dropped: frozenset[bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropped", self.remove | {name for name, _ in self.set})

    def apply(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        dropped = self.dropped
        kept = [f for f in fields if f[0] not in dropped] if dropped else list(fields)
        kept.extend(self.set)
        kept.extend(self.add)
        return kept


@dataclass(frozen=True, slots=True)
class WeightedClusters:
    """Several clusters sharing a route's (or a TCP filter's) traffic by weight.

    A pick is one random draw and a binary search over the cumulative weights, so it
    costs the same for two clusters or twenty. A cluster of weight 0 is never picked.
    """

    clusters: tuple[str, ...]
    weights: tuple[int, ...]
    # running sums of `weights`; the last one is the total (> 0, checked by the loader)
    cumulative: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        sums: list[int] = []
        total = 0
        for weight in self.weights:
            total += weight
            sums.append(total)
        object.__setattr__(self, "cumulative", tuple(sums))

    def pick(self, draw: Callable[[], float] = random.random) -> str:
        """The cluster for one request or connection; `draw` returns a float in [0, 1)."""
        cumulative = self.cumulative
        # bisect_right skips the clusters of weight 0: their sum equals the previous one
        return self.clusters[bisect_right(cumulative, draw() * cumulative[-1])]


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """A route's answer from the proxy itself: the status, and a text/plain body."""

    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Redirect:
    """A route's redirect: `location` is the request's URL with these parts replaced
    (None: the request's own); the query string is kept."""

    status: int = 301
    scheme: bytes | None = None
    host: bytes | None = None
    port: int | None = None
    path: bytes | None = None


@dataclass(frozen=True, slots=True)
class RequestMirror:
    """A copy of a route's requests for another cluster (`proxy.mirror`): sent with the
    Host suffixed `-shadow`, its response discarded; the caller never waits for it."""

    cluster: str
    # the share of the route's requests copied, 0 to 100
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Route:
    """Requests that match go to one cluster (or one of `weighted`, picked per request);
    the first matching route wins."""

    name: str
    match: RouteMatch
    # the cluster; with `weighted`, its first cluster (the one metrics name when none
    # was picked, as for a request refused before it); "" for a direct response or
    # a redirect
    cluster: str
    # total time for the upstream to answer (504 after it); 0 disables
    timeout: float = 15.0
    # the Timeout policy's fragment (connect, per_try, idle, and `timeout` as its
    # request); None when the route's `timeout` is a plain duration
    timeouts: Timeouts | None = None
    # the Retry policy's fragment; None: an attempt that fails is the answer
    retry: RetryPolicy | None = None
    # `weighted_clusters`: the clusters sharing the route's requests; None: `cluster`
    weighted: WeightedClusters | None = None
    # changes to the request forwarded upstream, and to the response sent back
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    # answered by the proxy itself, never forwarded (at most one of the two)
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    # `rewrite.prefix`: replaces the matched path prefix of the request forwarded
    rewrite_prefix: bytes | None = None
    # `mirror`: a copy of each request (a share of them) for another cluster; None: none
    mirror: RequestMirror | None = None


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    # exact names, "*.suffix", "prefix.*" or "*"; a port in Host is ignored when matching
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    # a client must send a whole request head within this time (408 after it)
    header_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Http2Limits:
    """What one HTTP/2 client connection may use (`meshling.http2.guard`)."""

    # streams open at once (SETTINGS_MAX_CONCURRENT_STREAMS)
    max_concurrent_streams: int = 256
    # receive window of each stream and of the connection, in bytes
    stream_window: int = 1 << 20
    connection_window: int = 4 << 20
    # decoded size of one header list (SETTINGS_MAX_HEADER_LIST_SIZE)
    max_header_list_size: int = 65536
    # client resets of unanswered streams, and control frames, allowed per `window`
    max_resets: int = 200
    max_control_frames: int = 1000
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class HttpFilter:
    """The HTTP/1.1 connection manager: parse, route, forward."""

    route_config: RouteConfig
    limits: HttpLimits = HttpLimits()
    # HTTP/2 clients' limits and abuse budgets
    http2: Http2Limits = Http2Limits()
    # idle time allowed on a downstream keep-alive connection between requests
    idle_timeout: float = 60.0
    merge_slashes: bool = True
    escaped_slashes: EscapedSlashes = "keep"
    # trust and extend X-Forwarded-For from the client (True) or replace it (False)
    xff_append: bool = True
    # keep a client-sent X-Request-Id (True) or always generate a new one
    preserve_request_id: bool = True


@dataclass(frozen=True, slots=True)
class TcpFilter:
    """Opaque byte forwarding to one cluster (or one of `weighted`, per connection)."""

    # the cluster; with `weighted`, its first cluster
    cluster: str
    # a connection with no bytes in either direction for this long is closed
    idle_timeout: float = 3600.0
    # seconds to connect to an endpoint (`timeout.connect`); 0: the cluster's
    connect_timeout: float = 0.0
    # `weighted_clusters`: the clusters sharing the connections; None: `cluster`
    weighted: WeightedClusters | None = None


@dataclass(frozen=True, slots=True)
class ProtocolDetection:
    """A chain declared `protocol: auto`: HTTP/1 takes the `http` filter, the rest `tcp`.

    The protocol is told from the client's first bytes (`proxy.detect`); a client that
    sends nothing within `timeout` (a server-speaks-first protocol) is served as TCP.
    """

    timeout: float = DETECT_TIMEOUT


@dataclass(frozen=True, slots=True)
class ChainMatch:
    """Which connections of a transparent listener a chain takes, by their original
    destination (the address the app connected to before the capture redirected it)."""

    # addresses and networks (ipaddress objects); empty: any destination
    destinations: tuple[IPv4Network | IPv6Network, ...] = ()
    # destination ports; empty: any port
    ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class FilterChain:
    name: str
    http: HttpFilter | None = None
    tcp: TcpFilter | None = None
    tls: DownstreamTls | None = None
    # who may connect (TrafficPermission); None: everyone
    authz: AuthzConfig | None = None
    # how many requests / connections callers may make (RateLimit); None: no limit
    rate_limit: RateLimitConfig | None = None
    # delays, aborts and slow responses for callers (FaultInjection); None: none
    fault: FaultConfig | None = None
    # `protocol: auto` (both `http` and `tcp` given); None: the one filter given decides
    detection: ProtocolDetection | None = None
    # the chain's access logs (AccessLog), besides the snapshot's own
    access_log: tuple[AccessLog, ...] = ()
    # on a transparent listener: the original destinations it takes; None: all of them
    match: ChainMatch | None = None
    # on a transparent listener: forward the bytes to the original destination itself,
    # outside the mesh (no http or tcp filter)
    passthrough: bool = False

    @property
    def protocol(self) -> ChainProtocol:
        if self.detection is not None:
            return "auto"
        return "http" if self.http is not None else "tcp"


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    filter_chains: tuple[FilterChain, ...]
    # which way its traffic goes, for the golden metrics: into the proxy's service
    # (callers' requests) or out of it (the service's calls); None: neither is known
    direction: Direction | None = None
    # connections redirected to it by capture rules: each takes the first chain whose
    # `match` holds its original destination (`meshling.transparent`); none: refused
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class Admin:
    address: str = "127.0.0.1"
    port: int = 9901
    # token required by state-changing endpoints (drain); None: those endpoints are refused
    token: str | None = None


AccessLogFormat = Literal["json", "text"]


@dataclass(frozen=True, slots=True)
class AccessLogBackend:
    """Where access log records go: the proxy's stdout, a file (reopened when rotated
    away), or a TCP collector (newline-delimited records, reconnected with backoff).
    Sinks with equal backends share one writer, across listeners and reloads."""

    kind: Literal["stdout", "file", "tcp"]
    # the file's path (kind "file")
    path: str = ""
    # the collector's host and port (kind "tcp")
    host: str = ""
    port: int = 0
    # records held at most (between flushes, or while a collector is down); more are
    # dropped and counted, never queued without bound
    max_pending: int = 16384

    @property
    def label(self) -> str:
        """The backend as the drops metric names it: `stdout`, `file:<path>`, `tcp:<h:p>`."""
        if self.kind == "file":
            return f"file:{self.path}"
        if self.kind == "tcp":
            return f"tcp:{self.host}:{self.port}"
        return "stdout"


@dataclass(frozen=True, slots=True)
class AccessLog:
    """One access log sink: a format and a backend (`meshling.telemetry.logformat`).

    The snapshot's own `access_log:` logs every listener; a filter chain's list (the
    AccessLog policy's fragment) logs that chain's traffic, on an inbound chain only the
    callers it names."""

    backend: AccessLogBackend
    format: AccessLogFormat = "json"
    # json: (key, template) pairs in order, the template None for a named field
    fields: tuple[tuple[str, str | None], ...] = ()
    # text: the template; None for the default one
    template: str | None = None
    # on an inbound chain, the callers logged (SPIFFE IDs); "*": every caller
    identities: tuple[str, ...] = ("*",)
    # the AccessLog policy it comes from; "" for a snapshot's own
    name: str = ""


@dataclass(frozen=True, slots=True)
class Tracing:
    """Distributed tracing (`tracing:`, a Trace policy's fragment): one span per request
    through the proxy, exported over OTLP/HTTP; see `meshling.tracing`."""

    # the collector's OTLP/HTTP traces URL (http://host:4318/v1/traces)
    endpoint: str
    # the share of new traces kept, 0 to 100; a caller's own decision is honoured
    sampling: float = 100.0
    # formats written besides W3C Trace Context (always): "b3" (single), "b3multi"
    propagation: tuple[str, ...] = ("w3c",)
    # custom span attributes (a literal, or a request header's value)
    tags: tuple[TraceTag, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """`metrics:`: whether requests are counted in the golden metrics (per-route
    requests and latency); the proxy's own counters are always kept."""

    enabled: bool = True


@dataclass(frozen=True, slots=True)
class MeshDns:
    """`dns:`: the proxy's DNS responder (`meshling.dns`), on UDP and TCP at
    (address, port): `<service>.<domain>` names resolve to the services' virtual IPs,
    other names are relayed upstream."""

    address: str = "127.0.0.1"
    port: int = 15053
    # the mesh's domain, lower case, without dots at either end
    domain: str = "mesh"
    # seconds clients may cache an answer
    ttl: int = 30
    # where other names go, (address, port) in order; empty: /etc/resolv.conf's
    upstream: tuple[tuple[str, int], ...] = ()
    # service -> virtual IP (IPv4)
    names: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    listeners: tuple[Listener, ...]
    clusters: dict[str, Cluster]
    admin: Admin = Admin()
    access_log: AccessLog | None = None
    # seconds that in-flight requests get to finish on SIGTERM / drain
    drain_timeout: float = 10.0
    node: str = "meshling"
    # the service the proxy stands next to (the golden metrics' source of outbound calls
    # and destination of inbound ones); "" when not known
    service: str = ""
    # the locality the proxy runs in: endpoints of this zone are preferred where a
    # cluster's load balancing says so
    zone: str | None = None
    # distributed tracing; None: off (the tracing code is not even imported)
    tracing: Tracing | None = None
    metrics: MetricsSettings = MetricsSettings()
    # the DNS responder; None: off (the DNS code is not even imported)
    dns: MeshDns | None = None
