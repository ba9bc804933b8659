"""The LoadBalancing resource: how callers' proxies spread requests over a destination
service's endpoints.

```yaml
kind: LoadBalancing
metadata: {name: api-sticky, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: api}]
  conf:
    policy: ring_hash
    hash_on: {header: x-user}
    prefer_local_zone: true
```

`conf` is exactly the cluster's `load_balancing:` fragment (see `snapshot`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.load_balancing.snapshot import LoadBalancingConfig
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.matching import Selector
    from meshling.policies.selection import Selection

KIND = "LoadBalancing"


@dataclass(frozen=True, slots=True)
class LoadBalancing:
    """The endpoint choice of the clusters from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies that pick endpoints this way
    sources: tuple[Selector, ...]
    # the called services (no tags: a cluster holds every instance)
    destinations: tuple[Selector, ...]
    # the algorithm and its settings, exactly as the cluster's fragment
    conf: LoadBalancingConfig


def parse_resource(document: Any, source: str) -> LoadBalancing:
    """Validate a parsed YAML/JSON document and build the LoadBalancing it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    return LoadBalancing(name, mesh, sources, destinations, LoadBalancingConfig.from_dict(conf))


def selects(policy: LoadBalancing, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes the policy acts in: callers matching a source selector with an
    outbound to a destination service."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)
