"""Two `meshling control-plane run` replicas on one PostgreSQL schema: what is applied on
one reaches streams on the other, status written by one is read through the other, they
sign with the same keys, and the proxies of a replica that dies go offline on their own."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from meshling.configstream import Push
from meshling.controlplane.store.postgres import redact
from meshling.identity import Bundle, SpiffeId, make_key_and_csr, verify_svid

from .test_cp_stream import (
    ControlPlane,
    ProxyClient,
    dataplane,
    eventually,
    run,
    start_control_plane,
)

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
