"""The proxy's own certificate expiring while it runs: real short-lived certificates from
the mesh CA, real proxies, and python's ssl and curl as clients. Nobody replaces the
certificate at first: the proxy must fail closed; then a valid one is written, and the
file watch must bring service back."""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from meshling.identity import CertificateAuthority
from meshling.proxy.tls import OwnCertificate
from meshling.telemetry.metrics import TlsStats

from .conftest import Nginx, http_get, wait_for
from .test_mtls import Files, Pki, assert_refused, inbound, metric, outbound
from .test_rotation import write_leaf

pytestmark = pytest.mark.integration

# long enough for two proxies to start and serve once, short enough to wait out
SHORT = dt.timedelta(seconds=6)


def not_after(files: Files) -> float:
    cert = x509.load_pem_x509_certificate(Path(files.certificate).read_bytes())
    return cert.not_valid_after_utc.timestamp()


def wait_until_expired(files: Files) -> None:
    # notAfter is the last valid second: the certificate is expired just after it
    delay = not_after(files) - time.time() + 1.2
    assert delay < SHORT.total_seconds() + 2, "the test started too slowly to see the expiry"
    time.sleep(max(delay, 0))


def client_context(files: Files) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the identity is a URI SAN, not a host name
    context.load_verify_locations(files.trust_bundle)
    context.load_cert_chain(files.certificate, files.key)
    return context


def tls_get(port: int, files: Files) -> bytes:
    """One request over a new mutual TLS connection; the response's first bytes."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client_context(files).wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return tls.recv(100)


def served(port: int, files: Files) -> bool:
    try:
        return tls_get(port, files).startswith(b"HTTP/1.1 200")
    except (ssl.SSLError, OSError):
        return False


def curl(port: int, files: Files) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--cert",
            files.certificate,
            "--key",
            files.key,
            # the server's certificate names no host: trust is checked by the proxies'
            # tests, here curl only needs to get through the handshake
            "--insecure",
            f"https://127.0.0.1:{port}/hello",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def get(port: int) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/hello")
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-meshling-error")
    finally:
        conn.close()


EXPIRY = 'meshling_tls_certificate_expiry_timestamp_seconds{direction="%s",name="%s"}'
EXPIRED = (
    'meshling_tls_handshake_failures_total{direction="%s",name="%s",'
    'reason="own_certificate_expired"}'
)


def test_cert_expiry_inbound_refuses_new_handshakes_until_renewed(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api_files = pki.issue("api", ttl=SHORT)
    web_files = pki.issue("web")
    api = start_proxy(inbound(nginx.port, api_files))
    assert metric(api.metrics(), EXPIRY % ("downstream", "in")) == not_after(api_files)
    assert tls_get(api.port, web_files).startswith(b"HTTP/1.1 200")
    assert curl(api.port, web_files).stdout == "hello from nginx\n"

    wait_until_expired(api_files)
    # python's ssl and curl: a new handshake is refused, with no answer
    assert_refused(api.port, client_context(web_files))
    refused = curl(api.port, web_files)
    assert refused.returncode != 0 and refused.stdout == "", refused
    assert metric(api.metrics(), EXPIRED % ("downstream", "in")) == 2
    assert "own certificate expired" in api.logs()
    assert api.logs().count("own certificate expired") == 1  # logged once, counted always

    # a valid certificate written over the expired one: the file watch reloads it
    renewed = write_leaf(api_files, pki.ca, "api")
    wait_for(lambda: served(api.port, web_files), 10, "service back after renewal")
    assert curl(api.port, web_files).stdout == "hello from nginx\n"
    text = api.metrics()
    assert (
        metric(text, EXPIRY % ("downstream", "in"))
        == x509.load_pem_x509_certificate(renewed).not_valid_after_utc.timestamp()
    )
    assert metric(text, 'meshling_config_reloads_total{result="ok"}') == 1
    # refused while the new files settled (one tick); none since the reload
    refusals = metric(text, EXPIRED % ("downstream", "in"))
    assert served(api.port, web_files)
    assert metric(api.metrics(), EXPIRED % ("downstream", "in")) == refusals


def test_cert_expiry_permissive_inbound_still_serves_plaintext(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api_files = pki.issue("api", ttl=SHORT)
    api = start_proxy(inbound(nginx.port, api_files, mode="permissive"))
    wait_until_expired(api_files)
    # plaintext needs no certificate of the proxy's (authz, if any, still decides)
    assert http_get(api.url + "/hello") == (200, b"hello from nginx\n")
    assert_refused(api.port, client_context(pki.issue("web")))
    assert metric(api.metrics(), EXPIRED % ("downstream", "in")) == 1


def test_cert_expiry_outbound_refuses_to_originate_until_renewed(
    start_proxy, nginx: Nginx, pki: Pki
) -> None:
    api = start_proxy(inbound(nginx.port, pki.issue("api")))
    web_files = pki.issue("web", ttl=SHORT)
    web = start_proxy(outbound(api.port, web_files))
    assert metric(web.metrics(), EXPIRY % ("upstream", "up")) == not_after(web_files)
    assert get(web.port) == (200, None)  # leaves a pooled connection to api
    handshakes = 'meshling_tls_handshakes_total{direction="downstream",name="in"}'
    assert metric(api.metrics(), handshakes) == 1

    wait_until_expired(web_files)
    # Neither a new connection nor the pooled one: the proxy answers itself, naming why.
    for _ in range(3):
        assert get(web.port) == (503, "own_certificate_expired")
    text = web.metrics()
    assert metric(text, EXPIRED % ("upstream", "up")) == 3
    assert metric(text, 'meshling_upstream_connect_failures_total{cluster="up",reason="tls"}') == 3
    assert metric(api.metrics(), handshakes) == 1
    requests = (
        'meshling_http_requests_total{cluster="up",listener="in",route="all",status_class="2xx"}'
    )
    assert metric(api.metrics(), requests) == 1  # nothing reached api since

    write_leaf(web_files, pki.ca, "web")
    wait_for(lambda: get(web.port)[0] == 200, 10, "service back after renewal")
    assert metric(web.metrics(), 'meshling_config_reloads_total{result="ok"}') == 1


def test_cert_expiry_own_certificate_check_is_a_comparison() -> None:
    ca = CertificateAuthority.create("default")
    stats = TlsStats()
    expiry = ca.root.not_valid_after_utc
    own = OwnCertificate(expiry, stats, "clusters[0].tls")
    assert stats.certificate_expiry == expiry.timestamp()
    # valid through its notAfter second, expired right after
    assert not own.expired(expiry.timestamp())
    assert own.expired(expiry.timestamp() + 0.001)
    own.refuse()
    own.refuse()
    assert stats.failures == {"own_certificate_expired": 2}
