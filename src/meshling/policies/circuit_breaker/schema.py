"""The CircuitBreaker resource: limits on a destination service's cluster, and outlier
detection.

```yaml
kind: CircuitBreaker
metadata: {name: api-limits, mesh: default}
spec:
  sources: [{service: "*"}]          # the callers whose proxies enforce it
  destinations: [{service: api}]     # the called service (its whole cluster)
  conf:
    max_connections: 512
    max_pending_requests: 128
    max_requests: 256
    outlier_detection:
      consecutive_5xx: 5
      base_ejection_time: 30s
      max_ejection_percent: 50
```

`conf` is exactly the cluster's `circuit_breaker:` fragment (see `snapshot`): one
validation for both, so an error reads the same in a resource and in a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.circuit_breaker.snapshot import CircuitBreakerConfig
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.matching import Selector
    from meshling.policies.selection import Selection

KIND = "CircuitBreaker"


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """The limits of the clusters from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies that enforce the limits
    sources: tuple[Selector, ...]
    # the called services (no tags: a cluster holds every instance)
    destinations: tuple[Selector, ...]
    # the limits and outlier detection, exactly as the cluster's fragment
    conf: CircuitBreakerConfig


def parse_resource(document: Any, source: str) -> CircuitBreaker:
    """Validate a parsed YAML/JSON document and build the CircuitBreaker it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    return CircuitBreaker(name, mesh, sources, destinations, CircuitBreakerConfig.from_dict(conf))


def selects(policy: CircuitBreaker, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes the policy acts in: callers matching a source selector with an
    outbound to a destination service."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)
