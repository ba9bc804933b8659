"""The TrafficPermission resource: which callers may open connections to a service.

```yaml
kind: TrafficPermission
metadata: {name: web-to-api, mesh: default}
spec:
  destination: {service: api}            # or {service: "*"}: every service of the mesh
  rules:                                 # evaluated in order, the first match wins
    - action: allow                      # allow | deny
      sources:
        - {service: web}                 # spiffe://default/web
        - {identity: "spiffe://default/ops/*"}   # an exact SPIFFE ID, or a prefix ending in /*
        - {service: "*"}                 # any authenticated caller of this mesh
        - {tags: {version: v1}}          # the services whose instances carry these tags
        - {service: batch, tags: {zone: a}}      # batch, if its instances are in zone a
  shadow: false                          # true: never deny, only log and count
```

Tag sources, and what they can promise. On the wire a caller is known only by its
certificate's SPIFFE ID, `spiffe://<mesh>/<service>`: one identity per *service*, shared
by all its instances, and no tags. So the control plane resolves a tag source into the
identities of whole services, from the tags of the mesh's Dataplanes, and the rule is
enforced at service granularity, in the direction that never widens access:

* in an **allow** rule, a service matches only if *every* one of its dataplanes carries
  all the tags: were one instance untagged, allowing the service's identity would let
  that instance in too;
* in a **deny** rule, a service matches if *any* of its dataplanes carries them: the
  tagged instance cannot be told from its siblings, so they are all denied.

A service with no dataplanes matches neither. A tag source no service matches makes the
rule match nobody (an allow grants nothing, a deny denies nothing); the rule still
appears in the snapshot, with the tag sources it came from and no identities, so the
outcome can be read there. A dataplane's service is one of its selectable attributes
(what Kuma calls the `kuma.io/service` tag), but it is written as the source's `service`
field, next to the tags (`{service: web, tags: {version: v1}}`), never as a tag: `service`
is refused as a tag key, so there is one spelling and no clash with a dataplane tag of
that name. A proxy running a snapshot without a control plane has no dataplanes to
resolve tags from: its authz fragment only ever holds identities and prefixes.

The selection is only as fresh as the snapshot: a Dataplane change rebuilds the
snapshots it can alter, and until the new one arrives the previous selection holds. It
also sees only registered dataplanes: an instance holding its service's certificate
without a Dataplane is invisible to it.

`parse_resource` validates everything and raises `SnapshotError(source, field path,
reason)`, the same error the snapshot loader raises, because a resource is the source of
a snapshot fragment and an operator reads both kinds of error the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from meshling.identity.spiffe import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node

KIND = "TrafficPermission"
ANY_SERVICE = "*"

Action = Literal["allow", "deny"]

# a DNS label, so a name can become a metric label, a file name or a Kubernetes object
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# the mesh is the SPIFFE trust domain of its identities
_MESH = re.compile(r"^[a-z0-9._-]{1,255}$")


@dataclass(frozen=True, slots=True)
class Source:
    """Callers a rule applies to: `service`, `identity` or `tags`, or `service` with `tags`."""

    # a service of the resource's mesh (`spiffe://<mesh>/<service>`), or "*" for any
    # authenticated caller of the mesh; with `tags`, the one service the tags may select
    service: str | None = None
    # an exact SPIFFE ID, or a prefix written as `spiffe://<domain>/<path>/*`, which
    # matches every ID below that path (and not the path itself)
    identity: str | None = None
    # dataplane tags, as (key, value) pairs sorted by key: the services whose dataplanes
    # carry them all (every dataplane for an allow, any for a deny; see the module
    # docstring), resolved by the control plane
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One step of the permission: if the caller is one of `sources`, take `action`."""

    # allow or deny the connection
    action: Action
    # the callers this rule matches; at least one
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    """The services whose inbound connections the permission governs."""

    # a service name, or "*" for every service of the mesh
    service: str


@dataclass(frozen=True, slots=True)
class TrafficPermission:
    """Who may connect to a destination service, as an ordered list of rules."""

    # unique within the mesh; rules are reported as "<name>/<rule index>"
    name: str
    # the mesh (SPIFFE trust domain) the permission belongs to
    mesh: str
    # which services the permission applies to
    destination: Destination
    # evaluated in order, the first matching rule decides
    rules: tuple[Rule, ...]
    # a shadow permission never denies: what it would deny is only logged and counted,
    # so a new rule can be tried on live traffic before it is enforced
    shadow: bool = False


