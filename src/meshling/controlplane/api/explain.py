"""The explain route (admin token): why a request from one service to another goes where
it goes, and whether it is let in.

    GET /api/v1/explain?mesh=M&source=S&destination=D[&dataplane=N][&method=GET]
                       [&path=/p][&header=k=v ...][&port=P]

It reads the mesh's resources from the store, each as the distributor hands it to the
snapshot builder (`distributor.service.to_view`: one that no longer parses is left out,
as the builder leaves it out), and answers with `controlplane.explain`'s document. 400
names the query parameter that is wrong (an unknown service or dataplane among them);
404 is an unknown mesh.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshling.controlplane.api.app import ApiError, guarded
from meshling.controlplane.distributor.service import to_view
from meshling.controlplane.explain import ExplainError, explain
from meshling.controlplane.explain import Request as ExplainRequest
from meshling.controlplane.resources import DATAPLANE_KIND, MESH_KIND, Dataplane, Mesh
from meshling.controlplane.store import NotFound, Store
from meshling.policies import registered

PATH: Final = "/api/v1/explain"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def explain_routes(store: Store) -> list[Route]:
    async def answer(request: Request) -> Response:
        query = request.query_params
        mesh_name = query.get("mesh") or "default"
        source = _required(query.get("source"), "source")
        destination = _required(query.get("destination"), "destination")
        asked = _request(
            query.get("method") or "GET",
            query.get("path") or "/",
            query.getlist("header"),
            query.get("port"),
        )
        try:
            stored_mesh = await store.get(MESH_KIND, mesh_name, mesh_name)
        except NotFound:
            raise ApiError(404, f"mesh {mesh_name!r} not found", field="mesh") from None
        mesh = to_view(stored_mesh)
        if not isinstance(mesh, Mesh):
            raise ApiError(500, f"mesh {mesh_name!r} is stored but no longer valid")
        dataplanes: list[Dataplane] = []
        policies: list[Any] = []
        for kind in (DATAPLANE_KIND, *(p.kind for p in registered())):
            for stored in await store.list(kind, mesh_name):
                parsed = to_view(stored)
                if isinstance(parsed, Dataplane):
                    dataplanes.append(parsed)
                elif parsed is not None:
                    policies.append(parsed)
        try:
            found = explain(
                mesh,
                dataplanes,
                policies,
                source,
                destination,
                asked,
                dataplane=query.get("dataplane") or None,
            )
        except ExplainError as e:
            raise ApiError(400, str(e), field=e.field, reason=e.reason) from None
        return JSONResponse(found)

    return [Route(PATH, guarded(answer), methods=["GET"])]


def _required(value: str | None, name: str) -> str:
    if not value:
        raise ApiError(400, f"missing query parameter {name!r}", field=name, reason="required")
    return value


def _request(method: str, path: str, headers: list[str], port: str | None) -> ExplainRequest:
    """The request to explain, from the query; errors name the parameter."""
    method = method.upper()
    if method not in METHODS:
        raise ApiError(
            400,
            f"invalid method {method!r}",
            field="method",
            reason=f"expected one of {', '.join(sorted(METHODS))}, got {method!r}",
        )
    if not path.startswith("/"):
        raise ApiError(
            400, f"invalid path {path!r}", field="path", reason=f"must start with /, got {path!r}"
        )
    pairs: list[tuple[str, str]] = []
    for raw in headers:
        name, sep, value = raw.partition("=")
        if not sep or not name.strip():
            raise ApiError(
                400,
                f"invalid header {raw!r}",
                field="header",
                reason=f"expected name=value, got {raw!r}",
            )
        pairs.append((name.strip().lower(), value))
    number: int | None = None
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ApiError(
                400,
                f"invalid port {port!r}",
                field="port",
                reason=f"expected 1 to 65535, got {port!r}",
            )
        number = int(port)
    return ExplainRequest(method, path, tuple(pairs), number)
