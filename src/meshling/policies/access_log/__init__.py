"""AccessLog: which proxies log which traffic (outbound to services, inbound from
callers), in which format (JSON or an Envoy-like text template), to which backends
(stdout, a file, a TCP collector).

* `schema` — the resource (`kind: AccessLog`) and `parse_resource`, its validation;
* `snapshot` — a sink as the snapshot carries it (`parse_sink`, `sink_document`) and
  `fragment`, the pure conversion of the resources selecting a dataplane into one
  filter chain's `access_log:` list;
* `testdata/` — golden resources and the fragments they convert into.

The data plane's side is `meshling.telemetry.logformat` (records, templates) and
`meshling.telemetry.accesslog` (the batched writers, one per backend).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.access_log.schema import KIND, AccessLog, parse_resource
from meshling.policies.access_log.snapshot import fragment, parse_sink, sink_document

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.selection import Selection


def selects(policy: AccessLog, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes whose proxies write the log: those matching `spec.dataplanes`."""
    from meshling.policies.matching import _wanted
    from meshling.policies.selection import Selection

    chosen = sorted(
        d.name
        for d in dataplanes
        if d.mesh == policy.mesh and any(s.matches(d.service, d.tags) for s in policy.dataplanes)
    )
    return Selection("spec.dataplanes", f"dataplane of {_wanted(policy.dataplanes)}", tuple(chosen))


__all__ = [
    "KIND",
    "AccessLog",
    "fragment",
    "parse_resource",
    "parse_sink",
    "selects",
    "sink_document",
]
