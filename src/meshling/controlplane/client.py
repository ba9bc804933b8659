"""A small synchronous client of the control plane's REST API, on the standard library only
(so that the command line needs nothing beyond the runtime dependencies).

`Client(url, token)` creates, reads, lists and deletes resources, and `apply`s documents:
create, or replace what is stored when it differs (based on the document's
`metadata.version` when it carries one, so that an edit of a stale read is refused); it also issues and revokes dataplane
tokens and reads dataplane status. A refusal of the API raises `ApiError`
with the server's message and field path; a control plane that cannot be reached raises
`Unreachable`.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, Literal

from meshling.controlplane.resources import MESH_KIND

Action = Literal["created", "configured", "unchanged"]

# metadata fields the server sets; dropped from a document before it is compared or sent
READ_ONLY_METADATA = ("version", "created", "updated")

# how many times `apply` re-reads and retries when another writer got in between
_APPLY_ATTEMPTS = 3


class ApiError(Exception):
    """A request the API refused: its HTTP status and the server's explanation."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        reason: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason
        self.body: dict[str, Any] = body or {}

    def __str__(self) -> str:
        if self.field and self.reason:
            return f"{self.field}: {self.reason}"
        if self.reason and self.reason != self.message:
            return f"{self.message}: {self.reason}"
        return self.message


