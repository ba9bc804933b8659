"""The mesh's certificate authority: one self-signed root, short-lived SPIFFE leaves.

A proxy makes its own key pair and sends only a CSR (`make_key_and_csr`), so its private
key never leaves it; `CertificateAuthority.issue` turns the CSR into an X.509-SVID for
`spiffe://<mesh>/<service>`. The CA takes nothing from the CSR but its public key: the
identity, the usages and the lifetime are the CA's to decide, never the requester's.

Keys are ECDSA P-256 everywhere, root and leaves. CSRs with other keys (RSA, Ed25519,
other curves) are refused: one algorithm keeps handshakes fast and every TLS stack a
proxy may meet able to verify them, and leaves the CA nothing to judge about key sizes.

The root (RFC 5280 and the SPIFFE X.509-SVID profile):
  subject O=meshling, CN=meshling root CA <first 16 hex digits of its key id>, so that
  the old and the new root of a rotation differ by name; basicConstraints cA=true,
  pathLen=0 (critical: no intermediates below it); keyUsage keyCertSign, cRLSign
  (critical); subjectKeyIdentifier; URI SAN `spiffe://<mesh>`, the trust domain's own
  ID, from which a bundle learns its trust domain.
  No URI name constraint: `cryptography`'s verifier (like rustls') refuses certificates
  that carry one, as the SPIFFE specification warns; verification checks the trust
  domain of every leaf instead.

A leaf has exactly: an empty subject, so that nothing can mistake a CN for the identity;
one URI SAN (critical, as RFC 5280 requires with an empty subject); basicConstraints
cA=false (critical); keyUsage digitalSignature (critical); extendedKeyUsage serverAuth
and clientAuth, since every proxy is both; authorityKeyIdentifier. It is valid from a
minute before `now` (clocks drift) to `now + ttl`, never past the root's own end, with
a random 128-bit serial number.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshling.identity import files
from meshling.identity.spiffe import SpiffeId, SpiffeIdError
from meshling.identity.svid import Bundle

DEFAULT_ROOT_VALIDITY: Final = dt.timedelta(days=3650)
DEFAULT_LEAF_TTL: Final = dt.timedelta(hours=24)
# how far back a certificate's notBefore goes, for peers whose clocks run behind
CLOCK_SKEW: Final = dt.timedelta(minutes=1)

CA_CERT_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"


class CaError(Exception):
    """A request the CA refuses, or CA material it cannot use; `reason` is a short code.

    Reasons: `bad_csr`, `bad_csr_signature`, `unsupported_key`, `invalid_service`,
    `root_expired`, `not_a_ca`, `key_mismatch`.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def _random_serial() -> int:
    # RFC 5280 wants a positive serial; 128 random bits make collisions and guessing moot
    while True:
        if serial := secrets.randbits(128):
            return serial


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A mesh's root certificate and key, issuing leaf certificates from CSRs."""

    def __init__(self, root: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if not _is_p256(key):
            raise CaError("unsupported_key", "the CA key must be ECDSA P-256")
        if root.public_key() != key.public_key():
            raise CaError("key_mismatch", "the key does not belong to the root certificate")
        try:
            bundle = Bundle(_root_trust_domain(root), (root,))
        except ValueError as exc:
            raise CaError("not_a_ca", str(exc)) from None
        self.root: Final = root
        self.mesh: Final = bundle.trust_domain
        self.bundle: Final = bundle
        self._key = key

    @classmethod
    def create(
        cls,
        mesh: str,
        *,
        validity: dt.timedelta = DEFAULT_ROOT_VALIDITY,
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new root for `mesh` (the trust domain), valid for `validity` from `now`."""
        now = _utc(now)
        if validity <= dt.timedelta(0):
            raise ValueError("validity must be positive")
        trust_domain_id = SpiffeId(mesh)  # validates the mesh name as a trust domain
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshling"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"meshling root CA {key_id.digest.hex()[:16]}"
                ),
            ]
        )
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(key_id, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain_id))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(root, key)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        csr_pem: bytes,
        service: str,
        *,
        ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        now: dt.datetime | None = None,
    ) -> bytes:
        """A PEM leaf certificate for `spiffe://<mesh>/<service>` on the CSR's key.

        Raises `CaError` for a CSR that does not parse, is not signed by its own key, or
        holds a key other than P-256, and for a service name that is not one valid SPIFFE
        path segment.
        """
        now = _utc(now)
        if ttl <= dt.timedelta(0):
            raise ValueError("ttl must be positive")
        try:
            identity = SpiffeId.for_service(self.mesh, service)
        except SpiffeIdError as exc:
            raise CaError("invalid_service", str(exc)) from None
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CaError("bad_csr", f"unreadable CSR: {exc}") from None
        public_key = csr.public_key()
        if not _is_p256(public_key):
            raise CaError("unsupported_key", "the CSR's key must be ECDSA P-256")
        # proof that the requester holds the private key for the public key
        if not csr.is_signature_valid:
            raise CaError("bad_csr_signature", "the CSR's signature does not match its key")
        not_after = min(now + ttl, self.root.not_valid_after_utc)
        if not_after <= now:
            raise CaError("root_expired", f"the root expired at {self.root.not_valid_after_utc}")
        not_before = max(now - CLOCK_SKEW, self.root.not_valid_before_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM)

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write `ca.crt` and `ca.key` (0600) into `directory`, made 0700 if new.

        Raises FileExistsError rather than replace an existing CA, unless `overwrite`.
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = path / CA_CERT_FILE, path / CA_KEY_FILE
        if not overwrite:
            for existing in (cert_path, key_path):
                if existing.exists():
                    raise FileExistsError(errno.EEXIST, "a CA is already there", str(existing))
        files.write_certificates(cert_path, self.root_pem)
        files.write_private_key(key_path, _key_pem(self._key))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """The CA saved in `directory`; `files.IdentityFileError` names what is wrong."""
        path = Path(directory)
        cert_path, key_path = path / CA_CERT_FILE, path / CA_KEY_FILE
        certs = files.read_certificates(cert_path)
        if len(certs) != 1:
            raise files.IdentityFileError(cert_path, f"expected 1 certificate, found {len(certs)}")
        key = files.read_private_key(key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise files.IdentityFileError(key_path, "the CA key must be ECDSA P-256")
        try:
            return cls(certs[0], key)
        except CaError as exc:
            where = key_path if exc.reason in ("key_mismatch", "unsupported_key") else cert_path
            raise files.IdentityFileError(where, exc.detail) from None


def _root_trust_domain(root: x509.Certificate) -> str:
    uris = [
        uri
        for ext in root.extensions
        if isinstance(ext.value, x509.SubjectAlternativeName)
        for uri in ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    ]
    if len(uris) != 1:
        raise CaError("not_a_ca", "the root must name its trust domain in one URI SAN")
    try:
        identity = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise CaError("not_a_ca", str(exc)) from None
    if identity.path:
        raise CaError("not_a_ca", f"the root's SPIFFE ID {identity} must not have a path")
    return identity.trust_domain


def make_key_and_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """A new P-256 private key and a CSR for it, both PEM, for the proxy side.

    The key stays with the caller; only the CSR goes to the CA. The CSR names `identity`
    for the record, but the CA decides the identity itself.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)
