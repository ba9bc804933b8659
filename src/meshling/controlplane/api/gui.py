"""The API routes the web GUI needs beyond the resource API: which dataplanes each policy
selects (admin token).

- `GET /api/v1/policies/dataplanes[?mesh=M]` — every stored policy (all kinds, in apply
  order, then by mesh and name) with its selection;
- `GET /api/v1/policies/{kind}/{mesh}/{name}/dataplanes` — one policy's selection.

A selection is computed with the policy registry's `selects`, the very function that
makes the API refuse a policy selecting nothing (`app.check_selection`), so what the GUI
shows is what the control plane decides. Each answer names the selector field and what
it asks for (`field`, `wanted`), and the selected dataplanes' names (`dataplanes`). A
stored policy that no longer parses (its kind's rules got stricter) selects nothing and
says why in `error`, rather than failing the whole list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshling.controlplane.api.app import (
    READ_ONLY_METADATA,
    ApiError,
    guarded,
    registered_dataplanes,
    render,
)
from meshling.controlplane.resources import DATAPLANE_KIND, Dataplane
from meshling.controlplane.store import NotFound, Resource, Store
from meshling.policies import PolicyType, registered
from meshling.snapshot.load import SnapshotError

LIST_PATH: Final = "/api/v1/policies/dataplanes"
ONE_PATH: Final = "/api/v1/policies/{kind}/{mesh}/{name}/dataplanes"


def selection_of(
    policy: PolicyType[Any, Any], stored: Resource, dataplanes: Iterable[Dataplane]
) -> dict[str, Any]:
    """What the stored policy selects among `dataplanes` (those of its mesh), as the API
    answers it."""
    answer: dict[str, Any] = {
        "kind": stored.kind,
        "mesh": stored.mesh,
        "name": stored.name,
        "version": stored.version,
    }
    document = render(stored)
    for key in READ_ONLY_METADATA:
        del document["metadata"][key]
    try:
        resource = policy.parse_resource(document, f"store:{stored.kind}")
    except SnapshotError as e:
        return {**answer, "field": e.path, "wanted": "", "dataplanes": [], "error": str(e)}
    selection = policy.selects(resource, dataplanes)
    return {
        **answer,
        "field": selection.field,
        "wanted": selection.wanted,
        "dataplanes": list(selection.dataplanes),
    }


def selections(
    policies: Sequence[tuple[PolicyType[Any, Any], Resource]],
    dataplanes_by_mesh: dict[str, list[Dataplane]],
) -> list[dict[str, Any]]:
    """The selection of every policy, each among the dataplanes of its own mesh."""
    return [
        selection_of(policy, stored, dataplanes_by_mesh.get(stored.mesh, []))
        for policy, stored in policies
    ]


def gui_api_routes(store: Store) -> list[Route]:
    by_lower = {p.kind.lower(): p for p in registered()}

    async def dataplanes_of(mesh: str | None) -> dict[str, list[Dataplane]]:
        by_mesh: dict[str, list[Dataplane]] = {}
        for dataplane in registered_dataplanes(await store.list(DATAPLANE_KIND, mesh)):
            by_mesh.setdefault(dataplane.mesh, []).append(dataplane)
        return by_mesh

    async def list_(request: Request) -> Response:
        mesh = request.query_params.get("mesh") or None
        stored = [
            (policy, resource)
            for policy in registered()
            for resource in await store.list(policy.kind, mesh)
        ]
        items = selections(stored, await dataplanes_of(mesh))
        return JSONResponse({"items": items})

    async def one(request: Request) -> Response:
        given = str(request.path_params["kind"])
        policy = by_lower.get(given.lower())
        if policy is None:
            known = ", ".join(p.kind for p in registered())
            raise ApiError(
                400,
                f"{given!r} is not a policy kind",
                field="kind",
                reason=f"only policies select dataplanes (policy kinds: {known})",
            )
        mesh, name = request.path_params["mesh"], request.path_params["name"]
        try:
            stored = await store.get(policy.kind, mesh, name)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        dataplanes = (await dataplanes_of(mesh)).get(mesh, [])
        return JSONResponse(selection_of(policy, stored, dataplanes))

    return [
        Route(LIST_PATH, guarded(list_), methods=["GET"]),
        Route(ONE_PATH, guarded(one), methods=["GET"]),
    ]
