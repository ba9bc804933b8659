"""Loading and validating snapshots from YAML or JSON.

Every error names the file, the field path (``listeners[0].port``) and the
reason, so an operator can fix a file without reading code. Validation is
total: a snapshot that loads is one the proxy can run.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from meshling.snapshot.model import (
    DETECT_TIMEOUT,
    AccessLog,
    Admin,
    ChainMatch,
    Cluster,
    DirectResponse,
    DownstreamTls,
    Endpoint,
    FilterChain,
    HeaderEdits,
    HeaderMatch,
    Http2Limits,
    HttpFilter,
    HttpLimits,
    Listener,
    MeshDns,
    MetricsSettings,
    PathMatch,
    ProtocolDetection,
    QueryMatch,
    Redirect,
    RequestMirror,
    Route,
    RouteConfig,
    RouteMatch,
    Snapshot,
    TcpFilter,
    TlsFiles,
    Tracing,
    UpstreamTls,
    VirtualHost,
    WeightedClusters,
)
from meshling.telemetry.logformat import DEFAULT_JSON_FIELDS

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# '~' and '=' for the subset clusters of a service (`api~version=v2`)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:~=-]{0,127}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# the access log's JSON fields when a sink names none (`telemetry.logformat`)
ACCESS_LOG_FIELDS = DEFAULT_JSON_FIELDS


class SnapshotError(ValueError):
    """A snapshot that cannot run: where (file, field path) and why."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source = source
        self.path = path
        self.reason = reason
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")


class _Node:
    """A value in the document together with its field path, for error messages."""

    __slots__ = ("path", "source", "value")

    def __init__(self, source: str, path: str, value: Any) -> None:
        self.source = source
        self.path = path
        self.value = value

    def error(self, reason: str) -> SnapshotError:
        return SnapshotError(self.source, self.path, reason)

    def child(self, key: str | int) -> _Node:
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
            return _Node(self.source, path, self.value[key])
        path = f"{self.path}.{key}" if self.path else key
        return _Node(
            self.source, path, self.value.get(key) if isinstance(self.value, dict) else None
        )

    def mapping(self, known: tuple[str, ...]) -> _Node:
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        for key in self.value:
            if key not in known:
                hint = ", ".join(known)
                raise self.child(str(key)).error(f"unknown field (known fields: {hint})")
        return self

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and self.value.get(key) is not None

    def items(self, key: str, *, required: bool = True) -> Iterator[_Node]:
        node = self.child(key)
        if node.value is None:
            if required:
                raise node.error("required field is missing")
            return
        if not isinstance(node.value, list):
            raise node.error(f"expected a list, got {_kind(node.value)}")
        for i in range(len(node.value)):
            yield node.child(i)

    def get(self, key: str, parse: Callable[[_Node], T], default: T) -> T:
        node = self.child(key)
        return default if node.value is None else parse(node)

    def need(self, key: str, parse: Callable[[_Node], T]) -> T:
        node = self.child(key)
        if node.value is None:
            raise node.error("required field is missing")
        return parse(node)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _str(node: _Node) -> str:
    if not isinstance(node.value, str) or not node.value:
        raise node.error(f"expected a non-empty string, got {_kind(node.value)}")
    return node.value


def _name(node: _Node) -> str:
    value = _str(node)
    if not _NAME.match(value):
        raise node.error(
            f"invalid name {value!r}: use letters, digits, '_', '.', ':', '~', '=', '-'"
        )
    return value


