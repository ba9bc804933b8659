"""Which policy of a kind governs a connection: selectors by service and tags, and the
most specific match.

The traffic policies (Timeout, Retry, CircuitBreaker, HealthCheck, LoadBalancing,
RateLimit, FaultInjection) share one shape:

```yaml
kind: Retry
metadata: {name: web-to-api, mesh: default}
spec:
  sources:       [{service: web}]                       # the callers; "*" for any
  destinations:  [{service: api, tags: {version: v2}}]  # the called
  conf: {...}                                           # the policy's own settings
```

A selector is `{service: NAME | "*", tags: {k: v, ...}}` (tags optional) and matches a
dataplane of that service carrying every tag. Where several resources of one kind match
the same (source, destination), the **most specific** one governs, the others do not
merge into it: a destination selector that names a service beats one with `"*"`, then
more destination tags win, then the same for the source; equal ones are ordered by name,
so the choice never depends on the order the store returned them in.

What "source" and "destination" are depends on where the policy acts:

* **outbound** policies (Timeout, Retry, CircuitBreaker, HealthCheck, LoadBalancing,
  HTTPRoute, TCPRoute) act
  in the caller's proxy, per destination service: the source is that proxy's dataplane
  (service and tags), the destination is the service it calls (no tags: a cluster holds
  every instance of the service);
* **inbound** policies (RateLimit, FaultInjection) act in the called proxy: the
  destination is that proxy's dataplane, and the sources select callers, which the proxy
  knows by SPIFFE identity only, so an inbound policy's source selector names services.

Parsing raises the snapshot loader's `SnapshotError` with the field path, like every
resource error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from meshling.controlplane.resources import metadata
from meshling.policies.selection import Selection
from meshling.snapshot.load import _Node

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane

ANY = "*"


@dataclass(frozen=True, slots=True)
class Selector:
    """Dataplanes of a service (or of any, `"*"`) carrying every one of `tags`."""

    service: str = ANY
    tags: Mapping[str, str] = field(default_factory=dict)

    def matches(self, service: str, tags: Mapping[str, str] | None = None) -> bool:
        if self.service not in (ANY, service):
            return False
        given = tags or {}
        return all(given.get(k) == v for k, v in self.tags.items())

    @property
    def specificity(self) -> tuple[int, int]:
        """Larger is more specific: a named service, then more tags."""
        return (0 if self.service == ANY else 1, len(self.tags))


class Targeted(Protocol):
    """What `best_match` needs of a policy resource."""

    @property
    def name(self) -> str: ...

    @property
    def mesh(self) -> str: ...

    @property
    def sources(self) -> tuple[Selector, ...]: ...

    @property
    def destinations(self) -> tuple[Selector, ...]: ...


T = TypeVar("T", bound=Targeted)


def parse_selector(node: _Node, mesh: str) -> Selector:
    node.mapping(("service", "tags"))
    service = node.get("service", lambda n: _service(n, mesh), ANY)
    no_tags: dict[str, str] = {}
    tags = node.get("tags", metadata.string_map, no_tags)
    if "service" in tags:
        raise (
            node.child("tags")
            .child("service")
            .error("the service is the selector's `service` field, not a tag")
        )
    return Selector(service, tags)


def parse_selectors(node: _Node, mesh: str) -> tuple[Selector, ...]:
    """A non-empty list of selectors."""
    if not isinstance(node.value, list) or not node.value:
        raise node.error('expected a non-empty list of selectors such as {service: "*"}')
    return tuple(parse_selector(node.child(i), mesh) for i in range(len(node.value)))


def _service(node: _Node, mesh: str) -> str:
    if node.value == ANY:
        return ANY
    return metadata.service(node, mesh)


def matched_selectors(
    policy: Targeted,
    source: tuple[str, Mapping[str, str]],
    destination: tuple[str, Mapping[str, str]],
) -> tuple[Selector, Selector] | None:
    """The most specific (destination, source) selectors of `policy` matching this pair,
    or None if it does not select it: what `match_score` scores, and what `meshling
    explain` names as the reason a policy applies."""
    dest = [s for s in policy.destinations if s.matches(*destination)]
    src = [s for s in policy.sources if s.matches(*source)]
    if not dest or not src:
        return None
    # max keeps the first of equals, so the selector named is the first one written
    return max(dest, key=_specificity), max(src, key=_specificity)


def _specificity(selector: Selector) -> tuple[int, int]:
    return selector.specificity


def match_score(
    policy: Targeted,
    source: tuple[str, Mapping[str, str]],
    destination: tuple[str, Mapping[str, str]],
) -> tuple[int, int, int, int] | None:
    """How specifically `policy` selects this pair, or None if it does not select it."""
    found = matched_selectors(policy, source, destination)
    if found is None:
        return None
    return (*found[0].specificity, *found[1].specificity)


def ranked_matches(
    policies: Iterable[T],
    source: tuple[str, Mapping[str, str]],
    destination: tuple[str, Mapping[str, str]],
) -> list[tuple[T, tuple[int, int, int, int]]]:
    """The policies selecting traffic from `source` to `destination`, with their scores,
    in precedence order: the first governs, the others are shadowed by it. A higher
    score wins; on a tie, the name that sorts first."""
    scored = [(p, s) for p in policies if (s := match_score(p, source, destination)) is not None]
    scored.sort(key=lambda item: (tuple(-x for x in item[1]), item[0].name))
    return scored


def best_match(
    policies: Iterable[T],
    source: tuple[str, Mapping[str, str]],
    destination: tuple[str, Mapping[str, str]],
) -> T | None:
    """The policy that governs traffic from `source` to `destination` ((service, tags)
    each), or None when no policy selects both: the first of `ranked_matches`."""
    ranked = ranked_matches(policies, source, destination)
    return ranked[0][0] if ranked else None


def _wanted(selectors: tuple[Selector, ...]) -> str:
    def one(s: Selector) -> str:
        tags = "".join(f", {k}={v}" for k, v in sorted(s.tags.items()))
        return ("any service" if s.service == ANY else f"service {s.service}") + tags

    return " or ".join(one(s) for s in selectors)


def selects_outbound(policy: Targeted, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes an outbound policy acts in: callers matching a source selector with
    an outbound to a service matching a destination selector."""
    chosen = sorted(
        d.name
        for d in dataplanes
        if d.mesh == policy.mesh
        and any(s.matches(d.service, d.tags) for s in policy.sources)
        and any(
            dest.service in (ANY, o.service) and not dest.tags
            for o in d.outbounds
            for dest in policy.destinations
        )
    )
    wanted = f"dataplane of {_wanted(policy.sources)} calling {_wanted(policy.destinations)}"
    return Selection("spec.sources", wanted, tuple(chosen))


