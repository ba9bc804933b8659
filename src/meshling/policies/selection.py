"""What a policy selects: the dataplanes it applies to, named by the field that chose them.

Every policy kind has a selector (a TrafficPermission's `spec.destination.service`, say)
and a pure function from the resource and the dataplanes of its mesh to a `Selection`.
The control plane refuses to store a policy whose selection is empty unless asked to
(`?allow_unmatched=true`), so that a typo in a selector is an error at apply time
instead of a policy that silently governs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Selection:
    """The dataplanes a policy applies to, and what it asked for."""

    # the selector's field path in the resource, as errors name fields
    field: str
    # what the selector asks for, for a person: "the dataplanes of service api"
    wanted: str
    # the names of the selected dataplanes, sorted
    dataplanes: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.dataplanes

    def unmatched(self, mesh: str) -> str:
        """Why an empty selection is refused, as an error's reason."""
        return f"selects no dataplane in mesh {mesh}: no {self.wanted} is registered"