def _bool(node: _Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {_kind(node.value)}")
    return node.value


def _int(lo: int, hi: int) -> Callable[[_Node], int]:
    def parse(node: _Node) -> int:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise node.error(f"expected an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise node.error(f"{value} is out of range [{lo}, {hi}]")
        return value

    return parse


def _port(node: _Node) -> int:
    return _int(0, 65535)(node)


def _duration(node: _Node) -> float:
    """Seconds from a number or a string such as "250ms", "10s", "5m", "1h"."""
    value = node.value
    if isinstance(value, bool):
        raise node.error("expected a duration such as 250ms, 10s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise node.error(
            f"invalid duration {value!r}: use a number of seconds or 250ms, 10s, 5m, 1h"
        )
    if seconds < 0 or seconds > 30 * 86400:
        raise node.error(f"duration {value!r} is out of range [0, 30 days]")
    return seconds


def _address(node: _Node) -> str:
    value = _str(node)
    if value == "localhost":
        return "127.0.0.1"
    # inet_pton instead of the ipaddress module: the same check, without its import.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, value))
        except OSError:
            continue
    raise node.error(f"invalid IP address {value!r}")


def _choice(*options: str) -> Callable[[_Node], str]:
    def parse(node: _Node) -> str:
        if node.value not in options:
            raise node.error(f"must be one of {', '.join(options)}, got {node.value!r}")
        return str(node.value)

    return parse


def _regex(node: _Node) -> re.Pattern[str]:
    value = _str(node)
    try:
        return re.compile(value)
    except re.error as exc:
        raise node.error(f"invalid regular expression: {exc}") from None


def _endpoint(node: _Node) -> Endpoint:
    node.mapping(("address", "port", "zone"))
    return Endpoint(
        address=node.need("address", _address),
        port=node.need("port", _int(1, 65535)),
        zone=node.get("zone", _name, None),
    )


def _tls_files(node: _Node) -> TlsFiles:
    # Only the paths are checked here; the proxy reads and checks the files when it
    # builds its TLS contexts, and names the same field paths if they are bad.
    return TlsFiles(
        certificate=node.need("certificate", _str),
        key=node.need("key", _str),
        trust_bundle=node.need("trust_bundle", _str),
    )


def _spiffe_id(node: _Node) -> str:
    value = _str(node)
    if not value.startswith("spiffe://") or len(value) > 2048:
        raise node.error(f"expected a SPIFFE ID such as spiffe://mesh/service, got {value!r}")
    return value


def _alpn(node: _Node) -> str:
    value = _str(node)
    if len(value) > 255 or not value.isascii():
        raise node.error(f"invalid ALPN protocol {value!r}")
    return value


def _upstream_tls(node: _Node) -> UpstreamTls:
    node.mapping(("certificate", "key", "trust_bundle", "identity", "alpn"))
    alpn = tuple(_alpn(a) for a in node.items("alpn", required=False))
    return UpstreamTls(
        files=_tls_files(node),
        identity=node.get("identity", _spiffe_id, None),
        alpn=alpn or ("http/1.1",),
    )


def _downstream_tls(node: _Node) -> DownstreamTls:
    node.mapping(
        ("mode", "certificate", "key", "trust_bundle", "detect_timeout", "handshake_timeout")
    )
    return DownstreamTls(
        files=_tls_files(node),
        mode=node.get("mode", _choice("strict", "permissive"), "strict"),  # type: ignore[arg-type]
        detect_timeout=node.get("detect_timeout", _duration, 5.0),
        handshake_timeout=node.get("handshake_timeout", _duration, 10.0),
    )


def _cluster(node: _Node) -> Cluster:
    node.mapping(
        (
            "name",
            "endpoints",
            "connect_timeout",
            "lb_policy",
            "max_idle_per_endpoint",
            "idle_timeout",
            "tls",
            "circuit_breaker",
            "health_check",
            "load_balancing",
            "protocol",
        )
    )
    endpoints = tuple(_endpoint(e) for e in node.items("endpoints", required=False))
    # The policies' fragments: imported only when used, like the authz fragment.
    circuit_breaker = health_check = load_balancing = None
    if node.has("circuit_breaker"):
        from meshling.policies.circuit_breaker.snapshot import CircuitBreakerConfig

        circuit_breaker = CircuitBreakerConfig.from_dict(node.child("circuit_breaker"))
    if node.has("health_check"):
        from meshling.policies.health_check.snapshot import HealthCheckConfig

        health_check = HealthCheckConfig.from_dict(node.child("health_check"))
    if node.has("load_balancing"):
        from meshling.policies.load_balancing.snapshot import LoadBalancingConfig

        load_balancing = LoadBalancingConfig.from_dict(node.child("load_balancing"))
    return Cluster(
        name=node.need("name", _name),
        endpoints=endpoints,
        connect_timeout=node.get("connect_timeout", _duration, 1.0),
        lb_policy=node.get("lb_policy", _choice("round_robin"), "round_robin"),  # type: ignore[arg-type]
        max_idle_per_endpoint=node.get("max_idle_per_endpoint", _int(0, 100000), 1024),
        idle_timeout=node.get("idle_timeout", _duration, 60.0),
        tls=node.get("tls", _upstream_tls, None),
        circuit_breaker=circuit_breaker,
        health_check=health_check,
        load_balancing=load_balancing,
        protocol=node.get("protocol", _choice("http1", "http2", "downstream"), "http1"),  # type: ignore[arg-type]
    )


def _path_match(node: _Node) -> PathMatch:
    node.mapping(("exact", "prefix", "regex"))
    given = [k for k in ("exact", "prefix", "regex") if node.has(k)]
    if len(given) != 1:
        raise node.error("give exactly one of exact, prefix, regex")
    kind = given[0]
    if kind == "regex":
        pattern = node.need("regex", _regex)
        return PathMatch("regex", pattern.pattern, pattern)
    value = node.need(kind, _str)
    if not value.startswith("/"):
        raise node.child(kind).error(f"a path must start with '/', got {value!r}")
    return PathMatch("exact" if kind == "exact" else "prefix", value)


def _header_match(node: _Node) -> HeaderMatch:
    node.mapping(("name", "exact", "prefix", "regex", "present", "invert"))
    name = node.need("name", _str)
    if not _TOKEN.match(name):
        raise node.child("name").error(f"invalid header name {name!r}")
    given = [k for k in ("exact", "prefix", "regex", "present") if node.has(k)]
    if len(given) != 1:
        raise node.error("give exactly one of exact, prefix, regex, present")
    kind = given[0]
    invert = node.get("invert", _bool, False)
    key = name.lower().encode()
    if kind == "present":
        present = node.need("present", _bool)
        return HeaderMatch(key, "present", "", invert=(not present) != invert)
    if kind == "regex":
        pattern = node.need("regex", _regex)
        return HeaderMatch(key, "regex", pattern.pattern, invert, pattern)
    value = node.child(kind).value
    if not isinstance(value, str):
        raise node.child(kind).error(f"expected a string, got {_kind(value)}")
    return HeaderMatch(key, "exact" if kind == "exact" else "prefix", value, invert)


def _method(node: _Node) -> bytes:
    value = _str(node)
    if not _TOKEN.match(value):
        raise node.error(f"invalid method {value!r}")
    return value.upper().encode()


def _query_match(node: _Node) -> QueryMatch:
    node.mapping(("name", "exact", "prefix", "regex", "present"))
    name = node.need("name", _str)
    given = [k for k in ("exact", "prefix", "regex", "present") if node.has(k)]
    if len(given) != 1:
        raise node.error("give exactly one of exact, prefix, regex, present")
    kind = given[0]
    if kind == "present":
        if not node.need("present", _bool):
            raise node.child("present").error("only `present: true` is supported")
        return QueryMatch(name, "present")
    if kind == "regex":
        pattern = node.need("regex", _regex)
        return QueryMatch(name, "regex", pattern.pattern, pattern)
    value = node.child(kind).value
    if not isinstance(value, str):
        raise node.child(kind).error(f"expected a string, got {_kind(value)}")
    return QueryMatch(name, "exact" if kind == "exact" else "prefix", value)


# fields the proxy frames or owns: a route's header edits may not touch them
_OWNED_FIELDS = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
    }
)


