"""The snapshot builder: golden snapshots of a sample mesh, determinism, mTLS off, and
which dataplanes a change touches.

Golden files live in `src/meshling/controlplane/builder/testdata/`: `resources.yaml`
holds a mesh, its dataplanes and permissions (several YAML documents), and
`<dataplane>.snapshot.yaml` what `build` makes of each dataplane. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the outputs after a deliberate change, then read the
diff.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.controlplane.builder import (
    BuildError,
    MeshIndex,
    affected,
    build,
    build_text,
    canonical_json,
    version_of,
)
from meshling.controlplane.resources import (
    Dataplane,
    Inbound,
    Mesh,
    MeshTls,
    Outbound,
    parse_resource,
)
from meshling.policies.traffic_permission import TrafficPermission
from meshling.snapshot import from_dict
from meshling.snapshot.model import TlsFiles

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "controlplane" / "builder" / "testdata"
NAMES = ["web", "api-1", "api-2", "db"]


def load() -> tuple[Mesh, list[Dataplane], list[TrafficPermission]]:
    path = TESTDATA / "resources.yaml"
    with path.open(encoding="utf-8") as f:
        resources = [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(f)]
    (mesh,) = [r for r in resources if isinstance(r, Mesh)]
    dataplanes = [r for r in resources if isinstance(r, Dataplane)]
    policies = [r for r in resources if isinstance(r, TrafficPermission)]
    return mesh, dataplanes, policies


def tls_paths(name: str) -> TlsFiles:
    return TlsFiles(
        certificate=f"/var/lib/meshling/{name}/cert.pem",
        key=f"/var/lib/meshling/{name}/key.pem",
        trust_bundle=f"/var/lib/meshling/{name}/bundle.pem",
    )


def named(dataplanes: list[Dataplane], name: str) -> Dataplane:
    (dataplane,) = [d for d in dataplanes if d.name == name]
    return dataplane


def build_all(
    mesh: Mesh, dataplanes: list[Dataplane], policies: list[TrafficPermission]
) -> dict[str, dict[str, Any]]:
    return {d.name: build(d, mesh, dataplanes, policies, tls_paths(d.name)) for d in dataplanes}


def without_mtls(mesh: Mesh) -> Mesh:
    return dataclasses.replace(mesh, mtls=MeshTls(enabled=False))


def chains(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [chain for li in document["listeners"] for chain in li["filter_chains"]]


# -- golden files: resources -> snapshot


@pytest.mark.parametrize("name", NAMES)
def test_build_matches_golden(name: str) -> None:
    mesh, dataplanes, policies = load()
    document = build(named(dataplanes, name), mesh, dataplanes, policies, tls_paths(name))
    golden = TESTDATA / f"{name}.snapshot.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# build(resources.yaml, dataplane={name!r}, tls_paths under /var/lib/meshling/{name}/)\n"
        golden.write_text(header + yaml.safe_dump(document, sort_keys=False))
    assert document == yaml.safe_load(golden.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_build_golden_is_a_snapshot_the_proxy_accepts(name: str) -> None:
    golden = TESTDATA / f"{name}.snapshot.yaml"
    document = yaml.safe_load(golden.read_text(encoding="utf-8"))
    snapshot = from_dict(document, str(golden))
    assert snapshot.node == name
    assert snapshot.version == document["version"]
    assert version_of({k: v for k, v in document.items() if k != "version"}) == snapshot.version


def test_build_outbound_endpoints_are_the_other_dataplanes_of_the_service() -> None:
    mesh, dataplanes, policies = load()
    snapshot = from_dict(
        build(named(dataplanes, "web"), mesh, dataplanes, policies, tls_paths("web"))
    )
    api = snapshot.clusters["api"]
    assert [str(e) for e in api.endpoints] == ["10.0.0.7:15006", "10.0.0.10:15006"]
    assert api.tls is not None
    assert api.tls.identity == "spiffe://default/api"
    assert api.tls.files == tls_paths("web")


def test_build_inbound_terminates_mtls_and_authorizes_by_permission() -> None:
    mesh, dataplanes, policies = load()
    snapshot = from_dict(
        build(named(dataplanes, "db"), mesh, dataplanes, policies, tls_paths("db"))
    )
    (listener,) = [li for li in snapshot.listeners if li.name == "inbound:15432"]
    assert (listener.address, listener.port) == ("0.0.0.0", 15432)
    (chain,) = listener.filter_chains
    assert chain.tcp is not None and chain.tcp.cluster == "local:5432"
    assert chain.tls is not None and chain.tls.mode == "strict"
    assert chain.authz is not None
    # the service's own permission first, then the mesh-wide one; other meshes' ignored
    assert [r.name for r in chain.authz.rules] == ["db-from-api/0", "ops-everywhere/0"]
    assert snapshot.clusters["local:5432"].endpoints[0].address == "127.0.0.1"


def test_build_excludes_itself_and_other_meshes_from_endpoints() -> None:
    mesh, dataplanes, policies = load()
    api_1 = named(dataplanes, "api-1")
    calls_itself = dataclasses.replace(
        api_1, outbounds=(*api_1.outbounds, Outbound(port=15003, service="api", protocol="http"))
    )
    elsewhere = dataclasses.replace(named(dataplanes, "api-2"), name="api-9", mesh="staging")
    again = named(dataplanes, "api-2")  # listed twice: one endpoint
    document = build(
        calls_itself, mesh, [*dataplanes, elsewhere, again], policies, tls_paths("api-1")
    )
    (api,) = [c for c in document["clusters"] if c["name"] == "api"]
    assert api["endpoints"] == [{"address": "10.0.0.10", "port": 15006}]


def test_build_service_without_dataplanes_has_an_empty_cluster() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    lonely = dataclasses.replace(web, outbounds=(Outbound(port=15009, service="nowhere"),))
    document = build(lonely, mesh, dataplanes, policies, tls_paths("web"))
    assert from_dict(document).clusters["nowhere"].endpoints == ()


def test_build_dataplane_without_traffic_has_only_the_admin_listener() -> None:
    mesh, _, policies = load()
    idle = Dataplane(name="idle", mesh="default", service="idle", address="10.0.0.99")
    document = build(idle, mesh, [idle], policies, tls_paths("idle"))
    snapshot = from_dict(document)
    assert snapshot.listeners == ()
    assert snapshot.clusters == {}
    assert (snapshot.admin.address, snapshot.admin.port) == ("127.0.0.1", 9901)


# -- tag sources


def web_rules(document: dict[str, Any]) -> dict[str, list[str]]:
    """The identities of each authz rule of web's inbound, by rule name."""
    authz = document["listeners"][0]["filter_chains"][0]["authz"]
    return {rule["name"]: rule["identities"] for rule in authz["rules"]}


