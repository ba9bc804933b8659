"""The policy registry: every policy kind meshling knows, in the order it applies.

A policy lives in its own folder (`policies/<name>/`): the resource and its validation
(`parse_resource`), the pure conversion into a snapshot fragment (`to_snapshot`), the
data plane's decision, and tests with golden files. Adding a policy touches its folder
and one line of `POLICIES` here, nothing else.

Every policy also says which dataplanes a resource of it selects (`selects`, a pure
function returning a `selection.Selection`): the control plane refuses a policy that
selects none, unless asked to store it anyway.

The order of `POLICIES` is the order in which policies apply to traffic, which is also
the order of the proxy's layers: authorization comes first, so nothing else is spent on
a caller that is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from meshling.policies import traffic_permission
from meshling.policies.selection import Selection

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane

R = TypeVar("R")  # the resource
F = TypeVar("F")  # the snapshot fragment


@dataclass(frozen=True, slots=True)
class PolicyType(Generic[R, F]):
    """One policy kind: how to read its resources and what they become in a snapshot."""

    # the resource's `kind:`
    kind: str
    # (document, source) -> resource; raises SnapshotError naming source and field path
    parse_resource: Callable[[Any, str], R]
    # (resources of the mesh, destination service, mesh) -> that service's fragment
    to_snapshot: Callable[[list[R], str, str], F]
    # (resource, dataplanes of its mesh) -> the dataplanes it applies to
    selects: Callable[[R, Iterable[Dataplane]], Selection]


POLICIES: tuple[PolicyType[Any, Any], ...] = (
    PolicyType(  # who may connect at all: first, before any other work
        traffic_permission.KIND,
        traffic_permission.parse_resource,
        traffic_permission.to_snapshot,
        traffic_permission.selects,
    ),
)


def policy_type(kind: str) -> PolicyType[Any, Any] | None:
    """The registered policy for a resource's `kind:`, or None if there is none."""
    for policy in POLICIES:
        if policy.kind == kind:
            return policy
    return None
