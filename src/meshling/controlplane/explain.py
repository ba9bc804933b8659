"""Why a request from one service to another goes where it goes: `meshling explain`.

Operators of a mesh mostly ask one question of its policies: *why* does this one apply
to my traffic, or not? This module answers it for one (source, destination, request)
from the resources of a mesh as the snapshot builder sees them, and from the builder's
own decisions, so the answer and the proxies' config cannot disagree:

* **the route**: the source dataplane's real snapshot is built (`builder.snapshot.build`),
  loaded as the proxy loads it (`snapshot.from_dict`), and its outbound listener's
  `Router` routes the request; the routes tried before the one chosen say why they did
  not match (`proxy.router.mismatch`, the same checks as the proxy's). A route is named
  back to the HTTPRoute rule it was made from (`<service>:<rule>[.<match>]`), or is the
  default route to the whole service;
* **the permission**: the destination dataplane's snapshot is built and loaded the same
  way, and its inbound chain's `authz` decides for the source's SPIFFE identity with the
  proxy's own `traffic_permission.decide`; every rule before the deciding one says why
  it did not decide;
* **the policies on the way**: for each traffic kind of the registry, the resources
  selecting the traffic in precedence order (`matching.ranked_matches` for the outbound
  kinds, `policies.inbound.rules_by_caller` for the inbound ones, the orders the builder
  uses), the first applying and the others "shadowed by" it, with the selector that
  made each apply and why the winner is more specific; resources of the kind that do
  not select the traffic say why not. A kind the builder does not place by selectors
  here (one registered later) is reported from its own `selects`.

Dataplanes of one service can differ (tags such as `version` or `zone` select
policies): the answer is made per distinct source dataplane (its tags and its outbound
to the destination) and per distinct destination dataplane, each naming the dataplanes
it stands for. The output is a plain JSON-ready document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshling.controlplane.builder.index import (
    TCP_ROUTE_KEYS,
    MeshIndex,
    PolicyResource,
    inbound_candidates,
    outbound_candidates,
    policy_of,
)
from meshling.controlplane.builder.snapshot import build
from meshling.controlplane.resources import Dataplane, Mesh
from meshling.identity.spiffe import SpiffeId
from meshling.policies import PolicyType, registered
from meshling.policies.inbound import ANY_CALLER, rules_by_caller
from meshling.policies.matching import ANY, Selector, matched_selectors, ranked_matches
from meshling.policies.traffic_permission import TrafficPermission, decide
from meshling.proxy.router import Router, mismatch
from meshling.snapshot.load import from_dict
from meshling.snapshot.model import FilterChain, Snapshot, TlsFiles

# The snapshots built here never reach a proxy: TLS paths are only read by a proxy, so
# any will do, and these say where they came from if one is ever printed.
_TLS = TlsFiles("explain/cert.pem", "explain/key.pem", "explain/bundle.pem")


class ExplainError(ValueError):
    """A question that cannot be answered: names the input (`field`) and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    """The request to explain; for a TCP outbound only the connection matters."""

    method: str = "GET"
    path: str = "/"
    # (name, value), names in any case
    headers: tuple[tuple[str, str], ...] = ()
    # the destination's inbound port (default: the first of each destination dataplane)
    port: int | None = None


