"""`MeshIndex`: what every snapshot of one mesh reads, worked out once for all of them.

A snapshot reads the whole mesh (the endpoints of each destination service, the tags of
every dataplane, the permissions of each inbound), but a mesh of N dataplanes has N
snapshots: reading the mesh again for each makes a change touching every proxy cost
O(N²). The index reads it once, from the same inputs `build` takes (dataplanes and
policies of any mesh; those of other meshes are left out here), into:

* **endpoints** per service (or subset cluster, `api~version=v2`: the dataplanes of
  the service carrying the tags): the (address, port) of every inbound of its dataplanes,
  deduplicated and in the snapshot's order (numeric by address, IPv4 first, then port),
  each with the names of the dataplanes listing it, so a snapshot can leave itself out;
  and their canonical JSON, spliced into the text of every snapshot with an outbound to
  the service (most of a snapshot's bytes);
* **instance tags** per service: what tag sources select from;
* **authz** per destination service: the merged TrafficPermissions, kept for every
  dataplane of that service;
* the **traffic policies** (every registered kind but TrafficPermission), grouped by
  kind: per destination service the resources that can select it, and per (source
  service and tags, destination service) the fragments of the resources that govern
  that pair (`outbound`); per (service, tags) of a dataplane the inbound chain's
  fragments (`inbound`). Dataplanes of one service and tags share all of them, so a
  mesh's policies are matched once per distinct caller, not once per proxy.

Dataplanes are grouped by service up front; the rest is made on first need and kept, so
an index made for one proxy's snapshot (a proxy registering) reads only the services
that snapshot names.

An index never changes its answers: a change to the mesh's resources makes a new one
(`DistributorCore` keeps one per mesh, dropped on every change to it).
"""

from __future__ import annotations

import functools
import ipaddress
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshling.controlplane.builder.canonical import canonical_json
from meshling.controlplane.resources import Dataplane, Mesh
from meshling.policies import POLICIES, PolicyType, traffic_permission
from meshling.policies.backends import subset_of
from meshling.policies.matching import ANY, best_match
from meshling.policies.traffic_permission import AuthzConfig, TrafficPermission

# The dataplane tag that names its locality: endpoints carry their dataplane's, and a
# proxy its own, where a cluster's load balancing prefers the local zone.
ZONE_TAG = "zone"
# The LoadBalancing fragment's field that asks for zones in a cluster.
PREFER_LOCAL_ZONE = "prefer_local_zone"
# The route policies a TCP outbound takes too, under its `tcp` filter: a TCP chain has no
# routes, and only a Timeout (its `connect` and `idle`) means anything without requests.
TCP_ROUTE_KEYS = frozenset({"timeout"})

Tags = tuple[tuple[str, str], ...]  # a dataplane's tags, hashable


class PolicyResource(Protocol):
    """A resource of any registered policy kind, as the builder holds it."""

    @property
    def name(self) -> str: ...

    @property
    def mesh(self) -> str: ...


@functools.cache
def _kinds_by_class() -> dict[type, PolicyType[Any, Any]]:
    """The registry by the class each `parse_resource` returns (its annotation): a
    resource does not name its own kind."""
    found: dict[type, PolicyType[Any, Any]] = {}
    for policy in POLICIES:
        returned = typing.get_type_hints(policy.parse_resource).get("return")
        if isinstance(returned, type):
            found[returned] = policy
    return found


def policy_of(resource: object) -> PolicyType[Any, Any] | None:
    """The registered policy kind of a resource; None for Mesh, Dataplane and others."""
    return _kinds_by_class().get(type(resource))


@dataclass(frozen=True, slots=True)
class OutboundPolicies:
    """The fragments of the policies governing one (caller, destination service) pair:
    by key, those for the route (`routes[].<key>`), those for the cluster, and those
    replacing the route itself (HTTPRoute, TCPRoute: `attach="routes"`)."""

    route: Mapping[str, Any] = field(default_factory=dict)
    cluster: Mapping[str, Any] = field(default_factory=dict)
    routes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def zones(self) -> bool:
        """Whether the cluster's endpoints carry their zone (the proxy prefers its own)."""
        balancing = self.cluster.get("load_balancing")
        return isinstance(balancing, Mapping) and balancing.get(PREFER_LOCAL_ZONE) is True


