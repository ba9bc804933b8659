"""The Mesh resource: a trust domain and whether its proxies talk over mutual TLS.

```yaml
kind: Mesh
metadata: {name: default, labels: {team: platform}}
spec:
  mtls:                   # absent: plaintext between proxies
    enabled: true         # false: plaintext between proxies
    mode: strict          # strict | permissive (inbounds also accept plaintext callers)
  multiplex: true         # HTTP/1.1 between proxies over multiplexed HTTP/2 (default)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from meshling.controlplane.resources import metadata
from meshling.snapshot.load import _Node

KIND = "Mesh"

MtlsMode = Literal["strict", "permissive"]


@dataclass(frozen=True, slots=True)
class MeshTls:
    """Mutual TLS between the mesh's proxies."""

    # on: inbounds terminate mTLS and authorize callers by identity (TrafficPermission),
    # clusters originate mTLS and check the destination's identity; off: plaintext, and no
    # authorization, since a plaintext caller has no identity to check
    enabled: bool = False
    # strict: inbounds accept only mTLS; permissive: mTLS and plaintext on one port
    # (plaintext callers match no permission), for moving a mesh to mTLS step by step
    mode: MtlsMode = "strict"


@dataclass(frozen=True, slots=True)
class Mesh:
    """A trust domain (`spiffe://<name>/<service>`) and its defaults."""

    # the SPIFFE trust domain of the mesh's identities
    name: str
    mtls: MeshTls = MeshTls()
    # carry HTTP/1.1 requests between proxies as streams of a few long-lived HTTP/2
    # connections per peer (as Linkerd does); false: one HTTP/1.1 connection per request
    # in flight, pooled
    multiplex: bool = True
    # free-form key/values for selecting resources; not used in snapshots
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def parse_mesh(document: Any, source: str) -> Mesh:
    """Validate a parsed YAML/JSON document and build the Mesh it describes.

    `source` names the document in errors (a file name, or an API request).
    """
    root = _Node(source, "", document).mapping(("kind", "metadata", "spec"))
    kind = root.need("kind", metadata.text)
    if kind != KIND:
        raise root.child("kind").error(f"expected kind {KIND}, got {kind!r}")
    meta = root.need("metadata", lambda n: n.mapping(("name", "labels")))
    spec = root.get("spec", lambda n: n.mapping(("mtls", "multiplex")), None)
    return Mesh(
        name=meta.need("name", metadata.mesh),
        mtls=spec.get("mtls", _mtls, MeshTls()) if spec is not None else MeshTls(),
        multiplex=spec.get("multiplex", metadata.flag, True) if spec is not None else True,
        labels=meta.get("labels", metadata.string_map, {}),
    )


def _mtls(node: _Node) -> MeshTls:
    node.mapping(("enabled", "mode"))
    return MeshTls(
        enabled=node.need("enabled", metadata.flag),
        mode=node.get("mode", _mode, "strict"),
    )


def _mode(node: _Node) -> MtlsMode:
    if node.value == "strict":
        return "strict"
    if node.value == "permissive":
        return "permissive"
    raise node.error(f"must be one of strict, permissive, got {node.value!r}")