def parse_resource(document: Any, source: str) -> TrafficPermission:
    """Validate a parsed YAML/JSON document and build the TrafficPermission it describes.

    `source` names the document in errors (a file name, or an API request).
    """
    # Imported here, not at the top: the snapshot model carries the authz fragment of
    # this package, so the snapshot modules import this package, and not the other way.
    from meshling.snapshot.load import _Node

    root = _Node(source, "", document).mapping(("kind", "metadata", "spec"))
    kind = root.need("kind", _text)
    if kind != KIND:
        raise root.child("kind").error(f"expected kind {KIND}, got {kind!r}")
    metadata = root.need("metadata", lambda n: n.mapping(("name", "mesh")))
    name = metadata.need("name", _name)
    mesh = metadata.need("mesh", _mesh)
    spec = root.need("spec", lambda n: n.mapping(("destination", "rules", "shadow")))
    destination = spec.need("destination", lambda n: _destination(n, mesh))
    rules = tuple(_rule(r, mesh) for r in spec.items("rules"))
    if not rules:
        raise spec.child("rules").error("at least one rule is required")
    return TrafficPermission(
        name=name,
        mesh=mesh,
        destination=destination,
        rules=rules,
        shadow=spec.get("shadow", _flag, False),
    )


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _text(node: _Node) -> str:
    if not isinstance(node.value, str) or not node.value:
        raise node.error(f"expected a non-empty string, got {_kind(node.value)}")
    return node.value


def _flag(node: _Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {_kind(node.value)}")
    return node.value


def _name(node: _Node) -> str:
    value = _text(node)
    if not _NAME.match(value):
        raise node.error(
            f"invalid name {value!r}: use at most 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _mesh(node: _Node) -> str:
    value = _text(node)
    if not _MESH.match(value):
        raise node.error(
            f"invalid mesh {value!r}: a mesh is a SPIFFE trust domain, "
            "use lower-case letters, digits, '.', '-' and '_'"
        )
    return value


def _service(node: _Node, mesh: str) -> str:
    value = _text(node)
    if value == ANY_SERVICE:
        return value
    try:
        SpiffeId.for_service(mesh, value)
    except SpiffeIdError as exc:
        raise node.error(f"invalid service name {value!r}: {exc}") from None
    return value


def _identity(node: _Node) -> str:
    value = _text(node)
    if not value.startswith("spiffe://"):
        raise node.error(f"an identity must start with spiffe://, got {value!r}")
    exact = value[:-2] if value.endswith("/*") else value
    if "*" in exact:
        raise node.error(f"invalid identity {value!r}: '*' is only allowed as a final '/*'")
    try:
        SpiffeId.parse(exact)
    except SpiffeIdError as exc:
        raise node.error(str(exc)) from None
    return value


def _tags(node: _Node) -> tuple[tuple[str, str], ...]:
    """A tag selector: Dataplane tag keys and values, at least one, never `service`."""
    from meshling.controlplane.resources.metadata import string_map

    tags = string_map(node)
    if not tags:
        raise node.error("give at least one tag (for every caller of a service, give service)")
    if "service" in tags:
        raise node.child("service").error(
            "the service is not a tag: write it beside the tags, {service: NAME, tags: {...}}"
        )
    return tuple(tags.items())


def _source(node: _Node, mesh: str) -> Source:
    node.mapping(("service", "identity", "tags"))
    given = [key for key in ("service", "identity", "tags") if node.has(key)]
    if given not in (["service"], ["identity"], ["tags"], ["service", "tags"]):
        raise node.error("give one of service, identity or tags (tags may come with a service)")
    source = Source(
        service=node.get("service", lambda n: _service(n, mesh), None),
        identity=node.get("identity", _identity, None),
        tags=node.get("tags", _tags, ()),
    )
    if source.tags and source.service == ANY_SERVICE:
        raise node.child("service").error(
            'service "*" with tags selects no more than the tags alone: drop the service'
        )
    return source


def _action(node: _Node) -> Action:
    if node.value == "allow":
        return "allow"
    if node.value == "deny":
        return "deny"
    raise node.error(f"must be one of allow, deny, got {node.value!r}")


def _rule(node: _Node, mesh: str) -> Rule:
    node.mapping(("action", "sources"))
    action = node.need("action", _action)
    sources = tuple(_source(s, mesh) for s in node.items("sources"))
    if not sources:
        raise node.child("sources").error("at least one source is required")
    return Rule(action=action, sources=sources)


def _destination(node: _Node, mesh: str) -> Destination:
    node.mapping(("service",))
    return Destination(service=node.need("service", lambda n: _service(n, mesh)))
