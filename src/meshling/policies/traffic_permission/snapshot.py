"""The authz fragment of a snapshot, and its conversion from TrafficPermissions.

`AuthzConfig` is what an inbound filter chain runs (`authz:` in the snapshot): an ordered
list of rules, each a set of exact SPIFFE IDs and a tuple of SPIFFE ID prefixes, and a
default action for callers no rule matches. `to_snapshot` builds it on the control plane,
as a pure function of the resources.

Merge order. When several permissions select one destination, their rules are
concatenated, each permission's rules kept in the order written, permissions ordered

1. by specificity: those naming the service before those for every service ("*"),
   so a service's own permission can make an exception to a mesh-wide one;
2. then by name, so the result never depends on the order the store returns them in.

Names are unique within a mesh (the store enforces it). A destination that no permission
selects gets no rules and the default action, deny: with mutual TLS nothing is allowed
until a permission says so (a mesh that wants open traffic has a permission for
destination "*" allowing service "*").

Tag sources. `to_snapshot` resolves them from `instances`, the tags of every dataplane of
the mesh by service (the control plane's registry), into the identities of the services
they select, by the rule of the schema's docstring: every dataplane of a service must
carry the tags for an allow, any one for a deny. The rule keeps the tag sources it was
resolved from (`tag_sources`), so a rule that resolved to no identity at all, and so
matches nobody, can still be read and explained. Without `instances` (no control plane)
tag sources select nothing. The proxy never reads tags: `decide` sees identities only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.identity.spiffe import SCHEME_PREFIX, SpiffeId, SpiffeIdError
from meshling.policies.traffic_permission.schema import (
    ANY_SERVICE,
    Action,
    Rule,
    Source,
    TrafficPermission,
    _action,
    _flag,
    _tags,
    _text,
)

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node

# rule names become metric labels and log fields: keep them plain
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")

# service -> the tags of each of its dataplanes, in one mesh
InstanceTags = Mapping[str, Sequence[Mapping[str, str]]]


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """If the caller's SPIFFE ID is one of `identities` or starts with one of `prefixes`,
    take `action` (or, for a shadow rule, only report a deny)."""

    # "<permission name>/<rule index>": what logs and metrics name the decision by
    name: str
    # what a match does
    action: Action
    # exact SPIFFE IDs
    identities: tuple[str, ...]
    # SPIFFE ID prefixes, each ending in "/" ("spiffe://default/ops/");
    # "spiffe://<mesh>/" for every caller of a mesh
    prefixes: tuple[str, ...]
    # the rule never decides; a match of a shadow deny is reported (see `decide`)
    shadow: bool = False
    # the tag sources (`Source` with `tags`) some of `identities` were resolved from, kept
    # so that a rule which resolved to no identity is visible; never read by `decide`
    tag_sources: tuple[Source, ...] = ()
    # `identities` as a set, for one hash lookup per connection
    identity_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_set", frozenset(self.identities))

    def matches(self, identity: str) -> bool:
        return identity in self.identity_set or identity.startswith(self.prefixes)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "action": self.action,
            "identities": list(self.identities),
            "prefixes": list(self.prefixes),
            "shadow": self.shadow,
        }
        # only when there are some, so rules without tags keep their form (and snapshots
        # their versions)
        if self.tag_sources:
            document["tag_sources"] = [_tag_source_dict(s) for s in self.tag_sources]
        return document

    @classmethod
    def from_dict(cls, node: _Node) -> AuthzRule:
        node.mapping(("name", "action", "identities", "prefixes", "shadow", "tag_sources"))
        rule = cls(
            name=node.need("name", _rule_name),
            action=node.need("action", _action),
            identities=tuple(_exact_id(i) for i in node.items("identities", required=False)),
            prefixes=tuple(_prefix(p) for p in node.items("prefixes", required=False)),
            shadow=node.get("shadow", _flag, False),
            tag_sources=tuple(_tag_source(s) for s in node.items("tag_sources", required=False)),
        )
        if not rule.identities and not rule.prefixes and not rule.tag_sources:
            # An empty rule is only meaningful as tag sources that resolved to nobody.
            raise node.error("a rule needs at least one of identities, prefixes")
        return rule


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """Who may connect to an inbound filter chain: the first matching rule decides,
    `default_action` when none matches (always for plaintext callers)."""

    # tried in order, the first enforced match decides
    rules: tuple[AuthzRule, ...]
    # for callers no rule matches, and for plaintext callers
    default_action: Action = "deny"

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's YAML/JSON form, as `from_dict` reads it."""
        return {
            "default_action": self.default_action,
            "rules": [rule.to_dict() for rule in self.rules],
        }

    @classmethod
    def from_dict(cls, node: _Node) -> AuthzConfig:
        """Validate the `authz:` field of a filter chain; errors name its field path."""
        node.mapping(("rules", "default_action"))
        rules = tuple(AuthzRule.from_dict(r) for r in node.items("rules", required=False))
        seen: set[str] = set()
        for i, rule in enumerate(rules):
            if rule.name in seen:
                raise (
                    node.child("rules")
                    .child(i)
                    .child("name")
                    .error(f"duplicate rule name {rule.name!r}")
                )
            seen.add(rule.name)
        return cls(rules=rules, default_action=node.get("default_action", _action, "deny"))