class Unreachable(Exception):
    """The control plane did not answer: refused, timed out, or an unknown host."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the control plane at {url}: {reason}. Is the control plane "
            f"running at {url}? (`meshling control-plane run`; --cp or MESHLING_CP to point "
            "elsewhere)"
        )
        self.url = url
        self.reason = reason


def identity(document: dict[str, Any]) -> tuple[str, str, str]:
    """The kind, mesh and name a (valid) document is addressed by; a Mesh is its own mesh."""
    kind = str(document["kind"])
    metadata = document["metadata"]
    name = str(metadata["name"])
    mesh = name if kind == MESH_KIND else str(metadata["mesh"])
    return kind, mesh, name


def without_read_only(document: Any) -> Any:
    """`document` without the metadata the server sets, so that what was read can be sent."""
    if isinstance(document, dict) and isinstance(document.get("metadata"), dict):
        metadata = {k: v for k, v in document["metadata"].items() if k not in READ_ONLY_METADATA}
        return {**document, "metadata": metadata}
    return document


def given_version(document: dict[str, Any]) -> int | None:
    """The `metadata.version` a document was read at, if it carries a usable one."""
    metadata = document.get("metadata")
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return None
    return version


def _unmatched_query(allow_unmatched: bool) -> str:
    return "?allow_unmatched=true" if allow_unmatched else ""


def _content(document: dict[str, Any]) -> tuple[Any, Any]:
    """What `apply` compares: the spec and the labels, as JSON would carry them."""
    metadata = document.get("metadata") or {}
    spec = document.get("spec") or {}
    labels = metadata.get("labels") or {}
    return json.loads(json.dumps([spec, labels], default=str))  # type: ignore[no-any-return]


class Client:
    """The control plane API at `url` (`http://HOST:PORT`), with the admin token `token`."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 10.0,
        token_source: str = "the token given",
        ca_file: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        # for an https:// control plane whose certificate no system CA vouches for
        self.ca_file = ca_file
        self._tls: ssl.SSLContext | None = None
        # where the token came from, for telling a person which one was refused
        self.token_source = token_source

    # the resource operations

    def create(self, document: dict[str, Any], allow_unmatched: bool = False) -> dict[str, Any]:
        """Create the resource; `allow_unmatched` stores a policy that selects no dataplane."""
        path = "/api/v1/resources" + _unmatched_query(allow_unmatched)
        return self._object("POST", path, body=without_read_only(document))

    def read(self, kind: str, mesh: str, name: str) -> dict[str, Any]:
        return self._object("GET", self._path(kind, mesh, name))

    def replace(
        self, document: dict[str, Any], version: int, allow_unmatched: bool = False
    ) -> dict[str, Any]:
        kind, mesh, name = identity(document)
        body = without_read_only(document)
        body = {**body, "metadata": {**body["metadata"], "version": version}}
        path = self._path(kind, mesh, name) + _unmatched_query(allow_unmatched)
        return self._object("PUT", path, body=body)

    def list_resources(
        self, kind: str, mesh: str | None = None, selector: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, str] = {}
        if mesh:
            query["mesh"] = mesh
        if selector:
            query["labelSelector"] = ",".join(f"{k}={v}" for k, v in selector.items())
        path = f"/api/v1/{_segment(kind)}"
        if query:
            path += "?" + urllib.parse.urlencode(query)
        items = self._object("GET", path).get("items", [])
        return [item for item in items if isinstance(item, dict)]

    def get(
        self,
        kind: str,
        mesh: str | None = None,
        name: str | None = None,
        selector: dict[str, str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One resource when `name` is given (a Mesh needs no `mesh`), else a list."""
        if name is None:
            return self.list_resources(kind, mesh, selector)
        if kind == MESH_KIND:
            mesh = name
        if mesh is None:
            raise ValueError(f"reading a {kind} by name needs its mesh")
        return self.read(kind, mesh, name)

    def delete(self, kind: str, mesh: str, name: str) -> None:
        self._request("DELETE", self._path(kind, mesh, name))

    def apply(
        self, document: dict[str, Any], allow_unmatched: bool = False
    ) -> tuple[Action, dict[str, Any]]:
        """Create the resource, or bring the stored one to this spec and labels.

        A document that carries `metadata.version` (it was read from the API and edited)
        replaces only that version: if the stored one moved on, the API's 409 is raised,
        so that an edit of a stale read never overwrites someone else's change.

        Returns what was done and the resource as stored.
        """
        kind, mesh, name = identity(document)
        based_on = given_version(document)
        if based_on is not None:
            current = self.read(kind, mesh, name)
            if int(current["metadata"]["version"]) == based_on and _content(current) == _content(
                document
            ):
                return "unchanged", current
            return "configured", self.replace(document, based_on, allow_unmatched)
        try:
            return "created", self.create(document, allow_unmatched)
        except ApiError as e:
            if e.status != 409:
                raise
        wanted = _content(document)
        for attempt in range(_APPLY_ATTEMPTS):
            current = self.read(kind, mesh, name)
            if _content(current) == wanted:
                return "unchanged", current
            version = int(current["metadata"]["version"])
            try:
                return "configured", self.replace(document, version, allow_unmatched)
            except ApiError as e:
                # someone else wrote in between: read again and retry
                if e.status != 409 or attempt == _APPLY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # tokens and status

    def issue_token(self, mesh: str, service: str, ttl: str) -> dict[str, Any]:
        """A dataplane token: `{"token", "jti", "mesh", "service", "expires"}`."""
        return self._object(
            "POST", "/api/v1/tokens/dataplane", body={"mesh": mesh, "service": service, "ttl": ttl}
        )

    def revoke_token(self, jti: str, mesh: str) -> None:
        self._request("POST", "/api/v1/tokens/revoke", body={"jti": jti, "mesh": mesh})

    def healthz(self) -> dict[str, Any]:
        """The control plane's health (no token needed)."""
        return self._object("GET", "/healthz")

    def dataplane_statuses(self, mesh: str | None = None) -> list[dict[str, Any]]:
        path = "/api/v1/status/dataplanes"
        if mesh:
            path += "?" + urllib.parse.urlencode({"mesh": mesh})
        items = self._object("GET", path).get("items", [])
        return [item for item in items if isinstance(item, dict)]

    def dataplane_status(self, mesh: str, name: str) -> dict[str, Any]:
        return self._object("GET", f"/api/v1/status/dataplanes/{_segment(mesh)}/{_segment(name)}")

    def explain(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        """`GET /api/v1/explain` with these query parameters (`header` may repeat)."""
        return self._object("GET", "/api/v1/explain?" + urllib.parse.urlencode(query))

    def stats(
        self, mesh: str, window: float, service: str | None = None, by: str = "service"
    ) -> dict[str, Any]:
        """Golden metrics over the last `window` seconds (`GET /api/v1/stats`)."""
        query = {"mesh": mesh, "window": f"{window:g}", "by": by}
        if service:
            query["service"] = service
        return self._object("GET", "/api/v1/stats?" + urllib.parse.urlencode(query))

    def tap(self, query: dict[str, str], duration: float) -> Iterator[dict[str, Any]]:
        """The events of a tap (`GET /api/v1/tap`) as they arrive, then its end line."""
        headers = {"Accept": "application/x-ndjson"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + "/api/v1/tap?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers=headers, method="GET")
        # a quiet tap sends nothing until its end: wait that long, and a margin
        response = self._open(request, duration + self.timeout)
        with response:
            try:
                for line in response:
                    if line.strip():
                        yield json.loads(line)
            except (TimeoutError, ConnectionError) as e:
                raise Unreachable(self.url, str(e) or type(e).__name__) from None
            except ValueError:
                raise ApiError(
                    0, f"the control plane sent a bad tap line: {line[:200]!r}"
                ) from None

    # HTTP

    def _path(self, kind: str, mesh: str, name: str) -> str:
        return f"/api/v1/{_segment(kind)}/{_segment(mesh)}/{_segment(name)}"

    def _object(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        result = self._request(method, path, body)
        if not isinstance(result, dict):
            raise ApiError(0, f"unexpected answer from the control plane: {result!r}")
        return result

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        if self._tls is None:
            try:
                self._tls = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                raise Unreachable(
                    self.url, f"cannot load the CA file {self.ca_file}: {reason}"
                ) from None
        return self._tls

    def _open(self, request: urllib.request.Request, timeout: float) -> Any:
        """The response to `request`; an error answer raises ApiError, no answer
        Unreachable."""
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self._context())
        except urllib.error.HTTPError as e:
            raise _api_error(e.code, e.read(), e.reason) from None
        except urllib.error.URLError as e:
            raise Unreachable(self.url, str(e.reason)) from None
        except (TimeoutError, ConnectionError) as e:
            raise Unreachable(self.url, str(e) or type(e).__name__) from None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body, default=str).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with self._open(request, self.timeout) as response:
            try:
                raw = response.read()
            except (TimeoutError, ConnectionError) as e:
                raise Unreachable(self.url, str(e) or type(e).__name__) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(0, f"the control plane answered with non-JSON: {raw[:200]!r}") from None


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _api_error(status: int, raw: bytes, http_reason: str) -> ApiError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "error" not in body:
        text = raw.decode(errors="replace").strip()
        return ApiError(status, f"HTTP {status} {http_reason}" + (f": {text}" if text else ""))
    field = body.get("field")
    reason = body.get("reason")
    return ApiError(
        status,
        str(body["error"]),
        field=str(field) if field else None,
        reason=str(reason) if reason else None,
        body=body,
    )
