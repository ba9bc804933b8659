"""The control plane's resources: Mesh and Dataplane validation (every error names the
file, the field path and the reason), and `parse_resource` across kinds."""

from __future__ import annotations

from typing import Any

import pytest

from meshling.controlplane.resources import (
    Dataplane,
    Inbound,
    Mesh,
    MeshTls,
    Outbound,
    kinds,
    parse_dataplane,
    parse_mesh,
    parse_resource,
)
from meshling.policies.traffic_permission import TrafficPermission
from meshling.snapshot import SnapshotError


def mesh_doc() -> dict[str, Any]:
    return {
        "kind": "Mesh",
        "metadata": {"name": "default", "labels": {"team": "platform"}},
        "spec": {"mtls": {"enabled": True, "mode": "strict"}},
    }


def dataplane_doc() -> dict[str, Any]:
    return {
        "kind": "Dataplane",
        "metadata": {"name": "api-1", "mesh": "default", "labels": {}},
        "spec": {
            "service": "api",
            "address": "10.0.0.7",
            "tags": {"version": "v1", "zone": "a"},
            "inbounds": [
                {"port": 15007, "service_port": 9090, "protocol": "tcp"},
                {"port": 15006, "service_port": 8080, "protocol": "http"},
            ],
            "outbounds": [{"port": 15001, "service": "web", "protocol": "http"}],
            "admin": {"port": 9901},
        },
    }


# -- Mesh


def test_parse_mesh_builds_the_mesh() -> None:
    assert parse_mesh(mesh_doc(), "m.yaml") == Mesh(
        name="default", mtls=MeshTls(enabled=True, mode="strict"), labels={"team": "platform"}
    )


def test_parse_mesh_defaults_to_plaintext() -> None:
    doc = {"kind": "Mesh", "metadata": {"name": "default"}}
    assert parse_mesh(doc, "m.yaml") == Mesh(name="default", mtls=MeshTls(enabled=False))


def test_parse_mesh_mode_defaults_to_strict() -> None:
    doc = mesh_doc()
    doc["spec"]["mtls"] = {"enabled": True}
    assert parse_mesh(doc, "m.yaml").mtls == MeshTls(enabled=True, mode="strict")


@pytest.mark.parametrize(
    ("edit", "path", "reason"),
    [
        (lambda d: d.update(kind="Dataplane"), "kind", "expected kind Mesh, got 'Dataplane'"),
        (lambda d: d["metadata"].update(name="Default"), "metadata.name", "invalid mesh"),
        (lambda d: d["metadata"].pop("name"), "metadata.name", "required field is missing"),
        (lambda d: d["metadata"].update(mesh="x"), "metadata.mesh", "unknown field"),
        (lambda d: d["spec"].update(mtls=True), "spec.mtls", "expected a mapping, got a boolean"),
        (lambda d: d["spec"]["mtls"].pop("enabled"), "spec.mtls.enabled", "required field"),
        (lambda d: d["spec"]["mtls"].update(enabled="yes"), "spec.mtls.enabled", "true or false"),
        (
            lambda d: d["spec"]["mtls"].update(mode="optional"),
            "spec.mtls.mode",
            "must be one of strict, permissive, got 'optional'",
        ),
        (lambda d: d["metadata"].update(labels={"team": 7}), "metadata.labels.team", "int"),
        (lambda d: d["metadata"].update(labels={"-x": "a"}), "metadata.labels.-x", "invalid key"),
    ],
)
def test_parse_mesh_rejects_invalid(edit: Any, path: str, reason: str) -> None:
    doc = mesh_doc()
    edit(doc)
    with pytest.raises(SnapshotError) as err:
        parse_mesh(doc, "meshes/default.yaml")
    assert (err.value.source, err.value.path) == ("meshes/default.yaml", path)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"meshes/default.yaml: {path}: ")


# -- Dataplane


def test_parse_dataplane_builds_the_dataplane_with_sorted_ports() -> None:
    assert parse_dataplane(dataplane_doc(), "dp.yaml") == Dataplane(
        name="api-1",
        mesh="default",
        service="api",
        address="10.0.0.7",
        inbounds=(
            Inbound(port=15006, service_port=8080, protocol="http"),
            Inbound(port=15007, service_port=9090, protocol="tcp"),
        ),
        outbounds=(Outbound(port=15001, service="web", protocol="http"),),
        admin_port=9901,
        tags={"version": "v1", "zone": "a"},
        labels={},
    )


def test_parse_dataplane_applies_defaults() -> None:
    doc = {
        "kind": "Dataplane",
        "metadata": {"name": "job", "mesh": "default"},
        "spec": {
            "service": "job",
            "address": "fd00::0:7",
            "outbounds": [{"port": 15001, "service": "api"}],
        },
    }
    dataplane = parse_dataplane(doc, "dp.yaml")
    assert dataplane.address == "fd00::7"  # normalised, as the snapshot loader does
    assert dataplane.inbounds == ()
    assert dataplane.outbounds == (Outbound(port=15001, service="api", protocol="tcp"),)
    assert dataplane.admin_port == 9901
    assert dataplane.tags == {}


