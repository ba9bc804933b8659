"""The OpenAPI 3 document of the REST API, written out by hand: the API is small, and its
documents are validated by the resource parsers, not by a schema library."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


def _resource(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Resource")}}}


def _json_body(description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {_JSON: {"schema": {"type": "object"}}},
    }


def _rows(properties: dict[str, Any]) -> dict[str, Any]:
    """An array of objects with these properties: a table's rows."""
    return {"type": "array", "items": {"type": "object", "properties": properties}}


def _listing(schema: str, **more: Any) -> dict[str, Any]:
    """`{items: [schema], ...more}`: what a listing endpoint answers."""
    items = {"type": "array", "items": _ref(schema)}
    return {_JSON: {"schema": {"type": "object", "properties": {"items": items, **more}}}}


def _body(description: str) -> dict[str, Any]:
    schema = _ref("Resource")
    return {
        "required": True,
        "description": description,
        "content": {
            _JSON: {"schema": schema},
            "application/yaml": {"schema": schema},
        },
    }


def openapi_document(kinds: Sequence[str]) -> dict[str, Any]:
    """The document, with `kinds` as the accepted values of `kind`."""
    kind_param = {
        "name": "kind",
        "in": "path",
        "required": True,
        "description": "A resource kind, matched without regard to case.",
        "schema": {"type": "string", "enum": list(kinds)},
    }
    mesh_param = {
        "name": "mesh",
        "in": "path",
        "required": True,
        "description": "The resource's mesh; for a Mesh, its own name.",
        "schema": {"type": "string"},
    }
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    mesh_query = {"name": "mesh", "in": "query", "required": False, "schema": {"type": "string"}}
    one = [kind_param, mesh_param, name_param]
    allow_unmatched = {
        "name": "allow_unmatched",
        "in": "query",
        "required": False,
        "description": "Store a policy even if it selects no registered dataplane (yet); "
        "without it, such a policy is a 400 naming its selector field.",
        "schema": {"type": "boolean", "default": False},
    }
    unauthorized = _error("Missing or wrong admin token.")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "meshling control plane",
            "version": "1",
            "description": (
                "Resources (Mesh, Dataplane and every policy kind) in the kind / metadata / "
                "spec shape. Every route except /healthz needs 'Authorization: Bearer <admin "
                "token>'. A Mesh is global: its mesh is its own name."
            ),
        },
        "security": [{"adminToken": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness; needs no token.",
                    "security": [],
                    "responses": {"200": {"description": "The API is serving."}},
                }
            },
            "/api/v1/tokens/dataplane": {
                "post": {
                    "summary": "Issue a dataplane token bound to a mesh and a service.",
                    "requestBody": _json_body("{service, mesh?, ttl? (default 24h)}"),
                    "responses": {
                        "201": {"description": "{token, jti, mesh, service, expires}"},
                        "400": _error("Invalid service, mesh or ttl."),
                        "401": _error("A valid admin token is required."),
                    },
                }
            },
            "/api/v1/tokens/revoke": {
                "post": {
                    "summary": "Revoke a dataplane token by its jti (or the token itself).",
                    "requestBody": _json_body("{jti, mesh?} or {token}"),
                    "responses": {
                        "204": {"description": "Revoked."},
                        "400": _error("Neither a jti nor a readable token."),
                        "401": _error("A valid admin token is required."),
                    },
                }
            },
            "/api/v1/ca/sign": {
                "post": {
                    "summary": "Sign a CSR for the token's service (spiffe://<mesh>/<service>).",
                    "security": [{"dataplaneToken": []}],
                    "requestBody": _json_body(
                        "{csr: PEM, dataplane?: NAME}; naming the dataplane records the "
                        "certificate's expiry in its status"
                    ),
                    "responses": {
                        "200": {"description": "{certificate, bundle, identity, expires}"},
                        "400": _error("The CSR cannot be read."),
                        "401": _error("The token is malformed, forged, expired or revoked."),
                        "403": _error(
                            "The CSR asks for another identity than the token's, the named "
                            "dataplane is another service's, or the token's mesh has no CA."
                        ),
                    },
                }
            },
            "/api/v1/ca/bundle": {
                "get": {
                    "summary": "A mesh's trust bundle (PEM); needs no token.",
                    "security": [],
                    "parameters": [
                        {
                            "name": "mesh",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "default": "default"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "The root certificates, PEM."},
                        "404": _error("No such mesh."),
                    },
                }
            },
            "/api/v1/stream": {
                "get": {
                    "summary": "The config stream: a WebSocket (see docs/config-stream.md).",
                    "description": (
                        "Upgrade with 'Authorization: Bearer <dataplane token>'. The proxy "
                        "sends hello, then ack/nack; the control plane sends push, or refuse "
                        "and closes with a 44xx code."
                    ),
                    "security": [{"dataplaneToken": []}],
                    "responses": {"101": {"description": "Switching to the WebSocket."}},
                }
            },
            "/api/v1/status/dataplanes": {
                "get": {
                    "summary": "Every dataplane with its stream's status.",
                    "parameters": [mesh_query],
                    "responses": {
                        "200": {
                            "description": "{items: [DataplaneStatus], offline_after}",
                            "content": _listing(
                                "DataplaneStatus", offline_after={"type": "number"}
                            ),
                        },
                        "401": unauthorized,
                    },
                }
            },
            "/api/v1/status/dataplanes/{mesh}/{name}": {
                "get": {
                    "summary": "One dataplane's status, certificate expiry and current snapshot.",
                    "parameters": [
                        {
                            "name": "mesh",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        name_param,
                    ],
                    "responses": {
                        "200": {
                            "description": "The status, with connected_at, "
                            "certificate_expires, tls_paths, snapshot (or snapshot_error) "
                            "and snapshot_version.",
                            "content": {_JSON: {"schema": _ref("DataplaneStatus")}},
                        },
                        "401": unauthorized,
                        "404": _error("No such dataplane."),
                    },
                }
            },
            **_telemetry_paths(unauthorized),
            **_explain_paths(unauthorized),
            "/api/v1/policies/dataplanes": {
                "get": {
                    "summary": "Every policy (all kinds) with the dataplanes it selects.",
                    "parameters": [mesh_query],
                    "responses": {
                        "200": {
                            "description": "{items: [PolicySelection]}, policies in apply "
                            "order, then by name.",
                            "content": _listing("PolicySelection"),
                        },
                        "401": unauthorized,
                    },
                }
            },
            "/api/v1/policies/{kind}/{mesh}/{name}/dataplanes": {
                "get": {
                    "summary": "The dataplanes one policy selects, by its kind's selector.",
                    "parameters": one,
                    "responses": {
                        "200": {
                            "description": "The selection.",
                            "content": {_JSON: {"schema": _ref("PolicySelection")}},
                        },
                        "400": _error("The kind is not a policy kind."),
                        "401": unauthorized,
                        "404": _error("No such policy."),
                    },
                }
            },
            "/gui/": {
                "get": {
                    "summary": "The web GUI (static files; needs no token). / redirects here.",
                    "security": [],
                    "responses": {"200": {"description": "The GUI's HTML page."}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {"200": {"description": "The OpenAPI document."}},
                }
            },
            "/api/v1/resources": {
                "post": {
                    "summary": "Create a resource.",
                    "parameters": [allow_unmatched],
                    "requestBody": _body("One resource document, JSON or YAML."),
                    "responses": {
                        "201": _resource("The stored resource, with metadata.version."),
                        "400": _error(
                            "Malformed or invalid document, unknown kind, or a policy "
                            "that selects no registered dataplane."
                        ),
                        "401": unauthorized,
                        "409": _error("A resource of that kind, mesh and name exists."),
                        "413": _error("Body too large."),
                        "415": _error("Content-Type is neither JSON nor YAML."),
                    },
                }
            },
            "/api/v1/{kind}": {
                "get": {
                    "summary": "List resources of a kind, sorted by name then mesh.",
                    "parameters": [
                        kind_param,
                        {
                            "name": "mesh",
                            "in": "query",
                            "required": False,
                            "description": "Only this mesh.",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "labelSelector",
                            "in": "query",
                            "required": False,
                            "description": "Only resources with all these labels: a=b,c=d.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The matching resources.",
                            "content": {_JSON: {"schema": _ref("ResourceList")}},
                        },
                        "400": _error("Unknown kind or invalid label selector."),
                        "401": unauthorized,
                    },
                }
            },
            "/api/v1/{kind}/{mesh}/{name}": {
                "get": {
                    "summary": "Read a resource.",
                    "parameters": one,
                    "responses": {
                        "200": _resource("The resource."),
                        "400": _error("Unknown kind."),
                        "401": unauthorized,
                        "404": _error("No such resource."),
                    },
                },
                "put": {
                    "summary": "Replace a resource's spec and labels.",
                    "parameters": [*one, allow_unmatched],
                    "requestBody": _body(
                        "The whole resource, with the metadata.version it is based on."
                    ),
                    "responses": {
                        "200": _resource("The updated resource, with its new version."),
                        "400": _error(
                            "Invalid document, one that does not match the URL, or a "
                            "policy that selects no registered dataplane."
                        ),
                        "401": unauthorized,
                        "404": _error("No such resource."),
                        "409": _error(
                            "Stale metadata.version; the body has 'current' and 'given'."
                        ),
                    },
                },
                "delete": {
                    "summary": "Delete a resource.",
                    "parameters": [
                        *one,
                        {
                            "name": "version",
                            "in": "query",
                            "required": False,
                            "description": "Delete only if this is the current version.",
                            "schema": {"type": "integer", "minimum": 1},
                        },
                    ],
                    "responses": {
                        "204": {"description": "Deleted."},
                        "400": _error("Unknown kind or invalid version."),
                        "401": unauthorized,
                        "404": _error("No such resource."),
                        "409": _error("The current version is not the one given."),
                    },
                },
            },
        },
        "components": {
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer"},
                "dataplaneToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A dataplane token, bound to one mesh and service.",
                },
            },
            "schemas": {
                "Resource": {
                    "type": "object",
                    "required": ["kind", "metadata"],
                    "properties": {
                        "kind": {"type": "string", "enum": list(kinds)},
                        "metadata": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "mesh": {
                                    "type": "string",
                                    "description": "Required for every kind but Mesh.",
                                },
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "version": {"type": "integer", "readOnly": True},
                                "created": {
                                    "type": "string",
                                    "format": "date-time",
                                    "readOnly": True,
                                },
                                "updated": {
                                    "type": "string",
                                    "format": "date-time",
                                    "readOnly": True,
                                },
                            },
                        },
                        "spec": {"type": "object", "description": "Depends on the kind."},
                    },
                },
                "ResourceList": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string"},
                        "items": {"type": "array", "items": _ref("Resource")},
                    },
                },
                "DataplaneStatus": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "mesh": {"type": "string"},
                        "service": {"type": "string"},
                        "online": {
                            "type": "boolean",
                            "description": "Connected, and seen within offline_after seconds.",
                        },
                        "connected": {"type": "boolean"},
                        "replica": {"type": "string", "nullable": True},
                        "last_seen": {"type": "string", "format": "date-time", "nullable": True},
                        "pushed": {"type": "string", "nullable": True},
                        "applied": {"type": "string", "nullable": True},
                        "last_nack": {
                            "type": "object",
                            "nullable": True,
                            "properties": {
                                "version": {"type": "string"},
                                "reason": {"type": "string"},
                                "at": {"type": "string", "format": "date-time"},
                            },
                        },
                    },
                },
                "PolicySelection": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string"},
                        "mesh": {"type": "string"},
                        "name": {"type": "string"},
                        "version": {"type": "integer"},
                        "field": {
                            "type": "string",
                            "description": "The selector's field path in the policy.",
                        },
                        "wanted": {
                            "type": "string",
                            "description": "What the selector asks for, for a person.",
                        },
                        "dataplanes": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "The names of the selected dataplanes, sorted.",
                        },
                        "error": {
                            "type": "string",
                            "description": "Why a stored policy no longer parses (it then "
                            "selects nothing).",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "field": {"type": "string", "description": "The field path at fault."},
                        "reason": {"type": "string"},
                        "current": {"type": "integer"},
                        "given": {"type": "integer"},
                    },
                },
            },
        },
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _explain_paths(unauthorized: dict[str, Any]) -> dict[str, Any]:
    """`GET /api/v1/explain` (meshling.controlplane.api.explain)."""
    text = {"type": "string"}
    return {
        "/api/v1/explain": {
            "get": {
                "summary": "Why a request from one service to another takes its route, is "
                "admitted or denied, and which policies apply on the way.",
                "parameters": [
                    _query("mesh", text, "the mesh (default: default)"),
                    {
                        **_query("source", text, "the calling service, or a dataplane's name"),
                        "required": True,
                    },
                    {**_query("destination", text, "the called service"), "required": True},
                    _query("dataplane", text, "only this dataplane of the source service"),
                    _query("method", text, "the request's method (default GET)"),
                    _query("path", text, "the request's path and query (default /)"),
                    _query("header", text, "a request header, name=value; repeatable"),
                    _query("port", {"type": "integer"}, "the destination's inbound port"),
                ],
                "responses": {
                    "200": {
                        "description": "{mesh, mtls, source: {service, identity}, destination, "
                        "request, sources: [{dataplanes, tags, outbound, route: {matched, "
                        "tried}, route_policies, policies}], destinations: [{dataplanes, tags, "
                        "inbound, permission: {allowed, rule, reason, rules}, policies}], "
                        "other_policies, allowed, verdict}; each policy entry has kind, name, "
                        "status (applies, shadowed, not selected), selected_by, specificity, "
                        "shadowed_by and reason.",
                        "content": {_JSON: {"schema": {"type": "object"}}},
                    },
                    "400": _error("A missing or bad parameter, or an unknown service."),
                    "401": unauthorized,
                    "404": _error("No such mesh."),
                },
            }
        }
    }


