"""`build`: the snapshot one proxy runs, as a pure function of the mesh's resources.

What a dataplane becomes:

* an **inbound** listener per inbound, on every interface (`0.0.0.0`, not the dataplane's
  address, which may be a NAT or host address that is not on the proxy's interfaces) at
  the inbound port, forwarding to the local cluster `local:<service_port>`
  (`127.0.0.1:<service_port>`). With mTLS on, its chain terminates mTLS in the mesh's
  mode with the proxy's own files, and carries the `authz` fragment of the
  TrafficPermissions selecting the dataplane's service. Their tag sources are resolved
  here, from the tags of every dataplane of the mesh (this one included), into the
  identities of the services they select (see `traffic_permission.schema`); a
  dataplane listed more than once counts once per listing, which can only narrow an
  allow and widen a deny;
* an **outbound** listener per outbound, on `127.0.0.1` at the outbound port, forwarding
  to the cluster named after the destination service, whose endpoints are the inbounds
  (address, port) of every *other* dataplane of that service in the mesh. With mTLS on,
  the cluster originates mTLS and requires `spiffe://<mesh>/<service>`;
* the **admin** listener on `127.0.0.1` at the dataplane's admin port (no token: the
  drain endpoint stays refused, SIGTERM drains);
* with `dns:` on the dataplane, the **DNS responder** (`dns:` at the top) on `127.0.0.1`
  at its port, naming every service of the mesh (one with a dataplane) at its virtual
  IP (`MeshIndex.virtual_ips`, from `meshling.dns.vip`);
* with `transparent:` on the dataplane, the listeners that captured traffic reaches
  (`_transparent`): `outbound:transparent`, a chain per service of the mesh matching its
  virtual IP (as an outbound to it would be) and a passthrough chain for the rest, and
  `inbound:transparent`, the inbound chains again, matched by their service port.

The traffic policies (every registered kind but TrafficPermission) are placed by where
their kind attaches (`policies.PolicyType.attach`), each fragment under the kind's key,
only where a resource governs:

* **route** and **cluster** kinds (Timeout, Retry; CircuitBreaker, HealthCheck,
  LoadBalancing) act in the caller: for each outbound, the most specific resource of the
  kind selecting (this dataplane's service and tags, the destination service) governs,
  and its fragment goes into the outbound's route (a TCP outbound has no route: the
  kinds of `index.TCP_ROUTE_KEYS` go into its `tcp` filter, the others are not placed)
  or into the destination's cluster;
* **routes** kinds (HTTPRoute, TCPRoute) act in the caller like route kinds, but in
  place of the route: an HTTPRoute's rules become routes before the one to the whole
  service (each with the route kinds' fragments), a TCPRoute's backends the `tcp`
  filter's `weighted_clusters`; every backend cluster (a mirror's too) is added, a subset
  (`api~version=v2`) with the service's identity and cluster policies and, as endpoints,
  the service's dataplanes carrying its tags;
* **chain** kinds (RateLimit, FaultInjection) act in the called: every inbound chain of
  the dataplane gets the rules of the resources selecting it (its service and tags),
  mTLS on or off (a `"*"` rule holds plaintext callers too);
* **listener** kinds (AccessLog) add to every chain of the dataplanes they select, all
  of them (none is more specific): an outbound chain gets the sinks of those whose `to`
  names its service, an inbound chain those with a `from`, by caller identity;
* **proxy** kinds (Trace) configure the whole proxy: the most specific resource of the
  kind selecting the dataplane (its service and tags) puts its section at the
  snapshot's top level (`tracing:`).

A cluster whose load balancing prefers the local zone lists each endpoint's `zone` (its
dataplane's `zone` tag), and the snapshot then names the proxy's own (`zone:` at the
top, from this dataplane's tag); without such a cluster neither appears.

With mTLS off there is no `tls` and no `authz` anywhere: a plaintext caller has no
identity, so a permission could only deny it.

The output is a plain document (what `meshling.snapshot.from_dict` reads, and what the
config stream sends), fully sorted so equal inputs give equal bytes whatever order the
store returned them in. `version` is a hash of the rest of the document: a proxy can
tell an unchanged snapshot from the version alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshling.controlplane.builder.canonical import canonical_json, object_json
from meshling.controlplane.builder.index import (
    TCP_ROUTE_KEYS,
    ZONE_TAG,
    MeshIndex,
    OutboundPolicies,
    PolicyResource,
)
from meshling.controlplane.resources import Dataplane, Inbound, Mesh, Outbound
from meshling.dns.vip import allocate
from meshling.identity.spiffe import SpiffeId
from meshling.policies.backends import subset_of
from meshling.snapshot.model import TlsFiles

INBOUND_ADDRESS = "0.0.0.0"
LOOPBACK = "127.0.0.1"
# the version is a prefix of a SHA-256: 64 bits keep collisions out of reach for the
# number of snapshots one proxy ever sees, and stay short in logs and metric labels
_VERSION_HEX_DIGITS = 16
# where `_body` leaves the endpoints of a service's cluster, for the index to fill in
_FROM_INDEX: Any = object()
# the dataplane protocols of apps that speak HTTP/2
HTTP2_PROTOCOLS = frozenset({"http2", "grpc"})
# ... and where the cluster's endpoints are to carry their zones
_FROM_INDEX_WITH_ZONES: Any = object()


class BuildError(ValueError):
    """Inputs that cannot make a snapshot (a caller's mistake, not a resource's)."""


@dataclass(frozen=True, slots=True)
class SnapshotText:
    """A built snapshot as the config stream sends it: its version, and the canonical
    JSON of the whole document (version included), the text the version hashes plus the
    version itself."""

    version: str
    text: str


def build(
    dataplane: Dataplane,
    mesh: Mesh,
    dataplanes: Iterable[Dataplane],
    policies: Iterable[PolicyResource],
    tls_paths: TlsFiles | None,
    *,
    index: MeshIndex | None = None,
) -> dict[str, Any]:
    """The snapshot document of `dataplane`.

    `dataplanes` are the dataplanes known to the control plane (any mesh; `dataplane`
    itself may be among them), `policies` the policy resources (any mesh), `tls_paths`
    where the proxy keeps its own certificate, key and trust bundle (needed only when
    the mesh has mTLS on).

    `index`, `MeshIndex(mesh, dataplanes, policies)` made once for many dataplanes of
    the mesh, saves reading the whole mesh again for each; `dataplanes` and `policies`
    are then not read (pass the ones the index was made from, or nothing).
    """
    if index is None:
        index = MeshIndex(mesh, dataplanes, policies)
    body = _body(dataplane, mesh, index, tls_paths)
    for cluster in body["clusters"]:
        endpoints = cluster["endpoints"]
        if endpoints is _FROM_INDEX or endpoints is _FROM_INDEX_WITH_ZONES:
            zones = endpoints is _FROM_INDEX_WITH_ZONES
            cluster["endpoints"] = index.endpoints(
                cluster["name"], excluding=dataplane.name, zones=zones
            )
    return {"version": version_of(body), **body}


def build_text(dataplane: Dataplane, index: MeshIndex, tls_paths: TlsFiles | None) -> SnapshotText:
    """`build`'s document for `dataplane` of the index's mesh, as canonical JSON: the
    document is serialised once, for its version and for the wire, and the endpoints of
    each service are serialised once for every snapshot of the index."""
    body = _body(dataplane, index.mesh, index, tls_paths)
    members = {key: canonical_json(value) for key, value in body.items() if key != "clusters"}
    clusters = (_cluster_json(c, index, excluding=dataplane.name) for c in body["clusters"])
    members["clusters"] = "[" + ",".join(clusters) + "]"
    text = object_json(members)
    version = _hash(text)
    if all(key < "version" for key in members):
        # "version" sorts after every key of the body (all but `zone`, which few
        # snapshots have): the whole document's canonical JSON is the body's with the
        # version appended
        return SnapshotText(version, f'{text[:-1]},"version":{json.dumps(version)}}}')
    return SnapshotText(version, object_json({**members, "version": json.dumps(version)}))


def _cluster_json(cluster: dict[str, Any], index: MeshIndex, excluding: str) -> str:
    endpoints = cluster["endpoints"]
    if endpoints is not _FROM_INDEX and endpoints is not _FROM_INDEX_WITH_ZONES:
        return canonical_json(cluster)
    zones = endpoints is _FROM_INDEX_WITH_ZONES
    return object_json(
        {
            key: index.endpoints_json(cluster["name"], excluding, zones=zones)
            if key == "endpoints"
            else canonical_json(value)
            for key, value in cluster.items()
        }
    )


def version_of(body: dict[str, Any]) -> str:
    """A stable hash of a snapshot document without its version."""
    return _hash(canonical_json(body))


def _hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:_VERSION_HEX_DIGITS]


def _body(
    dataplane: Dataplane, mesh: Mesh, index: MeshIndex, tls_paths: TlsFiles | None
) -> dict[str, Any]:
    """The document without its version, and with `_FROM_INDEX` for the endpoints of
    the clusters of services: the caller puts them in, as documents or as text."""
    if dataplane.mesh != mesh.name:
        raise BuildError(
            f"dataplane {dataplane.name!r} belongs to mesh {dataplane.mesh!r}, not {mesh.name!r}"
        )
    if index.mesh != mesh:
        raise BuildError(f"the index was made for {index.mesh!r}, not {mesh!r}")
    tls = tls_paths if mesh.mtls.enabled else None
    if mesh.mtls.enabled and tls is None:
        raise BuildError(
            f"mesh {mesh.name!r} has mTLS on: dataplane {dataplane.name!r} needs tls_paths"
        )
    authz = index.authz(dataplane) if tls is not None else None
    inbound_policies = index.inbound(dataplane)

    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {}
    inbound_chains: list[tuple[Inbound, dict[str, Any]]] = []
    for inbound in sorted(dataplane.inbounds, key=lambda i: i.port):
        cluster = _local_cluster(inbound)
        clusters[cluster["name"]] = cluster
        # Detection does not look inside TLS yet: with mTLS on, an auto inbound is opaque
        # (the caller's outbound, on plaintext from its app, still detects).
        protocol = "tcp" if inbound.protocol == "auto" and tls is not None else inbound.protocol
        if protocol in HTTP2_PROTOCOLS:
            # the app speaks HTTP/2 (gRPC): so does its proxy, to it
            cluster["protocol"] = "http2"
            protocol = "http"
        chain = _chain(protocol, f"inbound:{inbound.port}", "local", cluster["name"])
        # fresh dicts per chain: a shared one would come out as a YAML alias
        if inbound_policies:
            chain = {**_fresh(inbound_policies), **chain}
        if tls is not None and authz is not None:
            security = {"tls": {"mode": mesh.mtls.mode, **_files(tls)}, "authz": authz.to_dict()}
            chain = {**security, **chain}
        chain.update(_logged(index, dataplane, None))
        inbound_chains.append((inbound, chain))
        listeners.append(_listener(f"inbound:{inbound.port}", INBOUND_ADDRESS, inbound, chain))
    zoned = False
    for outbound in sorted(dataplane.outbounds, key=lambda o: o.port):
        name = f"outbound:{outbound.service}"
        chain, zones = _outbound_chain(
            dataplane, index, tls, clusters, outbound.service, outbound.protocol, name
        )
        zoned = zoned or zones
        listeners.append(_listener(name, LOOPBACK, outbound, chain))
    if dataplane.transparent is not None:
        zones = _transparent(dataplane, index, tls, clusters, listeners, inbound_chains)
        zoned = zoned or zones

    body: dict[str, Any] = {"node": dataplane.name, "service": dataplane.service}
    zone = dataplane.tags.get(ZONE_TAG)
    if zoned and zone:
        body["zone"] = zone
    body["admin"] = {"address": LOOPBACK, "port": dataplane.admin_port}
    body.update(_proxy_wide(index, dataplane))
    if dataplane.dns is not None:
        # every service of the mesh by name, so an app can call one it has no outbound for
        # (transparent capture routes by the virtual IP)
        names = dict(index.virtual_ips())
        if dataplane.service not in names:
            # a dataplane not yet among the index's: its service as it will be allocated
            names = allocate([*names, dataplane.service], mesh.name)
        names = dict(sorted(names.items()))
        body["dns"] = {"address": LOOPBACK, "port": dataplane.dns.port, "names": names}
    body["listeners"] = listeners  # inbounds, then outbounds, each by port
    body["clusters"] = [clusters[name] for name in sorted(clusters)]
    return body


def _outbound_chain(
    dataplane: Dataplane,
    index: MeshIndex,
    tls: TlsFiles | None,
    clusters: dict[str, dict[str, Any]],
    service: str,
    declared: str,
    route_config: str,
) -> tuple[dict[str, Any], bool]:
    """The chain of the app's calls to `service` (in the `declared` protocol), with the
    clusters it sends to added to `clusters`; and whether one of them lists zones."""
    mesh = index.mesh
    policies = index.outbound(dataplane, service)
    protocol = "http" if declared in HTTP2_PROTOCOLS else declared
    zoned = policies.zones
    if service not in clusters:  # an explicit outbound's, when it has one
        cluster = _service_cluster(service, mesh, tls, policies)
        _between_proxies(cluster, declared, mesh, index)
        clusters[cluster["name"]] = cluster
    # the backends of a route policy: subsets of the service, or other services
    for backend in _backend_clusters(protocol, policies):
        if backend not in clusters:
            backend_policies = index.outbound(dataplane, subset_of(backend)[0])
            clusters[backend] = _service_cluster(backend, mesh, tls, backend_policies)
            _between_proxies(clusters[backend], declared, mesh, index)
            zoned = zoned or backend_policies.zones
    chain = _chain(protocol, route_config, service, service, policies)
    chain.update(_logged(index, dataplane, service))
    return chain, zoned


def _transparent(
    dataplane: Dataplane,
    index: MeshIndex,
    tls: TlsFiles | None,
    clusters: dict[str, dict[str, Any]],
    listeners: list[dict[str, Any]],
    inbound_chains: list[tuple[Inbound, dict[str, Any]]],
) -> bool:
    """Add the listeners of transparent capture; whether a cluster lists zones.

    `outbound:transparent` (loopback, where REDIRECT from OUTPUT lands) has a chain per
    service of the mesh matching its virtual IP, any port, in the protocol its inbounds
    speak (HTTP if all of them do, else TCP), then the passthrough chain unless
    `unmatched: refuse`. `inbound:transparent` (every interface) serves a connection to
    an inbound's service port as that inbound's chain serves its own port."""
    transparent = dataplane.transparent
    assert transparent is not None
    vips = dict(index.virtual_ips())
    if dataplane.service not in vips:
        # a dataplane not yet among the index's: its service as it will be allocated
        vips = allocate([*vips, dataplane.service], index.mesh.name)
    chains: list[dict[str, Any]] = []
    zoned = False
    for service, vip in sorted(vips.items()):
        declared = "http" if index.speaks_http(service) else "tcp"
        chain, zones = _outbound_chain(
            dataplane, index, tls, clusters, service, declared, f"transparent:{service}"
        )
        zoned = zoned or zones
        chains.append({"name": service, "match": {"destinations": [vip]}, **chain})
    if transparent.unmatched == "passthrough":
        chains.append({"name": "passthrough", "passthrough": True})
    if chains:
        listeners.append(
            {
                "name": "outbound:transparent",
                "address": LOOPBACK,
                "port": transparent.outbound_port,
                "direction": "outbound",
                "transparent": True,
                "filter_chains": chains,
            }
        )
    if inbound_chains:
        listeners.append(
            {
                "name": "inbound:transparent",
                "address": INBOUND_ADDRESS,
                "port": transparent.inbound_port,
                "direction": "inbound",
                "transparent": True,
                "filter_chains": [
                    {
                        "name": f"inbound:{inbound.port}",
                        "match": {"ports": [inbound.service_port]},
                        **_fresh(chain),
                    }
                    for inbound, chain in inbound_chains
                ],
            }
        )
    return zoned


def _logged(index: MeshIndex, dataplane: Dataplane, destination: str | None) -> dict[str, Any]:
    """The fields the "listener" kinds (AccessLog) add to one chain of `dataplane`: an
    outbound one to `destination`, or (None) an inbound one."""
    found: dict[str, Any] = {}
    here = (dataplane.service, dataplane.tags)
    for kind, resources in index.traffic:
        if kind.attach == "listener" and kind.fragment is not None:
            found.update(kind.fragment(resources, index.mesh.name, here, destination))
    return found


def _proxy_wide(index: MeshIndex, dataplane: Dataplane) -> dict[str, Any]:
    """The top-level sections of the "proxy" kinds (Trace): for each, the fragment of the
    most specific resource selecting `dataplane`, where one does."""
    found: dict[str, Any] = {}
    here = (dataplane.service, dataplane.tags)
    for kind, resources in index.traffic:
        if kind.attach == "proxy" and kind.fragment is not None:
            document = kind.fragment(resources, index.mesh.name, dataplane=here)
            if document:
                found[kind.key] = document
    return found


def _files(tls: TlsFiles) -> dict[str, str]:
    return {"certificate": tls.certificate, "key": tls.key, "trust_bundle": tls.trust_bundle}


def _listener(
    name: str, address: str, port_of: Inbound | Outbound, chain: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "port": port_of.port,
        "direction": name.split(":", 1)[0],
        "filter_chains": [chain],
    }


def _chain(
    protocol: str,
    route_config: str,
    route: str,
    cluster: str,
    policies: OutboundPolicies | None = None,
) -> dict[str, Any]:
    on_route = policies.route if policies is not None else {}
    if protocol == "auto":
        # both paths, the first bytes of each connection choosing between them
        return {
            "protocol": "auto",
            **_chain("http", route_config, route, cluster, policies),
            **_chain("tcp", route_config, route, cluster, policies),
        }
    routing = policies.routes if policies is not None else {}
    if protocol == "tcp":
        split = routing.get("tcp_route")
        tcp: dict[str, Any] = {"cluster": cluster}
        if split is not None:
            tcp = {"weighted_clusters": _fresh(split["weighted_clusters"])}
        tcp.update(_fresh({k: v for k, v in on_route.items() if k in TCP_ROUTE_KEYS}))
        return {"tcp": tcp}
    # one virtual host for any Host (the app addresses its destination by port); an
    # HTTPRoute's rules come first, then one route for any path to the whole service
    routes = [{"name": route, "cluster": cluster, **_fresh(on_route)}]
    http_route = routing.get("http_route")
    if http_route is not None:
        routes = [*_rule_routes(route, http_route["rules"], on_route), *routes]
    virtual_host = {"name": route, "domains": ["*"], "routes": routes}
    return {"http": {"route_config": {"name": route_config, "virtual_hosts": [virtual_host]}}}


def _rule_routes(
    route: str, rules: list[dict[str, Any]], on_route: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The routes of an HTTPRoute's rules: one per match (`<service>:<rule>` or, for a
    rule of several matches, `<service>:<rule>.<match>`), each with the route policies."""
    routes: list[dict[str, Any]] = []
    for i, rule in enumerate(rules):
        matches: list[Any] = rule["matches"] or [None]
        for j, match in enumerate(matches):
            document: dict[str, Any] = {
                "name": f"{route}:{i}" if len(matches) == 1 else f"{route}:{i}.{j}"
            }
            if match is not None:
                document["match"] = _fresh(match)
            for key in (
                "weighted_clusters",
                "direct_response",
                "redirect",
                "rewrite",
                "mirror",
                "request_headers",
                "response_headers",
            ):
                if key in rule:
                    document[key] = _fresh(rule[key])
            document.update(_fresh(on_route))
            routes.append(document)
    return routes


