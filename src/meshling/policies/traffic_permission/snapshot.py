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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.identity.spiffe import SCHEME_PREFIX, SpiffeId, SpiffeIdError
from meshling.policies.traffic_permission.schema import (
    ANY_SERVICE,
    Action,
    Rule,
    TrafficPermission,
    _action,
    _flag,
    _text,
)

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node

# rule names become metric labels and log fields: keep them plain
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")


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
    # `identities` as a set, for one hash lookup per connection
    identity_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_set", frozenset(self.identities))

    def matches(self, identity: str) -> bool:
        return identity in self.identity_set or identity.startswith(self.prefixes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "identities": list(self.identities),
            "prefixes": list(self.prefixes),
            "shadow": self.shadow,
        }

    @classmethod
    def from_dict(cls, node: _Node) -> AuthzRule:
        node.mapping(("name", "action", "identities", "prefixes", "shadow"))
        rule = cls(
            name=node.need("name", _rule_name),
            action=node.need("action", _action),
            identities=tuple(_exact_id(i) for i in node.items("identities", required=False)),
            prefixes=tuple(_prefix(p) for p in node.items("prefixes", required=False)),
            shadow=node.get("shadow", _flag, False),
        )
        if not rule.identities and not rule.prefixes:
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
    policies: list[TrafficPermission], destination_service: str, mesh: str
) -> AuthzConfig:
    """The authz fragment for the inbound side of `destination_service` in `mesh`.

    Permissions of other meshes, and those whose destination is another service, are
    ignored; the rest are merged in the order the module docstring describes.
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
            _authz_rule(p, index, rule) for p in selected for index, rule in enumerate(p.rules)
        )
    )


def _authz_rule(policy: TrafficPermission, index: int, rule: Rule) -> AuthzRule:
    # dicts as ordered sets: the order written is kept, duplicates dropped
    identities: dict[str, None] = {}
    prefixes: dict[str, None] = {}
    for source in rule.sources:
        if source.service == ANY_SERVICE:
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
    )


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