def _telemetry_paths(unauthorized: dict[str, Any]) -> dict[str, Any]:
    """`GET /api/v1/stats` and `GET /api/v1/tap` (meshling.controlplane.api.telemetry)."""
    number = {"type": ["number", "null"]}
    rates = {
        "requests": {"type": "integer"},
        "rps": {"type": "number"},
        "success_rate": {**number, "description": "non-5xx over all; null without requests"},
        "p50_ms": number,
        "p95_ms": number,
        "p99_ms": number,
    }
    mesh = _query("mesh", {"type": "string", "default": "default"}, "the mesh")
    service = _query("service", {"type": "string"}, "only this service")
    return {
        "/api/v1/stats": {
            "get": {
                "summary": "Golden metrics over the last `window` seconds, from the inbound "
                "counters of this replica's proxies.",
                "parameters": [
                    mesh,
                    _query(
                        "window",
                        {"type": "number", "minimum": 1, "maximum": 900, "default": 60},
                        "seconds",
                    ),
                    service,
                    _query("by", {"enum": ["service", "route"]}, "what the caller shows"),
                ],
                "responses": {
                    "200": {
                        "description": "{mesh, window, generated, services, routes, edges}",
                        "content": {
                            _JSON: {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "mesh": {"type": "string"},
                                        "window": {"type": "number"},
                                        "generated": {"type": "string", "format": "date-time"},
                                        "services": _rows(
                                            {
                                                "service": {"type": "string"},
                                                "dataplanes": {"type": "integer"},
                                                "online": {"type": "integer"},
                                                **rates,
                                            }
                                        ),
                                        "routes": _rows(
                                            {
                                                "service": {"type": "string"},
                                                "route": {"type": "string"},
                                                **rates,
                                            }
                                        ),
                                        "edges": _rows(
                                            {
                                                "source": {"type": "string"},
                                                "destination": {"type": "string"},
                                                "requests": {"type": "integer"},
                                                "rps": {"type": "number"},
                                                "success_rate": number,
                                                "p99_ms": number,
                                            }
                                        ),
                                    },
                                }
                            }
                        },
                    },
                    "400": _error("A bad window or by."),
                    "401": unauthorized,
                },
            }
        },
        "/api/v1/tap": {
            "get": {
                "summary": "The requests to a service as they end, one JSON object a line.",
                "parameters": [
                    mesh,
                    {**service, "required": True, "description": "the service tapped"},
                    _query("direction", {"enum": ["inbound", "outbound"]}, "default: both"),
                    _query("method", {"type": "string"}, "only this method"),
                    _query("path", {"type": "string"}, "only paths with this prefix"),
                    _query("status", {"type": "string"}, "a class (5xx) or a code (503)"),
                    _query(
                        "sample",
                        {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                        "percent of the matching requests (default 100)",
                    ),
                    _query("max", {"type": "integer", "minimum": 1}, "events (default 100)"),
                    _query(
                        "duration",
                        {"type": "number", "minimum": 1, "maximum": 3600},
                        "seconds (default 30)",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "Events {time, dataplane, direction, source, "
                        "destination, method, authority, path, status, duration_ms, route, "
                        "cluster, upstream, request_id, grpc_status}, then a last line "
                        "{end: duration|max, events, dropped}.",
                        "content": {"application/x-ndjson": {"schema": {"type": "object"}}},
                    },
                    "400": _error("A bad filter or limit."),
                    "401": unauthorized,
                    "404": _error("No dataplane of that service."),
                },
            }
        },
    }