def test_build_tag_allow_needs_every_dataplane_of_a_service() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    # db's one instance and web's are in zone a: both allowed; api-2 is in zone b
    assert web_rules(build(web, mesh, dataplanes, policies, tls_paths("web")))["web-by-tags/1"] == [
        "spiffe://default/db",
        "spiffe://default/web",
    ]
    # a second db instance without the tag: db is no longer selected
    untagged = Dataplane(name="db-2", mesh="default", service="db", address="10.0.0.20")
    rules = web_rules(build(web, mesh, [*dataplanes, untagged], policies, tls_paths("web")))
    assert rules["web-by-tags/1"] == ["spiffe://default/web"]


def test_build_tag_deny_needs_any_dataplane_of_a_service() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    assert web_rules(build(web, mesh, dataplanes, policies, tls_paths("web")))["web-by-tags/0"] == [
        "spiffe://default/api"
    ]
    # no api instance of v2 left: the deny matches nobody, and stays visible
    v1 = [
        dataclasses.replace(d, tags={"version": "v1"}) if d.service == "api" else d
        for d in dataplanes
    ]
    document = build(web, mesh, v1, policies, tls_paths("web"))
    assert web_rules(document)["web-by-tags/0"] == []
    authz = from_dict(document).listeners[0].filter_chains[0].authz
    assert authz is not None
    (rule,) = [r for r in authz.rules if r.name == "web-by-tags/0"]
    assert rule.identities == () and rule.tag_sources[0].service == "api"


