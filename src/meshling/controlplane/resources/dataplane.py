"""The Dataplane resource: one proxy, next to one instance of a service.

```yaml
kind: Dataplane
metadata: {name: api-1, mesh: default, labels: {}}
spec:
  service: api                 # its identity is spiffe://<mesh>/api
  address: 10.0.0.7            # where other proxies reach this one
  tags: {version: v1, zone: a}
  inbounds:                    # proxy port (mesh side) -> the local app's port
    - {port: 15006, service_port: 8080, protocol: http}     # http | http2 | grpc | tcp (default) | auto
  outbounds:                   # local port the app calls -> a destination service
    - {port: 15001, service: web, protocol: http}
  admin: {port: 9901}          # loopback only; default 9901
  dns: {port: 15053}           # the proxy's DNS responder for <service>.mesh names,
                               # on 127.0.0.1 (UDP and TCP); off when absent
  transparent:                 # the app's traffic captured (meshling transparent install)
    outbound_port: 15001       # its outbound TCP, routed by original destination
    inbound_port: 15006        # connections to its inbounds' service ports
    unmatched: passthrough     # or refuse: destinations outside the mesh
```

A proxy binds every one of these ports on one host, so they must all differ: an inbound
listens on every interface, and the others on loopback would collide with it. One
outbound per destination service, so a service has one cluster and one listener name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from meshling.controlplane.resources import metadata
from meshling.snapshot.load import _address, _int, _Node

KIND = "Dataplane"
DEFAULT_ADMIN_PORT = 9901
DEFAULT_DNS_PORT = 15053
DEFAULT_TRANSPARENT_OUTBOUND_PORT = 15001
DEFAULT_TRANSPARENT_INBOUND_PORT = 15006

# auto: told apart per connection from the first bytes (HTTP/1 as http, the rest as tcp)
# http2 and grpc: the app speaks HTTP/2 (cleartext, prior knowledge) on that port
Protocol = Literal["http", "http2", "grpc", "tcp", "auto"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """Traffic from other proxies to the local app."""

    # the port this proxy listens on for the mesh (other proxies' endpoints point here)
    port: int
    # the port the local app listens on, on 127.0.0.1
    service_port: int
    # http: parsed, routed and counted per request; tcp: opaque bytes
    protocol: Protocol = "tcp"


@dataclass(frozen=True, slots=True)
class Outbound:
    """Traffic from the local app to a service of the mesh."""

    # the port on 127.0.0.1 the local app calls
    port: int
    # the destination service; its endpoints are the inbounds of its dataplanes
    service: str
    # http: parsed, routed and counted per request; tcp: opaque bytes
    protocol: Protocol = "tcp"


@dataclass(frozen=True, slots=True)
class DataplaneDns:
    """The proxy's DNS responder: every service of the mesh by name, at its virtual IP."""

    # on 127.0.0.1, UDP and TCP
    port: int = DEFAULT_DNS_PORT


@dataclass(frozen=True, slots=True)
class DataplaneTransparent:
    """Transparent capture: the capture rules hand the app's outbound TCP, and inbound
    connections to its service ports, to these listeners of the proxy."""

    # every mesh service's virtual IP is routed to the service; the rest per `unmatched`
    outbound_port: int = DEFAULT_TRANSPARENT_OUTBOUND_PORT
    # a connection to an inbound's service port is served as that inbound
    inbound_port: int = DEFAULT_TRANSPARENT_INBOUND_PORT
    # a destination outside the mesh: forwarded to it as it is, or refused
    unmatched: Literal["passthrough", "refuse"] = "passthrough"


@dataclass(frozen=True, slots=True)
class Dataplane:
    """One proxy: the service it stands for, where it is, and the traffic it carries."""

    # unique within the mesh; the snapshot's node name
    name: str
    # the mesh it belongs to
    mesh: str
    # the service of the instance next to it: its identity is spiffe://<mesh>/<service>
    service: str
    # the IP address other proxies connect to
    address: str
    # mesh-side ports to the local app, sorted by port
    inbounds: tuple[Inbound, ...] = ()
    # local ports to services of the mesh, sorted by port
    outbounds: tuple[Outbound, ...] = ()
    # the admin listener's port, on 127.0.0.1
    admin_port: int = DEFAULT_ADMIN_PORT
    # attributes of the instance (version, zone, ...) that policies select by
    tags: dict[str, str] = field(default_factory=dict, hash=False)
    # free-form key/values for selecting resources; not used in snapshots
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    # the DNS responder (`dns:` in its snapshot); None: off
    dns: DataplaneDns | None = None
    # transparent capture's listeners; None: the app calls its outbounds' ports itself
    transparent: DataplaneTransparent | None = None