def to_snapshot(
    policies: list[TrafficPermission],
    destination_service: str,
    mesh: str,
    instances: InstanceTags | None = None,
) -> AuthzConfig:
    """The authz fragment for the inbound side of `destination_service` in `mesh`.

    Permissions of other meshes, and those whose destination is another service, are
    ignored; the rest are merged in the order the module docstring describes.
    `instances` maps each service of `mesh` to the tags of each of its dataplanes, to
    resolve tag sources; None (no registry) resolves them to nothing.
    """
    selected = sorted(
        (
            p
            for p in policies
            if p.mesh == mesh and p.destination.service in (destination_service, ANY_SERVICE)
        ),
        key=lambda p: (p.destination.service == ANY_SERVICE, p.name),
    )
    return AuthzConfig(
        rules=tuple(
            _authz_rule(p, index, rule, instances or {})
            for p in selected
            for index, rule in enumerate(p.rules)
        )
    )


def tagged_services(source: Source, action: Action, instances: InstanceTags) -> Iterator[str]:
    """The services a tag source selects, by name: for an allow, those whose every
    dataplane carries the tags; for a deny, those with at least one that does."""
    candidates = [source.service] if source.service is not None else sorted(instances)
    # allow: a single untagged instance would be let in under the shared identity
    quantifier = all if action == "allow" else any
    for service in candidates:
        dataplanes = instances.get(service, ())
        if dataplanes and quantifier(
            all(tags.get(key) == value for key, value in source.tags) for tags in dataplanes
        ):
            yield service


def _authz_rule(
    policy: TrafficPermission, index: int, rule: Rule, instances: InstanceTags
) -> AuthzRule:
    # dicts as ordered sets: the order written is kept, duplicates dropped
    identities: dict[str, None] = {}
    prefixes: dict[str, None] = {}
    tag_sources: dict[Source, None] = {}
    for source in rule.sources:
        if source.tags:
            tag_sources[source] = None
            for service in tagged_services(source, rule.action, instances):
                identities[str(SpiffeId.for_service(policy.mesh, service))] = None
        elif source.service == ANY_SERVICE:
            prefixes[f"{SCHEME_PREFIX}{policy.mesh}/"] = None
        elif source.service is not None:
            identities[str(SpiffeId.for_service(policy.mesh, source.service))] = None
        elif source.identity is not None and source.identity.endswith("/*"):
            prefixes[source.identity[:-1]] = None  # keep the "/" so ".../ops" != ".../opsx"
        elif source.identity is not None:
            identities[source.identity] = None
    return AuthzRule(
        name=f"{policy.name}/{index}",
        action=rule.action,
        identities=tuple(identities),
        prefixes=tuple(prefixes),
        shadow=policy.shadow,
        tag_sources=tuple(tag_sources),
    )


def _tag_source_dict(source: Source) -> dict[str, Any]:
    tags = {"tags": dict(source.tags)}
    return {"service": source.service, **tags} if source.service is not None else tags


def _tag_source(node: _Node) -> Source:
    node.mapping(("service", "tags"))
    return Source(service=node.get("service", _text, None), tags=node.need("tags", _tags))


def _rule_name(node: _Node) -> str:
    value = _text(node)
    if not _RULE_NAME.match(value):
        raise node.error(f"invalid rule name {value!r}: use letters, digits, '_.:/-'")
    return value


def _exact_id(node: _Node) -> str:
    value = _text(node)
    try:
        SpiffeId.parse(value)
    except SpiffeIdError as exc:
        raise node.error(str(exc)) from None
    return value


def _prefix(node: _Node) -> str:
    value = _text(node)
    if not value.startswith(SCHEME_PREFIX) or not value.endswith("/"):
        raise node.error(
            f"a prefix is a SPIFFE ID followed by '/' (spiffe://mesh/path/), got {value!r}"
        )
    try:
        SpiffeId.parse(value[:-1])
    except SpiffeIdError as exc:
        raise node.error(f"invalid prefix {value!r}: {exc}") from None
    return value
