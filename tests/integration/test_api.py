"""The control plane's REST API over a real SQLite store: in-process through ASGI, and once
as a real server process over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meshling.controlplane.api import create_app, ensure_admin_token
from meshling.controlplane.store import NotFound, Store, open_store

from .conftest import free_port, wait_for

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
YAML = {"Content-Type": "application/yaml", **AUTH}

Scenario = Callable[[httpx.AsyncClient, Store], Awaitable[None]]


def dataplane(name: str = "api-1", **labels: str) -> dict[str, Any]:
    return {
        "kind": "Dataplane",
        "metadata": {"name": name, "mesh": "default", "labels": labels},
        "spec": {
            "service": "api",
            "address": "10.0.0.7",
            "tags": {"version": "v1"},
            "inbounds": [{"port": 15006, "service_port": 8080, "protocol": "http"}],
        },
    }


def with_api(tmp_path: Path, scenario: Scenario) -> None:
    """Runs `scenario` against the API over a fresh SQLite store."""

    async def main() -> None:
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            transport = httpx.ASGITransport(app=create_app(store, TOKEN))
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                await scenario(client, store)
        finally:
            await store.close()

    asyncio.run(main())


def test_create_get_list_update_delete(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.post("/api/v1/resources", json=dataplane("api-1", team="a"), headers=AUTH)
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["kind"] == "Dataplane"
        assert created["metadata"]["version"] == 1
        assert created["metadata"]["labels"] == {"team": "a"}
        assert created["spec"]["service"] == "api"

        # YAML by Content-Type
        body = yaml.safe_dump(dataplane("api-2", team="b"))
        r = await client.post("/api/v1/resources", content=body, headers=YAML)
        assert r.status_code == 201, r.text

        r = await client.get("/api/v1/Dataplane/default/api-1", headers=AUTH)
        assert r.status_code == 200
        assert r.json() == created

        r = await client.get("/api/v1/dataplane", headers=AUTH)
        assert [i["metadata"]["name"] for i in r.json()["items"]] == ["api-1", "api-2"]
        r = await client.get("/api/v1/dataplane", params={"mesh": "other"}, headers=AUTH)
        assert r.json()["items"] == []
        r = await client.get("/api/v1/Dataplane", params={"labelSelector": "team=b"}, headers=AUTH)
        assert [i["metadata"]["name"] for i in r.json()["items"]] == ["api-2"]
        r = await client.get("/api/v1/Dataplane", params={"labelSelector": "team"}, headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "labelSelector"

        # what was read can be edited and sent back
        edited = created
        edited["spec"]["address"] = "10.0.0.8"
        edited["metadata"]["labels"] = {"team": "b"}
        r = await client.put("/api/v1/Dataplane/default/api-1", json=edited, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["metadata"]["version"] == 2
        assert (await store.get("Dataplane", "default", "api-1")).spec["address"] == "10.0.0.8"
        r = await client.get("/api/v1/Dataplane", params={"labelSelector": "team=b"}, headers=AUTH)
        assert [i["metadata"]["name"] for i in r.json()["items"]] == ["api-1", "api-2"]

        # the body must name what the URL names
        r = await client.put("/api/v1/Dataplane/default/api-2", json=edited, headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "metadata.name"

        r = await client.delete(
            "/api/v1/Dataplane/default/api-1", params={"version": 1}, headers=AUTH
        )
        assert r.status_code == 409
        assert r.json()["current"] == 2
        r = await client.delete(
            "/api/v1/Dataplane/default/api-1", params={"version": 2}, headers=AUTH
        )
        assert r.status_code == 204
        r = await client.delete("/api/v1/Dataplane/default/api-2", headers=AUTH)
        assert r.status_code == 204
        assert await store.list("Dataplane") == []

    with_api(tmp_path, scenario)


def test_mesh_is_addressed_by_its_own_name(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        mesh = {
            "kind": "Mesh",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"enabled": True}},
        }
        r = await client.post("/api/v1/resources", json=mesh, headers=AUTH)
        assert r.status_code == 201, r.text
        assert "mesh" not in r.json()["metadata"]
        r = await client.get("/api/v1/Mesh/default/default", headers=AUTH)
        assert r.status_code == 200
        assert r.json()["spec"] == {"mtls": {"enabled": True}}
        r = await client.post("/api/v1/resources", json=mesh, headers=AUTH)
        assert r.status_code == 409

    with_api(tmp_path, scenario)


def test_token_is_required_except_for_healthz(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = await client.get("/api/v1/Dataplane", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = await client.post("/api/v1/resources", json=dataplane(), headers=headers)
            assert r.status_code == 401
            r = await client.get("/openapi.json", headers=headers)
            assert r.status_code == 401
        assert await store.list("Dataplane") == []
        r = await client.get("/healthz")
        assert r.status_code == 200

    with_api(tmp_path, scenario)


def test_bad_documents_are_400_and_store_nothing(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        bad = dataplane()
        bad["spec"]["inbounds"][0]["port"] = 70000
        r = await client.post("/api/v1/resources", json=bad, headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "spec.inbounds[0].port", r.json()
        assert r.json()["reason"]

        unknown = {"kind": "Gateway", "metadata": {"name": "g", "mesh": "default"}, "spec": {}}
        r = await client.post("/api/v1/resources", json=unknown, headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "kind"
        assert "Dataplane" in r.json()["reason"] and "TrafficPermission" in r.json()["reason"]
        r = await client.get("/api/v1/Gateway", headers=AUTH)
        assert r.status_code == 400
        assert "Dataplane" in r.json()["reason"]

        r = await client.post(
            "/api/v1/resources", content="kind: Dataplane\nmetadata: {name: [", headers=YAML
        )
        assert r.status_code == 400
        assert r.json()["error"] == "malformed YAML"
        r = await client.post(
            "/api/v1/resources",
            content="{not json",
            headers={"Content-Type": "application/json", **AUTH},
        )
        assert r.status_code == 400
        r = await client.post(
            "/api/v1/resources", content="kind: Mesh\n---\nkind: Mesh\n", headers=YAML
        )
        assert r.status_code == 400
        r = await client.post(
            "/api/v1/resources",
            content=json.dumps(dataplane()),
            headers={"Content-Type": "text/plain", **AUTH},
        )
        assert r.status_code == 415

        for kind in ("Dataplane", "Mesh", "TrafficPermission"):
            assert await store.list(kind) == []

    with_api(tmp_path, scenario)


def test_stale_update_is_409_and_changes_nothing(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.post("/api/v1/resources", json=dataplane(), headers=AUTH)
        first = r.json()
        first["spec"]["address"] = "10.0.0.8"
        r = await client.put("/api/v1/Dataplane/default/api-1", json=first, headers=AUTH)
        assert r.status_code == 200

        stale = dataplane()
        stale["spec"]["address"] = "10.0.0.9"
        stale["metadata"]["version"] = 1
        r = await client.put("/api/v1/Dataplane/default/api-1", json=stale, headers=AUTH)
        assert r.status_code == 409
        assert (r.json()["current"], r.json()["given"]) == (2, 1)
        stored = await store.get("Dataplane", "default", "api-1")
        assert (stored.version, stored.spec["address"]) == (2, "10.0.0.8")

        del stale["metadata"]["version"]
        r = await client.put("/api/v1/Dataplane/default/api-1", json=stale, headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "metadata.version"
        assert (await store.get("Dataplane", "default", "api-1")).version == 2

    with_api(tmp_path, scenario)


def permission(name: str, destination: str) -> dict[str, Any]:
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": name, "mesh": "default"},
        "spec": {
            "destination": {"service": destination},
            "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
        },
    }


def test_a_policy_selecting_no_dataplane_is_400_unless_allowed(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        # no dataplane at all: not even "*" selects one
        for destination, why in (
            ("api", "no dataplane of service api is registered"),
            ("*", "no dataplane is registered"),
        ):
            r = await client.post(
                "/api/v1/resources", json=permission("p", destination), headers=AUTH
            )
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["error"] == "TrafficPermission default/p selects no dataplane"
            assert body["field"] == "spec.destination.service"
            assert body["reason"] == f"selects no dataplane in mesh default: {why}"
        assert await store.list("TrafficPermission") == []

        r = await client.post(
            "/api/v1/resources?allow_unmatched=maybe", json=permission("p", "api"), headers=AUTH
        )
        assert r.status_code == 400 and r.json()["field"] == "allow_unmatched"
        # stored anyway when asked, as before the workloads register
        r = await client.post(
            "/api/v1/resources?allow_unmatched=true", json=permission("early", "api"), headers=AUTH
        )
        assert r.status_code == 201, r.text

        # once a dataplane of api is registered, both select it
        assert (await client.post("/api/v1/resources", json=dataplane(), headers=AUTH)).is_success
        for name, destination in (("api", "api"), ("any", "*")):
            r = await client.post(
                "/api/v1/resources", json=permission(name, destination), headers=AUTH
            )
            assert r.status_code == 201, r.text
        # moving one onto nothing is refused, and changes nothing
        moved = r.json()
        moved["spec"]["destination"]["service"] = "apii"
        r = await client.put("/api/v1/TrafficPermission/default/any", json=moved, headers=AUTH)
        assert r.status_code == 400 and "service apii" in r.json()["reason"], r.text
        stored = await store.get("TrafficPermission", "default", "any")
        assert (stored.version, stored.spec["destination"]) == (1, {"service": "*"})
        # another mesh's dataplanes do not count
        other = permission("elsewhere", "api")
        other["metadata"]["mesh"] = "other"
        r = await client.post("/api/v1/resources", json=other, headers=AUTH)
        assert r.status_code == 400 and "in mesh other" in r.json()["reason"], r.text

    with_api(tmp_path, scenario)


def test_not_found_is_404(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.get("/api/v1/Dataplane/default/nope", headers=AUTH)
        assert r.status_code == 404
        assert "nope" in r.json()["error"]
        r = await client.delete("/api/v1/Dataplane/default/nope", headers=AUTH)
        assert r.status_code == 404
        body = dataplane("nope")
        body["metadata"]["version"] = 1
        r = await client.put("/api/v1/Dataplane/default/nope", json=body, headers=AUTH)
        assert r.status_code == 404
        with pytest.raises(NotFound):
            await store.get("Dataplane", "default", "nope")
        r = await client.get("/no/such/route", headers=AUTH)
        assert r.status_code == 404
        assert "error" in r.json()

    with_api(tmp_path, scenario)


def test_openapi_document_lists_the_routes(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.get("/openapi.json", headers=AUTH)
        assert r.status_code == 200
        doc = r.json()
        assert doc["openapi"].startswith("3.")
        paths = doc["paths"]
        assert set(paths["/api/v1/resources"]) == {"post"}
        assert set(paths["/api/v1/{kind}"]) == {"get"}
        assert set(paths["/api/v1/{kind}/{mesh}/{name}"]) == {"get", "put", "delete"}
        assert "/healthz" in paths
        assert "409" in paths["/api/v1/{kind}/{mesh}/{name}"]["put"]["responses"]

    with_api(tmp_path, scenario)


def test_real_server_writes_a_private_token_and_serves_http(tmp_path: Path) -> None:
    port = free_port()
    token_file = tmp_path / "admin.token"
    code = textwrap.dedent(
        f"""
        import sys
        from meshling.controlplane.api import run
        sys.exit(run({str(tmp_path / "cp.db")!r}, "127.0.0.1", {port}, {str(token_file)!r}))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=10, what="the API server")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 43
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/api/v1/Dataplane", timeout=5).status_code == 401
        r = httpx.post(f"{base}/api/v1/resources", json=dataplane(), headers=auth, timeout=5)
        assert r.status_code == 201, r.text
        r = httpx.get(f"{base}/api/v1/Dataplane/default/api-1", headers=auth, timeout=5)
        assert r.json()["metadata"]["version"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert str(token_file) in out

    # a second start reads the same token instead of making a new one
    assert ensure_admin_token(str(token_file)) == (token, False)


def test_api_cli_control_plane_run_serves_and_stops(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "admin.token"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshling",
            "control-plane",
            "run",
            "--store",
            f"sqlite:///{tmp_path / 'cp.db'}",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with httpx.Client() as client:
                    if client.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError("the control plane did not come up")
        token = token_file.read_text().strip()
        with httpx.Client() as client:
            response = client.get(
                f"http://127.0.0.1:{port}/api/v1/Mesh", headers={"Authorization": f"Bearer {token}"}
            )
        assert response.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "meshling", "control-plane", "run", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr
