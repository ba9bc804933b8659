"""The GUI's API routes (which dataplanes each policy selects) and its static files, served
by the control plane's app over a real SQLite store, in-process through ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from meshling.controlplane.api import create_app
from meshling.controlplane.store import Store, open_store

TOKEN = "gui-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Scenario = Callable[[httpx.AsyncClient, Store], Awaitable[None]]


def with_api(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            transport = httpx.ASGITransport(app=create_app(store, TOKEN))
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                await scenario(client, store)
        finally:
            await store.close()

    asyncio.run(main())


def dataplane(
    name: str, service: str, mesh: str = "default", calls: str | None = None, version: str = "v1"
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "service": service,
        "address": "127.0.0.1",
        "tags": {"version": version},
        "inbounds": [{"port": 15006, "service_port": 8080, "protocol": "http"}],
    }
    if calls is not None:
        spec["outbounds"] = [{"port": 15001, "service": calls, "protocol": "http"}]
    return {"kind": "Dataplane", "metadata": {"name": name, "mesh": mesh}, "spec": spec}


def permission(name: str, destination: str, source: str, mesh: str = "default") -> dict[str, Any]:
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": name, "mesh": mesh},
        "spec": {
            "destination": {"service": destination},
            "rules": [{"action": "allow", "sources": [{"service": source}]}],
        },
    }


def timeout(name: str, source: str, destination: str) -> dict[str, Any]:
    return {
        "kind": "Timeout",
        "metadata": {"name": name, "mesh": "default"},
        "spec": {
            "sources": [{"service": source}],
            "destinations": [{"service": destination}],
            "conf": {"request": "5s"},
        },
    }


async def apply(client: httpx.AsyncClient, document: dict[str, Any], **params: str) -> None:
    r = await client.post("/api/v1/resources", json=document, headers=AUTH, params=params)
    assert r.status_code == 201, r.text


async def small_mesh(client: httpx.AsyncClient) -> None:
    for document in (
        dataplane("web-1", "web", calls="api"),
        dataplane("api-1", "api", calls="store"),
        dataplane("api-2", "api", calls="store", version="v2"),
        dataplane("store-1", "store"),
        dataplane("other-api", "api", mesh="other"),
        permission("api-from-web", "api", "web"),
        permission("store-from-api", "store", "api"),
        permission("api-from-anyone", "api", "*", mesh="other"),
        timeout("api-to-store", "api", "store"),
    ):
        await apply(client, document)


def test_gui_policy_dataplanes_lists_each_policy_with_the_dataplanes_it_selects(
    tmp_path: Path,
) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        await small_mesh(client)
        r = await client.get(
            "/api/v1/policies/dataplanes", params={"mesh": "default"}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        # apply order (TrafficPermission before Timeout), then by name; only mesh default
        assert [(i["kind"], i["name"], i["dataplanes"]) for i in items] == [
            ("TrafficPermission", "api-from-web", ["api-1", "api-2"]),
            ("TrafficPermission", "store-from-api", ["store-1"]),
            ("Timeout", "api-to-store", ["api-1", "api-2"]),
        ]
        first = items[0]
        assert first["field"] == "spec.destination.service"
        assert first["wanted"] == "dataplane of service api"
        assert first["mesh"] == "default" and first["version"] == 1
        assert items[2]["field"] == "spec.sources"

        # without ?mesh every mesh, each policy among the dataplanes of its own mesh only
        r = await client.get("/api/v1/policies/dataplanes", headers=AUTH)
        other = [i for i in r.json()["items"] if i["mesh"] == "other"]
        assert [(i["name"], i["dataplanes"]) for i in other] == [("api-from-anyone", ["other-api"])]

    with_api(tmp_path, scenario)


def test_gui_policy_dataplanes_of_one_policy_follows_registrations(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        # stored before any dataplane of its service registers: it selects none yet
        await apply(client, permission("db-from-api", "db", "api"), allow_unmatched="true")
        url = "/api/v1/policies/trafficpermission/default/db-from-api/dataplanes"
        r = await client.get(url, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "TrafficPermission"
        assert r.json()["dataplanes"] == []
        assert r.json()["wanted"] == "dataplane of service db"

        await apply(client, dataplane("db-2", "db"))
        await apply(client, dataplane("db-1", "db"))
        r = await client.get(url, headers=AUTH)
        assert r.json()["dataplanes"] == ["db-1", "db-2"]

        r = await client.delete("/api/v1/Dataplane/default/db-2", headers=AUTH)
        assert r.status_code == 204
        r = await client.get(url, headers=AUTH)
        assert r.json()["dataplanes"] == ["db-1"]

    with_api(tmp_path, scenario)


def test_gui_policy_dataplanes_refuses_what_is_not_a_policy(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        await small_mesh(client)
        r = await client.get("/api/v1/policies/Dataplane/default/api-1/dataplanes", headers=AUTH)
        assert r.status_code == 400
        assert r.json()["field"] == "kind"
        assert "TrafficPermission" in r.json()["reason"]

        r = await client.get(
            "/api/v1/policies/TrafficPermission/default/nope/dataplanes", headers=AUTH
        )
        assert r.status_code == 404
        assert "nope" in r.json()["error"]

        r = await client.get("/api/v1/policies/dataplanes")
        assert r.status_code == 401
        r = await client.get(
            "/api/v1/policies/TrafficPermission/default/api-from-web/dataplanes",
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401

    with_api(tmp_path, scenario)


def test_gui_policy_dataplanes_names_a_stored_policy_that_no_longer_parses(
    tmp_path: Path,
) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        await small_mesh(client)
        # as if written by an older control plane whose rules were looser
        await store.create(
            "TrafficPermission", "default", "broken", {"destination": {"service": 7}, "rules": []}
        )
        r = await client.get(
            "/api/v1/policies/dataplanes", params={"mesh": "default"}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        broken = next(i for i in r.json()["items"] if i["name"] == "broken")
        assert broken["dataplanes"] == []
        assert broken["field"].startswith("spec.")
        assert "store:TrafficPermission" in broken["error"]
        # the others are still answered
        assert len(r.json()["items"]) == 4

    with_api(tmp_path, scenario)


def test_gui_policy_dataplanes_are_in_the_openapi_document(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.get("/openapi.json", headers=AUTH)
        paths = r.json()["paths"]
        assert "/api/v1/policies/dataplanes" in paths
        assert "/api/v1/policies/{kind}/{mesh}/{name}/dataplanes" in paths
        assert "PolicySelection" in r.json()["components"]["schemas"]

    with_api(tmp_path, scenario)


def test_gui_files_are_served_without_a_token_and_the_api_still_needs_one(
    tmp_path: Path,
) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store) -> None:
        r = await client.get("/")
        assert r.status_code == 307
        assert r.headers["location"] == "/gui/"
        r = await client.get("/gui")
        assert r.status_code == 307

        r = await client.get("/gui/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert '<script type="module" src="app.js">' in r.text

        for name, content_type in (
            ("app.js", "text/javascript; charset=utf-8"),
            ("api.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("icon.svg", "image/svg+xml"),
        ):
            r = await client.get(f"/gui/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"] == content_type
            assert r.headers["x-content-type-options"] == "nosniff"
            etag = r.headers["etag"]
            again = await client.get(f"/gui/{name}", headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b""

        head = await client.head("/gui/app.js")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 1000

        # no token: the files yes, the data no
        assert (await client.get("/api/v1/Mesh")).status_code == 401
        # a path that is not one of the files is not opened by the GUI's prefix
        assert (await client.get("/gui/secret.txt")).status_code == 401
        assert (await client.get("/gui/secret.txt", headers=AUTH)).status_code == 404

    with_api(tmp_path, scenario)
