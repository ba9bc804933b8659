"""`affected`: which dataplanes' snapshots a resource change can alter, so that a change
recomputes those and no others.

What a snapshot reads, and so what touches it:

* **Mesh**: mTLS on every listener and cluster — every dataplane of the mesh;
* **Dataplane**: its own listeners, and the endpoints of every cluster of its service
  (with their zones, where a cluster asks for them) — itself and every dataplane of the
  mesh with an outbound to its service; and, since its service and tags are what tag
  sources are resolved from, the inbound `authz` of the destinations of every permission
  of its mesh with a tag source that can select its service (one naming that service,
  or none); and, when it is its service's only dataplane (the service appears or goes),
  the names of every dataplane of the mesh with a DNS responder; and every transparent
  dataplane of the mesh (it has a cluster for every service). Which traffic policies govern its outbounds and its inbound
  chains depends on its own service and tags only (a destination is a service, a caller
  of an inbound policy is known by its service), so those are in its own snapshot,
  already touched;
* **TrafficPermission**: the `authz` of the inbounds of its destination service —
  the dataplanes of that service, or of every service for `*`;
* a **traffic policy** (every other registered kind): the dataplanes it acts in, as
  the kind's own `selects` names them — the callers of an outbound policy (a source
  selector's dataplanes with an outbound to a destination), the destinations of an
  inbound one, and every transparent dataplane of its mesh (which calls every service).
  A resource that does not govern a dataplane it selects (a more specific one does) may
  start to, when that one goes: so selection, not governance, is what counts.

A change can move a resource (a dataplane to another service or address, a permission
to another destination) or delete it, and then its old place is touched as well as its
new one. So the caller passes the resources from before *and* after the change: the
lookups below take every version they find. A name that is in neither — nothing left to
tell where it was — touches every dataplane, the one answer that is never wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshling.controlplane.builder.index import PolicyResource, policy_of
from meshling.controlplane.resources import DATAPLANE_KIND, MESH_KIND, Dataplane
from meshling.policies import policy_type
from meshling.policies.traffic_permission import KIND as TRAFFIC_PERMISSION_KIND
from meshling.policies.traffic_permission import TrafficPermission
from meshling.policies.traffic_permission.schema import ANY_SERVICE


def affected(
    change_kind: str,
    change_name: str,
    dataplanes: Iterable[Dataplane],
    policies: Iterable[PolicyResource],
) -> set[str]:
    """The names of the dataplanes whose snapshots a change of resource
    (`change_kind`, `change_name`) can alter.

    `change_name` is the mesh's name for a Mesh, the resource's name otherwise.
    `dataplanes` and `policies` hold every version, before and after the change, of the
    resources they list (see the module docstring). Raises `ValueError` for a kind the
    builder does not read.
    """
    dataplanes = list(dataplanes)
    policies = list(policies)
    if change_kind == MESH_KIND:
        return {d.name for d in dataplanes if d.mesh == change_name}
    if change_kind == DATAPLANE_KIND:
        versions = [d for d in dataplanes if d.name == change_name]
        if not versions:
            return {change_name} | {d.name for d in dataplanes}
        touched = {change_name}
        for changed in versions:
            touched |= {
                d.name
                for d in dataplanes
                if d.mesh == changed.mesh
                and (
                    any(o.service == changed.service for o in d.outbounds)
                    # transparent capture: a chain and a cluster for every service
                    or d.transparent is not None
                )
            }
            # A new service, or the last dataplane of one gone, changes the names of
            # every DNS responder of the mesh.
            if not any(
                d.mesh == changed.mesh and d.service == changed.service and d.name != change_name
                for d in dataplanes
            ):
                touched |= {d.name for d in dataplanes if d.mesh == changed.mesh and d.dns}
            # Any change of a service's set of dataplanes or of their tags can flip a tag
            # source (a new untagged instance un-selects its service from an allow).
            destinations = {
                p.destination.service
                for p in policies
                if isinstance(p, TrafficPermission)
                and p.mesh == changed.mesh
                and _selects_by_tags(p, changed.service)
            }
            touched |= {
                d.name
                for d in dataplanes
                if d.mesh == changed.mesh
                and (ANY_SERVICE in destinations or d.service in destinations)
            }
        return touched
    if change_kind == TRAFFIC_PERMISSION_KIND:
        permissions = [
            p for p in policies if isinstance(p, TrafficPermission) and p.name == change_name
        ]
        if not permissions:
            return {d.name for d in dataplanes}
        return {
            d.name
            for p in permissions
            for d in dataplanes
            if d.mesh == p.mesh and p.destination.service in (d.service, ANY_SERVICE)
        }
    kind = policy_type(change_kind)
    if kind is not None and kind.fragment is not None:
        resources = [p for p in policies if p.name == change_name and policy_of(p) is kind]
        if not resources:
            return {d.name for d in dataplanes}
        touched = {
            name
            for resource in resources
            for name in kind.selects(
                resource, [d for d in dataplanes if d.mesh == resource.mesh]
            ).dataplanes
        }
        # a transparent dataplane calls every service of its mesh, outbounds or not
        meshes = {resource.mesh for resource in resources}
        return touched | {
            d.name for d in dataplanes if d.mesh in meshes and d.transparent is not None
        }
    raise ValueError(f"the snapshot builder reads no resources of kind {change_kind!r}")


def _selects_by_tags(permission: TrafficPermission, service: str) -> bool:
    """Whether a tag source of the permission may select `service`."""
    return any(
        source.tags and source.service in (None, service)
        for rule in permission.rules
        for source in rule.sources
    )