def explain(
    mesh: Mesh,
    dataplanes: Iterable[Dataplane],
    policies: Iterable[PolicyResource],
    source: str,
    destination: str,
    request: Request = Request(),
    *,
    dataplane: str | None = None,
) -> dict[str, Any]:
    """The explanation document (module docstring) of `request` from `source` (a service,
    or a dataplane's name) to service `destination` in `mesh`; `dataplane` narrows the
    source to one of its dataplanes. Raises `ExplainError` for unknown names."""
    everything = [d for d in dataplanes if d.mesh == mesh.name]
    policies = [p for p in policies if p.mesh == mesh.name]
    index = MeshIndex(mesh, everything, policies)
    by_service: dict[str, list[Dataplane]] = {}
    for d in everything:
        by_service.setdefault(d.service, []).append(d)
    callers = _callers(mesh, everything, by_service, source, dataplane)
    source_service = callers[0].service
    if destination not in by_service:
        raise ExplainError(
            "destination",
            f"no dataplane of service {destination!r} in mesh {mesh.name!r}{_known(by_service)}",
        )
    if request.port is not None and not any(
        i.port == request.port for d in by_service[destination] for i in d.inbounds
    ):
        raise ExplainError(
            "port", f"no dataplane of service {destination!r} has an inbound on {request.port}"
        )
    identity = str(SpiffeId.for_service(mesh.name, source_service))
    by_kind = {kind.kind: (kind, list(resources)) for kind, resources in index.traffic}
    permissions = [p for p in policies if isinstance(p, TrafficPermission)]

    sources = _grouped(
        callers,
        lambda d: (_tag_key(d), _outbound_protocol(d, destination)),
        lambda group: _outbound(mesh, index, group, destination, request, by_kind),
    )
    destinations = _grouped(
        by_service[destination],
        lambda d: (_tag_key(d), tuple((i.port, i.protocol) for i in d.inbounds)),
        lambda group: _inbound(
            mesh, index, group, source_service, identity, request, by_kind, permissions
        ),
    )
    routed = all(s["route"]["matched"] is not None for s in sources)
    admitted = all(d["permission"]["allowed"] for d in destinations)
    others = _unplaced(everything, policies, callers, by_service[destination])
    return {
        "mesh": mesh.name,
        "mtls": {"enabled": mesh.mtls.enabled, "mode": mesh.mtls.mode}
        if mesh.mtls.enabled
        else {"enabled": False},
        "source": {"service": source_service, "identity": identity},
        "destination": {"service": destination},
        "request": {
            "method": request.method,
            "path": request.path,
            "headers": [list(h) for h in request.headers],
            **({"port": request.port} if request.port is not None else {}),
        },
        "sources": sources,
        "destinations": destinations,
        "other_policies": others,
        "allowed": routed and admitted,
        "verdict": _verdict(routed, admitted, sources, destinations),
    }


# -- who is calling whom


def _callers(
    mesh: Mesh,
    dataplanes: list[Dataplane],
    by_service: Mapping[str, list[Dataplane]],
    source: str,
    dataplane: str | None,
) -> list[Dataplane]:
    by_name = {d.name: d for d in dataplanes}
    if source in by_service:
        found = by_service[source]
    elif source in by_name:
        found = [by_name[source]]
    else:
        raise ExplainError(
            "source",
            f"no service or dataplane named {source!r} in mesh {mesh.name!r}{_known(by_service)}",
        )
    if dataplane is not None:
        chosen = [d for d in found if d.name == dataplane]
        if not chosen:
            names = ", ".join(sorted(d.name for d in found))
            raise ExplainError(
                "dataplane",
                f"{dataplane!r} is not a dataplane of service {found[0].service!r} "
                f"(its dataplanes: {names})",
            )
        found = chosen
    return sorted(found, key=lambda d: d.name)


def _known(by_service: Mapping[str, Any]) -> str:
    return f" (services: {', '.join(sorted(by_service))})" if by_service else " (it has none)"


def _tag_key(d: Dataplane) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(d.tags.items()))


def _outbound_protocol(d: Dataplane, service: str) -> str | None:
    return next((o.protocol for o in d.outbounds if o.service == service), None)


def _grouped(
    dataplanes: Sequence[Dataplane],
    key: Any,
    explain_one: Any,
) -> list[dict[str, Any]]:
    """One explanation per distinct `key` of the dataplanes (those with the same tags and
    ports get the same snapshot parts), each naming the dataplanes it stands for."""
    groups: dict[Any, list[Dataplane]] = {}
    for d in dataplanes:
        groups.setdefault(key(d), []).append(d)
    answers = []
    for group in groups.values():
        answer = explain_one(group)
        answers.append({"dataplanes": [d.name for d in group], "tags": group[0].tags, **answer})
    return answers


def _snapshot(
    mesh: Mesh, index: MeshIndex, dataplane: Dataplane
) -> tuple[dict[str, Any], Snapshot]:
    """The dataplane's snapshot as the builder makes it, and as its proxy loads it."""
    document = build(dataplane, mesh, (), (), _TLS if mesh.mtls.enabled else None, index=index)
    return document, from_dict(document, f"snapshot of {dataplane.name}")


# -- the outbound side: route, route and cluster policies