def test_build_tags_of_other_meshes_are_ignored() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    elsewhere = Dataplane(name="db-9", mesh="staging", service="db", address="10.0.0.30")
    assert build(web, mesh, [*dataplanes, elsewhere], policies, tls_paths("web")) == build(
        web, mesh, dataplanes, policies, tls_paths("web")
    )


def test_build_counts_the_dataplane_itself_even_when_not_listed() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    others = [d for d in dataplanes if d.name != "web"]
    assert build(web, mesh, others, policies, tls_paths("web")) == build(
        web, mesh, dataplanes, policies, tls_paths("web")
    )


# -- determinism and versions


@pytest.mark.parametrize("seed", range(5))
def test_build_is_independent_of_input_order(seed: int) -> None:
    mesh, dataplanes, policies = load()
    expected = build_all(mesh, dataplanes, policies)
    rng = random.Random(seed)
    shuffled = [
        dataclasses.replace(
            d,
            inbounds=tuple(rng.sample(d.inbounds, len(d.inbounds))),
            outbounds=tuple(rng.sample(d.outbounds, len(d.outbounds))),
        )
        for d in rng.sample(dataplanes, len(dataplanes))
    ]
    shuffled_policies = rng.sample(policies, len(policies))
    actual = build_all(mesh, shuffled, shuffled_policies)
    assert actual == expected
    # equal as text too, key order included: what the config stream sends
    for name in NAMES:
        assert yaml.safe_dump(actual[name], sort_keys=False) == yaml.safe_dump(
            expected[name], sort_keys=False
        )


def test_build_extra_inbounds_and_outbounds_are_sorted_by_port() -> None:
    mesh, dataplanes, policies = load()
    web = dataclasses.replace(
        named(dataplanes, "web"),
        inbounds=(Inbound(port=15007, service_port=9000), Inbound(port=15006, service_port=8080)),
        outbounds=(Outbound(port=15005, service="db"), Outbound(port=15001, service="api")),
    )
    document = build(web, mesh, dataplanes, policies, tls_paths("web"))
    assert [li["name"] for li in document["listeners"]] == [
        "inbound:15006",
        "inbound:15007",
        "outbound:api",
        "outbound:db",
    ]
    assert [c["name"] for c in document["clusters"]] == ["api", "db", "local:8080", "local:9000"]


def test_build_version_changes_only_with_the_content() -> None:
    mesh, dataplanes, policies = load()
    before = build_all(mesh, dataplanes, policies)
    moved = [
        dataclasses.replace(d, address="10.0.0.11") if d.name == "api-2" else d for d in dataplanes
    ]
    after = build_all(mesh, moved, policies)
    assert after["web"]["version"] != before["web"]["version"]
    # api-2's own snapshot does not contain its address; db's has no outbound to api
    for name in ("api-1", "api-2", "db"):
        assert after[name] == before[name]
    assert len({doc["version"] for doc in before.values()}) == len(NAMES)


def test_build_version_covers_tls_paths() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    one = build(web, mesh, dataplanes, policies, tls_paths("web"))
    other = build(web, mesh, dataplanes, policies, tls_paths("web-rotated"))
    assert one["version"] != other["version"]


# -- the index and the text: one reading of the mesh, one serialisation per snapshot