def parse_dataplane(document: Any, source: str) -> Dataplane:
    """Validate a parsed YAML/JSON document and build the Dataplane it describes.

    `source` names the document in errors (a file name, or an API request).
    """
    root = _Node(source, "", document).mapping(("kind", "metadata", "spec"))
    kind = root.need("kind", metadata.text)
    if kind != KIND:
        raise root.child("kind").error(f"expected kind {KIND}, got {kind!r}")
    meta = root.need("metadata", lambda n: n.mapping(("name", "mesh", "labels")))
    name = meta.need("name", metadata.name)
    mesh = meta.need("mesh", metadata.mesh)
    spec = root.need(
        "spec",
        lambda n: n.mapping(
            (
                "service",
                "address",
                "tags",
                "inbounds",
                "outbounds",
                "admin",
                "dns",
                "transparent",
            )
        ),
    )
    service = spec.need("service", lambda n: metadata.service(n, mesh))
    address = spec.need("address", _address)
    inbounds = [_inbound(i) for i in spec.items("inbounds", required=False)]
    outbounds = [_outbound(o, mesh) for o in spec.items("outbounds", required=False)]
    admin = spec.get("admin", lambda n: n.mapping(("port",)), None)
    admin_port = admin.get("port", _port, DEFAULT_ADMIN_PORT) if admin else DEFAULT_ADMIN_PORT
    dns = spec.get("dns", _dns, None)
    transparent = spec.get("transparent", _transparent, None)
    _check_ports(spec, inbounds, outbounds, admin_port, dns, transparent)
    _check_outbound_services(spec, outbounds)
    return Dataplane(
        name=name,
        mesh=mesh,
        service=service,
        address=address,
        inbounds=tuple(sorted(inbounds, key=lambda i: i.port)),
        outbounds=tuple(sorted(outbounds, key=lambda o: o.port)),
        admin_port=admin_port,
        tags=spec.get("tags", metadata.string_map, {}),
        labels=meta.get("labels", metadata.string_map, {}),
        dns=dns,
        transparent=transparent,
    )


def _transparent(node: _Node) -> DataplaneTransparent:
    node.mapping(("outbound_port", "inbound_port", "unmatched"))
    unmatched: Literal["passthrough", "refuse"] = node.get("unmatched", _unmatched, "passthrough")
    return DataplaneTransparent(
        outbound_port=node.get("outbound_port", _port, DEFAULT_TRANSPARENT_OUTBOUND_PORT),
        inbound_port=node.get("inbound_port", _port, DEFAULT_TRANSPARENT_INBOUND_PORT),
        unmatched=unmatched,
    )


def _dns(node: _Node) -> DataplaneDns:
    node.mapping(("port",))
    return DataplaneDns(port=node.get("port", _port, DEFAULT_DNS_PORT))


def _unmatched(node: _Node) -> Literal["passthrough", "refuse"]:
    if node.value == "passthrough":
        return "passthrough"
    if node.value == "refuse":
        return "refuse"
    raise node.error(f"must be one of passthrough, refuse, got {node.value!r}")


def _port(node: _Node) -> int:
    return _int(1, 65535)(node)


def _protocol(node: _Node) -> Protocol:
    for protocol in ("http", "http2", "grpc", "tcp", "auto"):
        if node.value == protocol:
            return protocol
    raise node.error(f"must be one of http, http2, grpc, tcp, auto, got {node.value!r}")


def _inbound(node: _Node) -> Inbound:
    node.mapping(("port", "service_port", "protocol"))
    return Inbound(
        port=node.need("port", _port),
        service_port=node.need("service_port", _port),
        protocol=node.get("protocol", _protocol, "tcp"),
    )


def _outbound(node: _Node, mesh: str) -> Outbound:
    node.mapping(("port", "service", "protocol"))
    return Outbound(
        port=node.need("port", _port),
        service=node.need("service", lambda n: metadata.service(n, mesh)),
        protocol=node.get("protocol", _protocol, "tcp"),
    )


def _check_ports(
    spec: _Node,
    inbounds: list[Inbound],
    outbounds: list[Outbound],
    admin_port: int,
    dns: DataplaneDns | None = None,
    transparent: DataplaneTransparent | None = None,
) -> None:
    used: dict[int, str] = {admin_port: "admin.port"}
    if transparent is not None:
        for key in ("outbound_port", "inbound_port"):
            port = getattr(transparent, key)
            if port in used or (dns is not None and port == dns.port):
                other = used.get(port, "dns.port")
                where = spec.child("transparent").child(key)
                raise where.error(
                    f"port {port} is already used by {other}; every port of a dataplane must differ"
                )
            used[port] = f"transparent.{key}"
    if dns is not None:
        if dns.port == admin_port:
            where = spec.child("dns").child("port")
            raise where.error(f"port {dns.port} is already used by admin.port")
        used[dns.port] = "dns.port"
    ports = [("inbounds", i, b.port) for i, b in enumerate(inbounds)]
    ports += [("outbounds", i, b.port) for i, b in enumerate(outbounds)]
    for key, i, port in ports:
        if port in used:
            raise (
                spec.child(key)
                .child(i)
                .child("port")
                .error(
                    f"port {port} is already used by {used[port]}; "
                    "every port of a dataplane must differ"
                )
            )
        used[port] = f"{key}[{i}].port"


def _check_outbound_services(spec: _Node, outbounds: list[Outbound]) -> None:
    seen: dict[str, int] = {}
    for i, outbound in enumerate(outbounds):
        if outbound.service in seen:
            raise (
                spec.child("outbounds")
                .child(i)
                .child("service")
                .error(
                    f"service {outbound.service!r} already has an outbound "
                    f"(outbounds[{seen[outbound.service]}]); give each service one outbound"
                )
            )
        seen[outbound.service] = i
