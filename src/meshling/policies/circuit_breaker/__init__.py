"""CircuitBreaker: limits on the connections and requests a proxy sends to a service,
and outlier detection, which takes failing endpoints out of the load balancer.

* `schema` — the resource (`kind: CircuitBreaker`) and `parse_resource`;
* `snapshot` — the cluster's `circuit_breaker:` fragment (`CircuitBreakerConfig`) and
  `fragment`, the conversion from a resource;
* `decide` — outcomes, ejection and return, as functions of plain state and a clock;
* `testdata/` — golden resources and the fragments they convert into.
"""

from meshling.policies.circuit_breaker.schema import KIND, CircuitBreaker, parse_resource, selects
from meshling.policies.circuit_breaker.snapshot import (
    CircuitBreakerConfig,
    OutlierDetection,
    fragment,
)

__all__ = [
    "KIND",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "OutlierDetection",
    "fragment",
    "parse_resource",
    "selects",
]
