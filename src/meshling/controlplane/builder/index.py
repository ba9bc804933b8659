"""`MeshIndex`: what every snapshot of one mesh reads, worked out once for all of them.

A snapshot reads the whole mesh (the endpoints of each destination service, the tags of
every dataplane, the permissions of each inbound), but a mesh of N dataplanes has N
snapshots: reading the mesh again for each makes a change touching every proxy cost
O(N²). The index reads it once, from the same inputs `build` takes (dataplanes and
policies of any mesh; those of other meshes are left out here), into:

* **endpoints** per service: the (address, port) of every inbound of its dataplanes,
  deduplicated and in the snapshot's order (numeric by address, IPv4 first, then port),
  each with the names of the dataplanes listing it, so a snapshot can leave itself out;
  and their canonical JSON, spliced into the text of every snapshot with an outbound to
  the service (most of a snapshot's bytes);
* **instance tags** per service: what tag sources select from;
* **authz** per destination service: the merged TrafficPermissions, kept for every
  dataplane of that service.

Dataplanes are grouped by service up front; the rest is made on first need and kept, so
an index made for one proxy's snapshot (a proxy registering) reads only the services
that snapshot names.

An index never changes its answers: a change to the mesh's resources makes a new one
(`DistributorCore` keeps one per mesh, dropped on every change to it).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshling.controlplane.builder.canonical import canonical_json
from meshling.controlplane.resources import Dataplane, Mesh
from meshling.policies import traffic_permission
from meshling.policies.traffic_permission import AuthzConfig, TrafficPermission

# Every policy kind the builder reads; grows with the registry.
PolicyResource = TrafficPermission


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a service's cluster, and the dataplanes that list it."""

    address: str
    port: int
    # a set: the same instance listed twice (say, re-registered) is one endpoint
    listed_by: frozenset[str]


class MeshIndex:
    """The per-mesh lookups of the snapshot builder (see the module docstring)."""

    __slots__ = (
        "_authz",
        "_by_service",
        "_endpoints",
        "_endpoints_json",
        "_instances",
        "_permissions",
        "mesh",
    )

    def __init__(
        self, mesh: Mesh, dataplanes: Iterable[Dataplane], policies: Iterable[PolicyResource]
    ) -> None:
        self.mesh = mesh
        self._permissions = [
            p for p in policies if isinstance(p, TrafficPermission) and p.mesh == mesh.name
        ]
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
        self._endpoints_json: dict[str, str] = {}
        self._authz: dict[str, AuthzConfig] = {}

    def endpoints(self, service: str, excluding: str) -> list[tuple[str, int]]:
        """The endpoints of `service`, in order, less those only dataplane `excluding`
        lists (a proxy is not an endpoint of its own outbound)."""
        endpoints, _ = self._endpoints_of(service)
        return [
            (e.address, e.port)
            for e in endpoints
            if excluding not in e.listed_by or len(e.listed_by) > 1
        ]

    def endpoints_json(self, service: str, excluding: str) -> str:
        """`endpoints` as the canonical JSON of the cluster's `endpoints` list."""
        endpoints, listed_by = self._endpoints_of(service)
        if excluding in listed_by:
            return _endpoints_json(self.endpoints(service, excluding))
        text = self._endpoints_json.get(service)
        if text is None:
            text = self._endpoints_json[service] = _endpoints_json(
                [(e.address, e.port) for e in endpoints]
            )
        return text

    def _endpoints_of(self, service: str) -> tuple[tuple[Endpoint, ...], frozenset[str]]:
        """The endpoints of `service` in order, and every dataplane listing one."""
        found = self._endpoints.get(service)
        if found is None:
            listings: dict[tuple[str, int], set[str]] = {}
            listed_by = set()
            for dataplane in self._by_service.get(service, ()):
                if dataplane.inbounds:
                    listed_by.add(dataplane.name)
                for inbound in dataplane.inbounds:
                    listings.setdefault((dataplane.address, inbound.port), set()).add(
                        dataplane.name
                    )
            found = self._endpoints[service] = (
                tuple(
                    Endpoint(address, port, frozenset(names))
                    for (address, port), names in sorted(listings.items(), key=_endpoint_order)
                ),
                frozenset(listed_by),
            )
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


def _endpoints_json(endpoints: list[tuple[str, int]]) -> str:
    return canonical_json([{"address": address, "port": port} for address, port in endpoints])


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
