"""The resource shape every outbound traffic policy shares, and its one parser.

```yaml
kind: CircuitBreaker            # or HealthCheck, LoadBalancing, ...
metadata: {name: web-to-api, mesh: default}
spec:
  sources: [{service: web}]     # the callers, whose proxies the policy acts in; "*": any
  destinations: [{service: api}]  # the called services, without tags
  conf: {...}                   # the policy's own settings, read by the policy
```

A destination selector names a service only: an outbound cluster holds every instance of
the service, so tags could not narrow it. Errors are the snapshot loader's
`SnapshotError`, naming the field path (`spec.destinations[0].tags`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node


def parse_outbound(
    document: Any, source: str, kind: str
) -> tuple[_Node, str, str, tuple[Selector, ...], tuple[Selector, ...]]:
    """The parts of an outbound policy resource: the `spec.conf` node, name, mesh,
    sources and destinations."""
    from meshling.policies.matching import parse_targeted, refuse_tags

    name, mesh, spec, sources, destinations, conf = parse_targeted(document, source, kind)
    refuse_tags(
        spec,
        "destinations",
        destinations,
        f"{kind} acts on the cluster of a whole service, which holds every "
        "instance: a destination selects a service only, drop the tags",
    )
    return conf, name, mesh, sources, destinations