def scenarios() -> list[tuple[str, Mesh, Dataplane, list[Dataplane], list[TrafficPermission]]]:
    """Meshes that exercise every lookup of the index: golden, self-calls, duplicates,
    other meshes, IPv6, a shared address, a dataplane not listed, mTLS off."""
    mesh, dataplanes, policies = load()
    cases = [(name, mesh, named(dataplanes, name), dataplanes, policies) for name in NAMES]
    api_1 = named(dataplanes, "api-1")
    calls_itself = dataclasses.replace(
        api_1, outbounds=(*api_1.outbounds, Outbound(port=15003, service="api", protocol="http"))
    )
    elsewhere = dataclasses.replace(named(dataplanes, "api-2"), name="api-9", mesh="staging")
    again = named(dataplanes, "api-2")
    cases.append(
        ("self+dup", mesh, calls_itself, [*dataplanes, elsewhere, again, calls_itself], policies)
    )
    v6 = dataclasses.replace(again, name="api-6", address="fd00::7")
    same_place = dataclasses.replace(api_1, name="api-7")  # api-1's address and port
    crowd = [*dataplanes, v6, same_place]
    cases.append(("v6+shared", mesh, calls_itself, crowd, policies))
    untagged = dataclasses.replace(named(dataplanes, "web"), tags={})
    cases.append(("unlisted", mesh, untagged, [d for d in dataplanes if d.name != "web"], policies))
    cases.append(("plain", without_mtls(mesh), named(dataplanes, "web"), dataplanes, policies))
    return cases


@pytest.mark.parametrize("case", scenarios(), ids=lambda case: case[0])
def test_build_text_is_the_canonical_json_of_build(
    case: tuple[str, Mesh, Dataplane, list[Dataplane], list[TrafficPermission]],
) -> None:
    _, mesh, dataplane, dataplanes, policies = case
    document = build(dataplane, mesh, dataplanes, policies, tls_paths(dataplane.name))
    index = MeshIndex(mesh, dataplanes, policies)
    built = build_text(dataplane, index, tls_paths(dataplane.name))
    assert built.text == canonical_json(document)
    assert built.version == document["version"]
    assert build(dataplane, mesh, (), (), tls_paths(dataplane.name), index=index) == document


def test_build_index_endpoints_are_every_other_listing_in_address_order() -> None:
    rng = random.Random(7)
    mesh, _, policies = load()
    addresses = ["10.0.0.9", "10.0.0.10", "10.0.1.2", "9.9.9.9", "fd00::1", "fd00::a", "::1"]
    dataplanes = [
        Dataplane(
            name=f"d{n}",
            mesh="default",
            service=rng.choice(["api", "web"]),
            address=rng.choice(addresses),
            inbounds=tuple(Inbound(port, 8080) for port in rng.sample([15006, 15007, 9], 2)),
            outbounds=(Outbound(15001, "api"), Outbound(15002, "web")),
        )
        for n in range(40)
    ]
    index = MeshIndex(mesh, dataplanes, policies)
    for dataplane in dataplanes:
        document = build(dataplane, mesh, (), (), tls_paths("x"), index=index)
        for cluster in document["clusters"]:
            if cluster["name"].startswith("local:"):
                continue
            expected = sorted(
                {
                    (d.address, i.port)
                    for d in dataplanes
                    if d.service == cluster["name"] and d.name != dataplane.name
                    for i in d.inbounds
                },
                key=lambda e: (
                    ipaddress.ip_address(e[0]).version,
                    int(ipaddress.ip_address(e[0])),
                    e[1],
                ),
            )
            assert [(e["address"], e["port"]) for e in cluster["endpoints"]] == expected
        assert build_text(dataplane, index, tls_paths("x")).text == canonical_json(document)


def test_build_refuses_an_index_of_another_mesh_state() -> None:
    mesh, dataplanes, policies = load()
    index = MeshIndex(without_mtls(mesh), dataplanes, policies)
    with pytest.raises(BuildError, match="index"):
        build(named(dataplanes, "web"), mesh, (), (), tls_paths("web"), index=index)


# -- mTLS modes


def test_build_mtls_off_has_no_tls_and_no_authz() -> None:
    mesh, dataplanes, policies = load()
    for dataplane in dataplanes:
        document = build(dataplane, without_mtls(mesh), dataplanes, policies, None)
        assert all("tls" not in chain and "authz" not in chain for chain in chains(document))
        assert all("tls" not in cluster for cluster in document["clusters"])
        snapshot = from_dict(document)
        assert all(c.tls is None for c in snapshot.clusters.values())


def test_build_mtls_off_ignores_tls_paths() -> None:
    mesh, dataplanes, policies = load()
    web = named(dataplanes, "web")
    with_paths = build(web, without_mtls(mesh), dataplanes, policies, tls_paths("web"))
    assert with_paths == build(web, without_mtls(mesh), dataplanes, policies, None)


