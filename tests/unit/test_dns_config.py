"""The `dns:` section: the snapshot loader's checks, the Dataplane's `dns:`, and what the
builder and `affected` make of it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.controlplane.builder import MeshIndex, affected, build
from meshling.controlplane.resources import Dataplane, Inbound, Mesh, MeshTls, parse_resource
from meshling.controlplane.resources.dataplane import DataplaneDns
from meshling.dns.vip import allocate
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import MeshDns


def snapshot(dns: Any, **extra: Any) -> dict[str, Any]:
    return {
        "version": "1",
        "listeners": [
            {"name": "out", "port": 15001, "filter_chains": [{"tcp": {"cluster": "up"}}]}
        ],
        "clusters": [{"name": "up", "endpoints": [{"address": "127.0.0.1", "port": 8080}]}],
        "dns": dns,
        **extra,
    }


def test_dns_config_defaults() -> None:
    loaded = from_dict(snapshot({}), "s.yaml").dns
    assert loaded == MeshDns()
    assert (loaded.address, loaded.port, loaded.domain, loaded.ttl) == (
        "127.0.0.1",
        15053,
        "mesh",
        30,
    )
    assert from_dict(snapshot(None), "s.yaml").dns is None


def test_dns_config_reads_every_field() -> None:
    loaded = from_dict(
        snapshot(
            {
                "address": "127.0.0.2",
                "port": 5300,
                "domain": "Mesh.Internal.",
                "ttl": "5s",
                "upstream": ["10.0.0.2", "127.0.0.1:5353", "[::1]:53"],
                "names": {"api": "241.1.2.3", "web.front": "250.0.0.9"},
            }
        ),
        "s.yaml",
    ).dns
    assert loaded is not None
    assert loaded.domain == "mesh.internal" and loaded.ttl == 5
    assert loaded.upstream == (("10.0.0.2", 53), ("127.0.0.1", 5353), ("::1", 53))
    assert loaded.names == {"api": "241.1.2.3", "web.front": "250.0.0.9"}


@pytest.mark.parametrize(
    ("dns", "path", "reason"),
    [
        ({"names": {"api": "241.1.2"}}, "dns.names.api", "invalid IPv4 address"),
        ({"names": {"api": "::1"}}, "dns.names.api", "invalid IPv4 address"),
        ({"names": {"a b": "241.1.2.3"}}, "dns.names.a b", "not a DNS name"),
        ({"names": {"api": 3}}, "dns.names.api", "expected an IPv4 address"),
        ({"names": {"api": "241.1.2.3", "API": "241.1.2.4"}}, "dns.names.API", "already the name"),
        ({"names": ["api"]}, "dns.names", "expected a mapping"),
        ({"upstream": ["dns.google"]}, "dns.upstream[0]", "expected an address"),
        ({"upstream": ["10.0.0.2:70000"]}, "dns.upstream[0]", "out of range"),
        ({"upstream": ["1.1.1.1"] * 4}, "dns.upstream", "at most 3"),
        ({"ttl": "2h"}, "dns.ttl", "longer than"),
        ({"domain": "a..b"}, "dns.domain", "invalid domain"),
        ({"port": 15001}, "dns.port", "already used by listener 'out'"),
        ({"port": 9901}, "dns.port", "already used by listener 'admin'"),
        ({"color": "red"}, "dns.color", "unknown field"),
        ("on", "dns", "expected a mapping"),
    ],
)
def test_dns_config_errors_name_the_field(dns: Any, path: str, reason: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        from_dict(snapshot(dns), "s.yaml")
    assert caught.value.source == "s.yaml"
    assert caught.value.path == path
    assert reason in caught.value.reason


def dataplane(name: str, service: str, *, dns: bool = False, mesh: str = "default") -> Dataplane:
    return Dataplane(
        name=name,
        mesh=mesh,
        service=service,
        address="10.0.0.1",
        inbounds=(Inbound(15006, 8080, "http"),),
        dns=DataplaneDns() if dns else None,
    )


MESH = Mesh(name="default", mtls=MeshTls(enabled=False))


def test_dns_dataplane_reads_dns_and_refuses_a_taken_port() -> None:
    document = {
        "kind": "Dataplane",
        "metadata": {"name": "web-1", "mesh": "default"},
        "spec": {"service": "web", "address": "10.0.0.5", "dns": {"port": 5353}},
    }
    parsed = parse_resource(document, "web.yaml")
    assert isinstance(parsed, Dataplane) and parsed.dns == DataplaneDns(5353)
    document["spec"]["dns"] = {}
    assert parse_resource(document, "web.yaml").dns == DataplaneDns(15053)  # type: ignore[union-attr]
    document["spec"]["dns"] = {"port": 15006}
    document["spec"]["inbounds"] = [{"port": 15006, "service_port": 8080}]
    with pytest.raises(
        ValueError,
        match=r"web.yaml: spec.inbounds\[0\].port: port 15006 is already used by dns.port",
    ):
        parse_resource(document, "web.yaml")
    document["spec"]["inbounds"] = []
    document["spec"]["dns"] = {"port": 9901}
    with pytest.raises(
        ValueError, match=r"spec\.dns\.port: port 9901 is already used by admin\.port"
    ):
        parse_resource(document, "web.yaml")


def test_dns_builder_names_every_service_of_the_mesh_at_its_vip() -> None:
    others = [dataplane("api-1", "api"), dataplane("api-2", "api"), dataplane("db-1", "db")]
    stranger = dataplane("x-1", "x", mesh="other")
    web = dataplane("web-1", "web", dns=True)
    document = build(web, MESH, [web, *others, stranger], [], None)
    assert document["dns"] == {
        "address": "127.0.0.1",
        "port": 15053,
        "names": allocate(["api", "db", "web"], "default"),
    }
    loaded = from_dict(document)
    assert loaded.dns is not None and set(loaded.dns.names) == {"api", "db", "web"}
    # without dns on the dataplane, no section
    plain = dataplane("web-2", "web")
    assert "dns" not in build(plain, MESH, [plain, *others], [], None)


def test_dns_builder_vips_are_stable_when_services_come_and_go() -> None:
    web = dataplane("web-1", "web", dns=True)
    before = MeshIndex(MESH, [web, dataplane("api-1", "api")], []).virtual_ips()
    after = MeshIndex(MESH, [web, dataplane("api-1", "api"), dataplane("db-1", "db")], [])
    assert after.virtual_ips()["api"] == before["api"]
    assert set(after.virtual_ips()) == {"api", "db", "web"}


def test_dns_affected_a_new_service_touches_every_dns_dataplane_of_the_mesh() -> None:
    web = dataplane("web-1", "web", dns=True)
    quiet = dataplane("api-1", "api")
    other_mesh = dataplane("o-1", "o", dns=True, mesh="other")
    new = dataplane("db-1", "db")
    touched = affected("Dataplane", "db-1", [web, quiet, other_mesh, new], [])
    assert touched == {"db-1", "web-1"}
    # another instance of a service the mesh has: the names stay, no DNS proxy is touched
    second = dataplane("api-2", "api")
    assert affected("Dataplane", "api-2", [web, quiet, second], []) == {"api-2"}
    # the dns dataplane's own snapshot is rebuilt when its dns section changes
    moved = dataclasses.replace(web, dns=DataplaneDns(5353))
    assert "web-1" in affected("Dataplane", "web-1", [web, moved, quiet], [])


TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "controlplane" / "builder" / "testdata"


@pytest.mark.parametrize("name", ["web-1", "payments-1"])
def test_dns_builder_matches_golden(name: str) -> None:
    path = TESTDATA / "dns.resources.yaml"
    with path.open(encoding="utf-8") as f:
        resources = [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(f)]
    (mesh,) = [r for r in resources if isinstance(r, Mesh)]
    dataplanes = [r for r in resources if isinstance(r, Dataplane)]
    (this,) = [d for d in dataplanes if d.name == name]
    document = build(this, mesh, dataplanes, [], None)
    golden = TESTDATA / f"{name}.dns.snapshot.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# build(dns.resources.yaml, dataplane={name!r})\n"
        golden.write_text(header + yaml.safe_dump(document, sort_keys=False))
    assert document == yaml.safe_load(golden.read_text(encoding="utf-8"))
    # a snapshot the proxy runs
    assert from_dict(document, str(golden)).dns is not None
