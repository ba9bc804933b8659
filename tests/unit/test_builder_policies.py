"""The snapshot builder with traffic policies: where each kind's fragment goes, which
resource governs, zones for zone-aware load balancing, and which dataplanes a change of
a policy (or of a dataplane's tags) touches.

The golden mesh is `src/meshling/controlplane/builder/testdata/policies.resources.yaml`
and `<dataplane>.policies.snapshot.yaml` what `build` makes of each dataplane. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the outputs after a deliberate change, then read the
diff.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.controlplane.builder import (
    MeshIndex,
    affected,
    build,
    build_text,
    canonical_json,
)
from meshling.controlplane.builder.index import policy_of
from meshling.controlplane.resources import (
    Dataplane,
    Inbound,
    Mesh,
    MeshTls,
    Outbound,
    parse_resource,
)
from meshling.policies import POLICIES
from meshling.snapshot import from_dict
from meshling.snapshot.model import TlsFiles

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "controlplane" / "builder" / "testdata"
NAMES = ["web", "api-1", "api-2", "db"]


def load() -> tuple[Mesh, list[Dataplane], list[Any]]:
    path = TESTDATA / "policies.resources.yaml"
    with path.open(encoding="utf-8") as f:
        resources = [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(f)]
    (mesh,) = [r for r in resources if isinstance(r, Mesh)]
    dataplanes = [r for r in resources if isinstance(r, Dataplane)]
    policies = [r for r in resources if not isinstance(r, Mesh | Dataplane)]
    return mesh, dataplanes, policies


def tls_paths(name: str) -> TlsFiles:
    return TlsFiles(
        certificate=f"/var/lib/meshling/{name}/cert.pem",
        key=f"/var/lib/meshling/{name}/key.pem",
        trust_bundle=f"/var/lib/meshling/{name}/bundle.pem",
    )


def named(items: list[Any], name: str, kind: str | None = None) -> Any:
    (found,) = [i for i in items if i.name == name and (kind is None or policy_of(i).kind == kind)]
    return found


def build_all(mesh: Mesh, dataplanes: list[Dataplane], policies: list[Any]) -> dict[str, Any]:
    return {d.name: build(d, mesh, dataplanes, policies, tls_paths(d.name)) for d in dataplanes}


def route(document: dict[str, Any], service: str) -> dict[str, Any]:
    (listener,) = [li for li in document["listeners"] if li["name"] == f"outbound:{service}"]
    chain = listener["filter_chains"][0]
    if "tcp" in chain:
        tcp: dict[str, Any] = chain["tcp"]
        return tcp
    # the last route, to the whole service (an HTTPRoute's rules come before it)
    routes: dict[str, Any] = chain["http"]["route_config"]["virtual_hosts"][0]["routes"][-1]
    return routes


def cluster(document: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in document["clusters"] if c["name"] == name]
    return dict(found)


def inbound_chain(document: dict[str, Any]) -> dict[str, Any]:
    chain: dict[str, Any] = document["listeners"][0]["filter_chains"][0]
    return chain


def rule_names(chain: dict[str, Any], key: str) -> list[str]:
    return [r["name"] for r in chain[key]["rules"]]


# -- golden files


@pytest.mark.parametrize("name", NAMES)
def test_build_policies_match_golden(name: str) -> None:
    mesh, dataplanes, policies = load()
    document = build(named(dataplanes, name), mesh, dataplanes, policies, tls_paths(name))
    golden = TESTDATA / f"{name}.policies.snapshot.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = (
            f"# build(policies.resources.yaml, dataplane={name!r}, "
            f"tls_paths under /var/lib/meshling/{name}/)\n"
        )
        golden.write_text(header + yaml.safe_dump(document, sort_keys=False))
    assert document == yaml.safe_load(golden.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_build_policies_golden_is_a_snapshot_the_proxy_accepts(name: str) -> None:
    golden = TESTDATA / f"{name}.policies.snapshot.yaml"
    text = golden.read_text(encoding="utf-8")
    assert "&id" not in text  # no YAML aliases: every fragment is the document's own
    snapshot = from_dict(yaml.safe_load(text), str(golden))
    assert snapshot.node == name


@pytest.mark.parametrize("name", NAMES)
def test_build_text_with_policies_is_the_documents_canonical_json(name: str) -> None:
    mesh, dataplanes, policies = load()
    index = MeshIndex(mesh, dataplanes, policies)
    dataplane = named(dataplanes, name)
    text = build_text(dataplane, index, tls_paths(name))
    document = build(dataplane, mesh, dataplanes, policies, tls_paths(name))
    assert text.text == canonical_json(document)
    assert text.version == document["version"]


def test_golden_policies_cover_every_traffic_policy_kind() -> None:
    _, _, policies = load()
    kinds = {policy_of(p).kind for p in policies}
    assert kinds == {p.kind for p in POLICIES}


# -- which resource governs


def test_build_outbound_policies_most_specific_wins() -> None:
    mesh, dataplanes, policies = load()
    web = build_all(mesh, dataplanes, policies)["web"]
    snapshot = from_dict(web)
    # the HTTPRoute's rules come first, then the route to the whole service: all alike
    http = snapshot.listeners[1].filter_chains[0].http
    assert http is not None
    *rules, api_route = http.route_config.virtual_hosts[0].routes
    assert [r.name for r in rules] == ["api:0.0", "api:0.1", "api:1"]
    assert {(r.timeouts, r.retry) for r in rules} == {(api_route.timeouts, api_route.retry)}
    # web-to-api (named source and destination) beats defaults
    assert api_route.timeouts is not None and api_route.timeout == 2.0
    assert api_route.timeouts.per_try == 0.5
    # web-v1-to-api (a source tag) beats anyone; web-v2-to-api does not select web v1
    assert api_route.retry is not None and api_route.retry.max_attempts == 3
    api = snapshot.clusters["api"]
    assert api.circuit_breaker is not None and api.circuit_breaker.max_requests == 100
    # web-to-api-local (a named destination) beats round-robin ("*")
    assert api.load_balancing is not None and api.load_balancing.policy == "least_request"
    assert api.health_check is None  # db-health is for api's calls to db


def test_build_outbound_policies_follow_the_callers_tags() -> None:
    mesh, dataplanes, policies = load()
    canary = dataclasses.replace(
        named(dataplanes, "web"), name="web-canary", address="10.0.0.6", tags={"version": "v2"}
    )
    document = build(canary, mesh, [*dataplanes, canary], policies, tls_paths("web-canary"))
    assert route(document, "api")["retry"]["max_attempts"] == 5  # web-v2-to-api
    assert route(document, "api")["timeout"]["request"] == "2s"  # web-to-api, by service


def test_build_tcp_outbound_takes_the_timeout_and_no_retry() -> None:
    mesh, dataplanes, policies = load()
    document = build_all(mesh, dataplanes, policies)["api-1"]
    tcp = route(document, "db")
    # the Retry "anyone" has no route here; the TCPRoute api-to-db names the clusters
    assert set(tcp) == {"weighted_clusters", "timeout"}
    assert tcp["timeout"]["connect"] == "1s"
    db = cluster(document, "db")
    assert db["load_balancing"] == {"policy": "round_robin", "prefer_local_zone": False}
    assert db["health_check"]["tcp"] == {}
    chain = from_dict(document).listeners[1].filter_chains[0]
    assert chain.tcp is not None and chain.tcp.idle_timeout == 300.0


def test_build_http_route_subsets_hold_the_tagged_instances() -> None:
    mesh, dataplanes, policies = load()
    web = build_all(mesh, dataplanes, policies)["web"]
    v1, v2 = cluster(web, "api~version=v1"), cluster(web, "api~version=v2")
    assert [e["address"] for e in v1["endpoints"]] == [named(dataplanes, "api-1").address]
    assert [e["address"] for e in v2["endpoints"]] == [named(dataplanes, "api-2").address]
    # a subset is the service's instances: the same identity and cluster policies
    for subset in (v1, v2):
        whole = cluster(web, "api")
        assert subset["tls"] == whole["tls"]
        assert subset["circuit_breaker"] == whole["circuit_breaker"]
    snapshot = from_dict(web)
    http = snapshot.listeners[1].filter_chains[0].http
    assert http is not None
    routes = http.route_config.virtual_hosts[0].routes
    split = routes[2].weighted
    assert split is not None and (split.clusters, split.weights) == (
        ("api~version=v1", "api~version=v2"),
        (90, 10),
    )
    assert routes[0].match.path.value == "/v2" and routes[-1].weighted is None


def test_build_http_route_without_tagged_instances_leaves_the_subset_empty() -> None:
    mesh, dataplanes, policies = load()
    untagged = [dataclasses.replace(d, tags={}) if d.service == "api" else d for d in dataplanes]
    web = build(named(untagged, "web"), mesh, untagged, policies, tls_paths("web"))
    assert cluster(web, "api~version=v2")["endpoints"] == []
    from_dict(web)  # an empty subset is a snapshot the proxy runs (503 no_endpoint)


def test_build_inbound_policies_rank_the_rules_for_the_dataplane() -> None:
    mesh, dataplanes, policies = load()
    documents = build_all(mesh, dataplanes, policies)
    # api-2 (v2, zone b): its own limit for web first, then the default; the fault
    api_2 = inbound_chain(documents["api-2"])
    assert rule_names(api_2, "rate_limit") == ["api-v2-from-web", "everyone"]
    assert rule_names(api_2, "fault") == ["api-zone-b-aborts"]
    # api-1 (v1, zone a): the default only, and no fault key at all
    api_1 = inbound_chain(documents["api-1"])
    assert rule_names(api_1, "rate_limit") == ["everyone"]
    assert "fault" not in api_1
    # db's TCP inbound takes the default too (its `tcp` limit applies there)
    assert rule_names(inbound_chain(documents["db"]), "rate_limit") == ["everyone"]
    rule = from_dict(documents["api-2"]).listeners[0].filter_chains[0].rate_limit
    assert rule is not None and rule.rule_for("spiffe://default/web") is not None
    assert rule.rule_for("spiffe://default/web").name == "api-v2-from-web"  # type: ignore[union-attr]


def test_build_inbound_policies_apply_with_mtls_off() -> None:
    mesh, dataplanes, policies = load()
    plain = dataclasses.replace(mesh, mtls=MeshTls(enabled=False))
    document = build(named(dataplanes, "api-2"), plain, dataplanes, policies, None)
    chain = inbound_chain(document)
    assert "authz" not in chain and "tls" not in chain
    assert rule_names(chain, "rate_limit") == ["api-v2-from-web", "everyone"]
    from_dict(document)


def test_build_without_governing_policies_has_no_policy_keys() -> None:
    mesh, dataplanes, policies = load()
    only_api = [
        p for p in policies if policy_of(p).kind == "TrafficPermission" or p.name == "api-limits"
    ]
    document = build(named(dataplanes, "api-1"), mesh, dataplanes, only_api, tls_paths("api-1"))
    # the CircuitBreaker is for calls to api: api-1 calls db only
    assert set(route(document, "db")) == {"cluster"}
    assert set(cluster(document, "db")) == {"name", "endpoints", "tls"}
    assert set(inbound_chain(document)) == {"tls", "authz", "http"}
    assert "zone" not in document
    # and exactly the snapshot of a mesh without any traffic policy
    permissions = [p for p in policies if policy_of(p).kind == "TrafficPermission"]
    assert document == build(
        named(dataplanes, "api-1"), mesh, dataplanes, permissions, tls_paths("api-1")
    )


def test_build_ignores_policies_of_other_meshes() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    here = [p for p in policies if p.mesh == "default"]
    assert build(web, mesh, dataplanes, policies, tls_paths("web")) == build(
        web, mesh, dataplanes, here, tls_paths("web")
    )


# -- zones


def test_build_zones_only_where_the_balancer_prefers_the_local_zone() -> None:
    mesh, dataplanes, policies = load()
    documents = build_all(mesh, dataplanes, policies)
    web = documents["web"]
    assert web["zone"] == "a"
    assert [e.get("zone") for e in cluster(web, "api")["endpoints"]] == ["a", "b"]
    snapshot = from_dict(web)
    assert snapshot.zone == "a"
    assert [e.zone for e in snapshot.clusters["api"].endpoints] == ["a", "b"]
    # api's round robin to db does not prefer a zone: no zones anywhere in its snapshot
    api_1 = documents["api-1"]
    assert "zone" not in api_1
    assert all("zone" not in e for c in api_1["clusters"] for e in c["endpoints"])


def test_build_zones_unknown_where_listings_disagree_or_no_tag() -> None:
    mesh, dataplanes, policies = load()
    web = dataclasses.replace(named(dataplanes, "web"), tags={"version": "v1"})
    # a second listing of api-1's endpoint, in another zone: its zone is unknown
    twin = dataclasses.replace(named(dataplanes, "api-1"), name="api-1b", tags={"zone": "c"})
    others = [d for d in dataplanes if d.name != "web"]
    document = build(web, mesh, [web, *others, twin], policies, tls_paths("web"))
    assert "zone" not in document  # web has no zone tag
    assert cluster(document, "api")["endpoints"] == [
        {"address": "10.0.0.7", "port": 15006},
        {"address": "10.0.0.10", "port": 15006, "zone": "b"},
    ]
    from_dict(document)


# -- the index


def test_index_shares_policy_matches_between_dataplanes_of_one_service_and_tags() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    web_2 = dataclasses.replace(web, name="web-2", address="10.0.0.15")
    index = MeshIndex(mesh, [*dataplanes, web_2], policies)
    assert index.outbound(web, "api") is index.outbound(web_2, "api")
    assert index.inbound(web) is index.inbound(web_2)
    assert index.outbound(web, "api") is not index.outbound(named(dataplanes, "api-1"), "api")


def test_policy_of_names_every_registered_kind() -> None:
    _, _, policies = load()
    for policy in POLICIES:
        (resource, *_) = [p for p in policies if type(p).__name__ == policy.kind]
        assert policy_of(resource) is policy
    assert policy_of(load()[0]) is None  # a Mesh is no policy


# -- affected


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        # outbound: the callers it selects (a source, with an outbound to a destination)
        ("Timeout", "defaults", {"web", "api-1", "api-2"}),  # db calls nobody
        ("Timeout", "web-to-api", {"web"}),
        ("Retry", "anyone", {"web", "api-1", "api-2"}),
        ("Retry", "web-v1-to-api", {"web"}),
        ("Retry", "web-v2-to-api", set()),
        ("Retry", "web-to-api", set()),  # staging's
        ("CircuitBreaker", "api-limits", {"web"}),
        ("LoadBalancing", "round-robin", {"web", "api-1", "api-2"}),
        ("HealthCheck", "db-health", {"api-1", "api-2"}),
        ("HTTPRoute", "web-to-api-canary", {"web"}),
        ("TCPRoute", "api-to-db", {"api-1", "api-2"}),
        # inbound: the destinations it selects
        ("RateLimit", "everyone", {"web", "api-1", "api-2", "db"}),
        ("RateLimit", "api-v2-from-web", {"api-2"}),
        ("FaultInjection", "api-zone-b-aborts", {"api-2"}),
        # whole-proxy: the dataplanes it selects
        ("Trace", "api-v2", {"api-2"}),
        # a name no version has: everything
        ("Retry", "gone", {"web", "api-1", "api-2", "db"}),
    ],
)
def test_affected_policy_touches_the_dataplanes_it_selects(
    kind: str, name: str, expected: set[str]
) -> None:
    _, dataplanes, policies = load()
    assert affected(kind, name, dataplanes, policies) == expected


def test_affected_unknown_kind_is_an_error() -> None:
    _, dataplanes, policies = load()
    with pytest.raises(ValueError, match="no resources of kind 'MeshGateway'"):
        affected("MeshGateway", "r", dataplanes, policies)


TRAFFIC = [
    ("Timeout", "defaults"),
    ("Timeout", "web-to-api"),
    ("Retry", "anyone"),  # governs only TCP outbounds, where a Retry is not placed
    ("Retry", "web-v1-to-api"),
    ("CircuitBreaker", "api-limits"),
    ("LoadBalancing", "round-robin"),
    ("LoadBalancing", "web-to-api-local"),
    ("HealthCheck", "db-health"),
    ("HTTPRoute", "web-to-api-canary"),
    ("TCPRoute", "api-to-db"),
    ("RateLimit", "everyone"),
    ("RateLimit", "api-v2-from-web"),
    ("FaultInjection", "api-zone-b-aborts"),
]


@pytest.mark.parametrize(("kind", "name"), TRAFFIC, ids=[f"{k}-{n}" for k, n in TRAFFIC])
def test_affected_covers_every_snapshot_a_policy_deletion_alters(kind: str, name: str) -> None:
    mesh, dataplanes, policies = load()
    gone = named(policies, name, kind)
    before = build_all(mesh, dataplanes, policies)
    after = build_all(mesh, dataplanes, [p for p in policies if p is not gone])
    altered = {n for n in NAMES if before[n] != after[n]}
    assert altered or name == "anyone"  # the others govern somewhere
    assert altered <= affected(kind, name, dataplanes, policies)


def test_affected_covers_a_policy_moving_to_other_destinations() -> None:
    mesh, dataplanes, policies = load()
    old = named(policies, "db-health")
    new = dataclasses.replace(old, destinations=named(policies, "api-limits").destinations)
    changed = [new if p is old else p for p in policies]
    before, after = build_all(mesh, dataplanes, policies), build_all(mesh, dataplanes, changed)
    altered = {n for n in NAMES if before[n] != after[n]}
    # api stops checking db; nobody starts checking api (only api is the source)
    assert altered == {"api-1", "api-2"}
    assert altered <= affected("HealthCheck", "db-health", dataplanes, [*policies, new])


MUTATIONS: list[tuple[str, Any]] = [
    # web becomes v2: web-v2-to-api governs its retries instead
    ("web", lambda d: dataclasses.replace(d, tags={"version": "v2", "zone": "a"})),
    # api-2 moves to zone a: web's endpoint zones change, and api-2 loses its fault
    ("api-2", lambda d: dataclasses.replace(d, tags={"version": "v2", "zone": "a"})),
    # api-1 becomes v2: it takes web's tighter limit
    ("api-1", lambda d: dataclasses.replace(d, tags={"version": "v2", "zone": "a"})),
    # db gets an outbound to api: it calls api under the mesh-wide policies
    ("db", lambda d: dataclasses.replace(d, outbounds=(Outbound(15001, "api", "http"),))),
    # api-1 takes a second inbound: both chains carry its inbound policies
    ("api-1", lambda d: dataclasses.replace(d, inbounds=(*d.inbounds, Inbound(15007, 9090)))),
]


@pytest.mark.parametrize(("name", "change"), MUTATIONS, ids=[str(i) for i in range(len(MUTATIONS))])
def test_affected_covers_every_snapshot_a_dataplane_change_alters(name: str, change: Any) -> None:
    mesh, dataplanes, policies = load()
    changed = [change(d) if d.name == name else d for d in dataplanes]
    before, after = build_all(mesh, dataplanes, policies), build_all(mesh, changed, policies)
    altered = {n for n in NAMES if before[n] != after[n]}
    assert name in altered
    assert altered <= affected("Dataplane", name, [*dataplanes, *changed], policies)


def test_affected_same_name_in_two_kinds_is_two_resources() -> None:
    _, dataplanes, policies = load()
    # TrafficPermission "everyone" (every destination) and RateLimit "everyone"
    permissions_only = [p for p in policies if policy_of(p).kind != "RateLimit"]
    assert affected("TrafficPermission", "everyone", dataplanes, policies) == set(NAMES)
    # without the RateLimit, its name tells nothing: everything
    assert affected("RateLimit", "everyone", dataplanes, permissions_only) == set(NAMES)
    only_v2 = [p for p in policies if p.name != "everyone" or policy_of(p).kind != "RateLimit"]
    assert affected("RateLimit", "api-v2-from-web", dataplanes, only_v2) == {"api-2"}


# -- every policy's own golden resources, placed everywhere


def policy_goldens() -> list[Path]:
    """The traffic policies' golden resources (TrafficPermission has its own goldens)."""
    root = TESTDATA.parents[2] / "policies"
    found = [*root.glob("*/testdata/*.resource.yaml"), *root.glob("*/testdata/*.policies.yaml")]
    return sorted(p for p in found if p.parent.parent.name != "traffic_permission")


@pytest.mark.parametrize("path", policy_goldens(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_build_places_every_policy_golden_where_the_proxy_accepts_it(path: Path) -> None:
    mesh, dataplanes, policies = load()
    with path.open(encoding="utf-8") as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    assert documents
    anyone = [{"service": "*"}]
    everywhere = [
        parse_resource(
            {
                **d,
                # a whole-proxy kind (Trace) selects dataplanes, the others traffic
                "spec": {**d["spec"], "dataplanes": anyone}
                if "dataplanes" in d["spec"]
                else {**d["spec"], "sources": anyone, "destinations": anyone},
            },
            str(path),
        )
        for d in documents
    ]
    # the golden mesh's own resources of those kinds make way for these
    kinds = {policy_of(r).kind for r in everywhere}
    kept = [p for p in policies if policy_of(p).kind not in kinds]
    for name, document in build_all(mesh, dataplanes, [*kept, *everywhere]).items():
        from_dict(document, f"{path.name} in {name}")
