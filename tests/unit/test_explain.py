"""`explain`: routes, permissions and policy precedence for one request, on resource sets,
checked against what the snapshot builder puts in the proxies' snapshots."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meshling.controlplane.api import create_app
from meshling.controlplane.builder import build
from meshling.controlplane.explain import ExplainError, Request, explain, render_text
from meshling.controlplane.resources import Dataplane, Mesh, parse_resource
from meshling.controlplane.store import open_store
from meshling.policies import policy_type
from meshling.proxy.router import matches, mismatch
from meshling.snapshot.model import HeaderMatch, PathMatch, RouteMatch, TlsFiles

MESH = """
kind: Mesh
metadata: {name: default}
spec: {mtls: {enabled: true, mode: strict}}
---
kind: Dataplane
metadata: {name: web-1, mesh: default}
spec:
  service: web
  address: 10.0.0.1
  tags: {version: v1, zone: a}
  outbounds: [{port: 15001, service: api, protocol: http}]
---
kind: Dataplane
metadata: {name: web-2, mesh: default}
spec:
  service: web
  address: 10.0.0.2
  tags: {version: v2, zone: b}
  outbounds: [{port: 15001, service: api, protocol: http}]
---
kind: Dataplane
metadata: {name: api-1, mesh: default}
spec:
  service: api
  address: 10.0.0.3
  tags: {version: v1}
  inbounds: [{port: 15006, service_port: 8080, protocol: http}]
---
kind: Dataplane
metadata: {name: api-2, mesh: default}
spec:
  service: api
  address: 10.0.0.4
  tags: {version: v2}
  inbounds: [{port: 15006, service_port: 8080, protocol: http}]
---
kind: Dataplane
metadata: {name: batch-1, mesh: default}
spec:
  service: batch
  address: 10.0.0.5
  outbounds: [{port: 15001, service: api, protocol: http}, {port: 15002, service: db}]
---
kind: Dataplane
metadata: {name: db-1, mesh: default}
spec:
  service: db
  address: 10.0.0.6
  inbounds: [{port: 15006, service_port: 5432}]
---
kind: TrafficPermission
metadata: {name: api-callers, mesh: default}
spec:
  destination: {service: api}
  rules:
    - {action: deny, sources: [{service: batch}]}
    - {action: allow, sources: [{service: web}]}
---
kind: TrafficPermission
metadata: {name: everyone-to-web, mesh: default}
spec:
  destination: {service: web}
  rules: [{action: allow, sources: [{service: "*"}]}]
---
kind: HTTPRoute
metadata: {name: api-canary, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: api}]
  conf:
    rules:
      - matches: [{path: {prefix: /v2}, methods: [GET]}]
        backends: [{service: api, tags: {version: v2}}]
      - matches: [{path: {prefix: /}, headers: [{name: x-canary, exact: "1"}]}]
        backends:
          - {service: api, tags: {version: v1}, weight: 90}
          - {service: api, tags: {version: v2}, weight: 10}
---
kind: Retry
metadata: {name: any-to-api, mesh: default}
spec:
  sources: [{service: "*"}]
  destinations: [{service: api}]
  conf: {max_attempts: 2}
---
kind: Retry
metadata: {name: web-v2-to-api, mesh: default}
spec:
  sources: [{service: web, tags: {version: v2}}]
  destinations: [{service: api}]
  conf: {max_attempts: 4}
---
kind: Timeout
metadata: {name: web-to-api, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: "*"}]
  conf: {request: 3s}
---
kind: Timeout
metadata: {name: web-to-api-b, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: "*"}]
  conf: {request: 5s}
---
kind: Timeout
metadata: {name: web-to-db, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: db}]
  conf: {request: 1s}
---
kind: RateLimit
metadata: {name: api-any, mesh: default}
spec:
  sources: [{service: "*"}]
  destinations: [{service: api}]
  conf: {local: {requests: 100, interval: 1s}}