def _outbound(
    mesh: Mesh,
    index: MeshIndex,
    group: list[Dataplane],
    destination: str,
    request: Request,
    by_kind: Mapping[str, tuple[PolicyType[Any, Any], list[Any]]],
) -> dict[str, Any]:
    caller = group[0]
    protocol = _outbound_protocol(caller, destination)
    here = (caller.service, caller.tags)
    there: tuple[str, Mapping[str, str]] = (destination, {})
    policies: list[dict[str, Any]] = []
    routing: list[dict[str, Any]] = []
    for kind, resources in by_kind.values():
        if kind.attach in ("listener", "proxy"):
            policies.extend(_wrapping(mesh, kind, resources, caller, destination))
        if kind.attach not in ("route", "cluster", "routes"):
            continue
        entries = _ranked_outbound(kind, resources, here, there, destination)
        (routing if kind.attach == "routes" else policies).extend(entries)
    if protocol is None:
        route: dict[str, Any] = {
            "matched": None,
            "reason": f"dataplane {caller.name} has no outbound to service {destination}: "
            "add one to its `outbounds` (its app has no port to call it on)",
            "tried": [],
        }
        return {"outbound": None, "route": route, "route_policies": routing, "policies": policies}
    document, snapshot = _snapshot(mesh, index, caller)
    listener_name = f"outbound:{destination}"
    listener = next(li for li in snapshot.listeners if li.name == listener_name)
    listener_doc = next(li for li in document["listeners"] if li["name"] == listener_name)
    chain, chain_doc = listener.filter_chains[0], listener_doc["filter_chains"][0]
    governing = {e["kind"]: e["name"] for e in routing if e["status"] == "applies"}
    if chain.http is not None:
        route = _http_route(chain, chain_doc, destination, request, governing)
    else:
        route = _tcp_route(chain, chain_doc, governing)
        for entry in policies:
            if entry["attach"] == "route" and entry["key"] not in TCP_ROUTE_KEYS:
                if entry["status"] == "applies":
                    entry["status"] = "inactive"
                entry["reason"] = "a TCP outbound carries no requests: " + entry["reason"]
    outbound = {"port": listener.port, "protocol": protocol, "listener": listener_name}
    return {"outbound": outbound, "route": route, "route_policies": routing, "policies": policies}


def _http_route(
    chain: FilterChain,
    chain_doc: Mapping[str, Any],
    destination: str,
    request: Request,
    governing: Mapping[str, str],
) -> dict[str, Any]:
    assert chain.http is not None
    path, _, query = request.path.partition("?")
    method = request.method.upper().encode("latin-1")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
    host = destination.encode()
    router = Router(chain.http.route_config)
    chosen = router.route(host, method, path, headers, query.encode("latin-1"))
    routes_doc = {
        r["name"]: r
        for vh in chain_doc["http"]["route_config"]["virtual_hosts"]
        for r in vh["routes"]
    }
    tried: list[dict[str, Any]] = []
    virtual_host = router.virtual_host(host)
    for route in virtual_host.routes if virtual_host is not None else ():
        if chosen is not None and route.name == chosen.name:
            break
        why = mismatch(route.match, method, path, headers, query.encode("latin-1"))
        tried.append({**_route_origin(route.name, destination, governing), "reason": why})
    if chosen is None:
        return {"matched": None, "reason": "no route matches the request", "tried": tried}
    doc = routes_doc[chosen.name]
    matched = {
        **_route_origin(chosen.name, destination, governing),
        "match": doc.get("match"),
        **_backends(doc),
    }
    return {"matched": matched, "tried": tried}


def _tcp_route(
    chain: FilterChain, chain_doc: Mapping[str, Any], governing: Mapping[str, str]
) -> dict[str, Any]:
    assert chain.tcp is not None
    tcp = chain_doc["tcp"]
    resource = governing.get("TCPRoute")
    origin = (
        {"route": "tcp", "policy": "TCPRoute", "resource": resource}
        if resource is not None and "weighted_clusters" in tcp
        else {"route": "tcp", "policy": None, "default": True}
    )
    return {"matched": {**origin, **_backends(tcp)}, "tried": []}


def _route_origin(name: str, service: str, governing: Mapping[str, str]) -> dict[str, Any]:
    """Where a route of the outbound came from: `<service>` is the default route to the
    whole service, `<service>:<rule>[.<match>]` the HTTPRoute's rule (and match)."""
    if name == service:
        return {"route": name, "policy": None, "default": True}
    rule, _, match = name[len(service) + 1 :].partition(".")
    origin: dict[str, Any] = {
        "route": name,
        "policy": "HTTPRoute",
        "resource": governing.get("HTTPRoute"),
        "rule": int(rule),
    }
    if match:
        origin["match_index"] = int(match)
    return origin