def _edited_name(node: _Node) -> bytes:
    name = _str(node).lower()
    if not _TOKEN.match(name):
        raise node.error(f"invalid header name {name!r}")
    if name in _OWNED_FIELDS or name.startswith("x-meshling-"):
        raise node.error(f"header {name!r} is set by the proxy and cannot be edited")
    return name.encode()


def _header_value(node: _Node) -> bytes:
    value = node.value
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise node.error("expected a string without CR, LF or NUL")
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise node.error("a header value must be Latin-1 text") from None


def _edit_fields(node: _Node) -> tuple[tuple[bytes, bytes], ...]:
    """{name: value, ...}, in the order given."""
    if not isinstance(node.value, dict):
        raise node.error(f"expected a mapping of header names to values, got {_kind(node.value)}")
    fields = []
    for key, value in node.value.items():
        at = f"{node.path}.{key}"
        fields.append(
            (
                _edited_name(_Node(node.source, at, key)),
                _header_value(_Node(node.source, at, value)),
            )
        )
    return tuple(fields)


def _header_edits(node: _Node) -> HeaderEdits:
    node.mapping(("add", "set", "remove"))
    edits = HeaderEdits(
        add=node.get("add", _edit_fields, ()),
        set=node.get("set", _edit_fields, ()),
        remove=frozenset(_edited_name(n) for n in node.items("remove", required=False)),
    )
    for name, _ in edits.set:
        if name in edits.remove:
            raise node.child("remove").error(f"{name.decode()!r} is also set: give one of them")
    return edits