def _backend_clusters(protocol: str, policies: OutboundPolicies) -> list[str]:
    """The clusters an outbound's route policies send to (an HTTPRoute's on an HTTP
    path, its mirrors' among them, a TCPRoute's on a TCP one; "auto" has both)."""
    routing = policies.routes
    rules: list[Any] = []
    if protocol != "tcp" and "http_route" in routing:
        rules.extend(routing["http_route"]["rules"])
    if protocol != "http" and "tcp_route" in routing:
        rules.append(routing["tcp_route"])
    names = {c["cluster"] for rule in rules for c in rule.get("weighted_clusters", ())}
    names.update(rule["mirror"]["cluster"] for rule in rules if "mirror" in rule)
    return sorted(names)


def _between_proxies(cluster: dict[str, Any], protocol: str, mesh: Mesh, index: MeshIndex) -> None:
    """How a service's cluster speaks HTTP to the destination's proxies: HTTP/2, one
    multiplexed connection per peer, when the destination's inbounds all speak HTTP
    (their proxies turn streams back into what the app speaks); else what the client
    spoke. An app declared to speak HTTP/2 (gRPC) is always carried over HTTP/2."""
    if protocol == "tcp":
        return
    if protocol in HTTP2_PROTOCOLS or (
        mesh.multiplex and index.speaks_http(subset_of(cluster["name"])[0])
    ):
        cluster["protocol"] = "http2"
    else:
        cluster["protocol"] = "downstream"


