"""Client and server certificates that mutual TLS must refuse, and the reason it counts.

A strict inbound has two gates. OpenSSL verifies the client's chain to the trust
bundle during the handshake (dates, signatures); what it lets through, meshling
checks against the SPIFFE X.509-SVID rules (one URI SAN, a SPIFFE ID in the bundle's
trust domain, a leaf that is not a CA). Each case below names which gate stops it and
the reason label the refusal is counted under. The bad certificates are built by hand,
signed with the mesh root's key, since the mesh CA would never issue them.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

from .conftest import Nginx, ProxyProcess, free_port, http_get, http_snapshot, wait_for

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Root:
    """A mesh root whose key the test holds, to sign what the mesh CA never would."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, mesh: str) -> Root:
        # meshling's root profile: P-256, cA with pathLen 0, the trust domain's ID. Two
        # roots of one mesh share a subject name, so an impostor root looks like ours.
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshling"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshling root CA {mesh}"),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 10 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{mesh}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def leaf(
        self,
        names: list[x509.GeneralName],
        *,
        ca: bool = False,
        not_before: dt.datetime = NOW - HOUR,
        not_after: dt.datetime = NOW + DAY,
    ) -> tuple[bytes, bytes]:
        """A PEM certificate and key: the mesh CA's leaf profile, with the given SANs and dates."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _pem(key)


def _key_usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


@dataclass
class Mesh:
    """Our root, written out as a trust bundle, and a directory for certificate files."""

    root: Root
    other_root: Root
    directory: Path

    @property
    def bundle(self) -> str:
        path = self.directory / "bundle.crt"
        if not path.exists():
            path.write_bytes(self.root.pem)
        return str(path)

    def write(self, name: str, certificate: bytes, key: bytes) -> tuple[str, str]:
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_path.write_bytes(certificate)
        key_path.write_bytes(key)
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def issue(self, service: str) -> dict[str, str]:
        """A proper SVID from meshling's CA on our root, as a snapshot `tls` block."""
        ca = CertificateAuthority(self.root.certificate, self.root.key)
        key, csr = make_key_and_csr(SpiffeId.for_service(ca.mesh, service))
        certificate, key_path = self.write(service, ca.issue(csr, service), key)
        return {"certificate": certificate, "key": key_path, "trust_bundle": self.bundle}


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(Root.create("default"), Root.create("default"), tmp_path)


def metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def failure_lines(text: str, direction: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(f'meshling_tls_handshake_failures_total{{direction="{direction}"')
    ]


