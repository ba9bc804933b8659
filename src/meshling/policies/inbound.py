"""Inbound traffic policies as rules by caller: what RateLimit and FaultInjection share.

An inbound policy acts in the called proxy, which knows a caller only by the SPIFFE ID
of its certificate (or not at all: a plaintext caller of a permissive listener). So its
resource's `spec.sources` name services (`{service: web}` or `{service: "*"}`), never
tags, and the control plane turns the resources that select a dataplane into an ordered
list of rules, each with the `identities` it applies to:

* `spiffe://<mesh>/<service>` for a named source service;
* `"*"` for `service: "*"`: any caller, plaintext ones included.

The proxy applies the first rule whose identities hold the caller; a caller no rule holds
meets no policy of that kind. The order is `matching.best_match`'s, so that first-match
on the proxy picks the resource the control plane's most-specific rule picks: by
destination specificity (for the dataplane, when the builder passes it), then source
specificity (a named service before `"*"`), then name. A resource with both named and
`"*"` sources becomes two rules of the same name, which share their state in the proxy
(one rate-limit bucket per name), so splitting it changes precedence only, never limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from meshling.policies.matching import Selector, Targeted
    from meshling.snapshot.load import _Node

ANY_CALLER = "*"
# rule names become metric labels and log fields: keep them plain
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,254}$")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The `kind / metadata / spec` parts every inbound policy resource has."""

    name: str
    mesh: str
    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]


def parse_envelope(document: Any, source: str, kind: str) -> tuple[Envelope, _Node]:
    """Check kind, metadata and the selectors; returns them and the `spec.conf` node.

    Imported by the control plane only: the proxy reads fragments, never resources.
    """
    from meshling.policies.matching import parse_targeted, refuse_tags

    name, mesh, spec, sources, destinations, conf = parse_targeted(document, source, kind)
    refuse_tags(
        spec,
        "sources",
        sources,
        "an inbound policy knows callers by their service identity only: "
        "select sources by service, without tags",
    )
    return Envelope(name, mesh, sources, destinations), conf


T = TypeVar("T", bound="Targeted")


def rules_by_caller(
    resources: Iterable[T],
    mesh: str,
    dataplane: tuple[str, Mapping[str, str]] | None = None,
) -> list[tuple[T, tuple[str, ...]]]:
    """(resource, identities) pairs in the order the proxy tries them (module docstring).

    `dataplane` ((service, tags)) ranks destinations by the selector that matches it;
    without it, by the most specific destination selector of each resource.
    """
    ranked: list[tuple[tuple[int, int, int], str, int, T, tuple[str, ...]]] = []
    for order, resource in enumerate(resources):
        if resource.mesh != mesh:
            continue
        if dataplane is not None:
            matching = [s.specificity for s in resource.destinations if s.matches(*dataplane)]
            if not matching:
                continue
            destination = max(matching)
        else:
            destination = max(s.specificity for s in resource.destinations)
        named: dict[str, None] = {}  # an ordered set: duplicates dropped, order kept
        anyone = False
        for selector in resource.sources:
            if selector.service == ANY_CALLER:
                anyone = True
            else:
                named[f"spiffe://{mesh}/{selector.service}"] = None
        if named:
            ranked.append(((*destination, 1), resource.name, order, resource, tuple(named)))
        if anyone:
            ranked.append(((*destination, 0), resource.name, order, resource, (ANY_CALLER,)))
    # most specific first; then by name, so the store's order never matters
    ranked.sort(key=lambda r: (tuple(-x for x in r[0]), r[1], r[2]))
    return [(r[3], r[4]) for r in ranked]


def first_rule(rules: Sequence[Any], identity: str | None) -> Any:
    """The first rule (with `identity_set`) holding the caller; None if none does."""
    for rule in rules:
        ids = rule.identity_set
        if ANY_CALLER in ids or (identity is not None and identity in ids):
            return rule
    return None


# -- small field parsers shared by both policies' schemas and fragments ----------------
def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def text(node: _Node) -> str:
    if not isinstance(node.value, str) or not node.value:
        raise node.error(f"expected a non-empty string, got {kind_of(node.value)}")
    return node.value


def flag(node: _Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {kind_of(node.value)}")
    return node.value


def integer(node: _Node, lo: int, hi: int) -> int:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise node.error(f"expected an integer, got {kind_of(value)}")
    if not lo <= value <= hi:
        raise node.error(f"{value} is out of range [{lo}, {hi}]")
    return value


def positive_duration(node: _Node, most: float = 86400.0) -> float:
    """Seconds, above zero, from a number or "250ms", "10s", "5m", "1h"."""
    from meshling.snapshot.load import _duration

    if isinstance(node.value, int | float) and not isinstance(node.value, bool) and node.value < 0:
        raise node.error(f"a duration cannot be negative, got {node.value}")
    if isinstance(node.value, str) and node.value.strip().startswith("-"):
        raise node.error(f"a duration cannot be negative, got {node.value!r}")
    seconds = _duration(node)
    if seconds <= 0:
        raise node.error("must be longer than zero")
    if seconds > most:
        raise node.error(f"{node.value!r} is too long (at most {most:g}s)")
    return seconds


def percentage(node: _Node) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error(f"expected a percentage from 0 to 100, got {kind_of(value)}")
    if not 0 <= value <= 100:
        raise node.error(f"a percentage is from 0 to 100, got {value}")
    return float(value)


def rule_name(node: _Node) -> str:
    value = text(node)
    if not _RULE_NAME.match(value):
        raise node.error(f"invalid rule name {value!r}: use letters, digits, '_.:/-'")
    return value


def identities(node: _Node) -> tuple[str, ...]:
    """A rule's callers: SPIFFE IDs, or "*" for any caller; at least one."""
    if not isinstance(node.value, list) or not node.value:
        raise node.error('expected a non-empty list of SPIFFE IDs, or ["*"] for any caller')
    found: list[str] = []
    for i in range(len(node.value)):
        item = node.child(i)
        value = text(item)
        if value != ANY_CALLER and (
            not value.startswith("spiffe://") or "*" in value or len(value) > 2048
        ):
            raise item.error(
                f'expected a SPIFFE ID such as spiffe://mesh/service or "*", got {value!r}'
            )
        found.append(value)
    return tuple(found)
