"""TCPRoute: which backends a caller's connections to a service go to, by weight (a
service, or the instances of it carrying some tags).

* `schema` — the resource (`kind: TCPRoute`) and `parse_resource`, its validation;
* `snapshot` — `fragment`, the outbound TCP filter's `weighted_clusters`;
* `testdata/` — golden resources and the fragments they convert into.

The data plane picks the cluster per connection (`snapshot.model.WeightedClusters`).
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.selection import Selection
from meshling.policies.tcp_route.schema import KIND, TCPRoute, parse_resource
from meshling.policies.tcp_route.snapshot import fragment

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane


def selects(policy: TCPRoute, dataplanes: "Iterable[Dataplane]") -> Selection:
    """The dataplanes a TCPRoute acts in: callers with an outbound to a destination."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)


__all__ = ["KIND", "TCPRoute", "fragment", "parse_resource", "selects"]
