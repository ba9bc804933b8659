"""`meshling explain` against a real control plane (mTLS strict) and four real proxies,
checked against the data plane: the route explain names is the one the web proxy runs
and takes (the canary rule's requests all reach the v2 instance), and the caller explain
says is denied is refused by the real api proxy with 403.

    web-1  ─┐                       ┌─> api-1 (version v1) -> upstream "v1"
            ├─ outbound api ─mTLS──>┤
    batch-1 ┘                       └─> api-2 (version v2) -> upstream "v2"
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import free_port, http_get, wait_for
from .cp_mesh import ControlPlane, Dataplane, start_ready
from .reliability_upstreams import answer, serve

pytestmark = pytest.mark.integration

POLICIES: list[dict[str, Any]] = [
    {
        "kind": "TrafficPermission",
        "metadata": {"name": "api-callers", "mesh": "default"},
        "spec": {
            "destination": {"service": "api"},
            "rules": [
                {"action": "deny", "sources": [{"service": "batch"}]},
                {"action": "allow", "sources": [{"service": "web"}]},
            ],
        },
    },
    {
        "kind": "HTTPRoute",
        "metadata": {"name": "canary", "mesh": "default"},
        "spec": {
            "sources": [{"service": "web"}],
            "destinations": [{"service": "api"}],
            "conf": {
                "rules": [
                    {
                        "matches": [{"headers": [{"name": "x-canary", "exact": "1"}]}],
                        "backends": [{"service": "api", "tags": {"version": "v2"}}],
                    }
                ]
            },
        },
    },
    {
        "kind": "Retry",
        "metadata": {"name": "any-to-api", "mesh": "default"},
        "spec": {
            "sources": [{"service": "*"}],
            "destinations": [{"service": "api"}],
            "conf": {"max_attempts": 2},
        },
    },
    {
        "kind": "Retry",
        "metadata": {"name": "web-to-api", "mesh": "default"},
        "spec": {
            "sources": [{"service": "web"}],
            "destinations": [{"service": "api"}],
            "conf": {"max_attempts": 3},
        },
    },
]


class Named:
    """An HTTP/1.1 upstream on 127.0.0.1 answering every GET with its name."""

    def __init__(self, name: str) -> None:
        body = name.encode()
        self.server = serve(lambda request: answer(request, 200, body))
        self.port = int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams() -> Iterator[tuple[Named, Named]]:
    v1, v2 = Named("v1"), Named("v2")
    yield v1, v2
    v1.close()
    v2.close()


def explain(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MESHLING_CP": cp.url,
        "MESHLING_ADMIN_TOKEN_FILE": str(cp.admin_token_file),
    }
    return subprocess.run(
        [sys.executable, "-m", "meshling", "explain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def get(port: int, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/orders", headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def answers(port: int, headers: dict[str, str] | None = None) -> bool:
    try:
        return get(port, headers)[0] == 200
    except OSError:
        return False


def outbound_routes(proxy: Dataplane) -> dict[str, Any]:
    """The routes of the proxy's `outbound:api` listener, by name, from its `/config`."""
    snapshot = json.loads(http_get(proxy.admin + "/config")[1])["snapshot"]
    (listener,) = [li for li in snapshot["listeners"] if li["name"] == "outbound:api"]
    (virtual_host,) = listener["filter_chains"][0]["http"]["route_config"]["virtual_hosts"]
    return {route["name"]: route for route in virtual_host["routes"]}