def _backends(doc: Mapping[str, Any]) -> dict[str, Any]:
    if "direct_response" in doc:
        return {"direct_response": doc["direct_response"]}
    if "redirect" in doc:
        return {"redirect": doc["redirect"]}
    weighted = doc.get("weighted_clusters")
    backends = (
        [{"cluster": c["cluster"], "weight": c["weight"]} for c in weighted]
        if weighted
        else [{"cluster": doc["cluster"], "weight": 1}]
    )
    found: dict[str, Any] = {"backends": backends}
    if "mirror" in doc:
        found["mirror"] = doc["mirror"]
    return found


def _ranked_outbound(
    kind: PolicyType[Any, Any],
    resources: list[Any],
    source: tuple[str, Mapping[str, str]],
    destination: tuple[str, Mapping[str, str]],
    service: str,
) -> list[dict[str, Any]]:
    """Every resource of an outbound kind: the one governing the pair (`best_match` over
    the builder's candidates), those it shadows, and those not selecting it, why."""
    candidates = outbound_candidates(resources, service)
    ranked = ranked_matches(candidates, source, destination)
    entries: list[dict[str, Any]] = []
    winner: tuple[Any, tuple[int, int, int, int]] | None = ranked[0] if ranked else None
    for i, (resource, score) in enumerate(ranked):
        chosen = matched_selectors(resource, source, destination)
        assert chosen is not None
        entry = _entry(kind, resource, chosen, score)
        if i == 0:
            entry["status"] = "applies"
            entry["reason"] = "the most specific " + kind.kind + " selecting this traffic"
        else:
            assert winner is not None
            entry["status"] = "shadowed"
            entry["shadowed_by"] = winner[0].name
            entry["reason"] = _outranked(winner, (resource, score))
        entries.append(entry)
    selecting = {id(r) for r, _ in ranked}
    for resource in sorted(resources, key=lambda r: r.name):
        if id(resource) in selecting:
            continue
        entry = {**_entry(kind, resource, None, None), "status": "not selected"}
        if resource not in candidates:
            named = [d for d in resource.destinations if d.service in (ANY, service)]
            entry["reason"] = (
                f"its destinations ({_selectors(resource.destinations)}) select instances "
                f"of {service} by tags, and an outbound policy selects whole services"
                if named
                else f"its destinations ({_selectors(resource.destinations)}) do not name "
                f'service {service} or "*"'
            )
        else:
            entry["reason"] = (
                f"its sources ({_selectors(resource.sources)}) do not match {_who(*source)}"
            )
        entries.append(entry)
    return entries


def _entry(
    kind: PolicyType[Any, Any],
    resource: Any,
    chosen: tuple[Selector, Selector] | None,
    score: tuple[int, ...] | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": kind.kind,
        "key": kind.key,
        "attach": kind.attach,
        "name": resource.name,
    }
    if chosen is not None and score is not None:
        entry["selected_by"] = {
            "destination": _selector(chosen[0]),
            "source": _selector(chosen[1]),
        }
        entry["specificity"] = list(score)
    return entry


_RANKS = (
    'its destination selector names the service, not "*"',
    "its destination selector has more tags",
    'its source selector names the service, not "*"',
    "its source selector has more tags",
)


def _outranked(winner: tuple[Any, tuple[int, ...]], loser: tuple[Any, tuple[int, ...]]) -> str:
    """Why `winner` governs rather than `loser`: the first part of the score that differs
    (`matching.match_score`), or the name on a tie."""
    for rank, (a, b) in enumerate(zip(winner[1], loser[1], strict=True)):
        if a != b:
            return f"{winner[0].name} is more specific: {_RANKS[rank]} ({a} > {b})"
    return f"equally specific: {winner[0].name} sorts first by name"


def _selector(s: Selector) -> str:
    service = '"*"' if s.service == ANY else s.service
    if not s.tags:
        return f"{{service: {service}}}"
    tags = ", ".join(f"{k}: {v}" for k, v in sorted(s.tags.items()))
    return f"{{service: {service}, tags: {{{tags}}}}}"


def _selectors(selectors: Iterable[Selector]) -> str:
    return ", ".join(_selector(s) for s in selectors)


def _who(service: str, tags: Mapping[str, str]) -> str:
    if not tags:
        return f"service {service}"
    return f"service {service} with tags " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


