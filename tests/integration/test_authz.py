"""TrafficPermission on a real inbound: allowed and denied callers over mTLS, shadow mode, TCP."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
import yaml

from meshling.policies.traffic_permission import parse_resource, to_snapshot

from .conftest import Nginx, http_get
from .test_mtls import Pki, inbound, metric, outbound

pytestmark = pytest.mark.integration

POLICY = """
kind: TrafficPermission
metadata: {name: web-to-api, mesh: default}
spec:
  destination: {service: api}
  rules:
    - action: allow
      sources: [{service: web}]
"""


def authz() -> dict[str, Any]:
    """The inbound fragment, converted from a TrafficPermission resource as the control plane will."""
    resource = parse_resource(yaml.safe_load(POLICY), "policy.yaml")
    return to_snapshot([resource], "api", "default").to_dict()


def protected(nginx_port: int, pki: Pki, *, mode: str = "strict") -> dict[str, Any]:
    doc = inbound(nginx_port, pki.issue("api"), mode=mode)
    doc["listeners"][0]["filter_chains"][0]["authz"] = authz()
    return doc


def test_authz_allows_the_permitted_caller_and_denies_others(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(protected(nginx.port, pki))
    web = start_proxy(outbound(api.port, pki.issue("web")))
    billing = start_proxy(outbound(api.port, pki.issue("billing")))
    assert http_get(web.url + "/hello") == (200, b"hello from nginx\n")
    status, body = http_get(billing.url + "/hello")
    assert (status, body) == (403, b"permission denied\n")
    text = api.metrics()
    assert (
        metric(
            text,
            'meshling_authz_decisions_total{listener="in",result="allowed",rule="web-to-api/0"}',
        )
        == 1
    )
    assert (
        metric(text, 'meshling_authz_decisions_total{listener="in",result="denied",rule="default"}')
        == 1
    )


def test_authz_denied_caller_is_answered_by_the_proxy_not_the_app(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(protected(nginx.port, pki))
    billing = start_proxy(outbound(api.port, pki.issue("billing")))
    for _ in range(3):
        assert http_get(billing.url + "/hello")[0] == 403
    # the api proxy answered every time, and forwarded nothing to nginx
    assert metric(api.metrics(), "meshling_upstream_connections_total") == 0


MESH_WIDE = """
kind: TrafficPermission
metadata: {name: mesh-wide, mesh: default}
spec:
  destination: {service: "*"}
  rules:
    - action: allow
      sources: [{service: "*"}]
"""


ONLY_WEB_SHADOW = """
kind: TrafficPermission
metadata: {name: api-web-only, mesh: default}
spec:
  destination: {service: api}
  shadow: true
  rules:
    - action: allow
      sources: [{service: web}]
    - action: deny
      sources: [{service: "*"}]
"""


def test_authz_shadow_policy_allows_and_counts_what_it_would_deny(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    # Rolling out "only web may call api" in shadow mode, while a mesh-wide allow is enforced.
    resources = [
        parse_resource(yaml.safe_load(MESH_WIDE), "mesh-wide.yaml"),
        parse_resource(yaml.safe_load(ONLY_WEB_SHADOW), "api-web-only.yaml"),
    ]
    doc = inbound(nginx.port, pki.issue("api"))
    doc["listeners"][0]["filter_chains"][0]["authz"] = to_snapshot(
        resources, "api", "default"
    ).to_dict()
    api = start_proxy(doc)
    billing = start_proxy(outbound(api.port, pki.issue("billing")))
    web = start_proxy(outbound(api.port, pki.issue("web")))
    assert http_get(billing.url + "/hello")[0] == 200
    assert http_get(web.url + "/hello")[0] == 200
    text = api.metrics()
    shadow = [
        line
        for line in text.splitlines()
        if line.startswith("meshling_authz_decisions_total") and 'result="shadow_denied"' in line
    ]
    assert len(shadow) == 1 and shadow[0].endswith(" 1.0"), shadow
    assert (
        metric(
            text,
            'meshling_authz_decisions_total{listener="in",result="allowed",rule="mesh-wide/0"}',
        )
        == 2
    )
    assert "would deny spiffe://default/billing" in api.logs()


def test_authz_plaintext_caller_on_a_permissive_port_is_denied(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(protected(nginx.port, pki, mode="permissive"))
    assert http_get(api.url + "/hello") == (403, b"permission denied\n")
    web = start_proxy(outbound(api.port, pki.issue("web")))
    assert http_get(web.url + "/hello")[0] == 200


def test_authz_denied_tcp_connection_is_closed(start_proxy, nginx: Nginx, pki: Pki) -> None:
    doc = protected(nginx.port, pki, mode="permissive")
    chain = doc["listeners"][0]["filter_chains"][0]
    del chain["http"]
    chain["tcp"] = {"cluster": "up"}
    api = start_proxy(doc)
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    assert (
        metric(
            api.metrics(),
            'meshling_authz_decisions_total{listener="in",result="denied",rule="default"}',
        )
        == 1
    )
    assert metric(api.metrics(), "meshling_upstream_connections_total") == 0
