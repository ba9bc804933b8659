"""The dataplane status routes (admin token), answered from the store by any replica:

- `GET /api/v1/status/dataplanes[?mesh=M]` — every Dataplane with its stream's status:
  name, mesh, service, online, connected, replica, last_seen, applied, pushed, last_nack;
- `GET /api/v1/status/dataplanes/{mesh}/{name}` — that, plus connected_at,
  certificate_expires, tls_paths, and `snapshot`: the one the proxy runs or is being
  sent (as this replica's distributor builds it), or `snapshot_error` saying why there
  is none.

Registered dataplanes that never connected are listed, offline. Status records of
dataplanes since deleted are not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshling.controlplane.api.app import ApiError, guarded
from meshling.controlplane.resources import DATAPLANE_KIND
from meshling.controlplane.status import STATUS_KIND, Clock, detail, summary
from meshling.controlplane.store import NotFound, Resource, Store
from meshling.snapshot.model import TlsFiles

if TYPE_CHECKING:
    from meshling.controlplane.distributor import Distributor

LIST_PATH: Final = "/api/v1/status/dataplanes"
ONE_PATH: Final = "/api/v1/status/dataplanes/{mesh}/{name}"


def status_routes(
    store: Store,
    distributor: Distributor,
    offline_after: float,
    clock: Clock,
) -> list[Route]:
    async def list_(request: Request) -> Response:
        mesh = request.query_params.get("mesh") or None
        dataplanes = await store.list(DATAPLANE_KIND, mesh)
        statuses = {(s.mesh, s.name): s for s in await store.list(STATUS_KIND, mesh)}
        now = clock()
        items = [
            summary(
                d.mesh,
                d.name,
                _service(d),
                statuses.get((d.mesh, d.name)),
                now,
                offline_after,
            )
            for d in dataplanes
        ]
        return JSONResponse({"items": items, "offline_after": offline_after})

    async def one(request: Request) -> Response:
        mesh, name = request.path_params["mesh"], request.path_params["name"]
        try:
            dataplane = await store.get(DATAPLANE_KIND, mesh, name)
        except NotFound:
            raise ApiError(404, f"dataplane {name!r} not found in mesh {mesh!r}") from None
        status: Resource | None
        try:
            status = await store.get(STATUS_KIND, mesh, name)
        except NotFound:
            status = None
        body = detail(mesh, name, _service(dataplane), status, clock(), offline_after)
        snapshot = distributor.snapshot_of(mesh, name, _tls(body.get("tls_paths")))
        if isinstance(snapshot, str):
            body["snapshot"] = None
            body["snapshot_error"] = snapshot
        else:
            body["snapshot"] = snapshot
            body["snapshot_version"] = snapshot.get("version")
        return JSONResponse(body)

    return [
        Route(LIST_PATH, guarded(list_), methods=["GET"]),
        Route(ONE_PATH, guarded(one), methods=["GET"]),
    ]


def _service(resource: Resource) -> str | None:
    service = resource.spec.get("service")
    return service if isinstance(service, str) else None


def _tls(raw: Any) -> TlsFiles | None:
    if not isinstance(raw, dict):
        return None
    try:
        return TlsFiles(str(raw["certificate"]), str(raw["key"]), str(raw["trust_bundle"]))
    except KeyError:
        return None