def _route_match(node: _Node) -> RouteMatch:
    node.mapping(("path", "methods", "headers", "query"))
    return RouteMatch(
        path=node.get("path", _path_match, PathMatch("prefix", "/")),
        methods=frozenset(_method(m) for m in node.items("methods", required=False)),
        headers=tuple(_header_match(h) for h in node.items("headers", required=False)),
        query=tuple(_query_match(q) for q in node.items("query", required=False)),
    )


def _cluster_ref(clusters: dict[str, Cluster]) -> Callable[[_Node], str]:
    def parse(node: _Node) -> str:
        cluster = _name(node)
        if cluster not in clusters:
            known = ", ".join(sorted(clusters)) or "none"
            raise node.error(f"unknown cluster {cluster!r} (defined: {known})")
        return cluster

    return parse


def _destination(node: _Node, clusters: dict[str, Cluster]) -> tuple[str, WeightedClusters | None]:
    """A route's or TCP filter's `cluster`, or its `weighted_clusters` (then the first
    cluster and the split)."""
    if node.has("cluster") == node.has("weighted_clusters"):
        raise node.error("give exactly one of cluster, weighted_clusters")
    if node.has("cluster"):
        return node.need("cluster", _cluster_ref(clusters)), None
    names: list[str] = []
    weights: list[int] = []
    for item in node.items("weighted_clusters"):
        item.mapping(("cluster", "weight"))
        name = item.need("cluster", _cluster_ref(clusters))
        if name in names:
            raise item.child("cluster").error(f"cluster {name!r} is listed twice")
        names.append(name)
        weights.append(item.need("weight", _int(0, 1_000_000)))
    if not names:
        raise node.child("weighted_clusters").error("expected at least one cluster")
    if sum(weights) == 0:
        raise node.child("weighted_clusters").error(
            "every weight is 0: give at least one cluster a positive weight"
        )
    return names[0], WeightedClusters(tuple(names), tuple(weights))


def _route(node: _Node, clusters: dict[str, Cluster]) -> Route:
    node.mapping(
        (
            "name",
            "match",
            "cluster",
            "weighted_clusters",
            "timeout",
            "retry",
            "request_headers",
            "response_headers",
            "direct_response",
            "redirect",
            "rewrite",
            "mirror",
        )
    )
    direct = node.get("direct_response", _direct_response, None)
    redirect = node.get("redirect", _redirect, None)
    match = node.get("match", _route_match, RouteMatch())
    if direct is not None or redirect is not None:
        given = [k for k in _ROUTE_ACTIONS if node.has(k)]
        if len(given) > 1:
            raise node.error(f"give exactly one of {', '.join(_ROUTE_ACTIONS)}, got {given}")
        if node.has("rewrite"):
            raise node.child("rewrite").error("a rewrite needs a route forwarding to a cluster")
        if node.has("mirror"):
            raise node.child("mirror").error("a mirror needs a route forwarding to a cluster")
        cluster, weighted = "", None
    else:
        cluster, weighted = _destination(node, clusters)
    rewrite = node.get("rewrite", _rewrite, None)
    if rewrite is not None and match.path.kind != "prefix":
        raise node.child("rewrite").error(
            f"a prefix rewrite needs a prefix path match, got {match.path.kind}"
        )
    # `timeout` is the total as a duration, or the Timeout policy's fragment as a mapping
    timeouts = _timeouts(node.child("timeout"))
    retry = None
    if node.child("retry").value is not None:
        # Imported only when used, like the authz fragment.
        from meshling.policies.retry.snapshot import RetryPolicy

        retry = RetryPolicy.from_dict(node.child("retry"))
    return Route(
        name=node.need("name", _name),
        match=match,
        cluster=cluster,
        timeout=timeouts.request if timeouts is not None else node.get("timeout", _duration, 15.0),
        timeouts=timeouts,
        retry=retry,
        weighted=weighted,
        request_headers=node.get("request_headers", _header_edits, None),
        response_headers=node.get("response_headers", _header_edits, None),
        direct_response=direct,
        redirect=redirect,
        rewrite_prefix=rewrite,
        mirror=node.get("mirror", lambda n: _mirror(n, clusters), None),
    )


_ROUTE_ACTIONS = ("cluster", "weighted_clusters", "direct_response", "redirect")
# the largest body of a direct response, in bytes (UTF-8)
DIRECT_BODY_LIMIT = 4096
_REDIRECT_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
# a path of printable ASCII, without the query or fragment delimiters
_URL_PATH = re.compile(r"/[!$%&'()*+,\-./0-9:;=@A-Z_a-z~]*")


