"""HealthCheck: active checks of a destination service's endpoints by the callers'
proxies; unhealthy endpoints leave the load balancer, with a panic threshold.

* `schema` — the resource (`kind: HealthCheck`) and `parse_resource`;
* `snapshot` — the cluster's `health_check:` fragment (`HealthCheckConfig`) and
  `fragment`, the conversion from a resource;
* `decide` — an endpoint's health state machine and the panic rule, pure functions;
* `testdata/` — golden resources and the fragments they convert into.
"""

from meshling.policies.health_check.schema import KIND, HealthCheck, parse_resource, selects
from meshling.policies.health_check.snapshot import GrpcCheck, HealthCheckConfig, fragment

__all__ = [
    "KIND",
    "GrpcCheck",
    "HealthCheck",
    "HealthCheckConfig",
    "fragment",
    "parse_resource",
    "selects",
]
