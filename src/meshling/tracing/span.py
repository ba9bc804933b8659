"""What a proxy hop's span says: its name, kind, attributes and status, as plain values.

`describe` is a pure function of what an exchange knew when it ended, following the
OpenTelemetry semantic conventions for HTTP (and for gRPC, `rpc.*`), with the mesh's
own facts under `meshling.*`. The SDK-facing code (`telemetry.otlp`) only copies the
result into a span, so every naming and status rule is tested here without an SDK.

* kind: SERVER on an inbound listener (the proxy receives the call for its service),
  CLIENT on an outbound one (the proxy makes its service's call); INTERNAL elsewhere;
* name: `{method} {route}` (the route is the snapshot's, the closest thing to
  `http.route` a proxy has), or the gRPC `{service}/{method}`;
* status: ERROR for a 5xx, for a request that got no response at all, and for a gRPC
  status that means the server failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
  INTERNAL, UNAVAILABLE, DATA_LOSS; any non-OK on a CLIENT span); the description is
  the proxy's own error reason (`upstream_connect_failure`, ...) when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["server", "client", "internal"]
AttributeValue = str | int | bool
# gRPC status codes that are the server's failure (OpenTelemetry's rpc semconv)
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


@dataclass(frozen=True, slots=True)
class TraceTag:
    """A custom span attribute: a literal value, or a request header's (or `default`)."""

    name: str
    literal: str | None = None
    header: bytes | None = None
    default: str | None = None


@dataclass(frozen=True, slots=True)
class Exchanged:
    """The facts of an ended exchange that a span reports."""

    direction: str | None
    listener: str
    method: bytes
    path: bytes
    scheme: bytes
    authority: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    status: int
    route: str
    cluster: str
    endpoint: str
    request_id: bytes
    peer: bytes
    # the calling service (inbound, from its identity) or ""
    source: str
    error: str | None
    body_in: int
    body_out: int
    grpc: bool = False
    grpc_status: int | None = None


@dataclass(frozen=True, slots=True)
class SpanDescription:
    name: str
    kind: Kind
    attributes: dict[str, AttributeValue]
    # None: status UNSET; else ERROR with this description
    error: str | None


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _host_port(authority: bytes) -> tuple[str, int | None]:
    host, port = authority, b""
    colon = authority.rfind(b":")
    if colon > authority.rfind(b"]"):
        host, port = authority[:colon], authority[colon + 1 :]
    return _text(host.strip(b"[]")), int(port) if port.isdigit() and len(port) <= 5 else None


def describe(ex: Exchanged, tags: tuple[TraceTag, ...] = ()) -> SpanDescription:
    """The span of an exchange (module docstring)."""
    kind: Kind = (
        "server"
        if ex.direction == "inbound"
        else "client"
        if ex.direction == "outbound"
        else "internal"
    )
    method = _text(ex.method)
    attributes: dict[str, AttributeValue] = {
        "http.request.method": method,
        "url.path": _text(ex.path),
        "url.scheme": _text(ex.scheme),
        "network.protocol.version": _text(ex.version),
        "meshling.listener": ex.listener,
        "meshling.route": ex.route,
        "meshling.cluster": ex.cluster,
    }
    if ex.authority:
        host, port = _host_port(ex.authority)
        attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
    if ex.status:
        attributes["http.response.status_code"] = ex.status
    if ex.endpoint:
        attributes["meshling.upstream.address"] = ex.endpoint
    if ex.request_id:
        attributes["meshling.request_id"] = _text(ex.request_id)
    if ex.peer and kind == "server":
        # (on a CLIENT span the peer is the proxy's own app, on loopback: nothing to say)
        attributes["client.address"] = _text(ex.peer)
    peer_service = ex.source if kind == "server" else ex.cluster.split("~", 1)[0]
    if peer_service and peer_service != "none":
        attributes["peer.service"] = peer_service
    attributes["http.request.body.size"] = ex.body_in
    attributes["http.response.body.size"] = ex.body_out
    for field, value in ex.headers:
        if field == b"user-agent":
            attributes["user_agent.original"] = _text(value)
            break
    for tag in tags:
        tag_value = tag.literal
        if tag.header is not None:
            tag_value = next((_text(v) for n, v in ex.headers if n == tag.header), tag.default)
        if tag_value is not None:
            attributes[tag.name] = tag_value
    name = f"{method} {ex.route}"
    error: str | None = None
    if ex.status >= 500 or ex.status == 0:
        error = ex.error or (f"HTTP {ex.status}" if ex.status else "no response")
        attributes["error.type"] = ex.error or (str(ex.status) if ex.status else "no_response")
    elif ex.error is not None:
        attributes["error.type"] = ex.error
    if ex.grpc:
        attributes["rpc.system"] = "grpc"
        rpc_service, _, rpc_method = _text(ex.path).lstrip("/").partition("/")
        if rpc_service and rpc_method:
            attributes["rpc.service"] = rpc_service
            attributes["rpc.method"] = rpc_method
            name = f"{rpc_service}/{rpc_method}"
        if ex.grpc_status is not None:
            attributes["rpc.grpc.status_code"] = ex.grpc_status
            failed = (
                ex.grpc_status in _GRPC_SERVER_ERRORS if kind == "server" else ex.grpc_status != 0
            )
            if failed and error is None:
                error = f"gRPC status {ex.grpc_status}"
    return SpanDescription(name, kind, attributes, error)
