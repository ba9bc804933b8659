"""The `fault:` fragment of an inbound filter chain, and its conversion from resources.

```yaml
fault:
  rules:                                   # the first rule holding the caller applies
    - name: api-chaos
      identities: ["*"]                    # SPIFFE IDs, or "*": any caller
      delay: {percentage: 50.0, value: 2.0}
      abort: {percentage: 10.0, http_status: 503}
      response_bandwidth: {limit: 10000bps, percentage: 100.0}
      header: {name: x-chaos, value: "on"}
```

`fragment` builds it on the control plane from the FaultInjections selecting a dataplane
(order and splitting: `policies/inbound.py`); `FaultConfig.from_dict` is what the snapshot
loader reads, and reads exactly what `fragment` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.policies.fault_injection.schema import (
    CONF_FIELDS,
    FaultConf,
    FaultInjection,
    parse_conf,
)
from meshling.policies.inbound import first_rule, identities, rule_name, rules_by_caller

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node


@dataclass(frozen=True, slots=True)
class FaultRule:
    """The faults for callers whose SPIFFE ID is one of `identities` ("*": anyone)."""

    # the FaultInjection's name, for metrics and logs
    name: str
    # SPIFFE IDs of callers, or "*"
    identities: tuple[str, ...]
    # the faults
    conf: FaultConf
    # `identities` as a set, for one lookup per connection
    identity_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identity_set", frozenset(self.identities))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "identities": list(self.identities), **self.conf.to_dict()}

    @classmethod
    def from_dict(cls, node: _Node) -> FaultRule:
        node.mapping(("name", "identities", *CONF_FIELDS))
        return cls(
            name=node.need("name", rule_name),
            identities=node.need("identities", identities),
            conf=parse_conf(node),
        )


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """An inbound chain's faults: rules tried in order, the first holding the caller."""

    rules: tuple[FaultRule, ...]

    def rule_for(self, identity: str | None) -> FaultRule | None:
        """The rule for a caller (its verified SPIFFE ID; None: plaintext), or None."""
        rule: FaultRule | None = first_rule(self.rules, identity)
        return rule

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's YAML/JSON form, as `from_dict` reads it."""
        return {"rules": [rule.to_dict() for rule in self.rules]}

    @classmethod
    def from_dict(cls, node: _Node) -> FaultConfig:
        """Validate the `fault:` field of a filter chain; errors name its field path."""
        node.mapping(("rules",))
        # no rules (no FaultInjection selects the dataplane): no faults
        return cls(rules=tuple(FaultRule.from_dict(r) for r in node.items("rules", required=False)))


def fragment(
    resources: Iterable[FaultInjection],
    mesh: str,
    dataplane: tuple[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The `fault:` fragment for a dataplane's inbound chains, from the FaultInjections
    selecting it (in any order: they are ranked here), as `FaultConfig.from_dict` reads
    it. `dataplane` ((service, tags)) ranks the destinations exactly; see
    `policies/inbound.py`."""
    rules = [
        FaultRule(name=resource.name, identities=ids, conf=resource.conf)
        for resource, ids in rules_by_caller(resources, mesh, dataplane)
    ]
    return FaultConfig(rules=tuple(rules)).to_dict()
