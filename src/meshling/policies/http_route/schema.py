"""The HTTPRoute resource: rules sending a caller's requests to a service's backends.

```yaml
kind: HTTPRoute
metadata: {name: api-canary, mesh: default}
spec:
  sources: [{service: web}]          # the callers (their tags may narrow them); "*": any
  destinations: [{service: api}]     # the called services, without tags
  conf:
    rules:                           # in order: the first rule matching a request wins
      - matches:                     # any one of them (none: every request)
          - path: {prefix: /v2}      # exact, prefix or regex
            methods: [GET, HEAD]     # none: any method
            headers: [{name: x-canary, exact: "1"}]
            query: [{name: beta, present: true}]  # exact, prefix, regex or present
        backends:
          - {service: api, tags: {version: v2}, weight: 1}
        request_headers:             # add (append), set (replace), remove
          set: {x-canary: "1"}
        response_headers:
          add: {x-served-by: canary}
          remove: [server]
      - matches: [{path: {prefix: /old/}}]
        backends: [{service: api}]
        rewrite: {prefix: /new/}     # the matched prefix, replaced upstream (query kept)
      - matches: [{path: {prefix: /search}}]
        backends: [{service: api, tags: {version: v1}}]
        mirror:                      # a copy of 30% of the requests, answers discarded
          backend: {service: api, tags: {version: v2}}  # a backend, without weight
          percent: 30                # 0 to 100; 100 by default
      - matches: [{path: {exact: /docs}}]
        redirect: {host: docs.example.com, path: /, status: 302}  # scheme, port too
      - matches: [{path: {prefix: /internal}}]
        direct_response: {status: 403, body: internal}  # the proxy answers
      - backends:                    # the rest: 90/10 between two versions
          - {service: api, tags: {version: v1}, weight: 90}
          - {service: api, tags: {version: v2}, weight: 10}
```

HTTPRoute is an outbound policy (see `policies.matching`): it acts in the caller's
proxy and replaces the route list of its outbound to the destination service; a request
matching no rule still goes to the whole service. A `matches` entry is read by the
snapshot loader's route `match` parser, so an error names the same fields as in a
snapshot; `parse_resource` raises `SnapshotError` naming the field path
(`spec.conf.rules[0].backends[1].weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.backends import Backend, parse_backend, parse_backends
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node

KIND = "HTTPRoute"


@dataclass(frozen=True, slots=True)
class HTTPRouteMirror:
    """Copies of a rule's requests for another backend, sent as well as the request
    (Host suffixed `-shadow`); the caller never waits for them, their answers are
    discarded."""

    # where the copies go: a service, or the instances of it carrying some tags
    backend: Backend
    # the share of the rule's requests copied, 0 to 100
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    """Requests matching one of `matches` go to `backends`, by weight (or are answered
    by a direct response or a redirect)."""

    # the route `match` documents, as validated (empty: every request)
    matches: tuple[dict[str, Any], ...]
    # where the matching requests go
    backends: tuple[Backend, ...]
    # the `request_headers` and `response_headers` edits, as validated (None: none)
    request_headers: dict[str, Any] | None = None
    response_headers: dict[str, Any] | None = None
    # the rule's action in place of `backends` (empty then), as validated: the proxy
    # answers itself (`direct_response`) or redirects (`redirect`); None: forward
    direct_response: dict[str, Any] | None = None
    redirect: dict[str, Any] | None = None
    # with backends: `{prefix: /new/}` replaces the matched path prefix forwarded
    rewrite: dict[str, Any] | None = None
    # with backends: copies of the requests for another backend (None: none)
    mirror: HTTPRouteMirror | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """The rules of the routes from `sources` to `destinations`."""

    # unique within the mesh
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers: the proxies the routes act in
    sources: tuple[Selector, ...]
    # the called services (no tags: the rules choose the instances)
    destinations: tuple[Selector, ...]
    # the rules, in order
    rules: tuple[HTTPRouteRule, ...]


def parse_resource(document: Any, source: str) -> HTTPRoute:
    """Validate a parsed YAML/JSON document and build the HTTPRoute it describes."""
    conf, name, mesh, sources, destinations = parse_outbound(document, source, KIND)
    conf.mapping(("rules",))
    rules_node = conf.child("rules")
    if not isinstance(rules_node.value, list) or not rules_node.value:
        raise rules_node.error("expected a non-empty list of rules such as {backends: [...]}")
    rules = tuple(_rule(rules_node.child(i), mesh) for i in range(len(rules_node.value)))
    return HTTPRoute(name, mesh, sources, destinations, rules)


def _rule(node: _Node, mesh: str) -> HTTPRouteRule:
    from meshling.snapshot.load import (
        _direct_response,
        _header_edits,
        _redirect,
        _rewrite,
        _route_match,
    )

    node.mapping(
        (
            "matches",
            "backends",
            "direct_response",
            "redirect",
            "rewrite",
            "mirror",
            "request_headers",
            "response_headers",
        )
    )
    matches: list[dict[str, Any]] = []
    for match in node.items("matches", required=False):
        _route_match(match)  # raises naming the field
        matches.append(match.value)
    given = [k for k in ("backends", "direct_response", "redirect") if node.has(k)]
    if len(given) != 1:
        raise node.error(
            "give exactly one of backends, direct_response, redirect"
            + (f", got {', '.join(given)}" if given else "")
        )
    backends: tuple[Backend, ...] = ()
    if given[0] == "backends":
        backends = node.need("backends", lambda n: parse_backends(n, mesh))
    documents: dict[str, dict[str, Any] | None] = {}
    for key, parse in (
        ("direct_response", _direct_response),
        ("redirect", _redirect),
        ("rewrite", _rewrite),
        ("request_headers", _header_edits),
        ("response_headers", _header_edits),
    ):
        child = node.child(key)
        if child.value is not None:
            parse(child)  # raises naming the field
        documents[key] = child.value
    rewrite = node.child("rewrite")
    if rewrite.value is not None:
        if not backends:
            raise rewrite.error("a rewrite needs backends to forward to")
        for i, document in enumerate(matches):
            path_match: dict[str, Any] = document.get("path") or {"prefix": "/"}
            if "prefix" not in path_match:
                raise (
                    node.child("matches")
                    .child(i)
                    .child("path")
                    .error("a rule with a prefix rewrite needs prefix path matches")
                )
    mirror = node.get("mirror", lambda n: _mirror(n, mesh), None)
    if mirror is not None and not backends:
        raise node.child("mirror").error("a mirror needs backends to forward to")
    return HTTPRouteRule(
        tuple(matches),
        backends,
        request_headers=documents["request_headers"],
        response_headers=documents["response_headers"],
        direct_response=documents["direct_response"],
        redirect=documents["redirect"],
        rewrite=documents["rewrite"],
        mirror=mirror,
    )


def _mirror(node: _Node, mesh: str) -> HTTPRouteMirror:
    from meshling.snapshot.load import _percent

    node.mapping(("backend", "percent"))
    return HTTPRouteMirror(
        backend=node.need("backend", lambda n: parse_backend(n, mesh, weighted=False)),
        percent=node.get("percent", _percent, 100.0),
    )