def selects_inbound(policy: Targeted, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes an inbound policy acts in: those matching a destination selector."""
    chosen = sorted(
        d.name
        for d in dataplanes
        if d.mesh == policy.mesh and any(s.matches(d.service, d.tags) for s in policy.destinations)
    )
    return Selection(
        "spec.destinations", f"dataplane of {_wanted(policy.destinations)}", tuple(chosen)
    )


def parse_envelope(
    document: Any, source: str, kind: str, spec_fields: tuple[str, ...]
) -> tuple[str, str, _Node]:
    """The `kind / metadata / spec` envelope of every policy resource: its name, mesh and
    the `spec` node, in which only `spec_fields` may stand."""
    root = _Node(source, "", document).mapping(("kind", "metadata", "spec"))
    given = root.need("kind", metadata.text)
    if given != kind:
        raise root.child("kind").error(f"expected kind {kind}, got {given!r}")
    meta = root.need("metadata", lambda n: n.mapping(("name", "mesh")))
    name = meta.need("name", metadata.name)
    mesh = meta.need("mesh", metadata.mesh)
    spec = root.need("spec", lambda n: n.mapping(spec_fields))
    return name, mesh, spec


def parse_proxy_policy(
    document: Any, source: str, kind: str, spec_fields: tuple[str, ...]
) -> tuple[str, str, _Node, tuple[Selector, ...]]:
    """The envelope of a policy that selects whole proxies by `spec.dataplanes` (AccessLog,
    Trace) rather than traffic by source and destination: its name, mesh, the `spec` node
    (`dataplanes` and `spec_fields`) and the dataplane selectors."""
    name, mesh, spec = parse_envelope(document, source, kind, ("dataplanes", *spec_fields))
    dataplanes = spec.need("dataplanes", lambda n: parse_selectors(n, mesh))
    return name, mesh, spec, dataplanes


def parse_targeted(
    document: Any, source: str, kind: str
) -> tuple[str, str, _Node, tuple[Selector, ...], tuple[Selector, ...], _Node]:
    """The `kind / metadata / spec` envelope every traffic policy resource has: its
    name, mesh, the `spec` node, the source and destination selectors, and the
    `spec.conf` node, which the policy reads itself."""
    name, mesh, spec = parse_envelope(document, source, kind, ("sources", "destinations", "conf"))
    sources = spec.need("sources", lambda n: parse_selectors(n, mesh))
    destinations = spec.need("destinations", lambda n: parse_selectors(n, mesh))
    conf = spec.child("conf")
    if conf.value is None:
        raise conf.error("required field is missing")
    return name, mesh, spec, sources, destinations, conf


def refuse_tags(spec: _Node, field: str, selectors: tuple[Selector, ...], reason: str) -> None:
    """Raise on the first selector of `spec.<field>` that carries tags, for policies
    that can only select by service there."""
    for i, selector in enumerate(selectors):
        if selector.tags:
            raise spec.child(field).child(i).child("tags").error(reason)