def test_build_mtls_permissive_sets_the_inbound_mode() -> None:
    mesh, dataplanes, policies = load()
    permissive = dataclasses.replace(mesh, mtls=MeshTls(enabled=True, mode="permissive"))
    document = build(named(dataplanes, "api-1"), permissive, dataplanes, policies, tls_paths("a"))
    inbound = document["listeners"][0]["filter_chains"][0]
    assert inbound["tls"]["mode"] == "permissive"
    assert from_dict(document).listeners[0].filter_chains[0].tls is not None


def test_build_mtls_without_permissions_denies_by_default() -> None:
    mesh, dataplanes, _ = load()
    document = build(named(dataplanes, "web"), mesh, dataplanes, [], tls_paths("web"))
    assert document["listeners"][0]["filter_chains"][0]["authz"] == {
        "default_action": "deny",
        "rules": [],
    }


def test_build_mtls_on_needs_tls_paths() -> None:
    mesh, dataplanes, policies = load()
    with pytest.raises(BuildError, match="mTLS on: dataplane 'web' needs tls_paths"):
        build(named(dataplanes, "web"), mesh, dataplanes, policies, None)


def test_build_refuses_a_dataplane_of_another_mesh() -> None:
    mesh, dataplanes, policies = load()
    staging = dataclasses.replace(named(dataplanes, "web"), mesh="staging")
    with pytest.raises(BuildError, match="belongs to mesh 'staging', not 'default'"):
        build(staging, mesh, dataplanes, policies, tls_paths("web"))


# -- affected


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("Mesh", "default", {"web", "api-1", "api-2", "db"}),
        ("Mesh", "staging", set()),
        ("Dataplane", "web", {"web"}),  # nobody calls web
        ("Dataplane", "api-1", {"api-1", "web"}),
        # api calls db; web-by-tags selects by tags from every service, db included
        ("Dataplane", "db", {"db", "api-1", "api-2", "web"}),
        ("TrafficPermission", "api-from-web", {"api-1", "api-2"}),
        ("TrafficPermission", "web-by-tags", {"web"}),
        ("TrafficPermission", "db-from-api", {"db"}),
        ("TrafficPermission", "ops-everywhere", {"web", "api-1", "api-2", "db"}),
        ("TrafficPermission", "api-from-batch", set()),  # another mesh
        # unknown: nothing tells where it was, so everything
        ("TrafficPermission", "gone", {"web", "api-1", "api-2", "db"}),
        ("Dataplane", "gone", {"gone", "web", "api-1", "api-2", "db"}),
    ],
)
def test_affected_touches(kind: str, name: str, expected: set[str]) -> None:
    _, dataplanes, policies = load()
    assert affected(kind, name, dataplanes, policies) == expected


def test_affected_moved_dataplane_touches_old_and_new_callers() -> None:
    _, dataplanes, policies = load()
    moved = dataclasses.replace(named(dataplanes, "api-2"), service="db")
    assert affected("Dataplane", "api-2", [*dataplanes, moved], policies) == {
        "api-2",
        "web",  # calls api, which api-2 leaves
        "api-1",  # calls db, which api-2 joins
    }


def test_affected_moved_permission_touches_old_and_new_destinations() -> None:
    _, dataplanes, policies = load()
    (old,) = [p for p in policies if p.name == "db-from-api"]
    new = dataclasses.replace(old, destination=dataclasses.replace(old.destination, service="web"))
    assert affected("TrafficPermission", "db-from-api", dataplanes, [*policies, new]) == {
        "db",
        "web",
    }


def test_affected_refuses_a_kind_the_builder_does_not_read() -> None:
    _, dataplanes, policies = load()
    with pytest.raises(ValueError, match="no resources of kind 'MeshGateway'"):
        affected("MeshGateway", "t", dataplanes, policies)


