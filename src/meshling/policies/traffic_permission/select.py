"""Which dataplanes a TrafficPermission governs: those of its destination service.

A pure function of the permission and the dataplanes of its mesh, so that the control
plane can refuse a permission that governs nothing, and a command line can tell before
it writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.selection import Selection
from meshling.policies.traffic_permission.schema import ANY_SERVICE, TrafficPermission

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane

FIELD = "spec.destination.service"


def selects(permission: TrafficPermission, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes of the permission's mesh whose inbounds it governs: every one for
    `service: "*"`, else those of the destination service."""
    service = permission.destination.service
    chosen = sorted(
        d.name
        for d in dataplanes
        if d.mesh == permission.mesh and service in (ANY_SERVICE, d.service)
    )
    wanted = "dataplane" if service == ANY_SERVICE else f"dataplane of service {service}"
    return Selection(field=FIELD, wanted=wanted, dataplanes=tuple(chosen))