def test_parse_dataplane_resources_are_hashable() -> None:
    dataplane = parse_dataplane(dataplane_doc(), "dp.yaml")
    assert len({dataplane, parse_dataplane(dataplane_doc(), "dp.yaml")}) == 1


@pytest.mark.parametrize(
    ("edit", "path", "reason"),
    [
        (lambda d: d.pop("spec"), "spec", "required field is missing"),
        (lambda d: d["metadata"].pop("mesh"), "metadata.mesh", "required field is missing"),
        (lambda d: d["metadata"].update(name="API_1"), "metadata.name", "invalid name 'API_1'"),
        (lambda d: d["spec"].update(service="a/b"), "spec.service", "invalid service name"),
        (lambda d: d["spec"].update(address="api.local"), "spec.address", "invalid IP address"),
        (lambda d: d["spec"].update(port=1), "spec.port", "unknown field"),
        (lambda d: d["spec"].update(tags=["v1"]), "spec.tags", "expected a mapping, got a list"),
        (
            lambda d: d["spec"]["tags"].update(version=1),
            "spec.tags.version",
            "expected a string, got int",
        ),
        (lambda d: d["spec"].update(inbounds={}), "spec.inbounds", "expected a list"),
        (
            lambda d: d["spec"]["inbounds"][1].update(port=70000),
            "spec.inbounds[1].port",
            "70000 is out of range [1, 65535]",
        ),
        (
            lambda d: d["spec"]["inbounds"][0].pop("service_port"),
            "spec.inbounds[0].service_port",
            "required field is missing",
        ),
        (
            lambda d: d["spec"]["inbounds"][1].update(protocol="quic"),
            "spec.inbounds[1].protocol",
            "must be one of http, http2, grpc, tcp, auto, got 'quic'",
        ),
        (
            lambda d: d["spec"]["outbounds"][0].update(service="*"),
            "spec.outbounds[0].service",
            "invalid service name '*'",
        ),
        (lambda d: d["spec"]["admin"].update(port="9901"), "spec.admin.port", "an integer"),
        (
            lambda d: d["spec"]["outbounds"][0].update(port=15006),
            "spec.outbounds[0].port",
            "port 15006 is already used by inbounds[1].port",
        ),
        (
            lambda d: d["spec"]["inbounds"][0].update(port=9901),
            "spec.inbounds[0].port",
            "port 9901 is already used by admin.port",
        ),
        (
            lambda d: d["spec"]["outbounds"].append({"port": 15002, "service": "web"}),
            "spec.outbounds[1].service",
            "service 'web' already has an outbound (outbounds[0])",
        ),
    ],
)
def test_parse_dataplane_rejects_invalid(edit: Any, path: str, reason: str) -> None:
    doc = dataplane_doc()
    edit(doc)
    with pytest.raises(SnapshotError) as err:
        parse_dataplane(doc, "dataplanes/api-1.yaml")
    assert (err.value.source, err.value.path) == ("dataplanes/api-1.yaml", path)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"dataplanes/api-1.yaml: {path}: ")


# -- any kind


def test_parse_resource_reads_every_kind() -> None:
    permission = {
        "kind": "TrafficPermission",
        "metadata": {"name": "web-to-api", "mesh": "default"},
        "spec": {
            "destination": {"service": "api"},
            "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
        },
    }
    assert isinstance(parse_resource(mesh_doc(), "r.yaml"), Mesh)
    assert isinstance(parse_resource(dataplane_doc(), "r.yaml"), Dataplane)
    assert isinstance(parse_resource(permission, "r.yaml"), TrafficPermission)
    assert kinds()[:3] == ("Mesh", "Dataplane", "TrafficPermission")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"kind": "Gateway", "metadata": {}},
            "r.yaml: kind: unknown kind 'Gateway' (known: Mesh, Dataplane, TrafficPermission",
        ),
        ({"metadata": {}}, "r.yaml: kind: required field is missing"),
        ({"kind": 3}, "r.yaml: kind: unknown kind 3"),
        (["kind", "Mesh"], "r.yaml: expected a mapping, got a list"),
    ],
)
def test_parse_resource_rejects_unknown_kinds(document: Any, message: str) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(document, "r.yaml")
    assert str(err.value).startswith(message)


def test_parse_dataplane_rejects_a_tag_value_with_spaces() -> None:
    doc = dataplane_doc()
    doc["spec"]["tags"]["zone"] = "zone a"
    with pytest.raises(SnapshotError, match=r"^dp\.yaml: spec\.tags\.zone: invalid value 'zone a'"):
        parse_dataplane(doc, "dp.yaml")


def test_resources_label_selector_parses_pairs_and_names_a_bad_term() -> None:
    from meshling.controlplane.resources.metadata import parse_selector

    assert parse_selector(" app=web , zone = a ,") == {"app": "web", "zone": "a"}
    assert parse_selector("") == {}
    for bad in ("app", "=web", "app=web=x"):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            parse_selector(bad)
