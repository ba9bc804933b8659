"""HTTPRoute: which requests to a service go where, by path, method and headers, split
over weighted backends (a service, or the instances of it carrying some tags).

* `schema` — the resource (`kind: HTTPRoute`) and `parse_resource`, its validation;
* `snapshot` — `fragment`, the rules as the builder turns them into the outbound's
  routes (`weighted_clusters` per rule, and a `mirror` cluster) and subset clusters;
* `testdata/` — golden resources and the fragments they convert into.

The data plane picks a rule's cluster per request (`snapshot.model.WeightedClusters`),
and sends a copy of a share of its requests to the mirror's (`proxy.mirror`).
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.http_route.schema import (
    KIND,
    HTTPRoute,
    HTTPRouteMirror,
    HTTPRouteRule,
    parse_resource,
)
from meshling.policies.http_route.snapshot import fragment
from meshling.policies.selection import Selection

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane


def selects(policy: HTTPRoute, dataplanes: "Iterable[Dataplane]") -> Selection:
    """The dataplanes an HTTPRoute acts in: callers with an outbound to a destination."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)


__all__ = [
    "KIND",
    "HTTPRoute",
    "HTTPRouteMirror",
    "HTTPRouteRule",
    "fragment",
    "parse_resource",
    "selects",
]
