"""What a policy selects (`PolicyType.selects`): the dataplanes a TrafficPermission
governs, and the reason an empty selection is refused with."""

from __future__ import annotations

from typing import Any

from meshling.controlplane.resources import Dataplane
from meshling.policies import POLICIES
from meshling.policies.traffic_permission import TrafficPermission, parse_resource, selects


def permission(destination: str, mesh: str = "default") -> TrafficPermission:
    document: dict[str, Any] = {
        "kind": "TrafficPermission",
        "metadata": {"name": "p", "mesh": mesh},
        "spec": {
            "destination": {"service": destination},
            "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
        },
    }
    return parse_resource(document, "test")


DATAPLANES = [
    Dataplane(name="api-2", mesh="default", service="api", address="10.0.0.2"),
    Dataplane(name="api-1", mesh="default", service="api", address="10.0.0.1"),
    Dataplane(name="web-1", mesh="default", service="web", address="10.0.0.3"),
    Dataplane(name="api-9", mesh="other", service="api", address="10.0.0.9"),
]


def test_policy_selection_of_a_service_is_its_dataplanes_in_the_mesh() -> None:
    selection = selects(permission("api"), DATAPLANES)
    assert selection.dataplanes == ("api-1", "api-2")
    assert selection.field == "spec.destination.service"
    assert not selection.empty


def test_policy_selection_of_any_service_is_every_dataplane_of_the_mesh() -> None:
    assert selects(permission("*"), DATAPLANES).dataplanes == ("api-1", "api-2", "web-1")
    assert selects(permission("*", mesh="other"), DATAPLANES).dataplanes == ("api-9",)


def test_policy_selection_that_is_empty_says_why() -> None:
    selection = selects(permission("apii"), DATAPLANES)
    assert selection.empty
    assert selection.unmatched("default") == (
        "selects no dataplane in mesh default: no dataplane of service apii is registered"
    )
    nothing = selects(permission("*", mesh="empty"), DATAPLANES)
    assert nothing.empty
    assert nothing.unmatched("empty") == (
        "selects no dataplane in mesh empty: no dataplane is registered"
    )


def test_policy_selection_every_registered_policy_has_one() -> None:
    for policy in POLICIES:
        assert callable(policy.selects), policy.kind
