"""The weighted backends of the route policies (HTTPRoute, TCPRoute), and the subset
clusters they name.

A backend is a service, optionally narrowed to the instances carrying some tags, and
a weight:

```yaml
backends:
  - {service: api, tags: {version: v1}, weight: 90}   # the instances tagged version=v1
  - {service: api, tags: {version: v2}, weight: 10}
```

A backend without tags is the service's own cluster (named after the service); one with
tags is a **subset cluster**, named `<service>~<key>=<value>` for each tag in key order
(`api~version=v2`), whose endpoints are the dataplanes of the service carrying every tag.
The control plane's builder makes these clusters from their names (`subset_of`); the
proxy only sees clusters and weights (`weighted_clusters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node

SUBSET = "~"
# the largest weight, as the snapshot loader takes it
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a share of a route's traffic goes."""

    # the called service
    service: str
    # the instances of the service it goes to: those carrying every tag (none: all)
    tags: Mapping[str, str] = field(default_factory=dict)
    # its share, relative to the other backends of the rule (0: none)
    weight: int = 1

    @property
    def cluster(self) -> str:
        """The snapshot cluster of the backend: the service's, or its subset's."""
        return subset_cluster(self.service, self.tags)


def subset_cluster(service: str, tags: Mapping[str, str]) -> str:
    """`api` for no tags, `api~version=v2` for {version: v2} (tags in key order)."""
    return service + "".join(f"{SUBSET}{k}={v}" for k, v in sorted(tags.items()))


def subset_of(cluster: str) -> tuple[str, dict[str, str]]:
    """The service and tags a cluster name stands for (`subset_cluster` reversed)."""
    service, *parts = cluster.split(SUBSET)
    return service, dict(part.split("=", 1) for part in parts)


def parse_backend(node: _Node, mesh: str, *, weighted: bool = True) -> Backend:
    """One backend; without `weighted` (a mirror's), a `weight` is an unknown field."""
    from meshling.controlplane.resources import metadata
    from meshling.snapshot.load import SnapshotError, _int, _name, _Node

    item = node.mapping(("service", "tags", "weight") if weighted else ("service", "tags"))
    service = item.need("service", lambda n: metadata.service(n, mesh))
    no_tags: dict[str, str] = {}
    tags = item.get("tags", metadata.string_map, no_tags)
    weight = item.get("weight", _int(0, MAX_WEIGHT), 1)
    backend = Backend(service, tags, weight)
    try:
        if any(SUBSET in k + v for k, v in tags.items()):
            raise SnapshotError(item.source, item.path, SUBSET)
        _name(_Node(item.source, item.path, backend.cluster))
    except SnapshotError:
        raise item.child("tags").error(
            f"the subset cluster {backend.cluster!r} is not a valid cluster name: use "
            "tag keys and values of letters, digits, '_', '.', '-' (at most 128 in all)"
        ) from None
    return backend


def parse_backends(node: _Node, mesh: str) -> tuple[Backend, ...]:
    """A non-empty list of backends, each cluster once, with a positive total weight."""
    if not isinstance(node.value, list) or not node.value:
        raise node.error("expected a non-empty list of backends such as {service: api}")
    backends: list[Backend] = []
    for i in range(len(node.value)):
        item = node.child(i)
        backend = parse_backend(item, mesh)
        if any(b.cluster == backend.cluster for b in backends):
            raise item.error(f"backend {backend.cluster!r} is listed twice")
        backends.append(backend)
    if sum(b.weight for b in backends) == 0:
        raise node.error("every weight is 0: give at least one backend a positive weight")
    return tuple(backends)


def weighted_clusters(backends: tuple[Backend, ...]) -> list[dict[str, Any]]:
    """The snapshot's `weighted_clusters` of a rule's backends."""
    return [{"cluster": b.cluster, "weight": b.weight} for b in backends]
