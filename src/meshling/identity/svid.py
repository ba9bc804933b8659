"""Verification of X.509-SVIDs: who a TLS peer is, per the SPIFFE rules, or why not.

`verify_svid` takes the chain a peer presented (DER, leaf first), the trust bundle of
one trust domain and the time, and returns the peer's `SpiffeId` or raises `SvidError`
with a short reason code fit for a metric label.

The checks, in this order (the first that fails names the reason):

1. there is a leaf, and every certificate parses (`no_certificate`, `malformed`);
2. the leaf has exactly one URI SAN (`uri_san_count`), a SPIFFE ID with a path
   (`not_spiffe`), in the bundle's trust domain (`wrong_trust_domain`);
3. the leaf is not a CA (`leaf_is_ca`), has digitalSignature and neither keyCertSign
   nor cRLSign, and an extended key usage, if any, allows both TLS server and client
   (`key_usage`);
4. the leaf is valid at `now` (`expired`, `not_yet_valid`);
5. RFC 5280 path validation from the leaf through the presented intermediates to a
   root of the bundle, every certificate valid at `now` (`unknown_root`,
   `bad_signature`, `expired`, `not_yet_valid`, or `invalid_chain` when signatures and
   dates are right but a rule is broken: a CA without keyCertSign, a path too long,
   an unknown critical extension, a forbidden algorithm);
6. the identity is the one expected, if one is (`unexpected_identity`).

Identity comes only from the typed URI SAN: subject CN and DNS SANs are never read.
Path validation is `cryptography`'s (`x509.verification`), with the Web PKI rules for
CA certificates and, for the leaf, only the SPIFFE rules above plus the refusal of
unknown critical extensions: Web PKI rules for end entities (SAN criticality tied to
the subject, a mandatory clientAuth) are not SPIFFE's. When it refuses a chain, a short
walk over names and signatures finds which link failed, for the reason code.

One bundle is one trust domain: a root of the bundle vouches only for identities in
that trust domain, so a leaf of another trust domain fails even when a known root
signed it.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshling.identity.spiffe import SpiffeId, SpiffeIdError

SvidReason = Literal[
    "no_certificate",
    "malformed",
    "uri_san_count",
    "not_spiffe",
    "wrong_trust_domain",
    "leaf_is_ca",
    "key_usage",
    "expired",
    "not_yet_valid",
    "unknown_root",
    "bad_signature",
    "invalid_chain",
    "unexpected_identity",
]
# every reason code, e.g. to create metric label values up front
SVID_REASONS: Final[tuple[SvidReason, ...]] = get_args(SvidReason)

# leaf + intermediates + root; deep enough for any sane hierarchy, and it bounds the work
MAX_CHAIN_DEPTH: Final = 8


class SvidError(Exception):
    """A presented certificate chain that does not prove a SPIFFE identity.

    `reason` is one of `SVID_REASONS`, stable and low-cardinality (a metric label);
    `detail` is for a log line.
    """

    def __init__(self, reason: SvidReason, detail: str) -> None:
        self.reason: SvidReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class BundleError(ValueError):
    """A trust bundle that cannot be used: no roots, a non-CA, mixed trust domains."""


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


@dataclass(frozen=True)
class Bundle:
    """The root certificates trusted for one trust domain.

    Usually one root; two while a root rotates (the old one, still behind live
    certificates, and the new one). Build it from PEM with `from_pem`.
    """

    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    # built once: the verifier takes a Store, and a bundle is used for many handshakes
    _store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            SpiffeId(self.trust_domain)
        except SpiffeIdError as exc:
            raise BundleError(f"invalid trust domain {self.trust_domain!r}: {exc}") from None
        if not self.roots:
            raise BundleError("a bundle needs at least one root certificate")
        for root in self.roots:
            if not _is_ca(root):
                raise BundleError(f"{root.subject.rfc4514_string()!r} is not a CA certificate")
            for uri in _uri_sans(root):
                if uri != f"spiffe://{self.trust_domain}":
                    raise BundleError(
                        f"root {root.subject.rfc4514_string()!r} names {uri!r}, "
                        f"not trust domain {self.trust_domain!r}"
                    )
        object.__setattr__(self, "_store", Store(list(self.roots)))

    @classmethod
    def from_pem(cls, pem: bytes, *, trust_domain: str | None = None) -> Bundle:
        """Every certificate in `pem` as a root.

        Without `trust_domain`, it is read from the roots' SPIFFE IDs
        (`spiffe://<trust domain>`, as meshling's roots carry): they must agree.
        """
        try:
            roots = tuple(x509.load_pem_x509_certificates(pem))
        except ValueError as exc:
            raise BundleError(f"no readable PEM certificate: {exc}") from None
        if trust_domain is None:
            named = {uri for root in roots for uri in _uri_sans(root)}
            if len(named) != 1:
                raise BundleError(
                    "cannot tell the trust domain from the roots "
                    f"(they name {sorted(named) or 'none'}); pass trust_domain"
                )
            try:
                trust_domain = SpiffeId.parse(named.pop()).trust_domain
            except SpiffeIdError as exc:
                raise BundleError(str(exc)) from None
        return cls(trust_domain, roots)

    def to_pem(self) -> bytes:
        return b"".join(root.public_bytes(serialization.Encoding.PEM) for root in self.roots)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _validity_reason(cert: x509.Certificate, now: dt.datetime) -> SvidReason | None:
    if now < cert.not_valid_before_utc:
        return "not_yet_valid"
    if now > cert.not_valid_after_utc:
        return "expired"
    return None


def _parse_chain(chain_der: Sequence[bytes]) -> list[x509.Certificate]:
    if not chain_der or not chain_der[0]:
        raise SvidError("no_certificate", "the peer presented no certificate")
    certs = []
    for position, der in enumerate(chain_der):
        try:
            cert = x509.load_der_x509_certificate(der)
            # extensions parse lazily: make a duplicate or garbled one fail here, not later
            cert.extensions  # noqa: B018
        except ValueError as exc:
            raise SvidError("malformed", f"certificate {position} of the chain: {exc}") from None
        certs.append(cert)
    return certs


def _leaf_identity(leaf: x509.Certificate, trust_domain: str) -> SpiffeId:
    uris = _uri_sans(leaf)
    if len(uris) != 1:
        raise SvidError("uri_san_count", f"the leaf has {len(uris)} URI SANs, not exactly one")
    try:
        identity = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError("not_spiffe", str(exc)) from None
    if not identity.path:
        raise SvidError("not_spiffe", f"{identity} has no path: it names a trust domain")
    if identity.trust_domain != trust_domain:
        raise SvidError(
            "wrong_trust_domain",
            f"{identity} is not in trust domain {trust_domain!r} of the bundle",
        )
    return identity


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    # An absent basicConstraints means cA FALSE (its ASN.1 default), as RFC 5280 reads it.
    if _is_ca(leaf):
        raise SvidError("leaf_is_ca", "the leaf is a CA certificate (basicConstraints cA=true)")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SvidError("key_usage", "the leaf has no keyUsage extension") from None
    if not usage.digital_signature:
        raise SvidError("key_usage", "the leaf's keyUsage lacks digitalSignature")
    if usage.key_cert_sign or usage.crl_sign:
        raise SvidError("key_usage", "the leaf's keyUsage allows signing certificates or CRLs")
    try:
        purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(purposes):
        raise SvidError("key_usage", "the leaf's extendedKeyUsage lacks serverAuth or clientAuth")


def _verifier_for(bundle: Bundle, now: dt.datetime) -> ClientVerifier:
    # extension policies need cryptography >= 45
    return (
        PolicyBuilder()
        .store(bundle._store)
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            # the SPIFFE leaf rules are checked before; this still refuses unknown
            # critical extensions
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# When several paths fail differently, report the one that came closest to success.
_CLOSENESS: Final[tuple[SvidReason, ...]] = (
    "invalid_chain",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "unknown_root",
)


def _diagnose(
    cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...],
    now: dt.datetime,
    depth: int = 1,
) -> SvidReason:
    """Why no path from `cert` reaches a root: the first broken link, by name, signature, date."""
    issuers = [c for c in (*roots, *intermediates) if c.subject == cert.issuer]
    if not issuers:
        return "unknown_root"
    signers = [c for c in issuers if _signed_by(cert, c)]
    if not signers:
        return "bad_signature"
    reasons: list[SvidReason] = []
    for signer in signers:
        reason = _validity_reason(signer, now)
        if reason is None:
            if signer in roots or depth + 1 >= MAX_CHAIN_DEPTH:
                # names, signatures and dates hold up to a root: a path rule failed
                reason = "invalid_chain"
            else:
                rest = [c for c in intermediates if c != signer]
                reason = _diagnose(signer, rest, roots, now, depth + 1)
        reasons.append(reason)
    return min(reasons, key=_CLOSENESS.index)


def verify_svid(
    chain_der: Sequence[bytes],
    bundle: Bundle,
    *,
    now: dt.datetime,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The SPIFFE ID proven by `chain_der` (leaf first, then any intermediates).

    `now` must be timezone-aware. Raises `SvidError` with the reason (see the module
    docstring for the checks and their order).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    certs = _parse_chain(chain_der)
    leaf, intermediates = certs[0], certs[1:]
    identity = _leaf_identity(leaf, bundle.trust_domain)
    _check_leaf_usage(leaf)
    if reason := _validity_reason(leaf, now):
        raise SvidError(
            reason,
            f"the leaf is valid from {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
            f"to {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        )
    try:
        _verifier_for(bundle, now).verify(leaf, intermediates)
    except VerificationError as exc:
        reason = _diagnose(leaf, intermediates, bundle.roots, now)
        raise SvidError(
            reason, f"no valid path to a root of {bundle.trust_domain!r}: {exc}"
        ) from None
    if expected is not None and identity != expected:
        raise SvidError("unexpected_identity", f"the peer is {identity}, expected {expected}")
    return identity


def peer_identity_from_ssl_object(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    bundle: Bundle,
    *,
    now: dt.datetime,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The verified SPIFFE ID of the peer of a TLS connection whose handshake is done.

    Python 3.13 exposes the chain the peer sent (`get_unverified_chain`); with it the
    intermediates take part. Python 3.11 and 3.12 give only the peer's leaf, which is
    then verified directly against the bundle's roots: enough for meshling's CA, which
    signs leaves with the root itself.
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        raise SvidError("no_certificate", "the peer presented no certificate")
    chain = [leaf]
    get_chain = getattr(ssl_object, "get_unverified_chain", None)
    if get_chain is not None:
        presented = [bytes(der) for der in get_chain() or ()]
        # trust the list only if it is the same leaf the handshake authenticated
        if presented and presented[0] == leaf:
            chain = presented
    return verify_svid(chain, bundle, now=now, expected=expected)
