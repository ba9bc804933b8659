"""`meshling ca` end to end: files made by the real command carry a real mutual TLS handshake.

The CLI runs as a process (`python -m meshling.identity.cli`), then a server and a
client `ssl.SSLContext` built from the files it wrote shake hands over 127.0.0.1 with
certificates required both ways, and each side reads the other's SPIFFE ID with
`peer_identity_from_ssl_object`.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshling.identity import Bundle, SpiffeId, SvidError, peer_identity_from_ssl_object

pytestmark = pytest.mark.integration

TIMEOUT = 5.0


def ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshling.identity.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class Mesh:
    ca_dir: Path
    out: Path

    def context(
        self, service: str | None, *, server: bool, version: ssl.TLSVersion
    ) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = version
        # identity is the SPIFFE ID, checked after the handshake, not a host name
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=self.out / "bundle.crt")
        if service is not None:
            context.load_cert_chain(self.out / f"{service}.crt", self.out / f"{service}.key")
        return context

    @property
    def bundle(self) -> Bundle:
        return Bundle.from_pem((self.out / "bundle.crt").read_bytes())


def make_mesh(tmp_path: Path, mesh: str, *services: str) -> Mesh:
    ca_dir, out = tmp_path / mesh / "ca", tmp_path / mesh / "certs"
    result = ca("init", "--mesh", mesh, "--dir", str(ca_dir))
    assert result.returncode == 0, result.stderr
    for service in services:
        result = ca("issue", "--dir", str(ca_dir), "--service", service, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE((out / f"{service}.key").stat().st_mode) == 0o600
    return Mesh(ca_dir, out)


@dataclass
class Side:
    identity: SpiffeId | None = None
    error: Exception | None = None
    version: str | None = None
    received: bytes = b""


def connect(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    server_bundle: Bundle,
    client_bundle: Bundle,
    expected_server: SpiffeId | None = None,
) -> tuple[Side, Side]:
    """One TLS connection on 127.0.0.1; what each side saw of the other."""
    server_side, client_side = Side(), Side()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            raw, _ = listener.accept()
            raw.settimeout(TIMEOUT)
            with server_context.wrap_socket(raw, server_side=True) as tls:
                server_side.version = tls.version()
                now = dt.datetime.now(dt.UTC)
                server_side.identity = peer_identity_from_ssl_object(tls, server_bundle, now=now)
                tls.sendall(b"hello " + str(server_side.identity).encode())
        except (OSError, SvidError) as exc:
            server_side.error = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            client_context.wrap_socket(raw) as tls,
        ):
            client_side.version = tls.version()
            now = dt.datetime.now(dt.UTC)
            client_side.identity = peer_identity_from_ssl_object(
                tls, client_bundle, now=now, expected=expected_server
            )
            client_side.received = tls.recv(1024)
    except (OSError, SvidError) as exc:
        client_side.error = exc
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    return server_side, client_side


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_ca_cli_certificates_carry_mutual_tls(tmp_path: Path, version: ssl.TLSVersion) -> None:
    mesh = make_mesh(tmp_path, "prod", "web", "api")
    server, client = connect(
        mesh.context("web", server=True, version=version),
        mesh.context("api", server=False, version=version),
        mesh.bundle,
        mesh.bundle,
        expected_server=SpiffeId.for_service("prod", "web"),
    )
    assert server.error is None and client.error is None
    assert (
        server.version
        == client.version
        == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    )
    assert server.identity == SpiffeId.parse("spiffe://prod/api")
    assert client.identity == SpiffeId.parse("spiffe://prod/web")
    assert client.received == b"hello spiffe://prod/api"


def test_ca_cli_client_refuses_an_unexpected_server(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path, "prod", "web", "api")
    _, client = connect(
        mesh.context("web", server=True, version=ssl.TLSVersion.TLSv1_3),
        mesh.context("api", server=False, version=ssl.TLSVersion.TLSv1_3),
        mesh.bundle,
        mesh.bundle,
        expected_server=SpiffeId.for_service("prod", "db"),
    )
    assert isinstance(client.error, SvidError)
    assert client.error.reason == "unexpected_identity"


def test_ca_cli_server_refuses_a_client_of_another_mesh(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path, "prod", "web")
    stranger = make_mesh(tmp_path, "other", "api")
    # the stranger trusts prod's root, so only the server's check can stop it
    client_context = stranger.context("api", server=False, version=ssl.TLSVersion.TLSv1_2)
    client_context.load_verify_locations(cafile=mesh.out / "bundle.crt")
    server, _ = connect(
        mesh.context("web", server=True, version=ssl.TLSVersion.TLSv1_2),
        client_context,
        mesh.bundle,
        mesh.bundle,
    )
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert server.identity is None


def test_ca_cli_server_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path, "prod", "web")
    server, _ = connect(
        mesh.context("web", server=True, version=ssl.TLSVersion.TLSv1_2),
        mesh.context(None, server=False, version=ssl.TLSVersion.TLSv1_2),
        mesh.bundle,
        mesh.bundle,
    )
    assert isinstance(server.error, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(server.error)
    assert server.identity is None


def test_ca_cli_show_and_errors_as_a_process(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path, "prod", "web")
    shown = ca("show", str(mesh.out / "web.crt"))
    assert shown.returncode == 0
    assert "spiffe://prod/web" in shown.stdout
    again = ca("init", "--mesh", "prod", "--dir", str(mesh.ca_dir))
    assert again.returncode == 2
    assert str(mesh.ca_dir / "ca.crt") in again.stderr
    missing = ca("show", str(tmp_path / "nope.crt"))
    assert missing.returncode == 2
    assert f"{tmp_path / 'nope.crt'}: no such file" in missing.stderr