def _direct_response(node: _Node) -> DirectResponse:
    node.mapping(("status", "body"))
    status = node.need("status", _int(200, 599))
    body = node.get("body", _str, "").encode("utf-8")
    if len(body) > DIRECT_BODY_LIMIT:
        raise node.child("body").error(
            f"a direct response body is at most {DIRECT_BODY_LIMIT} bytes, got {len(body)}"
        )
    return DirectResponse(status, body)


def _url_path(node: _Node) -> bytes:
    value = _str(node)
    if _URL_PATH.fullmatch(value) is None:
        raise node.error(
            f"expected a path starting with '/', of printable ASCII without spaces, '?' "
            f"or '#', got {value!r}"
        )
    return value.encode()


def _redirect(node: _Node) -> Redirect:
    node.mapping(("scheme", "host", "port", "path", "status"))
    host = node.get("host", _str, None)
    if host is not None and _REDIRECT_HOST.fullmatch(host) is None:
        raise node.child("host").error(f"expected a host name or [IPv6] address, got {host!r}")
    status = node.get("status", _int(300, 399), 301)
    if status not in (301, 302, 303, 307, 308):
        raise node.child("status").error(f"expected 301, 302, 303, 307 or 308, got {status}")
    scheme = node.get("scheme", _choice("http", "https"), None)
    return Redirect(
        status=status,
        scheme=scheme.encode() if scheme is not None else None,
        host=host.encode() if host is not None else None,
        port=node.get("port", _int(1, 65535), None),
        path=node.get("path", _url_path, None),
    )


def _rewrite(node: _Node) -> bytes:
    node.mapping(("prefix",))
    return node.need("prefix", _url_path)


def _percent(node: _Node) -> float:
    """A share from 0 to 100 (a number: 30, 0.5)."""
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error(f"expected a percentage from 0 to 100, got {_kind(value)}")
    if not 0 <= value <= 100:
        raise node.error(f"{value} is out of range [0, 100]")
    return float(value)


def _mirror(node: _Node, clusters: dict[str, Cluster]) -> RequestMirror:
    node.mapping(("cluster", "percent"))
    return RequestMirror(
        cluster=node.need("cluster", _cluster_ref(clusters)),
        percent=node.get("percent", _percent, 100.0),
    )


def _timeouts(node: _Node) -> Any:
    """The Timeout fragment (`policies.timeout.snapshot.Timeouts`) of a mapping, else None."""
    if not isinstance(node.value, dict):
        return None
    from meshling.policies.timeout.snapshot import Timeouts

    return Timeouts.from_dict(node)


def _domain(node: _Node) -> str:
    value = _str(node).lower()
    if value != "*" and not re.match(
        r"^(\*\.|)[a-z0-9.-]+(\.\*|)(:\d+)?$|^\[[0-9a-f:]+\](:\d+)?$", value
    ):
        raise node.error(f"invalid domain {value!r}: use a name, '*.suffix', 'prefix.*' or '*'")
    return value


def _virtual_host(node: _Node, clusters: dict[str, Cluster]) -> VirtualHost:
    node.mapping(("name", "domains", "routes"))
    routes = tuple(_route(r, clusters) for r in node.items("routes"))
    _unique(node, "routes", [r.name for r in routes])
    domains = tuple(_domain(d) for d in node.items("domains"))
    if not domains:
        raise node.child("domains").error("at least one domain is required ('*' matches any)")
    return VirtualHost(name=node.need("name", _name), domains=domains, routes=routes)


def _route_config(node: _Node, clusters: dict[str, Cluster]) -> RouteConfig:
    node.mapping(("name", "virtual_hosts"))
    vhosts = tuple(_virtual_host(v, clusters) for v in node.items("virtual_hosts"))
    _unique(node, "virtual_hosts", [v.name for v in vhosts])
    seen: dict[str, str] = {}
    for i, vh in enumerate(vhosts):
        for domain in vh.domains:
            if domain in seen:
                raise (
                    node.child("virtual_hosts")
                    .child(i)
                    .error(f"domain {domain!r} is already served by virtual host {seen[domain]!r}")
                )
            seen[domain] = vh.name
    return RouteConfig(name=node.get("name", _name, "default"), virtual_hosts=vhosts)


def _limits(node: _Node) -> HttpLimits:
    node.mapping(("max_request_line", "max_header_bytes", "max_headers", "header_timeout"))
    return HttpLimits(
        max_request_line=node.get("max_request_line", _int(64, 1 << 20), 8192),
        max_header_bytes=node.get("max_header_bytes", _int(256, 1 << 22), 65536),
        max_headers=node.get("max_headers", _int(1, 10000), 100),
        header_timeout=node.get("header_timeout", _duration, 10.0),
    )


