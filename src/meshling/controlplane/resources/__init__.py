"""The control plane's own resources, Mesh and Dataplane, in the `kind / metadata / spec`
shape of the policies, validated the same way.

* `mesh` — `Mesh` (a trust domain and its mTLS setting) and `parse_mesh`;
* `dataplane` — `Dataplane` (one proxy: service, address, tags, inbounds, outbounds) and
  `parse_dataplane`;
* `metadata` — the field parsers they share.

`parse_resource` reads any resource the control plane stores: these two kinds, and every
policy kind of the registry (`meshling.policies.POLICIES`).
"""

from __future__ import annotations

from typing import Any

from meshling.controlplane.resources.dataplane import KIND as DATAPLANE_KIND
from meshling.controlplane.resources.dataplane import (
    Dataplane,
    Inbound,
    Outbound,
    parse_dataplane,
)
from meshling.controlplane.resources.mesh import KIND as MESH_KIND
from meshling.controlplane.resources.mesh import Mesh, MeshTls, parse_mesh
from meshling.snapshot.load import _Node

__all__ = [
    "DATAPLANE_KIND",
    "MESH_KIND",
    "Dataplane",
    "Inbound",
    "Mesh",
    "MeshTls",
    "Outbound",
    "kinds",
    "parse_dataplane",
    "parse_mesh",
    "parse_resource",
]


def kinds() -> tuple[str, ...]:
    """Every `kind:` the control plane accepts."""
    from meshling.policies import POLICIES

    return (MESH_KIND, DATAPLANE_KIND, *(p.kind for p in POLICIES))


def parse_resource(document: Any, source: str) -> Any:
    """Validate a document of any known kind and build its resource.

    Raises `SnapshotError` naming `source`, the field path and the reason; an unknown
    kind is an error on `kind` that lists the known ones.
    """
    from meshling.policies import policy_type

    root = _Node(source, "", document)
    if not isinstance(document, dict):
        root.mapping(())  # raises: a document is a mapping
    kind = root.child("kind").value
    if kind == MESH_KIND:
        return parse_mesh(document, source)
    if kind == DATAPLANE_KIND:
        return parse_dataplane(document, source)
    policy = policy_type(kind) if isinstance(kind, str) else None
    if policy is None:
        if kind is None:
            raise root.child("kind").error("required field is missing")
        raise root.child("kind").error(f"unknown kind {kind!r} (known: {', '.join(kinds())})")
    return policy.parse_resource(document, source)