def test_explain_agrees_with_the_proxies_on_route_and_permission(
    upstreams: tuple[Named, Named], tmp_path: Path
) -> None:
    v1, v2 = upstreams
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(*POLICIES)
    proxies: list[Dataplane] = []
    outbounds: dict[str, int] = {}
    try:
        for name, version, upstream in (("api-1", "v1", v1), ("api-2", "v2", v2)):
            spec = {
                "service": "api",
                "address": "127.0.0.1",
                "tags": {"version": version},
                "inbounds": [
                    {"port": free_port(), "service_port": upstream.port, "protocol": "http"}
                ],
                "admin": {"port": free_port()},
            }
            proxies.append(Dataplane(tmp_path, cp, name, spec))
        for name, service in (("web-1", "web"), ("batch-1", "batch")):
            outbounds[service] = free_port()
            spec = {
                "service": service,
                "address": "127.0.0.1",
                "outbounds": [{"port": outbounds[service], "service": "api", "protocol": "http"}],
                "admin": {"port": free_port()},
            }
            proxies.append(Dataplane(tmp_path, cp, name, spec))
        start_ready(*proxies, timeout=30)
        web = next(p for p in proxies if p.name == "web-1")
        canary = {"x-canary": "1"}
        wait_for(lambda: answers(outbounds["web"], canary), 30, "web -> api through the canary")

        # the canary request: explain names the HTTPRoute's rule and its v2 backend
        out = explain(cp, "web", "api", "--path", "/orders", "--header", "x-canary=1")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "✓ api:0 (HTTPRoute canary rule 0) → api~version=v2" in out.stdout
        assert "✓ api-callers/1 allow: decides" in out.stdout
        assert "✓ Retry web-to-api: applies" in out.stdout
        assert "✗ Retry any-to-api: shadowed by web-to-api" in out.stdout
        assert out.stdout.rstrip().endswith("Verdict: allowed")
        document = json.loads(
            explain(cp, "web", "api", "--header", "x-canary=1", "-o", "json").stdout
        )
        (caller,) = document["sources"]
        matched = caller["route"]["matched"]
        # ... the route the web proxy runs under that name sends to the same backends
        routes = outbound_routes(web)
        running = routes[matched["route"]]
        assert running["weighted"] == {
            "clusters": [b["cluster"] for b in matched["backends"]],
            "weights": [b["weight"] for b in matched["backends"]],
        }
        assert matched["backends"] == [{"cluster": "api~version=v2", "weight": 1}]
        (header,) = running["match"]["headers"]
        assert (header["name"], header["kind"], header["value"]) == ("x-canary", "exact", "1")
        (retry,) = [
            p for p in caller["policies"] if p["kind"] == "Retry" and p["status"] == "applies"
        ]
        assert running["retry"]["max_attempts"] == 3 and retry["name"] == "web-to-api"
        # ... and every canary request through the real proxy reaches the v2 instance
        for _ in range(10):
            assert get(outbounds["web"], canary) == (200, b"v2")

        # without the header: the default route, to the whole service
        out = explain(cp, "web", "api", "-o", "json")
        assert out.returncode == 0
        default = json.loads(out.stdout)["sources"][0]["route"]
        assert default["matched"]["route"] == "api" and default["matched"]["default"] is True
        assert default["tried"][0]["reason"] == "header x-canary: wanted exact '1'"
        assert routes["api"]["cluster"] == "api"

        # batch: explain says denied by the first rule, and the api proxies refuse it
        out = explain(cp, "batch", "api")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "✓ api-callers/0 deny: decides" in out.stdout
        assert "Verdict: denied: rule api-callers/0 denies" in out.stdout
        wait_for(lambda: get(outbounds["batch"])[0] == 403, 30, "batch refused")
        for _ in range(4):  # both api instances, by the balancer's turns
            assert get(outbounds["batch"]) == (403, b"permission denied\n")

        # bad input: exit 2 and a message naming the field
        out = explain(cp, "nope", "api")
        assert out.returncode == 2
        assert "source: no service or dataplane named 'nope'" in out.stderr
        assert "services: api, batch, web" in out.stderr
        out = explain(cp, "web", "api", "--header", "oops")
        assert out.returncode == 2 and "header: expected name=value, got 'oops'" in out.stderr
    finally:
        for proxy in proxies:
            proxy.stop_all()
        cp.stop()
    out = explain(cp, "web", "api")
    assert out.returncode == 2 and "127.0.0.1" in out.stderr
