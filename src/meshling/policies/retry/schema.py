"""The Retry resource: which failed calls from some services to others are tried again.

```yaml
kind: Retry
metadata: {name: web-to-api, mesh: default}
spec:
  sources: [{service: web}]          # the callers (their tags may narrow them); "*": any
  destinations: [{service: api}]     # the called services, without tags
  conf:
    max_attempts: 3                  # 1 to 10, the first attempt included
    retry_on: [5xx, connect-failure, reset]   # or gateway-error
    status_codes: [409]              # further statuses to retry (4xx, 5xx)
    methods: [GET, HEAD, OPTIONS, PUT, DELETE, TRACE]   # the default; "*": every method
    per_try_timeout: 1s              # each attempt, to its response head
    backoff: {base: 25ms, max: 250ms}
    budget: {ratio: 0.2, min_per_second: 10, ttl: 10s}
    max_body: 65536                  # bytes of request body kept; larger: not retried
```

Retry is an outbound policy (see `policies.matching`): it acts in the caller's proxy, on
the route to a destination service. `conf` is the route's `retry:` fragment as it is
(`policies.retry.snapshot.RetryPolicy`), so the resource and the snapshot are validated
by one parser and errors name the same fields (`spec.conf.budget.ratio`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.outbound import parse_outbound
from meshling.policies.retry.snapshot import RetryPolicy

if TYPE_CHECKING:
    from meshling.policies.matching import Selector

KIND = "Retry"


@dataclass(frozen=True, slots=True)
class Retry:
    """The retry policy of the routes from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies that retry
    sources: tuple[Selector, ...]
    # the called services (no tags: a route reaches every instance)
    destinations: tuple[Selector, ...]
    # when and how to retry, exactly as the route's `retry:` fragment
    conf: RetryPolicy


def parse_resource(document: Any, source: str) -> Retry:
    """Validate a parsed YAML/JSON document and build the Retry it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    if not isinstance(conf.value, dict):
        raise conf.error("expected a mapping of retry settings ({} for the defaults)")
    return Retry(name, mesh, sources, destinations, RetryPolicy.from_dict(conf))
