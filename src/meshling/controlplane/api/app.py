"""The REST API over the resource store, as an ASGI app.

Routes (all under an admin bearer token except `GET /healthz`):

- `POST   /api/v1/resources`               create one resource (JSON or YAML body)
- `GET    /api/v1/{kind}`                  list; `?mesh=NAME`, `?labelSelector=a=b,c=d`
- `GET    /api/v1/{kind}/{mesh}/{name}`    read one
- `PUT    /api/v1/{kind}/{mesh}/{name}`    replace one; the body carries `metadata.version`
- `DELETE /api/v1/{kind}/{mesh}/{name}`    remove one; `?version=N` to delete only that state
- `GET    /openapi.json`                   the OpenAPI 3 document of all this
- `GET    /gui/`                           the web GUI's static files (no token; `/`
                                           redirects there), and which dataplanes each
                                           policy selects, for it (`api.gui`)

Given a token signer, also the dataplane-token routes, and given a CA as well, the CA
routes (`meshling.controlplane.api.ca`): `/api/v1/ca/sign` takes a dataplane token
instead of the admin token, and `/api/v1/ca/bundle` is open. Given a distributor as well,
the config stream (`WebSocket /api/v1/stream`, dataplane token; `distributor.stream`) and
the dataplane status routes (`/api/v1/status/dataplanes...`, admin token; `status`), and
live golden metrics and taps (`/api/v1/stats`, `/api/v1/tap`, admin token; `telemetry`).

`{kind}` is a resource kind (`Dataplane`, `TrafficPermission`, ...), matched without regard
to case. A Mesh is global: it is stored, and addressed, with its own name as its mesh
(`/api/v1/Mesh/default/default`).

Documents are validated by `parse_resource`, the same rules as files; a bad one is a 400
naming the field path, and never reaches the store. A policy must also select at least
one registered dataplane of its mesh (its kind's `selects`, from the policy registry): one
that selects none is a 400 naming its selector field, unless the POST or PUT carries
`?allow_unmatched=true`, for set-ups that apply policies before their workloads register.
A resource comes back in the shape it was written in, with `metadata.version`,
`metadata.created` and `metadata.updated` added; those three are read-only and may be
sent back unchanged (a PUT needs `metadata.version`).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from meshling.controlplane.api.openapi import openapi_document
from meshling.controlplane.resources import (
    DATAPLANE_KIND,
    MESH_KIND,
    Dataplane,
    kinds,
    parse_dataplane,
    parse_resource,
)
from meshling.controlplane.resources.metadata import parse_selector as read_selector
from meshling.controlplane.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    Resource,
    Store,
    StoreError,
)
from meshling.policies import policy_type
from meshling.snapshot.load import SnapshotError

if TYPE_CHECKING:
    from meshling.controlplane.distributor import Distributor
    from meshling.controlplane.tokens import TokenSigner
    from meshling.controlplane.trust import Authorities, FixedAuthority
    from meshling.identity import CertificateAuthority

# The largest request body accepted: resources are small; this keeps a client from
# making the control plane buffer an arbitrary amount.
MAX_BODY = 1024 * 1024

# metadata fields the server sets; accepted (and dropped) in a request body so that a
# document read from the API can be edited and sent back
READ_ONLY_METADATA = ("version", "created", "updated")

_JSON_TYPES = ("application/json",)
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

Handler = Callable[[Request], Awaitable[Response]]

# the query parameter that stores a policy selecting no dataplane
ALLOW_UNMATCHED = "allow_unmatched"


class ApiError(Exception):
    """A request the API refuses: the status and the JSON body that say why."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, **extra}


