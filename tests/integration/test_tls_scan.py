"""A strict mTLS inbound as a third-party scanner sees it: sslyze's verdict on protocols and suites.

sslyze speaks every protocol from SSL 2.0 up through its own OpenSSL builds, so what
it reports accepted is what the proxy accepts on the wire, not what Python's `ssl`
module is willing to offer. It runs offline from its own virtualenv (its pin on
`cryptography` is older than meshling's): `sslyze` on PATH, or `.venv-sslyze/` at the
repository root.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

from .conftest import ProxyProcess, free_port, http_snapshot

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# TLS 1.2 suites sslyze must find and no other: forward secrecy (ECDHE) and AEAD, on
# the ECDSA key every mesh certificate has.
TLS12_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
}
TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
}
WEAK_MARKERS = ("CBC", "RC4", "3DES", "DES_", "NULL", "EXPORT", "anon", "MD5")


def sslyze_binary() -> str:
    found = shutil.which("sslyze") or str(REPO / ".venv-sslyze" / "bin" / "sslyze")
    if not Path(found).exists():
        pytest.fail(
            "sslyze is not installed: python3 -m venv .venv-sslyze && "
            ".venv-sslyze/bin/pip install 'sslyze==6.3.1'"
        )
    return found


@dataclass
class Strict:
    proxy: ProxyProcess
    client_certificate: str
    client_key: str


@pytest.fixture
def strict_inbound(start_proxy, tmp_path: Path) -> Iterator[Strict]:
    """A strict inbound with an SVID from a fresh mesh CA, and a client SVID for the scanner."""
    ca = CertificateAuthority.create("default")
    (tmp_path / "bundle.crt").write_bytes(ca.root_pem)
    paths = {}
    for service in ("api", "scanner"):
        key, csr = make_key_and_csr(SpiffeId.for_service("default", service))
        (tmp_path / f"{service}.crt").write_bytes(ca.issue(csr, service, ttl=dt.timedelta(hours=1)))
        (tmp_path / f"{service}.key").write_bytes(key)
        (tmp_path / f"{service}.key").chmod(0o600)
        paths[service] = (str(tmp_path / f"{service}.crt"), str(tmp_path / f"{service}.key"))
    # no request goes through: the scanner only handshakes, so the endpoint need not exist
    doc = http_snapshot(free_port(), free_port(), [free_port()])
    doc["listeners"][0]["filter_chains"][0]["tls"] = {
        "certificate": paths["api"][0],
        "key": paths["api"][1],
        "trust_bundle": str(tmp_path / "bundle.crt"),
        "mode": "strict",
    }
    yield Strict(start_proxy(doc), *paths["scanner"])


def scan(port: int, out: Path, *options: str) -> dict[str, Any]:
    """sslyze's JSON result for 127.0.0.1:port."""
    subprocess.run(
        [sslyze_binary(), "--quiet", f"--json_out={out}", *options, f"127.0.0.1:{port}"],
        check=True,
        timeout=60,
        stdout=subprocess.DEVNULL,
    )
    [result] = json.loads(out.read_text())["server_scan_results"]
    return dict(result)


def completed(result: dict[str, Any], name: str) -> dict[str, Any]:
    """One scan command's result, which must have run to the end."""
    command = result["scan_result"][name]
    assert command["status"] == "COMPLETED", (name, command["error_reason"], command["error_trace"])
    return dict(command["result"])


def accepted(result: dict[str, Any], name: str) -> set[str]:
    return {s["cipher_suite"]["name"] for s in completed(result, name)["accepted_cipher_suites"]}


def test_tls_scan_strict_inbound_accepts_only_modern_tls(
    strict_inbound: Strict, tmp_path: Path
) -> None:
    result = scan(
        strict_inbound.proxy.port,
        tmp_path / "scan.json",
        # the client certificate gets the scanner past the handshake, so every suite
        # the server accepts is seen as accepted
        f"--cert={strict_inbound.client_certificate}",
        f"--key={strict_inbound.client_key}",
        "--sslv2",
        "--sslv3",
        "--tlsv1",
        "--tlsv1_1",
        "--tlsv1_2",
        "--tlsv1_3",
        "--compression",
        "--reneg",
        "--heartbleed",
        "--openssl_ccs",
    )
    assert result["connectivity_status"] == "COMPLETED", result["connectivity_error_trace"]
    assert result["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"

    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        suites = completed(result, f"{old}_cipher_suites")
        assert not suites["is_tls_version_supported"], old
        assert suites["accepted_cipher_suites"] == [], old

    tls12 = completed(result, "tls_1_2_cipher_suites")
    assert tls12["is_tls_version_supported"]
    names = accepted(result, "tls_1_2_cipher_suites")
    for name in names:
        assert "_ECDHE_" in name and name.endswith(
            ("_GCM_SHA256", "_GCM_SHA384", "_POLY1305_SHA256")
        )
        assert not any(weak in name for weak in WEAK_MARKERS), name
    assert not any(s["cipher_suite"]["is_anonymous"] for s in tls12["accepted_cipher_suites"])
    assert names == TLS12_SUITES

    assert completed(result, "tls_1_3_cipher_suites")["is_tls_version_supported"]
    tls13 = accepted(result, "tls_1_3_cipher_suites")
    assert tls13 and tls13 <= TLS13_SUITES

    assert completed(result, "tls_compression") == {"supports_compression": False}
    renegotiation = completed(result, "session_renegotiation")
    assert renegotiation["client_renegotiations_success_count"] == 0
    assert not renegotiation["is_vulnerable_to_client_renegotiation_dos"]
    assert not completed(result, "heartbleed")["is_vulnerable_to_heartbleed"]
    assert not completed(result, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"]


def test_tls_scan_reports_client_certificate_required(
    strict_inbound: Strict, tmp_path: Path
) -> None:
    result = scan(strict_inbound.proxy.port, tmp_path / "scan.json", "--tlsv1_3")
    assert result["connectivity_status"] == "COMPLETED", result["connectivity_error_trace"]
    assert result["connectivity_result"]["client_auth_requirement"] == "REQUIRED"
    assert (
        'meshling_tls_handshake_failures_total{direction="downstream",name="in",'
        'reason="peer_certificate"}'
    ) in strict_inbound.proxy.metrics()