def _local_cluster(inbound: Inbound) -> dict[str, Any]:
    return {
        "name": f"local:{inbound.service_port}",
        "endpoints": [{"address": LOOPBACK, "port": inbound.service_port}],
    }


def _service_cluster(
    name: str, mesh: Mesh, tls: TlsFiles | None, policies: OutboundPolicies
) -> dict[str, Any]:
    """The cluster of a service, or of a subset of it (`api~version=v2`: the same
    identity, fewer endpoints)."""
    endpoints = _FROM_INDEX_WITH_ZONES if policies.zones else _FROM_INDEX
    cluster: dict[str, Any] = {"name": name, "endpoints": endpoints}
    if tls is not None:
        identity = SpiffeId.for_service(mesh.name, subset_of(name)[0])
        cluster["tls"] = {**_files(tls), "identity": str(identity)}
    cluster.update(_fresh(policies.cluster))
    return cluster


def _fresh(document: Any) -> Any:
    """A copy of a fragment the index shares between snapshots: a document's objects are
    its own (a shared one would come out as a YAML alias, and could be changed by
    whoever holds the document)."""
    if isinstance(document, Mapping):
        return {key: _fresh(value) for key, value in document.items()}
    if isinstance(document, list | tuple):
        return [_fresh(value) for value in document]
    return document
