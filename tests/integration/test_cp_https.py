"""A control plane served over TLS (`--tls-cert`/`--tls-key`), as it is when proxies and
operators reach it over a network: the CLI and a real proxy verify its certificate against
a CA file (`--cp-ca-file`), get their tokens and certificates over https, and the config
stream runs over wss. A client that cannot verify the server gets nowhere.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import free_port, http_get, wait_for

pytestmark = pytest.mark.integration


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_server_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1: (ca.pem, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("meshling test operators CA"))
        .issuer_name(_name("meshling test operators CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("control plane"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cp.pem", directory / "cp.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def meshling(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshling", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(cwd / "config")},
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def https_cp(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A control plane on https://127.0.0.1:PORT (mTLS strict mesh): URL, CA file, token."""
    ca, cert, key = make_server_pki(tmp_path)
    port = free_port()
    log = tmp_path / "cp.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshling",
            "control-plane",
            "run",
            "--data-dir",
            str(tmp_path / "cp"),
            "--port",
            str(port),
            "--mesh-mtls",
            "strict",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            return f"API at {url}" in log.read_text()

        wait_for(listening, 20, "control plane on https")
        yield url, ca, tmp_path / "cp" / "admin.token"
    finally:
        stop(proc)


def test_cli_and_proxy_verify_an_https_control_plane(
    https_cp: tuple[str, Path, Path], tmp_path: Path
) -> None:
    url, ca, admin_token = https_cp
    admin = ("--cp", url, "--token-file", str(admin_token))

    # without the CA the server cannot be verified: nothing is sent
    refused = meshling("get", "Mesh", *admin, cwd=tmp_path)
    assert refused.returncode == 2, refused
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr

    listed = meshling("get", "Mesh", *admin, "--cp-ca-file", str(ca), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "default" in listed.stdout
    token = tmp_path / "api.token"
    issued = meshling(
        "token", "dataplane", "--service", "api", "-o", str(token), *admin,
        "--cp-ca-file", str(ca), cwd=tmp_path,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr

    admin_port = free_port()
    dataplane = tmp_path / "api-1.yaml"
    dataplane.write_text(
        yaml.safe_dump(
            {
                "kind": "Dataplane",
                "metadata": {"name": "api-1", "mesh": "default"},
                "spec": {
                    "service": "api",
                    "address": "127.0.0.1",
                    "inbounds": [{"port": free_port(), "service_port": free_port()}],
                    "admin": {"port": admin_port},
                },
            }
        )
    )

    def proxy(*extra: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"proxy{len(extra)}.log"
        return subprocess.Popen(
            [
                sys.executable, "-m", "meshling", "proxy", "run", "--cp", url,
                "--token-file", str(token), "--dataplane", str(dataplane),
                "--data-dir", str(tmp_path / f"data{len(extra)}"), *extra,
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    # a proxy that cannot verify the control plane gets no certificate and stays not ready
    blind = proxy()
    try:
        log = tmp_path / "proxy0.log"
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text(), 15, "refusal logged")
        with pytest.raises(OSError):
            http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)
    finally:
        stop(blind)

    # with the CA file: certificate over https, snapshot over wss, ready and online
    seeing = proxy("--cp-ca-file", str(ca))
    try:

        def ready() -> bool:
            assert seeing.poll() is None, (tmp_path / "proxy2.log").read_text()
            try:
                return http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)[0] == 200
            except OSError:
                return False

        wait_for(ready, 20, "proxy ready from the https control plane")
        inspected = meshling(
            "inspect", "dataplane", "api-1", "-o", "yaml", *admin, "--cp-ca-file", str(ca),
            cwd=tmp_path,
        )  # fmt: skip
        assert inspected.returncode == 0, inspected.stderr
        status = yaml.safe_load(inspected.stdout)
        assert status["online"] is True, status
        assert status["applied"] == status["pushed"], status
        assert status["certificate_expires"], status
    finally:
        stop(seeing)
