"""Trace: distributed tracing for the proxies a resource selects.

* `schema` — the resource (`kind: Trace`) and `parse_resource`, its validation;
* `snapshot` — `fragment`, the pure conversion of the Traces selecting a dataplane into
  the snapshot's top-level `tracing:` section (the most specific one governs);
* `testdata/` — golden resources and the fragments they convert into.

The data plane's side is `meshling.tracing` (context, sampling, spans) and
`meshling.telemetry.otlp` (the export).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.trace.schema import KIND, Trace, parse_resource
from meshling.policies.trace.snapshot import fragment, governing

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.selection import Selection


def selects(policy: Trace, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes whose proxies the policy traces: those matching `spec.dataplanes`."""
    from meshling.policies.matching import _wanted
    from meshling.policies.selection import Selection

    chosen = sorted(
        d.name
        for d in dataplanes
        if d.mesh == policy.mesh and any(s.matches(d.service, d.tags) for s in policy.dataplanes)
    )
    return Selection("spec.dataplanes", f"dataplane of {_wanted(policy.dataplanes)}", tuple(chosen))


__all__ = ["KIND", "Trace", "fragment", "governing", "parse_resource", "selects"]
