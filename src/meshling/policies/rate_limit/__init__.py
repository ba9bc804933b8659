"""RateLimit: how many requests (HTTP) or connections (TCP) an inbound admits.

* `schema` — the resource (`kind: RateLimit`) and `parse_resource`, its validation;
* `snapshot` — the `rate_limit:` fragment of an inbound filter chain (`RateLimitConfig`)
  and `fragment`, the pure conversion from resources on the control plane;
* `decide` — token buckets and the global lease on an injected clock, pure;
* `testdata/` — golden resources and the fragments they convert into.

The data plane around the decisions is `meshling.proxy.ratelimit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.rate_limit.schema import (
    KIND,
    GlobalLimit,
    Limit,
    RateLimit,
    RateLimitConf,
    parse_resource,
)
from meshling.policies.rate_limit.snapshot import RateLimitConfig, RateLimitRule, fragment

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.selection import Selection


def selects(policy: RateLimit, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes whose inbounds the policy limits (its destinations)."""
    # imported here: the proxy loads this package for the fragment, never for selection
    from meshling.policies.matching import selects_inbound

    return selects_inbound(policy, dataplanes)


__all__ = [
    "KIND",
    "GlobalLimit",
    "Limit",
    "RateLimit",
    "RateLimitConf",
    "RateLimitConfig",
    "RateLimitRule",
    "fragment",
    "parse_resource",
    "selects",
]
