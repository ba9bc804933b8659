"""LoadBalancing: how a caller's proxy picks an endpoint of a destination service.

* `schema` — the resource (`kind: LoadBalancing`) and `parse_resource`;
* `snapshot` — the cluster's `load_balancing:` fragment (`LoadBalancingConfig`) and
  `fragment`, the conversion from a resource;
* `decide` — the pickers, the latency estimate, the hash ring and request keys, as pure
  functions with injected randomness and clock;
* `testdata/` — golden resources and the fragments they convert into.
"""

from meshling.policies.load_balancing.schema import KIND, LoadBalancing, parse_resource, selects
from meshling.policies.load_balancing.snapshot import HashOn, LoadBalancingConfig, fragment

__all__ = [
    "KIND",
    "HashOn",
    "LoadBalancing",
    "LoadBalancingConfig",
    "fragment",
    "parse_resource",
    "selects",
]
