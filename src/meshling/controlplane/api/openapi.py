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
                    "parameters": [
                        {
                            "name": "mesh",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "{items: [DataplaneStatus], offline_after}",
                            "content": {
                                _JSON: {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "items": {
                                                "type": "array",
                                                "items": _ref("DataplaneStatus"),
                                            },
                                            "offline_after": {"type": "number"},
                                        },
                                    }
                                }
                            },
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