---
kind: RateLimit
metadata: {name: api-from-web, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: api}]
  conf: {local: {requests: 10, interval: 1s}}
---
kind: FaultInjection
metadata: {name: api-v2-slow, mesh: default}
spec:
  sources: [{service: web}]
  destinations: [{service: api, tags: {version: v2}}]
  conf: {delay: {value: 100ms, percentage: 50}}
"""


def resources(text: str = MESH) -> tuple[Mesh, list[Dataplane], list[Any]]:
    parsed = [parse_resource(doc, "test") for doc in yaml.safe_load_all(text)]
    (mesh,) = [r for r in parsed if isinstance(r, Mesh)]
    dataplanes = [r for r in parsed if isinstance(r, Dataplane)]
    policies = [r for r in parsed if not isinstance(r, Mesh | Dataplane)]
    return mesh, dataplanes, policies


def run(source: str, destination: str, request: Request | None = None, **kw: Any) -> dict[str, Any]:
    mesh, dataplanes, policies = resources(kw.pop("text", MESH))
    return explain(mesh, dataplanes, policies, source, destination, request or Request(), **kw)


def by_name(entries: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entries if e["kind"] == kind}


def test_explain_header_match_takes_the_weighted_rule_and_names_the_rule_tried_before() -> None:
    answer = run("web", "api", Request("POST", "/orders", (("X-Canary", "1"),)), dataplane="web-1")
    (caller,) = answer["sources"]
    route = caller["route"]
    assert route["matched"]["route"] == "api:1"
    assert route["matched"]["resource"] == "api-canary" and route["matched"]["rule"] == 1
    assert route["matched"]["backends"] == [
        {"cluster": "api~version=v1", "weight": 90},
        {"cluster": "api~version=v2", "weight": 10},
    ]
    (tried,) = route["tried"]
    assert tried["route"] == "api:0"
    assert tried["reason"] == "path '/orders' is not under prefix '/v2'"
    assert answer["allowed"] is True and answer["verdict"] == "allowed"


def test_explain_method_and_header_mismatches_fall_to_the_default_route() -> None:
    answer = run("web", "api", Request("POST", "/v2/x"), dataplane="web-1")
    route = answer["sources"][0]["route"]
    assert route["matched"]["route"] == "api" and route["matched"]["default"] is True
    assert route["matched"]["backends"] == [{"cluster": "api", "weight": 1}]
    reasons = [t["reason"] for t in route["tried"]]
    assert reasons == ["method POST is not one of GET", "header x-canary: wanted exact '1'"]


def test_explain_path_match_and_the_route_the_proxy_router_picks() -> None:
    answer = run("web", "api", Request("GET", "/v2/items?page=2"), dataplane="web-1")
    matched = answer["sources"][0]["route"]["matched"]
    assert matched["route"] == "api:0" and matched["match"]["path"] == {"prefix": "/v2"}
    assert matched["backends"] == [{"cluster": "api~version=v2", "weight": 1}]
    assert answer["sources"][0]["route"]["tried"] == []


def test_explain_precedence_and_shadowing_of_outbound_policies_per_dataplane() -> None:
    answer = run("web", "api")
    by_tags = {s["tags"]["version"]: s for s in answer["sources"]}
    assert by_tags["v1"]["dataplanes"] == ["web-1"] and by_tags["v2"]["dataplanes"] == ["web-2"]
    v1 = by_name(by_tags["v1"]["policies"], "Retry")
    assert v1["any-to-api"]["status"] == "applies"
    assert v1["web-v2-to-api"]["status"] == "not selected"
    assert "do not match service web with tags version=v1" in v1["web-v2-to-api"]["reason"]
    v2 = by_name(by_tags["v2"]["policies"], "Retry")
    assert v2["web-v2-to-api"]["status"] == "applies"
    assert v2["web-v2-to-api"]["selected_by"]["source"] == "{service: web, tags: {version: v2}}"
    assert v2["any-to-api"]["status"] == "shadowed"
    assert v2["any-to-api"]["shadowed_by"] == "web-v2-to-api"
    assert "source selector names the service" in v2["any-to-api"]["reason"]
    timeouts = by_name(by_tags["v1"]["policies"], "Timeout")
    assert timeouts["web-to-api"]["status"] == "applies"
    assert timeouts["web-to-api-b"]["shadowed_by"] == "web-to-api"
    assert "sorts first by name" in timeouts["web-to-api-b"]["reason"]
    assert timeouts["web-to-db"]["status"] == "not selected"
    assert "do not name service api" in timeouts["web-to-db"]["reason"]


def test_explain_agrees_with_the_builder_on_every_applied_outbound_policy() -> None:
    mesh, dataplanes, policies = resources()
    tls = TlsFiles("c", "k", "b")
    answer = explain(mesh, dataplanes, policies, "web", "api")
    fragments = {"Retry": "retry", "Timeout": "timeout"}
    for group in answer["sources"]:
        caller = next(d for d in dataplanes if d.name == group["dataplanes"][0])
        snapshot = build(caller, mesh, dataplanes, policies, tls)
        (default,) = [
            r
            for li in snapshot["listeners"]
            if li["name"] == "outbound:api"
            for r in li["filter_chains"][0]["http"]["route_config"]["virtual_hosts"][0]["routes"]
            if r["name"] == "api"
        ]
        for kind, key in fragments.items():
            (applied,) = [
                p for p in group["policies"] if p["kind"] == kind and p["status"] == "applies"
            ]
            winner = next(
                p for p in policies if p.name == applied["name"] and type(p).__name__ == kind
            )
            policy = policy_type(kind)
            assert policy is not None and policy.fragment is not None
            assert default[key] == policy.fragment(winner)


def test_explain_inbound_policies_by_destination_dataplane() -> None:
    answer = run("web", "api", dataplane="web-1")
    by_tags = {d["tags"]["version"]: d for d in answer["destinations"]}
    for version in ("v1", "v2"):
        limits = by_name(by_tags[version]["policies"], "RateLimit")
        assert limits["api-from-web"]["status"] == "applies"
        assert limits["api-any"]["status"] == "shadowed"
        assert limits["api-any"]["shadowed_by"] == "api-from-web"
        assert "names the caller's service" in limits["api-any"]["reason"]
    faults_v2 = by_name(by_tags["v2"]["policies"], "FaultInjection")
    assert faults_v2["api-v2-slow"]["status"] == "applies"
    faults_v1 = by_name(by_tags["v1"]["policies"], "FaultInjection")
    assert faults_v1["api-v2-slow"]["status"] == "not selected"
    # a caller the rate limit's sources do not name
    limits = by_name(run("batch", "api")["destinations"][0]["policies"], "RateLimit")
    assert limits["api-any"]["status"] == "applies"
    assert limits["api-from-web"]["status"] == "not selected"
    assert "do not hold spiffe://default/batch" in limits["api-from-web"]["reason"]


def test_explain_permission_allow_names_the_deciding_rule_and_the_ones_before() -> None:
    answer = run("web", "api", dataplane="web-1")
    permission = answer["destinations"][0]["permission"]
    assert permission["allowed"] is True and permission["rule"] == "api-callers/1"
    first, second = permission["rules"]
    assert first["status"] == "no match" and "spiffe://default/batch" in first["reason"]
    assert second["status"] == "decides"
    assert answer["source"]["identity"] == "spiffe://default/web"
    assert answer["mtls"] == {"enabled": True, "mode": "strict"}
    (elsewhere,) = permission["not_selected"]
    assert elsewhere["resource"] == "everyone-to-web"


def test_explain_a_denied_caller() -> None:
    answer = run("batch", "api")
    permission = answer["destinations"][0]["permission"]
    assert permission["allowed"] is False and permission["rule"] == "api-callers/0"
    assert permission["rules"][1]["status"] == "not reached"
    assert answer["allowed"] is False
    assert answer["verdict"] == "denied: rule api-callers/0 denies"


def test_explain_a_destination_no_permission_selects_is_denied_by_default() -> None:
    answer = run("batch", "db")
    permission = answer["destinations"][0]["permission"]
    assert permission["allowed"] is False and permission["rule"] == "default"
    assert (
        permission["reason"]
        == "no TrafficPermission selects service db: the default (deny) decides"
    )
    # a TCP outbound: the route is the TCP filter's cluster
    matched = answer["sources"][0]["route"]["matched"]
    assert matched["route"] == "tcp" and matched["backends"] == [{"cluster": "db", "weight": 1}]


def test_explain_a_source_without_an_outbound_has_no_route() -> None:
    answer = run("api", "web")
    assert answer["allowed"] is False
    assert all(s["route"]["matched"] is None for s in answer["sources"])
    assert "has no outbound to service web" in answer["verdict"]


def test_explain_with_mtls_off_admits_everyone() -> None:
    text = MESH.replace("{mtls: {enabled: true, mode: strict}}", "{}")
    answer = run("batch", "api", text=text)
    assert answer["allowed"] is True
    assert "mTLS is off" in answer["destinations"][0]["permission"]["reason"]
    assert answer["mtls"] == {"enabled": False}


def test_explain_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ExplainError) as e:
        run("nope", "api")
    assert e.value.field == "source"
    assert "no service or dataplane named 'nope' in mesh 'default'" in str(e.value)
    assert "services: api, batch, db, web" in str(e.value)
    with pytest.raises(ExplainError) as e:
        run("web", "nope")
    assert e.value.field == "destination"
    with pytest.raises(ExplainError) as e:
        run("web", "api", dataplane="api-1")
    assert e.value.field == "dataplane" and "web-1, web-2" in str(e.value)
    with pytest.raises(ExplainError) as e:
        run("web", "api", Request(port=1))
    assert e.value.field == "port"


def test_explain_a_dataplane_name_as_the_source() -> None:
    answer = run("web-2", "api")
    assert [s["dataplanes"] for s in answer["sources"]] == [["web-2"]]


def test_router_mismatch_agrees_with_matches() -> None:
    cases = [
        RouteMatch(PathMatch("prefix", "/a")),
        RouteMatch(PathMatch("exact", "/a")),
        RouteMatch(PathMatch("prefix", "/"), frozenset({b"GET"})),
        RouteMatch(headers=(HeaderMatch(b"x", "exact", "1"),)),
        RouteMatch(headers=(HeaderMatch(b"x", "present", invert=True),)),
    ]
    requests = [
        (b"GET", "/a", []),
        (b"POST", "/a/b", [(b"x", b"1")]),
        (b"GET", "/b", [(b"x", b"2")]),
    ]
    for match in cases:
        for method, path, headers in requests:
            assert matches(match, method, path, headers) == (
                mismatch(match, method, path, headers) is None
            )


WRAPPING = """
---
kind: AccessLog
metadata: {name: web-calls, mesh: default}
spec:
  dataplanes: [{service: web}]
  to: [{service: api}]
  backends: [{stdout: true}]
