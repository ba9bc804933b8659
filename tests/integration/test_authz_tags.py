"""TrafficPermission by tags on real proxies: snapshots made by the control plane's
builder from resources, mTLS with certificates from the mesh CA, nginx behind the api."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshling.controlplane.builder import build
from meshling.controlplane.resources import Dataplane, Mesh, parse_resource
from meshling.policies.traffic_permission import TrafficPermission
from meshling.snapshot.model import TlsFiles

from .conftest import Nginx, free_port, http_get, wait_for
from .test_mtls import Pki, metric

pytestmark = pytest.mark.integration

MESH = """
kind: Mesh
metadata: {name: default}
spec:
  mtls: {enabled: true, mode: strict}
"""

# api takes calls from the services whose every instance runs version v1
PERMISSION = """
kind: TrafficPermission
metadata: {name: api-from-v1, mesh: default}
spec:
  destination: {service: api}
  rules:
    - action: allow
      sources: [{tags: {version: v1}}]
"""


def dataplane(
    name: str,
    service: str,
    tags: dict[str, str],
    *,
    inbound: tuple[int, int] | None = None,
    outbound_to: tuple[int, str] | None = None,
) -> Dataplane:
    spec: dict[str, Any] = {
        "service": service,
        "address": "127.0.0.1",
        "tags": tags,
        "admin": {"port": free_port()},
    }
    if inbound is not None:
        spec["inbounds"] = [{"port": inbound[0], "service_port": inbound[1], "protocol": "http"}]
    if outbound_to is not None:
        spec["outbounds"] = [
            {"port": outbound_to[0], "service": outbound_to[1], "protocol": "http"}
        ]
    document = {"kind": "Dataplane", "metadata": {"name": name, "mesh": "default"}, "spec": spec}
    resource = parse_resource(document, f"{name}.yaml")
    assert isinstance(resource, Dataplane)
    return resource


class TaggedMesh:
    """The resources of one mesh, and the snapshot the builder makes of each dataplane."""

    def __init__(self, pki: Pki, nginx_port: int) -> None:
        self.pki = pki
        mesh = parse_resource(yaml.safe_load(MESH), "mesh.yaml")
        assert isinstance(mesh, Mesh)
        self.mesh = mesh
        permission = parse_resource(yaml.safe_load(PERMISSION), "permission.yaml")
        assert isinstance(permission, TrafficPermission)
        self.policies = [permission]
        api_port = free_port()
        self.dataplanes = [
            dataplane("api-1", "api", {"version": "v2"}, inbound=(api_port, nginx_port)),
            dataplane("web-1", "web", {"version": "v1"}, outbound_to=(free_port(), "api")),
            dataplane("batch-1", "batch", {"version": "v2"}, outbound_to=(free_port(), "api")),
        ]

    def snapshot(self, name: str) -> dict[str, Any]:
        (node,) = [d for d in self.dataplanes if d.name == name]
        files = self.pki.issue(node.service)
        tls = TlsFiles(files.certificate, files.key, files.trust_bundle)
        document = build(node, self.mesh, self.dataplanes, self.policies, tls)
        # Tests listen on loopback only; the builder binds inbounds on every interface.
        for listener in document["listeners"]:
            listener["address"] = "127.0.0.1"
        return document


def test_authz_tags_allow_the_tagged_service_and_deny_the_other(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    mesh = TaggedMesh(pki, nginx.port)
    api_doc = mesh.snapshot("api-1")
    (rule,) = api_doc["listeners"][0]["filter_chains"][0]["authz"]["rules"]
    assert rule["identities"] == ["spiffe://default/web"]
    api = start_proxy(api_doc)
    web = start_proxy(mesh.snapshot("web-1"))
    batch = start_proxy(mesh.snapshot("batch-1"))

    assert http_get(web.url + "/hello") == (200, b"hello from nginx\n")
    assert http_get(batch.url + "/hello") == (403, b"permission denied\n")
    text = api.metrics()
    allowed = 'meshling_authz_decisions_total{listener="inbound:%d",result="allowed",rule="%s"}'
    denied = 'meshling_authz_decisions_total{listener="inbound:%d",result="denied",rule="%s"}'
    assert metric(text, allowed % (api.port, "api-from-v1/0")) == 1
    assert metric(text, denied % (api.port, "default")) == 1


def test_authz_tags_an_untagged_instance_withdraws_its_service(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    mesh = TaggedMesh(pki, nginx.port)
    api = start_proxy(mesh.snapshot("api-1"))
    web = start_proxy(mesh.snapshot("web-1"))
    assert http_get(web.url + "/hello")[0] == 200

    # A second web instance without the tag registers: its certificate would say
    # spiffe://default/web too, so web as a whole is no longer allowed.
    mesh.dataplanes.append(dataplane("web-2", "web", {}, outbound_to=(free_port(), "api")))
    rebuilt = mesh.snapshot("api-1")
    (rule,) = rebuilt["listeners"][0]["filter_chains"][0]["authz"]["rules"]
    assert (rule["identities"], rule["tag_sources"]) == ([], [{"tags": {"version": "v1"}}])
    api.write_config(rebuilt)
    wait_for(lambda: http_get(web.url + "/hello")[0] == 403, 10, "web denied after the rebuild")
    assert (
        metric(
            api.metrics(),
            f'meshling_snapshot_info{{version="{rebuilt["version"]}"}}',
        )
        == 1
    )