MUTATIONS: list[tuple[str, str, Any]] = [
    ("Dataplane", "api-2", lambda d: dataclasses.replace(d, address="10.0.0.12")),
    ("Dataplane", "db", lambda d: dataclasses.replace(d, inbounds=(Inbound(15433, 5432),))),
    ("Dataplane", "web", lambda d: dataclasses.replace(d, admin_port=9999)),
    ("Dataplane", "api-1", lambda d: dataclasses.replace(d, service="db")),
    # tags: api-2 joins zone a, so all of api is in zone a; db leaves it
    ("Dataplane", "api-2", lambda d: dataclasses.replace(d, tags={"version": "v2", "zone": "a"})),
    ("Dataplane", "db", lambda d: dataclasses.replace(d, tags={"zone": "b"})),
]


@pytest.mark.parametrize(
    ("kind", "name", "change"), MUTATIONS, ids=[f"{m[1]}-{i}" for i, m in enumerate(MUTATIONS)]
)
def test_affected_covers_every_snapshot_a_dataplane_change_alters(
    kind: str, name: str, change: Any
) -> None:
    mesh, dataplanes, policies = load()
    changed = [change(d) if d.name == name else d for d in dataplanes]
    before, after = build_all(mesh, dataplanes, policies), build_all(mesh, changed, policies)
    altered = {n for n in NAMES if before[n] != after[n]}
    assert altered  # the mutation matters to someone
    assert altered <= affected(kind, name, [*dataplanes, *changed], policies)


def test_affected_created_and_deleted_dataplanes_touch_tag_permissions() -> None:
    mesh, dataplanes, policies = load()
    # created: a db instance in zone b un-selects db from web's allow by zone a
    created = Dataplane(
        name="db-2", mesh="default", service="db", address="10.0.0.20", tags={"zone": "b"}
    )
    before, after = (
        build_all(mesh, dataplanes, policies),
        build_all(mesh, [*dataplanes, created], policies),
    )
    altered = {n for n in NAMES if before[n] != after[n]}
    assert "web" in altered
    assert altered <= affected("Dataplane", "db-2", [*dataplanes, created], policies)
    # api-2 deleted: every api instance left is in zone a, and web's allow selects api
    remaining = [d for d in dataplanes if d.name != "api-2"]
    after = build_all(mesh, remaining, policies)
    altered = {n for n in NAMES if n != "api-2" and before[n] != after[n]}
    assert "web" in altered
    assert altered <= affected("Dataplane", "api-2", dataplanes, policies)


def test_affected_tag_source_naming_a_service_ignores_other_services() -> None:
    _, dataplanes, policies = load()
    only_api = [p for p in policies if p.name != "web-by-tags"]
    (by_tags,) = [p for p in policies if p.name == "web-by-tags"]
    # keep only the rule whose tag source names api
    only_api.append(dataclasses.replace(by_tags, rules=by_tags.rules[:1]))
    assert affected("Dataplane", "db", dataplanes, only_api) == {"db", "api-1", "api-2"}
    assert affected("Dataplane", "api-2", dataplanes, only_api) == {"api-2", "web"}


def test_affected_covers_every_snapshot_a_permission_change_alters() -> None:
    mesh, dataplanes, policies = load()
    (old,) = [p for p in policies if p.name == "api-from-web"]
    new = dataclasses.replace(old, shadow=True)
    changed = [new if p is old else p for p in policies]
    before, after = build_all(mesh, dataplanes, policies), build_all(mesh, dataplanes, changed)
    altered = {n for n in NAMES if before[n] != after[n]}
    assert altered == {"api-1", "api-2"}
    assert altered == affected("TrafficPermission", old.name, dataplanes, [*policies, new])


def test_build_two_inbounds_serialise_without_yaml_aliases() -> None:
    mesh, dataplanes, policies = load()
    api_1 = dataclasses.replace(
        named(dataplanes, "api-1"),
        inbounds=(Inbound(15006, 8080, "http"), Inbound(15007, 9090, "tcp")),
    )
    document = build(api_1, mesh, dataplanes, policies, tls_paths("api-1"))
    text = yaml.safe_dump(document)
    assert "&id" not in text and "*id" not in text
    assert from_dict(yaml.safe_load(text)) == from_dict(document)
