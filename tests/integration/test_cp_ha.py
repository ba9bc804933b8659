"""Two `meshling control-plane run` replicas on one PostgreSQL schema: what is applied on
one reaches streams on the other, status written by one is read through the other, they
sign with the same keys, the proxies of a replica that dies go offline on their own, and
a real proxy given both addresses fails over to the survivor without failing a request."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from meshling.configstream import Push
from meshling.controlplane.store.postgres import redact
from meshling.identity import Bundle, SpiffeId, make_key_and_csr, verify_svid

from .conftest import Nginx, http_get, wait_for
from .cp_mesh import start_ready, web_and_service
from .test_agent import metric
from .test_cp_stream import (
    ControlPlane,
    ProxyClient,
    dataplane,
    eventually,
    run,
    start_control_plane,
)
from .test_lifecycle import Load

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("MESHLING_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
OFFLINE_AFTER = "1.5"


async def _execute(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[ControlPlane, ControlPlane]]:
    schema = f"meshling_test_{uuid.uuid4().hex[:12]}"
    try:
        run(_execute("SELECT 1"))
    except Exception as e:
        pytest.fail(f"PostgreSQL is not reachable at {redact(PG_URL)}: {e}", pytrace=False)
    store = f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    args = ("--offline-after", OFFLINE_AFTER)
    a = start_control_plane(tmp_path, *args, store=store, name="a")
    b = None
    try:
        b = start_control_plane(tmp_path, *args, store=store, name="b")
        yield a, b
    finally:
        a.stop()
        if b is not None:
            b.stop()
        run(_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def test_cp_ha_a_change_on_one_replica_reaches_a_stream_on_the_other(
    replicas: tuple[ControlPlane, ControlPlane],
) -> None:
    a, b = replicas

    async def body() -> None:
        a.apply(
            {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": True}}}
        )
        # a token issued by A is good on B: one signing key
        from .test_cp_stream import TLS

        proxy = await ProxyClient.connect(b.ws, a.dataplane_token("api"))
        first = await proxy.hello(dataplane("api-1", "api"), tls=TLS)
        await proxy.ack(first)
        a.apply(
            {
                "kind": "TrafficPermission",
                "metadata": {"name": "web-to-api", "mesh": "default"},
                "spec": {
                    "destination": {"service": "api"},
                    "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
                },
            }
        )
        push = await proxy.receive()
        assert isinstance(push, Push) and push.version != first.version
        await proxy.ack(push)
        # B wrote the status; A reads it
        status = await eventually(
            lambda: (s := a.status()["api-1"])["applied"] == push.version and s,
            what="B's status through A",
        )
        assert status["online"] and status["replica"] == "b"
        # both answer with the same snapshot
        assert a.status("api-1")["snapshot"]["version"] == push.version
        await proxy.close()

    run(body())


def test_cp_ha_replicas_share_the_ca(replicas: tuple[ControlPlane, ControlPlane]) -> None:
    a, b = replicas
    token = b.dataplane_token("api")
    _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
    signed = []
    for replica in (a, b):
        r = httpx.post(
            replica.url + "/api/v1/ca/sign",
            json={"csr": csr.decode()},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        signed.append(r.json())
    assert signed[0]["bundle"] == signed[1]["bundle"]
    bundle = Bundle.from_pem(signed[0]["bundle"].encode())
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    for body in signed:
        leaf = x509.load_pem_x509_certificate(body["certificate"].encode())
        identity = verify_svid(
            [leaf.public_bytes(Encoding.DER)], bundle, now=dt.datetime.now(dt.UTC)
        )
        assert str(identity) == "spiffe://default/api"


def test_cp_ha_the_proxies_of_a_dead_replica_go_offline(
    replicas: tuple[ControlPlane, ControlPlane],
) -> None:
    a, b = replicas

    async def body() -> None:
        proxy = await ProxyClient.connect(b.ws, a.dataplane_token("api"))
        push = await proxy.hello(dataplane("api-1", "api"))
        await proxy.ack(push)
        await eventually(lambda: a.status()["api-1"]["online"], what="online through A")
        # stays online past the window while B beats
        await asyncio.sleep(float(OFFLINE_AFTER) + 0.5)
        assert a.status()["api-1"]["online"]
        b.stop(signal.SIGKILL)  # no goodbye: only the missing heartbeat tells
        status = await eventually(
            lambda: (s := a.status()["api-1"])["online"] is False and s,
            timeout=float(OFFLINE_AFTER) + 3,
            what="offline after B died",
        )
        assert status["connected"] is True  # B never said otherwise: the clock decided
        # the proxy reconnects to A, and is online again
        proxy = await ProxyClient.connect(a.ws, a.dataplane_token("api"))
        again = await proxy.hello(dataplane("api-1", "api"), applied=push.version)
        assert again.version == push.version
        status = await eventually(
            lambda: (s := a.status()["api-1"])["online"] and s, what="online through A again"
        )
        assert status["replica"] == "a" and status["applied"] == push.version
        await proxy.close()

    run(body())


class Addresses:
    """Both replicas as a proxy is given them, `--cp FIRST,SECOND`; tokens come from the
    first (either would do: they share the signing key)."""

    def __init__(self, first: ControlPlane, second: ControlPlane) -> None:
        self.first = first
        self.second = second

    @property
    def url(self) -> str:
        return f"{self.first.url},{self.second.url}"

    def call(self, method: str, path: str, body: Any) -> Any:
        r = httpx.request(method, self.first.url + path, json=body, headers=self.first.auth)
        assert r.is_success, r.text
        return r.json()


def web_to_api(action: str) -> dict[str, Any]:
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": "web-to-api", "mesh": "default"},
        "spec": {
            "destination": {"service": "api"},
            "rules": [{"action": action, "sources": [{"service": "web"}]}],
        },
    }


def test_cp_ha_a_proxy_fails_over_to_the_surviving_replica_without_a_failed_request(
    replicas: tuple[ControlPlane, ControlPlane], nginx: Nginx, tmp_path: Path
) -> None:
    a, b = replicas
    by_id = {"a": a, "b": b}
    a.apply(
        {
            "kind": "Mesh",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"enabled": True, "mode": "strict"}},
        }
    )
    # before api-1 registers: it selects nothing yet
    r = a.post("/api/v1/resources?allow_unmatched=true", web_to_api("allow"))
    assert r.status_code == 201, r.text
    # api-1 tries A first, web-1 B first: a replica's death moves only its own proxies
    api, web, outbound = web_and_service(
        tmp_path, Addresses(a, b), "api", nginx.port, web_cp=Addresses(b, a)
    )
    try:
        start_ready(api, web, timeout=30)
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{outbound}/hello")[0] == 200,
            30,
            "web -> api over mTLS",
        )
        wait_for(lambda: a.status()["api-1"]["applied"] is not None, 10, "api-1 applied")
        status = a.status()["api-1"]
        assert status["online"], status
        victim = by_id[status["replica"]]
        survivor = b if victim is a else a
        survivor_id = "b" if survivor is b else "a"
        applied = status["applied"]

        load = Load(outbound, clients=4, seconds=60, path="/hello")
        try:
            time.sleep(1)
            victim.stop(signal.SIGKILL)
            wait_for(
                lambda: (s := survivor.status()["api-1"])["online"] and s["replica"] == survivor_id,
                15,
                "api-1 online through the surviving replica",
            )
            assert metric(api.metrics(), "meshling_control_plane_connected") == 1
            wait_for(lambda: survivor.status()["web-1"]["online"], 15, "web-1 online")
            time.sleep(1)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        status = survivor.status("api-1")
        assert (status["replica"], status["applied"]) == (survivor_id, applied)
        assert f"config stream open to {survivor.url} (running {applied})" in api.logs()

        # a change applied through the survivor reaches the proxy and its traffic
        survivor.apply(web_to_api("deny"))
        wait_for(
            lambda: survivor.status()["api-1"]["applied"] not in (None, applied),
            10,
            "api-1 applies the deny",
        )
        config = json.loads(http_get(api.admin + "/config")[1])
        assert config["version"] == survivor.status()["api-1"]["applied"]
        # a connection of the old chain closes after its current response: the next is
        # a new connection, refused
        wait_for(lambda: http_get(f"http://127.0.0.1:{outbound}/hello")[0] == 403, 10, "web denied")
        assert metric(api.metrics(), "meshling_control_plane_connected") == 1
    finally:
        web.stop_all()
        api.stop_all()
