"""Dataplane tokens and the CA over the control plane's API, in-process through ASGI over a
real SQLite store."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshling.controlplane.api import create_app
from meshling.controlplane.api.ca import REVOCATION_KIND, load_or_create_ca
from meshling.controlplane.store import Store, open_store
from meshling.controlplane.tokens import TokenSigner
from meshling.identity import Bundle, CertificateAuthority, SpiffeId, make_key_and_csr, verify_svid

pytestmark = pytest.mark.integration

ADMIN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
KEY = b"s" * 32


class CountingCa(CertificateAuthority):
    """A CA that counts the leaves it issues."""

    issued = 0

    def issue(self, csr_pem: bytes, service: str, **kw: Any) -> bytes:
        leaf = super().issue(csr_pem, service, **kw)
        type(self).issued += 1
        return leaf


Scenario = Callable[[httpx.AsyncClient, Store, CertificateAuthority], Awaitable[None]]


def with_api(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        base = CertificateAuthority.create("default")
        ca = CountingCa(base.root, base._key)
        CountingCa.issued = 0
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            app = create_app(store, ADMIN, ca=ca, signer=TokenSigner(KEY))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                await scenario(client, store, ca)
        finally:
            await store.close()

    asyncio.run(main())


async def dataplane_token(client: httpx.AsyncClient, service: str, ttl: str = "24h") -> str:
    r = await client.post(
        "/api/v1/tokens/dataplane",
        json={"mesh": "default", "service": service, "ttl": ttl},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) >= {"token", "jti", "expires"}
    token: str = body["token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csr_for(uri: str | None, common_name: str | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM).decode()


def test_sign_for_the_tokens_service(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        token = await dataplane_token(client, "api")
        _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
        r = await client.post("/api/v1/ca/sign", json={"csr": csr.decode()}, headers=bearer(token))
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {"certificate", "bundle", "expires"}
        leaf = x509.load_pem_x509_certificate(body["certificate"].encode())
        bundle = Bundle.from_pem(body["bundle"].encode())
        identity = verify_svid(
            [leaf.public_bytes(Encoding.DER)], bundle, now=dt.datetime.now(dt.UTC)
        )
        assert str(identity) == "spiffe://default/api"
        assert body["expires"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

        # a CSR naming no identity gets the token's
        r = await client.post("/api/v1/ca/sign", json={"csr": csr_for(None)}, headers=bearer(token))
        assert r.status_code == 200, r.text
        # nor is a common name of the service or its SPIFFE ID a problem
        r = await client.post(
            "/api/v1/ca/sign", json={"csr": csr_for(None, "api")}, headers=bearer(token)
        )
        assert r.status_code == 200, r.text
        assert CountingCa.issued == 3

    with_api(tmp_path, scenario)


def test_csr_for_another_service_is_refused(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        token = await dataplane_token(client, "api")
        _, csr = make_key_and_csr(SpiffeId.for_service("default", "web"))
        r = await client.post("/api/v1/ca/sign", json={"csr": csr.decode()}, headers=bearer(token))
        assert r.status_code == 403, r.text
        assert r.json()["error"] == (
            "csr identity spiffe://default/web does not match the token's service api"
        )
        for other in (
            csr_for("spiffe://other/api"),
            csr_for(None, "web"),
            csr_for("spiffe://default/api", "spiffe://default/web"),
        ):
            r = await client.post("/api/v1/ca/sign", json={"csr": other}, headers=bearer(token))
            assert r.status_code == 403, r.text
        # an unreadable CSR is a 400
        r = await client.post("/api/v1/ca/sign", json={"csr": "nonsense"}, headers=bearer(token))
        assert r.status_code == 400, r.text
        assert r.json()["reason"] == "bad_csr"
        assert CountingCa.issued == 0

    with_api(tmp_path, scenario)


def test_expired_revoked_and_malformed_tokens(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
        body = {"csr": csr.decode()}
        # issued with the server's key two days ago, for a day
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        expired = TokenSigner(KEY).issue("default", "api", dt.timedelta(days=1), past)
        r = await client.post("/api/v1/ca/sign", json=body, headers=bearer(expired))
        assert r.status_code == 401, r.text
        assert r.json()["reason"] == "expired"
        assert "expired" in r.json()["error"]

        token = await dataplane_token(client, "api")
        jti = TokenSigner(KEY).verify(token, dt.datetime.now(dt.UTC)).jti
        r = await client.post("/api/v1/tokens/revoke", json={"jti": jti}, headers=AUTH)
        assert r.status_code == 204, r.text
        revocation = await store.get(REVOCATION_KIND, "default", jti)
        assert revocation.spec["jti"] == jti
        # again: still revoked, no error
        r = await client.post("/api/v1/tokens/revoke", json={"jti": jti}, headers=AUTH)
        assert r.status_code == 204, r.text
        r = await client.post("/api/v1/ca/sign", json=body, headers=bearer(token))
        assert r.status_code == 401, r.text
        assert r.json()["reason"] == "revoked"

        # revoking by the token itself
        token = await dataplane_token(client, "api")
        r = await client.post("/api/v1/tokens/revoke", json={"token": token}, headers=AUTH)
        assert r.status_code == 204, r.text
        r = await client.post("/api/v1/ca/sign", json=body, headers=bearer(token))
        assert r.json()["reason"] == "revoked"

        forged = TokenSigner(b"x" * 32).issue("default", "api", dt.timedelta(hours=1), past)
        r = await client.post("/api/v1/ca/sign", json=body, headers=bearer(forged))
        assert r.status_code == 401
        assert r.json()["reason"] == "bad_signature"
        for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic abc"}):
            r = await client.post("/api/v1/ca/sign", json=body, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["reason"] == "malformed"
        r = await client.post("/api/v1/tokens/revoke", json={"jti": "nope"}, headers=AUTH)
        assert r.status_code == 400
        assert CountingCa.issued == 0

    with_api(tmp_path, scenario)


def test_admin_and_dataplane_tokens_do_not_mix(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
        r = await client.post("/api/v1/ca/sign", json={"csr": csr.decode()}, headers=AUTH)
        assert r.status_code == 401, r.text
        assert r.json()["reason"] == "malformed"

        token = await dataplane_token(client, "api")
        for method, path, json_body in (
            ("GET", "/api/v1/Dataplane", None),
            ("POST", "/api/v1/tokens/dataplane", {"service": "web"}),
            ("POST", "/api/v1/tokens/revoke", {"token": token}),
        ):
            r = await client.request(method, path, json=json_body, headers=bearer(token))
            assert r.status_code == 401, (path, r.text)
        r = await client.post("/api/v1/tokens/dataplane", json={"service": "web"})
        assert r.status_code == 401
        assert CountingCa.issued == 0

    with_api(tmp_path, scenario)


def test_token_issue_bad_input(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        for body, field in (
            ({}, "service"),
            ({"service": "a/b"}, "service"),
            ({"service": "api", "ttl": "soon"}, "ttl"),
            ({"service": "api", "ttl": 5}, "ttl"),
        ):
            r = await client.post("/api/v1/tokens/dataplane", json=body, headers=AUTH)
            assert r.status_code == 400, r.text
            assert r.json()["field"] == field
        # a token for another mesh is refused by this mesh's CA
        r = await client.post(
            "/api/v1/tokens/dataplane", json={"mesh": "other", "service": "api"}, headers=AUTH
        )
        assert r.status_code == 201
        _, csr = make_key_and_csr(SpiffeId.for_service("other", "api"))
        r = await client.post(
            "/api/v1/ca/sign", json={"csr": csr.decode()}, headers=bearer(r.json()["token"])
        )
        assert r.status_code == 403, r.text

    with_api(tmp_path, scenario)


def test_bundle_is_open(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, store: Store, ca: CertificateAuthority) -> None:
        r = await client.get("/api/v1/ca/bundle")
        assert r.status_code == 200
        assert r.content == ca.bundle.to_pem()
        assert Bundle.from_pem(r.content).trust_domain == "default"

    with_api(tmp_path, scenario)


def test_without_a_ca_the_routes_are_not_there(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(str(tmp_path / "cp.db"))
        try:
            transport = httpx.ASGITransport(app=create_app(store, ADMIN))
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                r = await client.get("/api/v1/ca/bundle", headers=AUTH)
                assert r.status_code == 404
                r = await client.post("/api/v1/tokens/dataplane", json={}, headers=AUTH)
                assert r.status_code in (404, 405)
        finally:
            await store.close()

    asyncio.run(main())


def test_load_or_create_ca(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = load_or_create_ca(directory, "default")
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    again = load_or_create_ca(directory, "default")
    assert again.root == first.root
    with pytest.raises(ValueError, match="mesh"):
        load_or_create_ca(directory, "other")


def test_api_ca_routes_are_in_the_openapi_document() -> None:
    from meshling.controlplane.api.openapi import openapi_document

    document = openapi_document(["Mesh"])
    for path in ("/api/v1/tokens/dataplane", "/api/v1/tokens/revoke", "/api/v1/ca/sign"):
        assert "post" in document["paths"][path], path
    assert document["paths"]["/api/v1/ca/sign"]["post"]["security"] == [{"dataplaneToken": []}]
    assert document["paths"]["/api/v1/ca/bundle"]["get"]["security"] == []


def test_api_status_and_stream_are_in_the_openapi_document() -> None:
    from meshling.controlplane.api.openapi import openapi_document

    document = openapi_document(["Mesh"])
    assert "get" in document["paths"]["/api/v1/status/dataplanes"]
    assert "get" in document["paths"]["/api/v1/status/dataplanes/{mesh}/{name}"]
    assert document["paths"]["/api/v1/stream"]["get"]["security"] == [{"dataplaneToken": []}]
    assert "DataplaneStatus" in document["components"]["schemas"]
