"""The `rate_limit:` fragment of an inbound filter chain, and its conversion from resources.

```yaml
rate_limit:
  rules:                                   # the first rule holding the caller applies
    - name: api-limit
      identities: [spiffe://default/web]   # or ["*"]: any caller, plaintext ones too
      local: {requests: 100, interval: 1.0, burst: 150}
      per_source: false
      global: {redis: "redis://127.0.0.1:6379/0", requests: 300, interval: 1.0,
               burst: 30, key: default/api-limit}
      tcp: {connections: 20, interval: 1.0, burst: 20}
```

`fragment` builds it on the control plane from the RateLimits selecting a dataplane
(order and splitting: `policies/inbound.py`); `RateLimitConfig.from_dict` is what the
snapshot loader reads, and reads exactly what `fragment` writes. Rules of one name share
their buckets in the proxy, so they must carry the same limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.policies.inbound import first_rule, identities, rule_name, rules_by_caller
from meshling.policies.rate_limit.schema import CONF_FIELDS, RateLimit, RateLimitConf, parse_conf

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """The limits for callers whose SPIFFE ID is one of `identities` ("*": anyone)."""

    # the RateLimit's name: what metrics and logs call the rule, and what its buckets
    # are keyed by in the proxy
    name: str
    # SPIFFE IDs of callers, or "*"
    identities: tuple[str, ...]
    # the limits
    conf: RateLimitConf
    # `identities` as a set, for one lookup per connection
    identity_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_set", frozenset(self.identities))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "identities": list(self.identities), **self.conf.to_dict()}

    @classmethod
    def from_dict(cls, node: _Node) -> RateLimitRule:
        node.mapping(("name", "identities", *CONF_FIELDS))
        name = node.need("name", rule_name)
        return cls(
            name=name,
            identities=node.need("identities", identities),
            conf=parse_conf(node, default_key=name),
        )


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """An inbound chain's rate limits: rules tried in order, the first holding the caller."""

    rules: tuple[RateLimitRule, ...]

    def rule_for(self, identity: str | None) -> RateLimitRule | None:
        """The rule for a caller (its verified SPIFFE ID; None: plaintext), or None."""
        rule: RateLimitRule | None = first_rule(self.rules, identity)
        return rule

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's YAML/JSON form, as `from_dict` reads it."""
        return {"rules": [rule.to_dict() for rule in self.rules]}

    @classmethod
    def from_dict(cls, node: _Node) -> RateLimitConfig:
        """Validate the `rate_limit:` field of a filter chain; errors name its field path."""
        node.mapping(("rules",))
        # no rules (no RateLimit selects the dataplane): no limits
        rules = tuple(RateLimitRule.from_dict(r) for r in node.items("rules", required=False))
        seen: dict[str, RateLimitConf] = {}
        for i, rule in enumerate(rules):
            if seen.setdefault(rule.name, rule.conf) != rule.conf:
                raise (
                    node.child("rules")
                    .child(i)
                    .child("name")
                    .error(
                        f"rule {rule.name!r} appears with other limits before: rules of one "
                        "name share their buckets, so their limits must be the same"
                    )
                )
        return cls(rules=rules)


def fragment(
    resources: Iterable[RateLimit],
    mesh: str,
    dataplane: tuple[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The `rate_limit:` fragment for a dataplane's inbound chains, from the RateLimits
    selecting it (in any order: they are ranked here), as `RateLimitConfig.from_dict`
    reads it. `dataplane` ((service, tags)) ranks the destinations exactly; see
    `policies/inbound.py`."""
    rules = [
        RateLimitRule(name=resource.name, identities=ids, conf=resource.conf)
        for resource, ids in rules_by_caller(resources, mesh, dataplane)
    ]
    return RateLimitConfig(rules=tuple(rules)).to_dict()
