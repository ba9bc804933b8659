"""TLS for the proxy: contexts built from a snapshot's files, and peers' SPIFFE identities.

A context is built once per snapshot, so TLS sessions and their cached
verification never outlive the trust configuration they were made under. Both
sides require a certificate; OpenSSL checks the chain to the trust bundle, and
the SPIFFE X.509-SVID rules (one URI SAN, trust domain, leaf not a CA, the
expected identity) are checked on top, since OpenSSL knows nothing of them.
The proxy's own certificate is checked by the same rules when the context is
built: with no valid certificate, the listener or cluster does not start.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from typing import Any

from meshling.identity import (
    Bundle,
    BundleError,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    peer_identity_from_ssl_object,
    verify_svid,
)
from meshling.snapshot.model import DownstreamTls, TlsFiles, UpstreamTls
from meshling.telemetry.metrics import TlsStats

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3's suites are all of that kind).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsConfigError(Exception):
    """A TLS file that cannot be used: which field of the snapshot, and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsConfigError(field, f"cannot read {path}: {exc.strerror}") from None


def _context(
    purpose: ssl._SSLMethod, files: TlsFiles, field: str, alpn: Sequence[str]
) -> tuple[ssl.SSLContext, Bundle, SpiffeId, dt.datetime]:
    bundle_pem = _read(files.trust_bundle, f"{field}.trust_bundle")
    try:
        bundle = Bundle.from_pem(bundle_pem)
    except BundleError as exc:
        raise TlsConfigError(f"{field}.trust_bundle", str(exc)) from None
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_REQUIRED
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        # Identity is the SPIFFE ID in the URI SAN, checked after the handshake; host
        # names play no part.
        ctx.check_hostname = False
    try:
        ctx.load_cert_chain(files.certificate, files.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise TlsConfigError(
            f"{field}.certificate", f"cannot use {files.certificate} with {files.key}: {reason}"
        ) from None
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise TlsConfigError(f"{field}.trust_bundle", f"not PEM certificates: {exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    own, expiry = _own_identity(files, bundle, f"{field}.certificate")
    return ctx, bundle, own, expiry


def _own_identity(files: TlsFiles, bundle: Bundle, field: str) -> tuple[SpiffeId, dt.datetime]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        chain = x509.load_pem_x509_certificates(_read(files.certificate, field))
    except ValueError as exc:
        raise TlsConfigError(field, f"{files.certificate}: not PEM certificates: {exc}") from None
    try:
        identity = verify_svid([c.public_bytes(Encoding.DER) for c in chain], bundle, now=_now())
    except SvidError as exc:
        # Fail closed: a proxy that cannot prove who it is serves nothing.
        raise TlsConfigError(field, f"{files.certificate} is not a valid SVID: {exc}") from None
    return identity, chain[0].not_valid_after_utc


class ServerTls:
    """An inbound filter chain's TLS: the context, and who the client is."""

    def __init__(self, config: DownstreamTls, field: str, stats: TlsStats) -> None:
        self.config = config
        self.context, self.bundle, self.identity, expiry = _context(
            ssl.PROTOCOL_TLS_SERVER, config.files, field, ("http/1.1",)
        )
        self.stats = stats
        stats.certificate_expiry = expiry.timestamp()

    def peer(self, transport: Any) -> tuple[bool, bytes | None]:
        """Whether to serve a new connection, and the client's verified SPIFFE ID.

        A plaintext connection (permissive mode) is served, unauthenticated (None).
        A TLS client whose certificate breaks the SVID rules is refused, and counted.
        """
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            self.stats.plaintext += 1
            return True, None
        try:
            identity = peer_identity_from_ssl_object(ssl_object, self.bundle, now=_now())
        except SvidError as exc:
            self.stats.fail(exc.reason)
            return False, None
        self.stats.handshakes += 1
        return True, str(identity).encode()


class ClientTls:
    """A cluster's TLS: the context, and the identity its endpoints must present."""

    def __init__(self, config: UpstreamTls, field: str, stats: TlsStats) -> None:
        self.config = config
        self.context, self.bundle, self.identity, expiry = _context(
            ssl.PROTOCOL_TLS_CLIENT, config.files, field, config.alpn
        )
        self.stats = stats
        stats.certificate_expiry = expiry.timestamp()
        try:
            self.expected = SpiffeId.parse(config.identity) if config.identity else None
        except SpiffeIdError as exc:
            raise TlsConfigError(f"{field}.identity", str(exc)) from None

    def authenticate(self, ssl_object: Any) -> SpiffeId:
        """The server's verified identity, which must be the expected one."""
        try:
            identity = peer_identity_from_ssl_object(
                ssl_object, self.bundle, now=_now(), expected=self.expected
            )
        except SvidError as exc:
            self.stats.fail(exc.reason)
            raise
        self.stats.handshakes += 1
        return identity


def handshake_failure_reason(exc: BaseException) -> str:
    """A short, bounded label for why a handshake failed."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate_verify_failed"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "ssl_error").lower()
        if "no_shared_cipher" in reason or "version" in reason or "protocol" in reason:
            return "protocol"
        if "certificate" in reason:
            return "peer_certificate"
        if "http_request" in reason or "wrong_version_number" in reason:
            return "not_tls"
        return "ssl_error"
    if isinstance(exc, ConnectionError | OSError):
        return "connection_error"
    return "error"