NO_OUTBOUND_POLICIES = OutboundPolicies()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a service's cluster, and the dataplanes that list it."""

    address: str
    port: int
    # a set: the same instance listed twice (say, re-registered) is one endpoint
    listed_by: frozenset[str]
    # the `zone` tag of the dataplanes listing it; None if they have none or disagree
    zone: str | None = None


class MeshIndex:
    """The per-mesh lookups of the snapshot builder (see the module docstring)."""

    __slots__ = (
        "_authz",
        "_by_service",
        "_candidates",
        "_endpoints",
        "_endpoints_json",
        "_fragments",
        "_inbound",
        "_instances",
        "_outbound",
        "_permissions",
        "_traffic",
        "_virtual_ips",
        "mesh",
    )

    def __init__(
        self, mesh: Mesh, dataplanes: Iterable[Dataplane], policies: Iterable[PolicyResource]
    ) -> None:
        self.mesh = mesh
        self._permissions: list[TrafficPermission] = []
        # the traffic policies of the mesh by kind, in the registry's order
        traffic: dict[str, tuple[PolicyType[Any, Any], list[Any]]] = {}
        for resource in policies:
            if resource.mesh != mesh.name:
                continue
            if isinstance(resource, TrafficPermission):
                self._permissions.append(resource)
                continue
            kind = policy_of(resource)
            if kind is not None and kind.fragment is not None:
                traffic.setdefault(kind.kind, (kind, []))[1].append(resource)
        self._traffic = [traffic[p.kind] for p in POLICIES if p.kind in traffic]
        by_service: dict[str, list[Dataplane]] = {}
        instances: dict[str, list[dict[str, str]]] = {}
        for dataplane in dataplanes:
            if dataplane.mesh == mesh.name:
                by_service.setdefault(dataplane.service, []).append(dataplane)
                instances.setdefault(dataplane.service, []).append(dataplane.tags)
        self._by_service = by_service
        self._instances: Mapping[str, Sequence[Mapping[str, str]]] = instances
        # made on first need: a proxy registering reads two or three services, not all
        self._endpoints: dict[str, tuple[tuple[Endpoint, ...], frozenset[str]]] = {}
        self._endpoints_json: dict[tuple[str, bool], str] = {}
        self._authz: dict[str, AuthzConfig] = {}
        self._candidates: dict[tuple[str, str], list[Any]] = {}
        self._fragments: dict[tuple[str, str], dict[str, Any]] = {}
        self._outbound: dict[tuple[str, Tags, str], OutboundPolicies] = {}
        self._inbound: dict[tuple[str, Tags], dict[str, Any]] = {}
        self._virtual_ips: dict[str, str] | None = None

    def virtual_ips(self) -> Mapping[str, str]:
        """Every service of the mesh (one with a dataplane) and its virtual IP, by name:
        what `<service>.mesh` resolves to, and what transparent capture routes by."""
        if self._virtual_ips is None:
            from meshling.dns.vip import allocate

            self._virtual_ips = allocate(self._by_service, self.mesh.name)
        return self._virtual_ips

    def speaks_http(self, service: str) -> bool:
        """Does every inbound of `service` take HTTP (so that its proxies can turn HTTP/2
        streams from other proxies back into what its app speaks)?"""
        http = {"http", "http2", "grpc"}
        if not self.mesh.mtls.enabled:
            http.add("auto")  # detection sees HTTP/2's preface too, when not inside TLS
        dataplanes = self._by_service.get(service, ())
        return bool(dataplanes) and all(
            inbound.protocol in http for d in dataplanes for inbound in d.inbounds
        )

    def endpoints(
        self, service: str, excluding: str, *, zones: bool = False
    ) -> list[dict[str, Any]]:
        """The endpoints of `service` as the cluster lists them, in order, less those
        only dataplane `excluding` lists (a proxy is not an endpoint of its own
        outbound); with `zones`, each with its zone where it has one."""
        endpoints, _ = self._endpoints_of(service)
        return [
            _endpoint_document(e, zones)
            for e in endpoints
            if excluding not in e.listed_by or len(e.listed_by) > 1
        ]

    def endpoints_json(self, service: str, excluding: str, *, zones: bool = False) -> str:
        """`endpoints` as the canonical JSON of the cluster's `endpoints` list."""
        endpoints, listed_by = self._endpoints_of(service)
        if excluding in listed_by:
            return canonical_json(self.endpoints(service, excluding, zones=zones))
        text = self._endpoints_json.get((service, zones))
        if text is None:
            text = self._endpoints_json[(service, zones)] = canonical_json(
                [_endpoint_document(e, zones) for e in endpoints]
            )
        return text

    def _endpoints_of(self, service: str) -> tuple[tuple[Endpoint, ...], frozenset[str]]:
        """The endpoints of `service` in order, and every dataplane listing one."""
        found = self._endpoints.get(service)
        if found is None:
            listings: dict[tuple[str, int], set[str]] = {}
            zones: dict[tuple[str, int], set[str | None]] = {}
            listed_by = set()
            # a subset cluster (`api~version=v2`): the instances carrying its tags
            name, tags = subset_of(service)
            for dataplane in self._by_service.get(name, ()):
                if any(dataplane.tags.get(k) != v for k, v in tags.items()):
                    continue
                if dataplane.inbounds:
                    listed_by.add(dataplane.name)
                zone = dataplane.tags.get(ZONE_TAG) or None
                for inbound in dataplane.inbounds:
                    at = (dataplane.address, inbound.port)
                    listings.setdefault(at, set()).add(dataplane.name)
                    zones.setdefault(at, set()).add(zone)
            found = self._endpoints[service] = (
                tuple(
                    Endpoint(address, port, frozenset(names), _one(zones[(address, port)]))
                    for (address, port), names in sorted(listings.items(), key=_endpoint_order)
                ),
                frozenset(listed_by),
            )
        return found

    # -- traffic policies

    def outbound(self, dataplane: Dataplane, service: str) -> OutboundPolicies:
        """The fragments of the outbound policies governing calls from `dataplane` to
        `service`: for each route and cluster kind, those of the most specific resource
        of the kind (`matching.best_match`) selecting the pair."""
        if not self._traffic:
            return NO_OUTBOUND_POLICIES
        tags = _tags(dataplane.tags)
        key = (dataplane.service, tags, service)
        found = self._outbound.get(key)
        if found is None:
            route: dict[str, Any] = {}
            cluster: dict[str, Any] = {}
            routes: dict[str, Any] = {}
            caller = (dataplane.service, dataplane.tags)
            for kind, resources in self._traffic:
                if kind.attach not in ("route", "cluster", "routes"):
                    continue
                governing = best_match(
                    self._selecting_service(kind, resources, service), caller, (service, {})
                )
                if governing is not None:
                    into = {"route": route, "cluster": cluster, "routes": routes}[kind.attach]
                    into[kind.key] = self._fragment(kind, governing)
            found = (
                OutboundPolicies(route, cluster, routes)
                if route or cluster or routes
                else NO_OUTBOUND_POLICIES
            )
            self._outbound[key] = found
        return found

    def inbound(self, dataplane: Dataplane) -> Mapping[str, Any]:
        """The fragments of the inbound policies for the chains of `dataplane`, by key:
        for each chain kind with a resource selecting the dataplane, the kind's rules
        from all of them (`policies/inbound.py`)."""
        if not self._traffic:
            return {}
        key = (dataplane.service, _tags(dataplane.tags))
        found = self._inbound.get(key)
        if found is None:
            found = {}
            here = (dataplane.service, dataplane.tags)
            for kind, resources in self._traffic:
                if kind.attach != "chain" or kind.fragment is None:
                    continue
                selecting = inbound_candidates(resources, here)
                if selecting:
                    found[kind.key] = kind.fragment(selecting, self.mesh.name, dataplane=here)
            self._inbound[key] = found
        return found

    def _selecting_service(
        self, kind: PolicyType[Any, Any], resources: list[Any], service: str
    ) -> list[Any]:
        """The resources of an outbound kind whose destinations can select `service`
        (a destination selects a whole service: no tags)."""
        found = self._candidates.get((kind.kind, service))
        if found is None:
            found = self._candidates[(kind.kind, service)] = outbound_candidates(resources, service)
        return found

    @property
    def traffic(self) -> Sequence[tuple[PolicyType[Any, Any], Sequence[Any]]]:
        """The traffic policies of the mesh (every kind with a `fragment`), by kind, in
        the registry's order: what `outbound` and `inbound` choose from."""
        return self._traffic

    def _fragment(self, kind: PolicyType[Any, Any], resource: Any) -> dict[str, Any]:
        found = self._fragments.get((kind.kind, resource.name))
        if found is None:
            assert kind.fragment is not None
            found = self._fragments[(kind.kind, resource.name)] = kind.fragment(resource)
        return found

    def authz(self, dataplane: Dataplane) -> AuthzConfig:
        """The authz fragment of the inbounds of `dataplane`, counting its own tags even
        when it is not among the indexed dataplanes."""
        instances = self._instances.get(dataplane.service, ())
        if dataplane.tags in instances:
            # listed already: one more copy of the same tags cannot change what a tag
            # source selects, so every dataplane of the service shares one fragment
            cached = self._authz.get(dataplane.service)
            if cached is None:
                cached = self._authz[dataplane.service] = self._resolve(
                    dataplane.service, self._instances
                )
            return cached
        with_itself = {**self._instances, dataplane.service: [dataplane.tags, *instances]}
        return self._resolve(dataplane.service, with_itself)

    def _resolve(
        self, service: str, instances: Mapping[str, Sequence[Mapping[str, str]]]
    ) -> AuthzConfig:
        return traffic_permission.to_snapshot(self._permissions, service, self.mesh.name, instances)