def create_app(
    store: Store,
    admin_token: str,
    ca: CertificateAuthority | Authorities | FixedAuthority | None = None,
    signer: TokenSigner | None = None,
    *,
    distributor: Distributor | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> ASGIApp:
    """The API over `store`; every route but `/healthz` (and the CA's, and the stream)
    needs `Bearer <admin_token>`.

    With `signer`, the dataplane-token routes are served; with `ca` as well (one CA, or
    `trust.Authorities`: one per mesh, from the store), the CA routes; with a
    `distributor` as well, the config stream and the status routes. `clock` (UTC now) is
    for tests.
    """
    if not admin_token:
        raise ValueError("the admin token must not be empty")
    if ca is not None and signer is None:
        raise ValueError("a CA needs a token signer: /api/v1/ca/sign takes dataplane tokens")
    if distributor is not None and signer is None:
        raise ValueError("the config stream needs a token signer: it takes dataplane tokens")
    known = kinds()
    by_lower = {k.lower(): k for k in known}

    def kind_of(request: Request) -> str:
        given = str(request.path_params["kind"])
        kind = by_lower.get(given.lower())
        if kind is None:
            raise ApiError(
                400,
                f"unknown kind {given!r}",
                field="kind",
                reason=f"unknown kind {given!r} (known: {', '.join(known)})",
                known=list(known),
            )
        return kind

    async def create(request: Request) -> Response:
        allow_unmatched = flag(request, ALLOW_UNMATCHED)
        document = await read_document(request)
        valid = validate(document)
        if not allow_unmatched:
            await check_selection(store, valid)
        try:
            resource = await store.create(
                valid.kind, valid.mesh, valid.name, valid.spec, valid.labels
            )
        except AlreadyExists as e:
            raise ApiError(409, str(e)) from None
        return JSONResponse(render(resource), status_code=201)

    async def list_(request: Request) -> Response:
        kind = kind_of(request)
        mesh = request.query_params.get("mesh") or None
        selector = parse_selector(request.query_params.get("labelSelector", ""))
        resources = await store.list(kind, mesh, selector)
        return JSONResponse({"kind": kind, "items": [render(r) for r in resources]})

    async def get(request: Request) -> Response:
        kind = kind_of(request)
        mesh, name = request.path_params["mesh"], request.path_params["name"]
        try:
            resource = await store.get(kind, mesh, name)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        return JSONResponse(render(resource))

    async def put(request: Request) -> Response:
        kind = kind_of(request)
        mesh, name = request.path_params["mesh"], request.path_params["name"]
        allow_unmatched = flag(request, ALLOW_UNMATCHED)
        document = await read_document(request)
        version = given_version(document)
        valid = validate(document)
        for field, in_path, in_body in (
            ("kind", kind, valid.kind),
            ("metadata.mesh" if kind != MESH_KIND else "metadata.name", mesh, valid.mesh),
            ("metadata.name", name, valid.name),
        ):
            if in_path != in_body:
                raise ApiError(
                    400,
                    "the document does not match the URL",
                    field=field,
                    reason=f"the URL names {in_path!r}, the document {in_body!r}",
                )
        if not allow_unmatched:
            await check_selection(store, valid)
        try:
            resource = await store.update(
                kind, mesh, name, valid.spec, valid.labels, version=version
            )
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except Conflict as e:
            raise ApiError(409, str(e), current=e.current, given=e.given) from None
        return JSONResponse(render(resource))

    async def delete(request: Request) -> Response:
        kind = kind_of(request)
        mesh, name = request.path_params["mesh"], request.path_params["name"]
        raw = request.query_params.get("version")
        version: int | None = None
        if raw is not None:
            if not raw.isdigit() or int(raw) < 1:
                raise ApiError(
                    400,
                    "invalid version",
                    field="version",
                    reason=f"expected a positive integer, got {raw!r}",
                )
            version = int(raw)
        try:
            await store.delete(kind, mesh, name, version=version)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except Conflict as e:
            raise ApiError(409, str(e), current=e.current, given=e.given) from None
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    document = openapi_document(known)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    # the CA routes import this module: imported here, not at the top
    from meshling.controlplane.api import ca as ca_api

    now = clock or ca_api.utc_now
    extra: list[BaseRoute] = []
    open_paths = {"/healthz"}
    stream_paths: set[str] = set()
    if signer is not None:
        extra += ca_api.token_routes(store, signer, clock=now)
        if ca is not None:
            extra += ca_api.ca_routes(store, ca, signer, clock=now)
            open_paths |= ca_api.OPEN_PATHS
    if distributor is not None and signer is not None:
        from meshling.configstream import STREAM_PATH
        from meshling.controlplane.api.status import status_routes
        from meshling.controlplane.distributor.stream import stream_endpoint

        extra.append(WebSocketRoute(STREAM_PATH, stream_endpoint(store, signer, distributor, now)))
        extra += status_routes(store, distributor, distributor.offline_after, now)
        from meshling.controlplane.api.telemetry import telemetry_routes

        extra += telemetry_routes(store, distributor, distributor.offline_after, now)
        stream_paths.add(STREAM_PATH)
    # why a request goes where it goes, from the store alone (admin token; `explain`)
    from meshling.controlplane.api.explain import explain_routes

    extra += explain_routes(store)
    # the web GUI: its API routes (admin token), and its static files (no token)
    from meshling.controlplane.api.gui import gui_api_routes
    from meshling.controlplane.gui import gui

    web_gui = gui()
    extra += [*gui_api_routes(store), *web_gui.routes]
    open_paths |= web_gui.open_paths

    routes = [
        *extra,
        Route("/healthz", guarded(healthz), methods=["GET"]),
        Route("/openapi.json", guarded(openapi), methods=["GET"]),
        Route("/api/v1/resources", guarded(create), methods=["POST"]),
        Route("/api/v1/{kind}", guarded(list_), methods=["GET"]),
        Route("/api/v1/{kind}/{mesh}/{name}", guarded(get), methods=["GET"]),
        Route("/api/v1/{kind}/{mesh}/{name}", guarded(put), methods=["PUT"]),
        Route("/api/v1/{kind}/{mesh}/{name}", guarded(delete), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return BearerAuth(
        app, admin_token, open_paths=frozenset(open_paths), stream_paths=frozenset(stream_paths)
    )


def guarded(handler: Handler) -> Handler:
    """`handler`, with refusals (`ApiError`) and store failures turned into JSON responses."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return JSONResponse(e.body, status_code=e.status)
        except StoreError as e:
            return JSONResponse({"error": f"store: {e}"}, status_code=503)

    return run


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail}, status_code=exc.status_code, headers=dict(exc.headers or {})
    )


class BearerAuth:
    """Refuses (401) any HTTP request without `Authorization: Bearer <token>`, except on
    `open_paths`. The token is compared in constant time.

    WebSockets are let through on `stream_paths` only, whose endpoint checks a dataplane
    token itself (the admin token is not one); any other upgrade is refused."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        open_paths: frozenset[str],
        stream_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.open_paths = open_paths
        self.stream_paths = stream_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] not in self.stream_paths:
            await send({"type": "websocket.close", "code": 4404, "reason": "no stream here"})
            return
        if (
            scope["type"] == "http"
            and scope["path"] not in self.open_paths
            and not self.authorized(scope)
        ):
            response = JSONResponse(
                {"error": "missing or wrong admin token: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="meshling"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        values = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self.token)


async def read_document(request: Request) -> Any:
    """The one document of the request body, by its Content-Type (JSON or YAML)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _JSON_TYPES + _YAML_TYPES:
        raise ApiError(
            415,
            f"unsupported content type {content_type or '(none)'!r}",
            reason=f"send one of {', '.join(_JSON_TYPES + _YAML_TYPES)}",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"request body is larger than {MAX_BODY} bytes")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "request body is not UTF-8", field="", reason=str(e)) from None
    if content_type in _JSON_TYPES:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, "malformed JSON", field="", reason=str(e)) from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ApiError(400, "malformed YAML", field="", reason=str(e)) from None
    if len(documents) != 1:
        raise ApiError(
            400,
            "expected exactly one YAML document",
            field="",
            reason=f"the body holds {len(documents)}; send one resource per request",
        )
    return documents[0]


def given_version(document: Any) -> int:
    """The `metadata.version` a PUT is based on."""
    metadata = document.get("metadata") if isinstance(document, dict) else None
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if version is None:
        raise ApiError(
            400,
            "an update needs the version it is based on",
            field="metadata.version",
            reason="required field is missing: send the version you read",
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ApiError(
            400,
            "invalid version",
            field="metadata.version",
            reason=f"expected a positive integer, got {version!r}",
        )
    return version


@dataclass(frozen=True, slots=True)
class Valid:
    """A request's document that passed validation: where it goes and what it holds."""

    kind: str
    mesh: str
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    # what `parse_resource` built from it (a Mesh, a Dataplane, a policy's resource)
    resource: Any


def validate(document: Any) -> Valid:
    """Validate a request's document: where it goes, what to store, and what it parsed as."""
    if isinstance(document, dict) and isinstance(document.get("metadata"), dict):
        metadata = {k: v for k, v in document["metadata"].items() if k not in READ_ONLY_METADATA}
        document = {**document, "metadata": metadata}
    try:
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ApiError(
            400, "the document cannot be represented as JSON", field="", reason=str(e)
        ) from None
    try:
        parsed = parse_resource(document, "request")
    except SnapshotError as e:
        raise ApiError(400, str(e), field=e.path, reason=e.reason) from None
    # parse_resource accepted it: a mapping with kind, metadata.name and (for all but a
    # Mesh) metadata.mesh
    kind: str = document["kind"]
    metadata = document["metadata"]
    name: str = metadata["name"]
    mesh: str = name if kind == MESH_KIND else metadata["mesh"]
    labels: dict[str, str] = dict(metadata.get("labels") or {})
    spec: dict[str, Any] = dict(document.get("spec") or {})
    return Valid(kind, mesh, name, labels, spec, parsed)


async def check_selection(store: Store, valid: Valid) -> None:
    """Refuses (400, naming the selector field) a policy that selects no registered
    dataplane of its mesh; other kinds select nothing and pass."""
    policy = policy_type(valid.kind)
    if policy is None:
        return
    dataplanes = registered_dataplanes(await store.list(DATAPLANE_KIND, valid.mesh))
    selection = policy.selects(valid.resource, dataplanes)
    if not selection.empty:
        return
    raise ApiError(
        400,
        f"{valid.kind} {valid.mesh}/{valid.name} selects no dataplane",
        field=selection.field,
        reason=selection.unmatched(valid.mesh),
        unmatched=True,
        hint=f"to store it before its dataplanes register, send ?{ALLOW_UNMATCHED}=true",
    )


def registered_dataplanes(stored: list[Resource]) -> list[Dataplane]:
    """The stored Dataplanes as resources; one that no longer parses selects nothing."""
    dataplanes = []
    for resource in stored:
        try:
            document = render(resource)
            for key in READ_ONLY_METADATA:
                del document["metadata"][key]
            dataplanes.append(parse_dataplane(document, f"store:{DATAPLANE_KIND}"))
        except SnapshotError:
            continue
    return dataplanes


def flag(request: Request, name: str) -> bool:
    """A true/false query parameter (absent is false); anything else is a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None or raw.lower() in ("false", "0", ""):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise ApiError(
        400, f"invalid {name}", field=name, reason=f"expected true or false, got {raw!r}"
    )


def parse_selector(raw: str) -> dict[str, str]:
    """The `labelSelector` query parameter; a malformed one is a 400 naming it."""
    try:
        return read_selector(raw)
    except ValueError as exc:
        raise ApiError(
            400, "invalid label selector", field="labelSelector", reason=str(exc)
        ) from None


def render(resource: Resource) -> dict[str, Any]:
    """A stored resource in the `kind / metadata / spec` shape it was written in."""
    metadata: dict[str, Any] = {"name": resource.name}
    if resource.kind != MESH_KIND:
        metadata["mesh"] = resource.mesh
    if resource.labels:
        metadata["labels"] = resource.labels
    metadata["version"] = resource.version
    metadata["created"] = resource.created.isoformat()
    metadata["updated"] = resource.updated.isoformat()
    return {"kind": resource.kind, "metadata": metadata, "spec": resource.spec}