---
kind: AccessLog
metadata: {name: api-from-batch, mesh: default}
spec:
  dataplanes: [{service: api}]
  from: [{service: batch}]
  backends: [{stdout: true}]
---
kind: Trace
metadata: {name: everyone, mesh: default}
spec:
  dataplanes: [{service: "*"}]
  conf: {sampling: 1, backend: {otlp: {endpoint: "http://127.0.0.1:4318"}}}
---
kind: Trace
metadata: {name: web-v2, mesh: default}
spec:
  dataplanes: [{service: web, tags: {version: v2}}]
  conf: {sampling: 100, backend: {otlp: {endpoint: "http://127.0.0.1:4318"}}}
"""


def test_explain_access_logs_add_up_and_the_most_specific_trace_governs() -> None:
    answer = run("web", "api", text=MESH + WRAPPING)
    by_tags = {s["tags"]["version"]: s for s in answer["sources"]}
    logs = by_name(by_tags["v1"]["policies"], "AccessLog")
    assert logs["web-calls"]["status"] == "applies"
    traces = by_name(by_tags["v2"]["policies"], "Trace")
    assert traces["web-v2"]["status"] == "applies"
    assert traces["everyone"]["status"] == "shadowed"
    assert traces["everyone"]["shadowed_by"] == "web-v2"
    assert by_name(by_tags["v1"]["policies"], "Trace")["everyone"]["status"] == "applies"
    inbound = by_name(answer["destinations"][0]["policies"], "AccessLog")
    assert inbound["api-from-batch"]["status"] == "not selected"
    assert "not for spiffe://default/web" in inbound["api-from-batch"]["reason"]
    inbound = by_name(
        run("batch", "api", text=MESH + WRAPPING)["destinations"][0]["policies"], "AccessLog"
    )
    assert inbound["api-from-batch"]["status"] == "applies"


def test_explain_api_answers_from_the_store_and_names_bad_parameters(tmp_path: Path) -> None:
    token = "explain-test-token"
    auth = {"Authorization": f"Bearer {token}"}

    async def main() -> None:
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            transport = httpx.ASGITransport(app=create_app(store, token))
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                for document in yaml.safe_load_all(MESH):
                    created = await client.post(
                        "/api/v1/resources?allow_unmatched=true", json=document, headers=auth
                    )
                    assert created.status_code == 201, created.text
                query = "source=web&destination=api&dataplane=web-1&path=/x&header=x-canary%3D1"
                found = await client.get(f"/api/v1/explain?{query}", headers=auth)
                assert found.status_code == 200, found.text
                answer = found.json()
                assert answer["sources"][0]["route"]["matched"]["route"] == "api:1"
                assert answer["allowed"] is True
                assert (await client.get(f"/api/v1/explain?{query}")).status_code == 401
                for bad, field in (
                    ("destination=api", "source"),
                    ("source=web&destination=api&header=oops", "header"),
                    ("source=web&destination=api&method=FETCH", "method"),
                    ("source=web&destination=api&port=70000", "port"),
                    ("source=nope&destination=api", "source"),
                ):
                    refused = await client.get(f"/api/v1/explain?{bad}", headers=auth)
                    assert refused.status_code == 400 and refused.json()["field"] == field, bad
                missing = await client.get(
                    "/api/v1/explain?mesh=other&source=web&destination=api", headers=auth
                )
                assert missing.status_code == 404
                document = (await client.get("/openapi.json", headers=auth)).json()
                assert "/api/v1/explain" in document["paths"]
        finally:
            await store.close()

    asyncio.run(main())


def test_explain_a_shadow_permission_reports_what_it_would_deny() -> None:
    shadow = """
---
kind: TrafficPermission
metadata: {name: a-trial, mesh: default}
spec:
  destination: {service: api}
  rules: [{action: deny, sources: [{service: web}]}]
  shadow: true
"""
    answer = run("web", "api", dataplane="web-1", text=MESH + shadow)
    permission = answer["destinations"][0]["permission"]
    assert permission["allowed"] is True and permission["rule"] == "api-callers/1"
    assert permission["shadow_denied_by"] == "a-trial/0"
    statuses = [(r["rule"], r["status"]) for r in permission["rules"]]
    assert statuses == [
        ("a-trial/0", "shadow"),
        ("api-callers/0", "no match"),
        ("api-callers/1", "decides"),
    ]
    assert "(shadow rule a-trial/0 would deny)" in render_text(answer)