# -- the inbound side: permission, inbound policies


def _inbound(
    mesh: Mesh,
    index: MeshIndex,
    group: list[Dataplane],
    source_service: str,
    identity: str,
    request: Request,
    by_kind: Mapping[str, tuple[PolicyType[Any, Any], list[Any]]],
    permissions: list[TrafficPermission],
) -> dict[str, Any]:
    called = group[0]
    _, snapshot = _snapshot(mesh, index, called)
    inbounds = [li for li in snapshot.listeners if li.direction == "inbound"]
    if request.port is not None:
        inbounds = [li for li in inbounds if li.port == request.port]
    if not inbounds:
        return {
            "inbound": None,
            "permission": {
                "allowed": False,
                "reason": f"dataplane {called.name} has no inbound: nothing of it can be called",
                "rules": [],
            },
            "policies": [],
        }
    listener = inbounds[0]
    chain = listener.filter_chains[0]
    here = (called.service, called.tags)
    policies: list[dict[str, Any]] = []
    for kind, resources in by_kind.values():
        if kind.attach == "chain":
            policies.extend(_ranked_inbound(mesh, kind, resources, here, identity, chain))
        elif kind.attach in ("listener", "proxy"):
            policies.extend(_wrapping(mesh, kind, resources, called, None, identity))
    return {
        "inbound": {"port": listener.port, "protocol": chain.protocol, "listener": listener.name},
        "permission": _permission(mesh, chain, called.service, identity, permissions),
        "policies": policies,
    }


def _permission(
    mesh: Mesh,
    chain: FilterChain,
    service: str,
    identity: str,
    permissions: list[TrafficPermission],
) -> dict[str, Any]:
    """The proxy's decision for the source's identity on the chain, and every rule's part
    in it."""
    if chain.authz is None:
        return {
            "allowed": True,
            "rule": None,
            "reason": "mTLS is off in this mesh: callers have no identity, so no "
            "TrafficPermission is enforced and every caller is admitted",
            "rules": [],
        }
    decision = decide(chain.authz, identity)
    rules: list[dict[str, Any]] = []
    reached = True
    for rule in chain.authz.rules:
        resource, _, index = rule.name.rpartition("/")
        entry: dict[str, Any] = {
            "rule": rule.name,
            "resource": resource,
            "index": int(index),
            "action": rule.action,
            "shadow": rule.shadow,
        }
        matched = rule.matches(identity)
        if not reached:
            entry["status"] = "not reached"
            entry["reason"] = f"{decision.rule} decided first"
        elif rule.name == decision.rule:
            entry["status"] = "decides"
            entry["reason"] = f"{identity} is one of its sources ({_rule_sources(rule)})"
            reached = False
        elif matched and rule.shadow:
            entry["status"] = "shadow"
            entry["reason"] = (
                f"matches {identity}, but its permission is shadow: it would {rule.action}, "
                "and only logs and counts"
            )
        else:
            entry["status"] = "no match"
            entry["reason"] = f"{identity} is not among its sources ({_rule_sources(rule)})"
        rules.append(entry)
    elsewhere = [
        {
            "resource": p.name,
            "status": "not selected",
            "reason": f"its destination is service {p.destination.service}, not {service}",
        }
        for p in sorted(permissions, key=lambda p: p.name)
        if p.destination.service not in (service, ANY)
    ]
    found: dict[str, Any] = {
        "allowed": decision.allowed,
        "rule": decision.rule,
        "rules": rules,
        "not_selected": elsewhere,
    }
    if decision.rule == "default":
        found["reason"] = (
            f"no TrafficPermission rule for service {service} matches {identity}: "
            f"the default ({chain.authz.default_action}) decides"
            if rules
            else f"no TrafficPermission selects service {service}: "
            f"the default ({chain.authz.default_action}) decides"
        )
    else:
        found["reason"] = f"rule {decision.rule} {'allows' if decision.allowed else 'denies'}"
    if decision.shadow_denied:
        found["shadow_denied_by"] = decision.shadow_rule
    return found


def _rule_sources(rule: Any) -> str:
    parts = [*rule.identities, *(f"{p}*" for p in rule.prefixes)]
    parts += ["tags " + ", ".join(f"{k}={v}" for k, v in s.tags) for s in rule.tag_sources]
    return ", ".join(parts) or "nobody"


