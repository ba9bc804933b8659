"""The Trace policy's snapshot fragment: the `tracing:` section at a snapshot's top.

`fragment` is the pure conversion on the control plane: of the resources selecting a
dataplane, the most specific one's conf, as the document `tracing.config.parse_tracing`
reads in the proxy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from meshling.tracing.config import tracing_document

if TYPE_CHECKING:
    from meshling.policies.trace.schema import Trace


def governing(
    resources: Iterable[Trace], mesh: str, dataplane: tuple[str, Mapping[str, str]]
) -> Trace | None:
    """The Trace that governs a dataplane ((service, tags)): the most specific selector
    matching it wins, then the name that sorts first; None when none selects it."""
    best: tuple[tuple[int, int], str, Trace] | None = None
    for resource in resources:
        if resource.mesh != mesh:
            continue
        scores = [s.specificity for s in resource.dataplanes if s.matches(*dataplane)]
        if not scores:
            continue
        score = max(scores)
        if best is None or score > best[0] or (score == best[0] and resource.name < best[1]):
            best = (score, resource.name, resource)
    return None if best is None else best[2]


def fragment(
    resources: Iterable[Trace], mesh: str, *, dataplane: tuple[str, Mapping[str, str]]
) -> dict[str, Any]:
    """The `tracing:` document for a dataplane, from the Traces selecting it; empty when
    none does (the snapshot then has no tracing)."""
    chosen = governing(resources, mesh, dataplane)
    return {} if chosen is None else tracing_document(chosen.conf)