def _http2_limits(node: _Node) -> Http2Limits:
    node.mapping(
        (
            "max_concurrent_streams",
            "stream_window",
            "connection_window",
            "max_header_list_size",
            "max_resets",
            "max_control_frames",
            "window",
        )
    )
    return Http2Limits(
        max_concurrent_streams=node.get("max_concurrent_streams", _int(1, 10000), 256),
        stream_window=node.get("stream_window", _int(65535, (1 << 31) - 1), 1 << 20),
        connection_window=node.get("connection_window", _int(65535, (1 << 31) - 1), 4 << 20),
        max_header_list_size=node.get("max_header_list_size", _int(1024, 1 << 24), 65536),
        max_resets=node.get("max_resets", _int(1, 1 << 20), 200),
        max_control_frames=node.get("max_control_frames", _int(1, 1 << 20), 1000),
        window=node.get("window", _duration, 10.0),
    )


def _http_filter(node: _Node, clusters: dict[str, Cluster]) -> HttpFilter:
    node.mapping(
        (
            "route_config",
            "limits",
            "http2",
            "idle_timeout",
            "merge_slashes",
            "escaped_slashes",
            "xff_append",
            "preserve_request_id",
        )
    )
    return HttpFilter(
        route_config=node.need("route_config", lambda n: _route_config(n, clusters)),
        limits=node.get("limits", _limits, HttpLimits()),
        http2=node.get("http2", _http2_limits, Http2Limits()),
        idle_timeout=node.get("idle_timeout", _duration, 60.0),
        merge_slashes=node.get("merge_slashes", _bool, True),
        escaped_slashes=node.get("escaped_slashes", _choice("keep", "reject", "unescape"), "keep"),  # type: ignore[arg-type]
        xff_append=node.get("xff_append", _bool, True),
        preserve_request_id=node.get("preserve_request_id", _bool, True),
    )


def _tcp_filter(node: _Node, clusters: dict[str, Cluster]) -> TcpFilter:
    node.mapping(("cluster", "weighted_clusters", "idle_timeout", "timeout"))
    cluster, weighted = _destination(node, clusters)
    idle = node.get("idle_timeout", _duration, 3600.0)
    # The Timeout fragment: its `idle` and `connect` apply (a TCP chain has no requests).
    timeouts = None
    if node.child("timeout").value is not None:
        timeouts = _timeouts(node.child("timeout"))
        if timeouts is None:
            raise node.child("timeout").error(
                "expected a mapping such as {idle: 5m, connect: 1s} (the Timeout fragment)"
            )
        if node.has("idle_timeout") and timeouts.idle:
            raise (
                node.child("timeout")
                .child("idle")
                .error("the idle timeout is also given as idle_timeout: give one of them")
            )
        idle = timeouts.idle or idle
    return TcpFilter(
        cluster=cluster,
        idle_timeout=idle,
        connect_timeout=timeouts.connect if timeouts is not None else 0.0,
        weighted=weighted,
    )


def _filter_chain(node: _Node, clusters: dict[str, Cluster]) -> FilterChain:
    node.mapping(
        (
            "name",
            "protocol",
            "detect_timeout",
            "http",
            "tcp",
            "tls",
            "authz",
            "rate_limit",
            "fault",
            "access_log",
            "match",
            "passthrough",
        )
    )
    passthrough = node.get("passthrough", _bool, False)
    if passthrough:
        for key in ("http", "tcp", "tls", "protocol", "detect_timeout"):
            if node.has(key):
                raise node.child(key).error(
                    "a passthrough chain forwards to the original destination as it is: "
                    f"remove {key}"
                )
    detection = None if passthrough else _detection(node)
    if not passthrough and detection is None and node.has("http") == node.has("tcp"):
        raise node.error("give exactly one of http, tcp (or both with protocol: auto)")
    authz = rate_limit = fault = None
    if node.has("authz"):
        # Imported only when used: it brings the SPIFFE parsing along.
        from meshling.policies.traffic_permission.snapshot import AuthzConfig

        authz = AuthzConfig.from_dict(node.child("authz"))
    if node.has("rate_limit"):
        from meshling.policies.rate_limit.snapshot import RateLimitConfig

        rate_limit = RateLimitConfig.from_dict(node.child("rate_limit"))
    if node.has("fault"):
        from meshling.policies.fault_injection.snapshot import FaultConfig

        fault = FaultConfig.from_dict(node.child("fault"))
    return FilterChain(
        authz=authz,
        rate_limit=rate_limit,
        fault=fault,
        name=node.get("name", _name, "default"),
        http=node.get("http", lambda n: _http_filter(n, clusters), None),
        tcp=node.get("tcp", lambda n: _tcp_filter(n, clusters), None),
        tls=node.get("tls", _downstream_tls, None),
        detection=detection,
        access_log=node.get("access_log", _chain_access_logs, ()),
        match=node.get("match", _chain_match, None),
        passthrough=passthrough,
    )