def _ranked_inbound(
    mesh: Mesh,
    kind: PolicyType[Any, Any],
    resources: list[Any],
    here: tuple[str, Mapping[str, str]],
    identity: str,
    chain: FilterChain,
) -> list[dict[str, Any]]:
    """Every resource of an inbound kind for the caller: the one whose rule the proxy
    applies (the first rule holding the caller, in `rules_by_caller`'s order, as the
    builder writes them), those it shadows, and those that do not select, why."""
    selecting = inbound_candidates(resources, here)
    ordered = rules_by_caller(selecting, mesh.name, dataplane=here)
    config = getattr(chain, kind.key, None)
    rule_for = getattr(config, "rule_for", None)
    if rule_for is not None:
        applied = rule_for(identity)
        winner_name = applied.name if applied is not None else None
    else:  # a chain kind without rules by caller: the first holding it, by the order
        winner_name = next(
            (r.name for r, ids in ordered if ANY_CALLER in ids or identity in ids), None
        )
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    winner_position: tuple[int, int, int] | None = None
    for resource, ids in ordered:
        holds = ANY_CALLER in ids or identity in ids
        if resource.name in seen or not holds:
            continue
        seen.add(resource.name)
        destination = max(s.specificity for s in resource.destinations if s.matches(*here))
        rank = (*destination, 0 if ANY_CALLER in ids else 1)
        entry: dict[str, Any] = {
            "kind": kind.kind,
            "key": kind.key,
            "attach": kind.attach,
            "name": resource.name,
            "selected_by": {
                "destination": _selector(
                    max(
                        (s for s in resource.destinations if s.matches(*here)),
                        key=lambda s: s.specificity,
                    )
                ),
                "source": '{service: "*"}' if ANY_CALLER in ids else identity,
            },
            "specificity": list(rank),
        }
        if resource.name == winner_name and winner_position is None:
            winner_position = rank
            entry["status"] = "applies"
            entry["reason"] = f"the first {kind.kind} rule holding {identity} on this inbound"
        else:
            entry["status"] = "shadowed"
            entry["shadowed_by"] = winner_name
            entry["reason"] = _inbound_outranked(winner_name, winner_position, rank)
        entries.append(entry)
    for resource in sorted(resources, key=lambda r: r.name):
        if resource.name in seen:
            continue
        entry = {"kind": kind.kind, "key": kind.key, "attach": kind.attach, "name": resource.name}
        entry["status"] = "not selected"
        if resource not in selecting:
            entry["reason"] = (
                f"its destinations ({_selectors(resource.destinations)}) do not match {_who(*here)}"
            )
        else:
            entry["reason"] = f"its sources ({_selectors(resource.sources)}) do not hold {identity}"
        entries.append(entry)
    return entries


def _inbound_outranked(
    winner: str | None, at: tuple[int, int, int] | None, rank: tuple[int, int, int]
) -> str:
    if winner is None or at is None:
        return "the proxy applies no rule of this kind to the caller"
    reasons = (
        'its destination selector names the service, not "*"',
        "its destination selector has more tags",
        'it names the caller\'s service, not "*"',
    )
    for i, (a, b) in enumerate(zip(at, rank, strict=True)):
        if a != b:
            return f"{winner} is more specific: {reasons[i]}"
    return f"equally specific: {winner} sorts first by name"


# -- the kinds that wrap every chain (AccessLog) or the whole proxy (Trace)


