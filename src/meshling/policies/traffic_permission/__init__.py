"""TrafficPermission: which callers, by SPIFFE identity, may connect to a service.

* `schema` — the resource (`kind: TrafficPermission`) and `parse_resource`, its validation;
* `snapshot` — the `authz:` fragment of an inbound filter chain (`AuthzConfig`) and
  `to_snapshot`, the pure conversion from resources on the control plane;
* `select` — `selects`, the dataplanes a permission governs (a pure function);
* `decide` — the data plane's decision for one connection, a pure function;
* `testdata/` — golden resources and the fragments they convert into.
"""

from meshling.policies.traffic_permission.decide import Decision, decide
from meshling.policies.traffic_permission.schema import (
    KIND,
    Destination,
    Rule,
    Source,
    TrafficPermission,
    parse_resource,
)
from meshling.policies.traffic_permission.select import selects
from meshling.policies.traffic_permission.snapshot import AuthzConfig, AuthzRule, to_snapshot

__all__ = [
    "KIND",
    "AuthzConfig",
    "AuthzRule",
    "Decision",
    "Destination",
    "Rule",
    "Source",
    "TrafficPermission",
    "decide",
    "parse_resource",
    "selects",
    "to_snapshot",
]