def outbound_candidates(resources: Iterable[Any], service: str) -> list[Any]:
    """The resources of an outbound kind that can select calls to `service`: a
    destination selector naming it (or `"*"`) without tags, since a cluster holds every
    instance of the service; one with tags selects no outbound."""
    return [
        r
        for r in resources
        if any(d.service in (ANY, service) and not d.tags for d in r.destinations)
    ]


def inbound_candidates(
    resources: Iterable[Any], dataplane: tuple[str, Mapping[str, str]]
) -> list[Any]:
    """The resources of an inbound (chain) kind selecting a dataplane ((service, tags))
    by one of their destination selectors."""
    return [r for r in resources if any(s.matches(*dataplane) for s in r.destinations)]


def _endpoint_document(endpoint: Endpoint, zones: bool) -> dict[str, Any]:
    if zones and endpoint.zone is not None:
        return {"address": endpoint.address, "port": endpoint.port, "zone": endpoint.zone}
    return {"address": endpoint.address, "port": endpoint.port}


def _one(zones: set[str | None]) -> str | None:
    """The zone every listing agrees on, else None (unknown)."""
    return next(iter(zones)) if len(zones) == 1 else None


def _tags(tags: Mapping[str, str]) -> Tags:
    return tuple(sorted(tags.items()))


def _endpoint_order(item: tuple[tuple[str, int], set[str]]) -> tuple[int, int, int]:
    (address, port), _ = item
    version, number = address_order(address)
    return version, number, port


@functools.lru_cache(maxsize=1 << 16)
def address_order(address: str) -> tuple[int, int]:
    """Where an address sorts: numeric, so 10.0.0.9 comes before 10.0.0.10; IPv4 before
    IPv6. Cached: an index is rebuilt on every change to its mesh, its addresses rarely
    change."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)