def _wrapping(
    mesh: Mesh,
    kind: PolicyType[Any, Any],
    resources: list[Any],
    dataplane: Dataplane,
    destination: str | None,
    identity: str | None = None,
) -> list[dict[str, Any]]:
    """The resources of a "listener" kind (each adds to a chain: its outbound to
    `destination`, or with None its inbound) or a "proxy" kind (the most specific one
    selecting the proxy governs it) that select `dataplane` by the kind's own `selects`;
    what each does is read from the kind's `fragment` given that resource alone, the
    call the builder makes with all of them."""
    assert kind.fragment is not None
    here = (dataplane.service, dataplane.tags)
    selecting = [r for r in resources if dataplane.name in kind.selects(r, [dataplane]).dataplanes]
    side = "inbound" if destination is None else f"outbound to {destination}"
    entries: list[dict[str, Any]] = []
    if kind.attach == "proxy":
        together = kind.fragment(selecting, mesh.name, dataplane=here)
        winner = next(
            (
                r.name
                for r in sorted(selecting, key=lambda r: r.name)
                if kind.fragment([r], mesh.name, dataplane=here) == together
            ),
            None,
        )
        for resource in sorted(selecting, key=lambda r: r.name != winner):
            entry = _wrapping_entry(kind, resource)
            if resource.name == winner:
                entry["status"] = "applies"
                entry["reason"] = f"the most specific {kind.kind} selecting {dataplane.name}"
            else:
                entry["status"] = "shadowed"
                entry["shadowed_by"] = winner
                entry["reason"] = f"one {kind.kind} governs a proxy: the most specific selector"
            entries.append(entry)
        return entries
    for resource in sorted(selecting, key=lambda r: r.name):
        entry = _wrapping_entry(kind, resource)
        document = kind.fragment([resource], mesh.name, here, destination)
        callers = {i for sink in document.get(kind.key, ()) for i in sink.get("identities", ())}
        if not document:
            entry["status"] = "not selected"
            entry["reason"] = f"selects {dataplane.name}, but not its {side}"
        elif identity is not None and callers and not callers & {ANY_CALLER, identity}:
            entry["status"] = "not selected"
            entry["reason"] = f"logs the {side} of {dataplane.name}, not for {identity}"
        else:
            entry["status"] = "applies"
            entry["reason"] = f"adds to the {side} of {dataplane.name} (they add up)"
        entries.append(entry)
    return entries


def _wrapping_entry(kind: PolicyType[Any, Any], resource: Any) -> dict[str, Any]:
    return {"kind": kind.kind, "key": kind.key, "attach": kind.attach, "name": resource.name}


# -- the rest


def _unplaced(
    dataplanes: list[Dataplane],
    policies: list[Any],
    callers: list[Dataplane],
    called: list[Dataplane],
) -> list[dict[str, Any]]:
    """Resources of kinds the builder does not place by selectors here (registered
    without a route, cluster or chain place), reported from their own `selects`."""
    names = {d.name for d in callers} | {d.name for d in called}
    found = []
    placed = ("authz", "route", "cluster", "chain", "routes", "listener", "proxy")
    for kind in registered():
        if kind.attach in placed and (kind.fragment is not None or kind.attach == "authz"):
            continue
        for resource in policies:
            found_kind = policy_of(resource)
            if found_kind is None or found_kind.kind != kind.kind:
                continue
            selection = kind.selects(resource, dataplanes)
            hit = sorted(names & set(selection.dataplanes))
            if hit:
                found.append(
                    {
                        "kind": kind.kind,
                        "name": resource.name,
                        "status": "applies",
                        "selected_by": selection.field,
                        "dataplanes": hit,
                        "reason": f"selects {selection.wanted}",
                    }
                )
    return found


def _verdict(
    routed: bool,
    admitted: bool,
    sources: list[dict[str, Any]],
    destinations: list[dict[str, Any]],
) -> str:
    if not routed:
        reasons = {
            s["route"].get("reason", "no route") for s in sources if not s["route"]["matched"]
        }
        return "no route: " + "; ".join(sorted(reasons))
    if not admitted:
        reasons = {
            d["permission"]["reason"] for d in destinations if not d["permission"]["allowed"]
        }
        return "denied: " + "; ".join(sorted(reasons))
    return "allowed"


# -- for a person

_MARKS = {
    "applies": "✓",
    "decides": "✓",
    "shadowed": "✗",
    "no match": "✗",
    "shadow": "~",
    "inactive": "~",
}


