"""Mutual TLS between proxies: two real proxy processes, certificates from the mesh CA."""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

from .conftest import Nginx, free_port, http_get, http_snapshot, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Files:
    certificate: str
    key: str
    trust_bundle: str

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {
            "certificate": self.certificate,
            "key": self.key,
            "trust_bundle": self.trust_bundle,
            **extra,
        }


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority.create("default")
        self.other = CertificateAuthority.create("other")

    def issue(
        self,
        service: str,
        *,
        ca: CertificateAuthority | None = None,
        ttl: dt.timedelta | None = None,
        now: dt.datetime | None = None,
    ) -> Files:
        ca = ca or self.ca
        key, csr = make_key_and_csr(SpiffeId.for_service(ca.mesh, service))
        cert = ca.issue(csr, service, ttl=ttl or dt.timedelta(hours=24), now=now)
        d = self.root / f"{ca.mesh}-{service}"
        d.mkdir(exist_ok=True)
        (d / "tls.crt").write_bytes(cert)
        (d / "tls.key").write_bytes(key)
        (d / "bundle.crt").write_bytes(ca.root_pem)
        (d / "tls.key").chmod(0o600)
        return Files(str(d / "tls.crt"), str(d / "tls.key"), str(d / "bundle.crt"))


def inbound(nginx_port: int, files: Files, mode: str = "strict") -> dict[str, Any]:
    doc = http_snapshot(free_port(), free_port(), [nginx_port])
    doc["listeners"][0]["filter_chains"][0]["tls"] = files.tls(mode=mode)
    return doc


def outbound(
    target_port: int, files: Files, identity: str = "spiffe://default/api"
) -> dict[str, Any]:
    doc = http_snapshot(free_port(), free_port(), [target_port])
    doc["clusters"][0]["tls"] = files.tls(identity=identity)
    return doc


def assert_refused(port: int, context: ssl.SSLContext) -> None:
    """A TLS client with this context gets no HTTP answer from the port."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError, OSError)),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        # With TLS 1.3 the server's refusal of the client certificate arrives on read.
        if not tls.recv(100):
            raise ConnectionResetError("closed without an answer")


def metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_mtls_two_proxies_carry_the_callers_identity(start_proxy, nginx: Nginx, pki: Pki) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api")))
    web = start_proxy(outbound(api.port, pki.issue("web")))
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    for _ in range(1000):
        conn.request("GET", "/echo-headers")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
    conn.close()
    assert b"id=spiffe://default/web " in body
    # one long-lived connection between the proxies: one handshake for 1000 requests
    handshakes = metric(
        web.metrics(), 'meshling_tls_handshakes_total{direction="upstream",name="up"}'
    )
    assert handshakes == 1
    assert (
        metric(api.metrics(), 'meshling_tls_handshakes_total{direction="downstream",name="in"}')
        == handshakes
    )
    assert (
        metric(
            api.metrics(),
            'meshling_tls_certificate_expiry_timestamp_seconds{direction="downstream",name="in"}',
        )
        > 0
    )


def test_mtls_client_cannot_forge_the_identity_header(start_proxy, nginx: Nginx, pki: Pki) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api")))
    web = start_proxy(outbound(api.port, pki.issue("web")))
    request = urllib.request.Request(
        web.url + "/echo-headers", headers={"X-Meshling-Peer-Identity": "spiffe://default/admin"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    assert b"id=spiffe://default/web " in body and b"admin" not in body


def test_mtls_strict_refuses_plaintext_and_clients_without_certificates(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api")))
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert b"HTTP/1.1" not in answer, "a strict port never answers plaintext"
    context = ssl.create_default_context(cafile=pki.issue("probe").trust_bundle)
    context.check_hostname = False
    assert_refused(api.port, context)
    wait_for(
        lambda: (
            metric(
                api.metrics(),
                'meshling_tls_handshake_failures_total{direction="downstream",name="in",reason="not_tls"}',
            )
            == 1
        ),
        5,
        "plaintext counted",
    )
    failures = [
        line
        for line in api.metrics().splitlines()
        if line.startswith("meshling_tls_handshake_failures_total")
    ]
    assert len(failures) == 2, failures
    assert metric(api.metrics(), "meshling_http_requests_total") == 0


def test_mtls_refuses_a_server_with_the_wrong_identity(start_proxy, nginx: Nginx, pki: Pki) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api")))
    web = start_proxy(outbound(api.port, pki.issue("web"), identity="spiffe://default/billing"))
    status, body = http_get(web.url + "/hello")
    assert status == 502 and body == b"upstream connect failure\n"
    text = web.metrics()
    assert (
        metric(
            text,
            'meshling_tls_handshake_failures_total{direction="upstream",name="up",reason="unexpected_identity"}',
        )
        == 1
    )
    assert metric(text, 'meshling_upstream_connect_failures_total{cluster="up",reason="tls"}') == 1


def test_mtls_refuses_a_client_of_another_trust_domain(start_proxy, nginx: Nginx, pki: Pki) -> None:
    api_files = pki.issue("api")
    api = start_proxy(inbound(nginx.port, api_files))
    # A client that trusts our root but whose certificate comes from the "other" mesh.
    foreign = pki.issue("web", ca=pki.other)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(api_files.trust_bundle)
    context.load_cert_chain(foreign.certificate, foreign.key)
    assert_refused(api.port, context)
    wait_for(
        lambda: (
            metric(
                api.metrics(),
                'meshling_tls_handshake_failures_total{direction="downstream",name="in",reason="certificate_verify_failed"}',
            )
            == 1
        ),
        5,
        "refusal counted",
    )
    assert metric(api.metrics(), "meshling_http_requests_total") == 0


def test_mtls_permissive_serves_plaintext_unauthenticated_and_mtls_with_identity(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api"), mode="permissive"))
    status, body = http_get(api.url + "/echo-headers")
    assert status == 200 and b"id= " in body
    web = start_proxy(outbound(api.port, pki.issue("web")))
    status, body = http_get(web.url + "/echo-headers")
    assert status == 200 and b"id=spiffe://default/web " in body
    text = api.metrics()
    assert (
        metric(text, 'meshling_tls_plaintext_connections_total{direction="downstream",name="in"}')
        >= 1
    )
    assert metric(text, 'meshling_tls_handshakes_total{direction="downstream",name="in"}') >= 1


def test_mtls_expired_own_certificate_fails_closed(
    start_proxy, nginx: Nginx, pki: Pki, tmp_path: Path
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    old_root = CertificateAuthority.create("default", now=past - dt.timedelta(days=1))
    expired = pki.issue("api", ca=old_root, ttl=dt.timedelta(hours=1), now=past)
    with pytest.raises(
        AssertionError, match=r"filter_chains\[0\]\.tls\.certificate: .* not a valid SVID"
    ):
        start_proxy(inbound(nginx.port, expired))
