"""Retry: failed calls to a service tried again, within a budget.

* `schema` — the resource (`kind: Retry`) and `parse_resource`, its validation;
* `snapshot` — the route's `retry:` fragment (`RetryPolicy`) and `fragment`, its pure
  conversion from a resource;
* `decide` — the decisions as pure functions on a given clock: `should_retry`,
  `backoff`, `RetryBudget`;
* `testdata/` — golden resources and the fragments they convert into.

The mechanism (keeping the body, the attempt loop, the timers) is the proxy's, in
`proxy/retry.py`; it asks `decide` what to do.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.retry.decide import RetryBudget, backoff, retriable, should_retry
from meshling.policies.retry.schema import KIND, Retry, parse_resource
from meshling.policies.retry.snapshot import Backoff, Budget, RetryPolicy, fragment
from meshling.policies.selection import Selection

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane


def selects(policy: Retry, dataplanes: "Iterable[Dataplane]") -> Selection:
    """The dataplanes a Retry acts in: callers with an outbound to a destination."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)


__all__ = [
    "KIND",
    "Backoff",
    "Budget",
    "Retry",
    "RetryBudget",
    "RetryPolicy",
    "backoff",
    "fragment",
    "parse_resource",
    "retriable",
    "selects",
    "should_retry",
]
