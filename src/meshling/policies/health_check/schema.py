"""The HealthCheck resource: how callers' proxies check a destination service's endpoints.

```yaml
kind: HealthCheck
metadata: {name: api-health, mesh: default}
spec:
  sources: [{service: "*"}]          # the callers whose proxies run the checks
  destinations: [{service: api}]     # the checked service (every endpoint of it)
  conf:
    interval: 5s
    timeout: 1s
    healthy_threshold: 2
    unhealthy_threshold: 3
    panic_threshold: 50
    http: {path: /healthz}           # or tcp: {}, or grpc: {service: api.v1.Orders}
```

`conf` is exactly the cluster's `health_check:` fragment (see `snapshot`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.health_check.snapshot import HealthCheckConfig
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.matching import Selector
    from meshling.policies.selection import Selection

KIND = "HealthCheck"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """The active checks of the clusters from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies that run the checks
    sources: tuple[Selector, ...]
    # the checked services (no tags: a cluster holds every instance)
    destinations: tuple[Selector, ...]
    # the check itself, exactly as the cluster's fragment
    conf: HealthCheckConfig


def parse_resource(document: Any, source: str) -> HealthCheck:
    """Validate a parsed YAML/JSON document and build the HealthCheck it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    return HealthCheck(name, mesh, sources, destinations, HealthCheckConfig.from_dict(conf))


def selects(policy: HealthCheck, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes the policy acts in: callers matching a source selector with an
    outbound to a destination service."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)
