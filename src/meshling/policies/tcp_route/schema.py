"""The TCPRoute resource: weighted backends for a caller's connections to a service.

```yaml
kind: TCPRoute
metadata: {name: db-migration, mesh: default}
spec:
  sources: [{service: web}]          # the callers (their tags may narrow them); "*": any
  destinations: [{service: db}]      # the called services, without tags
  conf:
    backends:                        # each connection goes to one, by weight
      - {service: db, tags: {version: old}, weight: 80}
      - {service: db, tags: {version: new}, weight: 20}
```

TCPRoute is an outbound policy (see `policies.matching`): it acts in the caller's proxy,
on its TCP outbound to the destination service (an HTTP outbound takes an HTTPRoute).
`parse_resource` raises `SnapshotError` naming the field path
(`spec.conf.backends[0].service`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.backends import Backend, parse_backends
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.policies.matching import Selector

KIND = "TCPRoute"


@dataclass(frozen=True, slots=True)
class TCPRoute:
    """The backends of the connections from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies the route acts in
    sources: tuple[Selector, ...]
    # the called services (no tags: the backends choose the instances)
    destinations: tuple[Selector, ...]
    # where the connections go, by weight
    backends: tuple[Backend, ...]


def parse_resource(document: Any, source: str) -> TCPRoute:
    """Validate a parsed YAML/JSON document and build the TCPRoute it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    conf.mapping(("backends",))
    backends = conf.need("backends", lambda n: parse_backends(n, mesh))
    return TCPRoute(name, mesh, sources, destinations, backends)
