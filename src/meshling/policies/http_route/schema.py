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

from meshling.policies.backends import Backend, parse_backends
from meshling.policies.outbound import parse_outbound

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node

KIND = "HTTPRoute"


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    """Requests matching one of `matches` go to `backends`, by weight."""

    # the route `match` documents, as validated (empty: every request)
    matches: tuple[dict[str, Any], ...]
    # where the matching requests go
    backends: tuple[Backend, ...]
    # the `request_headers` and `response_headers` edits, as validated (None: none)
    request_headers: dict[str, Any] | None = None
    response_headers: dict[str, Any] | None = None


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
    from meshling.snapshot.load import _header_edits, _route_match

    node.mapping(("matches", "backends", "request_headers", "response_headers"))
    matches: list[dict[str, Any]] = []
    for match in node.items("matches", required=False):
        _route_match(match)  # raises naming the field
        matches.append(match.value)
    backends = node.need("backends", lambda n: parse_backends(n, mesh))
    edits: list[dict[str, Any] | None] = []
    for key in ("request_headers", "response_headers"):
        edited = node.child(key)
        if edited.value is not None:
            _header_edits(edited)  # raises naming the field
        edits.append(edited.value)
    return HTTPRouteRule(tuple(matches), backends, *edits)
