"""The authorization decision for one inbound connection: a pure function of the
filter chain's `AuthzConfig` and the caller's verified SPIFFE ID.

The rules, precisely:

* Rules are tried in order; the first enforced (non-shadow) rule whose identities or
  prefixes match the caller decides. No match: `default_action` decides, and `rule` is
  "default".
* A plaintext caller (`source` None, a permissive listener) matches no rule, not even
  one for every caller of the mesh, so the default decides: deny unless the chain says
  otherwise.
* Shadow rules never change the decision. Each one sits at its place in the order, and
  the first shadow rule that matches *before* the deciding rule is what the connection
  would have met had the shadow rules been enforced. If that shadow rule is a deny and
  the real decision is allow, the decision says `shadow_denied` and names it in
  `shadow_rule`, for the log and the counters. A shadow allow met first shields the
  connection from later shadow denies, as it would once enforced; and a connection that
  is really denied is never reported as shadow-denied.

It runs once per connection, so the work per rule is one set lookup and one
`str.startswith` over a tuple (the sets are built once, with the config), and the
common results are shared objects rather than built per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from meshling.policies.traffic_permission.snapshot import AuthzConfig

DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a connection may proceed, and which rule said so."""

    allowed: bool
    # the name of the rule that decided, or "default"
    rule: str | None
    # a shadow rule would have denied this allowed connection
    shadow_denied: bool = False
    # that shadow rule's name
    shadow_rule: str | None = None


def decide(config: AuthzConfig, source: str | None) -> Decision:
    """Allow or deny a connection from `source` (a verified SPIFFE ID, None: plaintext)."""
    shadow: tuple[bool, str] | None = None  # (allow?, name) of the first shadow match
    if source is not None:
        for rule in config.rules:
            if source in rule.identity_set or source.startswith(rule.prefixes):
                if rule.shadow:
                    if shadow is None:
                        shadow = (rule.action == "allow", rule.name)
                    continue
                return _decided(rule.action == "allow", rule.name, shadow)
    return _decided(config.default_action == "allow", DEFAULT_RULE, shadow)


def _decided(allowed: bool, rule: str, shadow: tuple[bool, str] | None) -> Decision:
    if allowed and shadow is not None and not shadow[0]:
        return Decision(True, rule, shadow_denied=True, shadow_rule=shadow[1])
    return _verdict(allowed, rule)


# Without a shadow report a decision is one of two per rule name: share them, since
# building a frozen dataclass costs more than the rest of `decide`. Bounded, because
# names come and go with snapshots.
@lru_cache(maxsize=4096)
def _verdict(allowed: bool, rule: str) -> Decision:
    return Decision(allowed, rule)