def _chain_match(node: _Node) -> ChainMatch:
    """A transparent listener's chain selection: `{destinations: [ip or cidr], ports: []}`."""
    # ipaddress only for snapshots that have one: the proxy's start stays lean
    import ipaddress

    node.mapping(("destinations", "ports"))
    destinations = []
    for item in node.items("destinations", required=False):
        try:
            destinations.append(ipaddress.ip_network(_str(item), strict=False))
        except ValueError:
            raise item.error(f"invalid address or CIDR {item.value!r}") from None
    ports = frozenset(_int(1, 65535)(p) for p in node.items("ports", required=False))
    return ChainMatch(destinations=tuple(destinations), ports=ports)


def _detection(node: _Node) -> ProtocolDetection | None:
    """A chain's `protocol: auto` and `detect_timeout`; None for a declared protocol."""
    protocol = node.get("protocol", _choice("http", "tcp", "auto"), None)
    if protocol != "auto":
        if node.has("detect_timeout"):
            raise node.child("detect_timeout").error("only a chain with protocol: auto detects")
        if protocol is not None and not node.has(protocol):
            raise node.child("protocol").error(f"protocol: {protocol} needs the {protocol} block")
        return None
    for block in ("http", "tcp"):
        if not node.has(block):
            raise node.error(
                f"protocol: auto needs both http (for HTTP/1) and tcp (for the rest); "
                f"{block} is missing"
            )
    if node.has("tls"):
        # Inside TLS the protocol would have to be detected again, after the handshake.
        raise node.child("tls").error(
            "protocol detection on a TLS chain is not supported yet: declare http or tcp"
        )
    timeout = node.get("detect_timeout", _duration, DETECT_TIMEOUT)
    if timeout <= 0:
        raise node.child("detect_timeout").error("must be more than 0")
    return ProtocolDetection(timeout=timeout)


def _listener(node: _Node, clusters: dict[str, Cluster]) -> Listener:
    node.mapping(("name", "address", "port", "filter_chains", "direction", "transparent"))
    chains = tuple(_filter_chain(c, clusters) for c in node.items("filter_chains"))
    transparent = node.get("transparent", _bool, False)
    if transparent:
        _transparent_chains(node, chains)
    elif any(c.match is not None or c.passthrough for c in chains):
        i = next(i for i, c in enumerate(chains) if c.match is not None or c.passthrough)
        raise (
            node.child("filter_chains")
            .child(i)
            .error("match and passthrough need a listener with transparent: true")
        )
    elif len(chains) != 1:
        # Several chains need match criteria (SNI, transport protocol), which arrive with TLS.
        raise node.child("filter_chains").error("exactly one filter chain is supported")
    return Listener(
        name=node.need("name", _name),
        address=node.get("address", _address, "127.0.0.1"),
        port=node.need("port", _port),
        filter_chains=chains,
        direction=node.get("direction", _choice("inbound", "outbound"), None),  # type: ignore[arg-type]
        transparent=transparent,
    )


def _transparent_chains(node: _Node, chains: tuple[FilterChain, ...]) -> None:
    """A transparent listener's chains are tried in order: each needs a name of its own,
    and nothing may follow a chain that takes every destination."""
    if not chains:
        raise node.child("filter_chains").error("a transparent listener needs a chain")
    _unique(node, "filter_chains", [c.name for c in chains])
    for i, chain in enumerate(chains[:-1]):
        if chain.match is None or chain.match == ChainMatch():
            raise (
                node.child("filter_chains")
                .child(i + 1)
                .error(f"unreachable: chain {chain.name!r} before it takes every destination")
            )


def _admin(node: _Node) -> Admin:
    node.mapping(("address", "port", "token"))
    return Admin(
        address=node.get("address", _address, "127.0.0.1"),
        port=node.get("port", _port, 9901),
        token=node.get("token", _str, None),
    )


def _access_log(node: _Node) -> AccessLog:
    """The snapshot's own access log (`path:` a file or "-", or any sink's backend)."""
    from meshling.policies.access_log.snapshot import parse_sink

    return parse_sink(node, legacy=True)