def assert_no_answer(port: int, context: ssl.SSLContext) -> None:
    """A TLS client with this context sends a request and gets nothing back.

    With TLS 1.3 the client's handshake is done before the server has judged the
    client's certificate, so the refusal shows on the first read: the connection ends.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                assert tls.version() == "TLSv1.3"
                tls.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = tls.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return
    assert answer == b"", f"an HTTP answer to a refused certificate: {answer!r}"


# Each bad client certificate: how it is made, and the reason the strict inbound counts
# its refusal under: `certificate_verify_failed` when OpenSSL refused the chain during
# the handshake, the SVID reason code when meshling refused it after.
Builder = Callable[[Mesh], tuple[bytes, bytes]]


@dataclass(frozen=True)
class BadClient:
    build: Builder
    reason: str


BAD_CLIENTS: dict[str, BadClient] = {
    # OpenSSL: X509_V_ERR_CERT_HAS_EXPIRED
    "expired": BadClient(
        lambda m: m.root.leaf(
            [uri("spiffe://default/web")], not_before=NOW - 2 * DAY, not_after=NOW - DAY
        ),
        "certificate_verify_failed",
    ),
    # OpenSSL: X509_V_ERR_CERT_NOT_YET_VALID
    "not_yet_valid": BadClient(
        lambda m: m.root.leaf(
            [uri("spiffe://default/web")], not_before=NOW + DAY, not_after=NOW + 2 * DAY
        ),
        "certificate_verify_failed",
    ),
    # OpenSSL: the issuer is named like our root, but a root of its own signed it
    "unknown_root": BadClient(
        lambda m: m.other_root.leaf([uri("spiffe://default/web")]),
        "certificate_verify_failed",
    ),
    # meshling: OpenSSL reads no URI SAN rules
    "two_uri_sans": BadClient(
        lambda m: m.root.leaf([uri("spiffe://default/web"), uri("spiffe://default/admin")]),
        "uri_san_count",
    ),
    "dns_and_email_sans_only": BadClient(
        lambda m: m.root.leaf([x509.DNSName("web.default"), x509.RFC822Name("web@default")]),
        "uri_san_count",
    ),
    # a truncating reader would see spiffe://default/web
    "nul_in_uri_san": BadClient(
        lambda m: m.root.leaf([uri("spiffe://default/web\x00/admin")]),
        "not_spiffe",
    ),
    # OpenSSL accepts a CA certificate as the end entity; the SVID rules do not
    "leaf_is_ca": BadClient(
        lambda m: m.root.leaf([uri("spiffe://default/web")], ca=True),
        "leaf_is_ca",
    ),
    # signed by our root, so OpenSSL's chain holds; the trust domain is not ours
    "other_trust_domain": BadClient(
        lambda m: m.root.leaf([uri("spiffe://other/web")]),
        "wrong_trust_domain",
    ),
}


def strict_inbound(start_proxy, nginx: Nginx, mesh: Mesh) -> ProxyProcess:
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["listeners"][0]["filter_chains"][0]["tls"] = {**mesh.issue("api"), "mode": "strict"}
    return start_proxy(doc)


def client_context(mesh: Mesh, certificate: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(mesh.bundle)
    context.load_cert_chain(*mesh.write("client", certificate, key))
    return context


def test_strict_inbound_serves_a_hand_built_client_certificate(
    start_proxy, nginx: Nginx, mesh: Mesh
) -> None:
    # The control for the cases below: the hand-built profile itself is a valid SVID, so
    # each refusal comes from the one defect a case adds.
    api = strict_inbound(start_proxy, nginx, mesh)
    context = client_context(mesh, *mesh.root.leaf([uri("spiffe://default/web")]))
    with (
        socket.create_connection(("127.0.0.1", api.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /echo-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        for _ in range(100):
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"id=spiffe://default/web " in answer


@pytest.mark.parametrize("case", list(BAD_CLIENTS))
def test_strict_inbound_refuses_bad_client_certificate(
    case: str, start_proxy, nginx: Nginx, mesh: Mesh
) -> None:
    bad = BAD_CLIENTS[case]
    api = strict_inbound(start_proxy, nginx, mesh)

    assert_no_answer(api.port, client_context(mesh, *bad.build(mesh)))
    counted = (
        'meshling_tls_handshake_failures_total{direction="downstream",name="in",'
        f'reason="{bad.reason}"}}'
    )
    wait_for(lambda: metric(api.metrics(), counted) == 1, 5, f"refusal counted as {bad.reason}")
    text = api.metrics()
    assert failure_lines(text, "downstream") == [counted + " 1.0"]
    assert metric(text, 'meshling_tls_handshakes_total{direction="downstream"') == 0
    assert metric(text, "meshling_http_requests_total") == 0


@pytest.fixture
def expired_server(mesh: Mesh) -> Iterator[int]:
    """A TLS server on 127.0.0.1 whose SVID for spiffe://default/api expired yesterday."""
    certificate, key = mesh.write(
        "expired-api",
        *mesh.root.leaf(
            [uri("spiffe://default/api")], not_before=NOW - 2 * DAY, not_after=NOW - DAY
        ),
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    context.load_verify_locations(mesh.bundle)
    context.verify_mode = ssl.CERT_REQUIRED
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                except (ssl.SSLError, OSError):
                    pass  # the proxy refuses the certificate: the expected outcome

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    server.close()


def test_outbound_refuses_a_server_with_an_expired_certificate(
    start_proxy, mesh: Mesh, expired_server: int
) -> None:
    doc: dict[str, Any] = http_snapshot(free_port(), free_port(), [expired_server])
    doc["clusters"][0]["tls"] = {**mesh.issue("web"), "identity": "spiffe://default/api"}
    web = start_proxy(doc)
    status, body = http_get(web.url + "/hello")
    assert status == 502 and body == b"upstream connect failure\n"
    text = web.metrics()
    assert failure_lines(text, "upstream") == [
        'meshling_tls_handshake_failures_total{direction="upstream",name="up",'
        'reason="certificate_verify_failed"} 1.0'
    ]
    assert metric(text, 'meshling_upstream_connect_failures_total{cluster="up",reason="tls"}') == 1
    assert metric(text, 'meshling_tls_handshakes_total{direction="upstream"') == 0
