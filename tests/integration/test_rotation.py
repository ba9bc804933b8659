"""Certificate rotation under load: leaves every ~1.5 s, then a root, with zero failures."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from pathlib import Path

import pytest

from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

from .conftest import Nginx, http_get, wait_for
from .test_lifecycle import Load
from .test_mtls import Files, inbound, metric, outbound

pytestmark = pytest.mark.integration


def replace(path: str, data: bytes) -> None:
    """Write a file the way a rotator should: a new file renamed over the old one."""
    tmp = Path(path + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_leaf(files: Files, ca: CertificateAuthority, service: str) -> bytes:
    key, csr = make_key_and_csr(SpiffeId.for_service("default", service))
    cert = ca.issue(csr, service, ttl=dt.timedelta(hours=1))
    replace(files.key, key)
    Path(files.key).chmod(0o600)
    replace(files.certificate, cert)
    return cert


def make_files(root: Path, service: str, ca: CertificateAuthority) -> Files:
    d = root / service
    d.mkdir()
    files = Files(str(d / "tls.crt"), str(d / "tls.key"), str(d / "bundle.crt"))
    replace(files.trust_bundle, ca.root_pem)
    write_leaf(files, ca, service)
    return files


def served_certificate(port: int, client: Files) -> bytes:
    """The certificate the server presents to a new connection, as PEM."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(client.trust_bundle)
    context.load_cert_chain(client.certificate, client.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def serves(port: int, client: Files, cert: bytes) -> bool:
    try:
        return served_certificate(port, client) == cert
    except (ssl.SSLError, OSError):
        return False  # a handshake refused while the two sides' files change


def test_rotation_of_leaves_and_root_under_load_fails_nothing(
    start_proxy, nginx: Nginx, tmp_path: Path
) -> None:
    old = CertificateAuthority.create("default")
    api_files = make_files(tmp_path, "api", old)
    web_files = make_files(tmp_path, "web", old)
    api = start_proxy(inbound(nginx.port, api_files))
    web = start_proxy(outbound(api.port, web_files))
    assert http_get(web.url + "/hello")[0] == 200

    load = Load(web.port, clients=4, seconds=40)
    try:
        # Leaf rotation: both sides get new certificates and keys every ~1.5 s.
        for _ in range(5):
            time.sleep(1.5)
            write_leaf(api_files, old, "api")
            write_leaf(web_files, old, "web")
        # Root rotation: trust both roots, move the leaves to the new root, drop the old one.
        new = CertificateAuthority.create("default")
        for files in (api_files, web_files):
            replace(files.trust_bundle, old.root_pem + new.root_pem)
        time.sleep(2.5)
        api_cert = write_leaf(api_files, new, "api")
        write_leaf(web_files, new, "web")
        time.sleep(2.5)
        for files in (api_files, web_files):
            replace(files.trust_bundle, new.root_pem)
        # Changes that land within a tick of each other are picked up as one reload.
        wait_for(
            lambda: serves(api.port, web_files, api_cert),
            10,
            "new connections to get the new certificate from the new root",
        )
        time.sleep(1.5)
    finally:
        load.finish()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 200
    assert metric(api.metrics(), 'meshling_config_reloads_total{result="ok"}') >= 3
    assert metric(api.metrics(), 'meshling_config_reloads_total{result="rejected"}') == 0
    assert metric(web.metrics(), 'meshling_config_reloads_total{result="rejected"}') == 0
    assert http_get(web.url + "/hello")[0] == 200