def render_text(answer: Mapping[str, Any]) -> str:
    """`explain`'s document for a person: Route, Permission, Policies on the way, and the
    verdict; ✓ applies or decides, ✗ shadowed or not matching, · does not select."""
    request = answer["request"]
    mtls = answer["mtls"]
    security = f"mTLS {mtls['mode']}" if mtls["enabled"] else "mTLS off"
    headers = "".join(f" {k}: {v}" for k, v in request["headers"])
    lines = [
        f"{request['method']} {request['path']}{headers}  "
        f"{answer['source']['service']} → {answer['destination']['service']}  "
        f"(mesh {answer['mesh']}, {security})",
        f"Source identity: {answer['source']['identity']}",
        "",
        "Route",
    ]
    for group in answer["sources"]:
        lines.append(f"  {_group(group)}" + _where(group.get("outbound"), "outbound"))
        route = group["route"]
        for tried in route["tried"]:
            lines.append(f"    ✗ {_origin(tried)}: {tried['reason']}")
        matched = route["matched"]
        if matched is None:
            lines.append(f"    ✗ no route: {route['reason']}")
        else:
            lines.append(f"    ✓ {_origin(matched)} → {_target(matched)}")
        for entry in group["route_policies"]:
            lines.append(f"    {_policy(entry)}")
    lines += ["", "Permission"]
    # the permission is the destination service's: dataplanes whose inbounds decide
    # alike are shown once
    alike: dict[str, list[Mapping[str, Any]]] = {}
    for group in answer["destinations"]:
        key = json.dumps([group["permission"], group.get("inbound")], sort_keys=True)
        alike.setdefault(key, []).append(group)
    for groups in alike.values():
        group = groups[0]
        names = "; ".join(_group(g) for g in groups)
        lines.append(f"  {names}" + _where(group.get("inbound"), "inbound"))
        permission = group["permission"]
        for rule in permission["rules"]:
            mark = _MARKS.get(rule["status"], "·")
            lines.append(
                f"    {mark} {rule['rule']} {rule['action']}"
                f"{' (shadow)' if rule['shadow'] else ''}: {rule['status']}, {rule['reason']}"
            )
        for other in permission.get("not_selected", ()):
            lines.append(f"    · {other['resource']}: not selected, {other['reason']}")
        verdict = "allowed" if permission["allowed"] else "denied"
        lines.append(f"    → {verdict}: {permission['reason']}")
        if permission.get("shadow_denied_by"):
            lines.append(f"      (shadow rule {permission['shadow_denied_by']} would deny)")
    lines += ["", "Policies on the way"]
    empty = True
    for group in answer["sources"]:
        if group["policies"]:
            empty = False
            lines.append(
                f"  {_group(group)}: route and cluster to {answer['destination']['service']}"
            )
            lines += [f"    {_policy(e)}" for e in group["policies"]]
    for group in answer["destinations"]:
        if group["policies"]:
            empty = False
            lines.append(f"  {_group(group)}: inbound")
            lines += [f"    {_policy(e)}" for e in group["policies"]]
    for entry in answer["other_policies"]:
        empty = False
        lines.append(
            f"  ✓ {entry['kind']} {entry['name']}: applies on {', '.join(entry['dataplanes'])} "
            f"({entry['selected_by']} {entry['reason']})"
        )
    if empty:
        lines.append("  (none)")
    lines += ["", f"Verdict: {answer['verdict']}"]
    return "\n".join(lines) + "\n"


def _group(group: Mapping[str, Any]) -> str:
    tags = ", ".join(f"{k}={v}" for k, v in sorted(group["tags"].items()))
    return ", ".join(group["dataplanes"]) + (f" ({tags})" if tags else "")


def _where(at: Mapping[str, Any] | None, side: str) -> str:
    return f"; {side} :{at['port']} {at['protocol']}" if at else ""


def _origin(route: Mapping[str, Any]) -> str:
    if route.get("default"):
        return f"{route['route']} (default route)"
    match = f" match {route['match_index']}" if "match_index" in route else ""
    return f"{route['route']} ({route['policy']} {route['resource']} rule {route['rule']}{match})"


def _target(matched: Mapping[str, Any]) -> str:
    if "direct_response" in matched:
        return f"answered by the proxy: {matched['direct_response']}"
    if "redirect" in matched:
        return f"redirect: {matched['redirect']}"
    backends = matched["backends"]
    if len(backends) == 1:
        return str(backends[0]["cluster"])
    return ", ".join(f"{b['cluster']} (weight {b['weight']})" for b in backends)


def _policy(entry: Mapping[str, Any]) -> str:
    mark = _MARKS.get(entry["status"], "·")
    head = f"{mark} {entry['kind']} {entry['name']}"
    if entry["status"] == "applies" and "selected_by" not in entry:
        return f"{head}: applies, {entry['reason']}"
    if entry["status"] == "applies":
        chosen = entry["selected_by"]
        rank = ".".join(str(x) for x in entry["specificity"])
        return f"{head}: applies, {chosen['source']} → {chosen['destination']} (specificity {rank})"
    if entry["status"] == "shadowed":
        return f"{head}: shadowed by {entry['shadowed_by']}, {entry['reason']}"
    return f"{head}: {entry['status']}, {entry['reason']}"
