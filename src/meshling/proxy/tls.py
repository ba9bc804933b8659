"""TLS for the proxy: contexts built from a snapshot's files, and peers' SPIFFE identities.

A context is built once per snapshot, so TLS sessions and their cached
verification never outlive the trust configuration they were made under. Both
sides require a certificate; OpenSSL checks the chain to the trust bundle, and
the SPIFFE X.509-SVID rules (one URI SAN, trust domain, leaf not a CA, the
expected identity) are checked on top, since OpenSSL knows nothing of them.
The proxy's own certificate is checked by the same rules when the context is
built: with no valid certificate, the listener or cluster does not start.

It can also expire while the proxy runs, with nobody replacing it. Then the proxy fails
closed on everything new: an inbound refuses new TLS handshakes, a cluster opens no
connection and takes no idle one from its pool, both counted as handshake failures with
reason `own_certificate_expired` (and logged once). What is under way is not cut:
requests in flight finish, and an inbound's open connections keep serving, since they
were authenticated while the certificate was valid, as TLS sessions are. The check is a
comparison with the certificate's cached `notAfter`, per new connection or request, not
a file read; when a valid certificate is written over the old one, the file watch
reloads the snapshot and service resumes.
"""

from __future__ import annotations

import datetime as dt
import logging
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
# the handshake failure reason, and the x-meshling-error, of an expired own certificate
OWN_CERTIFICATE_EXPIRED = "own_certificate_expired"

log = logging.getLogger("meshling.proxy")


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


class OwnCertificate:
    """The proxy's own certificate's end of validity, for a check per new connection."""

    def __init__(self, expiry: dt.datetime, stats: TlsStats, where: str) -> None:
        # notAfter as a Unix time: the certificate is valid up to and including it
        self.not_after = expiry.timestamp()
        self.stats = stats
        self.where = where
        self._reported = False
        stats.certificate_expiry = self.not_after

    def expired(self, now: float) -> bool:
        """Whether the certificate has expired at `now` (a Unix time)."""
        return now > self.not_after

    def refuse(self) -> None:
        """Count a connection refused because the certificate expired; log the first."""
        self.stats.fail(OWN_CERTIFICATE_EXPIRED)
        if not self._reported:
            self._reported = True
            expiry = dt.datetime.fromtimestamp(self.not_after, dt.UTC)
            log.error(
                "%s: the proxy's own certificate expired at %s: no new TLS connections "
                "until a valid one is written to its file",
                self.where,
                f"{expiry:%Y-%m-%dT%H:%M:%SZ}",
            )


class ServerTls:
    """An inbound filter chain's TLS: the context, and who the client is."""

    def __init__(self, config: DownstreamTls, field: str, stats: TlsStats) -> None:
        self.config = config
        self.context, self.bundle, self.identity, expiry = _context(
            ssl.PROTOCOL_TLS_SERVER, config.files, field, ("h2", "http/1.1")
        )
        self.stats = stats
        self.own = OwnCertificate(expiry, stats, field)

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
        self.field = field
        # the context offering ALPN "h2" (multiplexed HTTP/2 connections), made when needed
        self._h2_context: ssl.SSLContext | None = None if "h2" not in config.alpn else self.context
        self.stats = stats
        self.own = OwnCertificate(expiry, stats, field)
        try:
            self.expected = SpiffeId.parse(config.identity) if config.identity else None
        except SpiffeIdError as exc:
            raise TlsConfigError(f"{field}.identity", str(exc)) from None

    def h2_context(self) -> ssl.SSLContext:
        """The same credentials, offering ALPN "h2" alone."""
        if self._h2_context is None:
            self._h2_context = _context(
                ssl.PROTOCOL_TLS_CLIENT, self.config.files, self.field, ("h2",)
            )[0]
        return self._h2_context

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
