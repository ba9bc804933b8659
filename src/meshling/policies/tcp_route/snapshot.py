"""The TCPRoute fragment: the outbound TCP filter's clusters, by weight.

```yaml
weighted_clusters:
  - {cluster: "db~version=old", weight: 80}
  - {cluster: "db~version=new", weight: 20}
```

The builder puts it in place of the filter's `cluster`, and makes each subset cluster
named here from its name (`policies.backends.subset_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshling.policies.backends import weighted_clusters

if TYPE_CHECKING:
    from meshling.policies.tcp_route.schema import TCPRoute


def fragment(resource: TCPRoute) -> dict[str, Any]:
    """The `weighted_clusters` of the TCP outbound a TCPRoute governs."""
    return {"weighted_clusters": weighted_clusters(resource.backends)}
