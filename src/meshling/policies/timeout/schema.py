"""The Timeout resource: how long calls from some services to others may take.

```yaml
kind: Timeout
metadata: {name: web-to-api, mesh: default}
spec:
  sources: [{service: web}]          # the callers (their tags may narrow them); "*": any
  destinations: [{service: api}]     # the called services, without tags
  conf:
    connect: 500ms    # opening a connection (default: the cluster's connect_timeout)
    request: 5s       # the whole request, every attempt included (default 15s)
    per_try: 1s       # each attempt, to its response head (default: none)
    idle: 30s         # no byte either way for this long (default: none)
```

Timeout is an outbound policy (see `policies.matching`): it acts in the caller's proxy,
on the route to a destination service, and a destination selector names a service only
(a route reaches every instance of it). Durations are the snapshot's: a number of
seconds, or text such as `250ms`, `2s`, `5m`. `parse_resource` raises the snapshot
loader's `SnapshotError` naming the field path (`spec.conf.per_try`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.outbound import parse_outbound
from meshling.policies.timeout.snapshot import Timeouts

if TYPE_CHECKING:
    from meshling.policies.matching import Selector

KIND = "Timeout"


@dataclass(frozen=True, slots=True)
class Timeout:
    """The timeouts of the routes from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies the timeouts act in
    sources: tuple[Selector, ...]
    # the called services (no tags: a route reaches every instance)
    destinations: tuple[Selector, ...]
    # the timeouts themselves, exactly as the route's `timeout:` fragment
    conf: Timeouts


def parse_resource(document: Any, source: str) -> Timeout:
    """Validate a parsed YAML/JSON document and build the Timeout it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    return Timeout(name, mesh, sources, destinations, Timeouts.from_dict(conf))
