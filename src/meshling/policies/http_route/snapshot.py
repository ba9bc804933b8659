"""The HTTPRoute fragment: the rules of the route policy governing an outbound, as the
control plane's builder turns them into the outbound's routes.

```yaml
rules:
  - matches: [{path: {prefix: /v2}}]        # the route `match` of each route of the rule
    weighted_clusters:                      # the route's clusters, by weight
      - {cluster: "api~version=v2", weight: 1}
    request_headers: {set: {x-canary: "1"}}  # the route's edits, when the rule has them
    response_headers: {remove: [server]}
  - matches: [{path: {prefix: /old/}}]
    weighted_clusters: [{cluster: api, weight: 1}]
    rewrite: {prefix: /new/}                # the rule's action, when it has one: rewrite
    mirror: {cluster: "api~version=v2", percent: 30}  # copies for another cluster
  - matches: [{path: {exact: /docs}}]
    redirect: {host: docs.example.com}      # or redirect / direct_response in place of
                                            # weighted_clusters
```

The builder makes one route per match (one matching everything for a rule without
matches), in order, then a last route to the whole service for requests no rule
matches; each route takes the outbound's route policies (Timeout, Retry), and each
subset cluster named here, a mirror's too, is made from its name
(`policies.backends.subset_of`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from meshling.policies.backends import weighted_clusters

if TYPE_CHECKING:
    from meshling.policies.http_route.schema import HTTPRoute


def fragment(resource: HTTPRoute) -> dict[str, Any]:
    """The rules of the outbound routes an HTTPRoute governs."""
    rules: list[dict[str, Any]] = []
    for rule in resource.rules:
        document: dict[str, Any] = {
            "matches": [copy.deepcopy(m) for m in rule.matches],
        }
        if rule.backends:
            document["weighted_clusters"] = weighted_clusters(rule.backends)
        for key in ("direct_response", "redirect", "rewrite"):
            value = getattr(rule, key)
            if value is not None:
                document[key] = copy.deepcopy(value)
        if rule.mirror is not None:
            percent = rule.mirror.percent
            document["mirror"] = {
                "cluster": rule.mirror.backend.cluster,
                # 30 rather than 30.0: the snapshot reads the same either way
                "percent": int(percent) if percent.is_integer() else percent,
            }
        if rule.request_headers is not None:
            document["request_headers"] = copy.deepcopy(rule.request_headers)
        if rule.response_headers is not None:
            document["response_headers"] = copy.deepcopy(rule.response_headers)
        rules.append(document)
    return {"rules": rules}