def _chain_access_logs(node: _Node) -> tuple[AccessLog, ...]:
    """A filter chain's access log sinks (the AccessLog policy's fragment)."""
    from meshling.policies.access_log.snapshot import parse_sink

    if not isinstance(node.value, list):
        raise node.error(f"expected a list of sinks, got {_kind(node.value)}")
    return tuple(parse_sink(node.child(i), chain=True) for i in range(len(node.value)))


def _unique(node: _Node, key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise node.child(key).child(i).child("name").error(f"duplicate name {name!r}")
        seen.add(name)


def from_dict(document: Any, source: str = "<snapshot>") -> Snapshot:
    """Validate a parsed document and build the snapshot it describes."""
    root = _Node(source, "", document).mapping(
        (
            "version",
            "node",
            "service",
            "zone",
            "listeners",
            "clusters",
            "admin",
            "access_log",
            "drain_timeout",
            "tracing",
            "metrics",
            "dns",
        )
    )
    version = root.need(
        "version", lambda n: str(n.value) if isinstance(n.value, str | int) else _str(n)
    )
    cluster_list = [_cluster(c) for c in root.items("clusters", required=False)]
    _unique(root, "clusters", [c.name for c in cluster_list])
    clusters = {c.name: c for c in cluster_list}
    listeners = tuple(_listener(item, clusters) for item in root.items("listeners"))
    _unique(root, "listeners", [li.name for li in listeners])
    binds: dict[tuple[str, int], str] = {}
    admin = root.get("admin", _admin, Admin())
    for i, li in enumerate(listeners):
        key = (li.address, li.port)
        if li.port and key in binds:
            raise (
                root.child("listeners")
                .child(i)
                .child("port")
                .error(f"{li.address}:{li.port} is already used by listener {binds[key]!r}")
            )
        if li.port and li.port == admin.port and li.address == admin.address:
            raise (
                root.child("listeners")
                .child(i)
                .child("port")
                .error(f"{li.address}:{li.port} is the admin listener's address")
            )
        binds[key] = li.name
    dns = root.get("dns", _dns, None)
    if dns is not None:
        _check_dns_port(root, dns.address, dns.port, binds, admin)
    return Snapshot(
        version=version,
        listeners=listeners,
        clusters=clusters,
        admin=admin,
        access_log=root.get("access_log", _access_log, None),
        drain_timeout=root.get("drain_timeout", _duration, 10.0),
        node=root.get("node", _name, "meshling"),
        service=root.get("service", _name, ""),
        zone=root.get("zone", _name, None),
        tracing=root.get("tracing", _tracing, None),
        metrics=root.get("metrics", _metrics, MetricsSettings()),
        dns=dns,
    )


def _dns(node: _Node) -> MeshDns:
    # the parsers live with the DNS code, which only a snapshot with DNS loads
    from meshling.dns.config import parse_dns

    return parse_dns(node)


def _check_dns_port(
    root: _Node, address: str, port: int, binds: dict[tuple[str, int], str], admin: Admin
) -> None:
    """The DNS responder's TCP socket may not take a listener's or the admin's port."""
    if not port:
        return
    for bound, name in [*binds.items(), ((admin.address, admin.port), "admin")]:
        wildcard = "0.0.0.0" in (bound[0], address) or "::" in (bound[0], address)
        if bound[1] == port and (bound[0] == address or wildcard):
            raise (
                root.child("dns")
                .child("port")
                .error(f"{address}:{port} is already used by listener {name!r}")
            )


def _tracing(node: _Node) -> Tracing:
    # the parsers live with the tracing code, which only a snapshot with tracing loads
    from meshling.tracing.config import parse_tracing

    return parse_tracing(node)


def _metrics(node: _Node) -> MetricsSettings:
    node.mapping(("enabled",))
    return MetricsSettings(enabled=node.get("enabled", _bool, True))


def parse_text(text: str, source: str) -> Any:
    """Parse YAML or JSON text (JSON is YAML, but its errors read better from json)."""
    if source.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SnapshotError(source, f"line {exc.lineno}", f"invalid JSON: {exc.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SnapshotError(source, where, f"invalid YAML: {problem}") from None


def load(path: str | os.PathLike[str]) -> Snapshot:
    """Read, parse and validate a snapshot file."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise SnapshotError(source, "", f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SnapshotError(source, "", "file is not UTF-8 text") from None
    return from_dict(parse_text(text, source), source)
