"""X.509-SVID verification: every way a peer's chain can fail, each with its reason code.

Certificates are built here with `cryptography` directly (not with the CA), so that
each test can make exactly the bad certificate it is about. Keys are made once per
module; a fixed clock makes validity exact.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshling.identity import (
    SVID_REASONS,
    Bundle,
    BundleError,
    CertificateAuthority,
    SpiffeId,
    SvidError,
    make_key_and_csr,
    peer_identity_from_ssl_object,
    verify_svid,
)

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
INTERMEDIATE_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())

SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
NOT_A_CA = x509.BasicConstraints(ca=False, path_length=None)


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_usage(
    *, signature: bool = True, cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca_cert(
    key: ec.EllipticCurvePrivateKey,
    subject: str,
    *,
    trust_domain: str | None = "mesh",
    issuer: tuple[ec.EllipticCurvePrivateKey, str] | None = None,
    not_before: dt.datetime = NOW - 365 * DAY,
    not_after: dt.datetime = NOW + 365 * DAY,
    path_length: int | None = None,
) -> x509.Certificate:
    """A root (self-signed) or, with `issuer`, an intermediate."""
    signer, issuer_name = issuer if issuer else (key, subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(signature=False, cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    if trust_domain:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


ROOT = make_ca_cert(ROOT_KEY, "mesh root")
OTHER_ROOT = make_ca_cert(OTHER_ROOT_KEY, "other root", trust_domain="other")
BUNDLE = Bundle("mesh", (ROOT,))


def make_leaf(
    *,
    sans: Sequence[x509.GeneralName] | None = (
        x509.UniformResourceIdentifier("spiffe://mesh/web"),
    ),
    signer: ec.EllipticCurvePrivateKey = ROOT_KEY,
    issuer: str = "mesh root",
    not_before: dt.datetime = NOW - HOUR,
    not_after: dt.datetime = NOW + HOUR,
    basic_constraints: x509.BasicConstraints | None = NOT_A_CA,
    usage: x509.KeyUsage | None = None,
    extended_usage: Sequence[x509.ObjectIdentifier] | None = SERVER_AND_CLIENT,
    extra: x509.ExtensionType | None = None,
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name(issuer))
        .public_key(LEAF_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(usage or key_usage(), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    if basic_constraints is not None:
        builder = builder.add_extension(basic_constraints, critical=True)
    if extended_usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_usage)), critical=False)
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    cert = builder.sign(signer, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def reason_of(chain: list[bytes], bundle: Bundle = BUNDLE, **kwargs: object) -> str:
    with pytest.raises(SvidError) as caught:
        verify_svid(chain, bundle, now=kwargs.pop("now", NOW), **kwargs)  # type: ignore[arg-type]
    assert caught.value.reason in SVID_REASONS
    return caught.value.reason


def test_verify_svid_accepts_a_valid_leaf() -> None:
    assert verify_svid([make_leaf()], BUNDLE, now=NOW) == SpiffeId("mesh", "/web")


def test_verify_svid_accepts_the_expected_identity() -> None:
    expected = SpiffeId.parse("spiffe://mesh/web")
    assert verify_svid([make_leaf()], BUNDLE, now=NOW, expected=expected) == expected


def test_verify_svid_accepts_a_leaf_issued_by_the_ca() -> None:
    ca = CertificateAuthority.create("mesh", now=NOW - DAY)
    _, csr_pem = make_key_and_csr(SpiffeId.for_service("mesh", "api"))
    leaf = x509.load_pem_x509_certificate(ca.issue(csr_pem, "api", now=NOW))
    assert verify_svid([der(leaf)], ca.bundle, now=NOW) == SpiffeId("mesh", "/api")


def test_verify_svid_accepts_a_leaf_without_basic_constraints() -> None:
    # cA defaults to FALSE when the extension is absent
    assert verify_svid([make_leaf(basic_constraints=None)], BUNDLE, now=NOW).path == "/web"


def test_verify_svid_accepts_a_leaf_without_extended_key_usage() -> None:
    assert verify_svid([make_leaf(extended_usage=None)], BUNDLE, now=NOW).path == "/web"


def test_verify_svid_accepts_the_validity_bounds_inclusive() -> None:
    leaf = make_leaf()
    assert verify_svid([leaf], BUNDLE, now=NOW - HOUR)
    assert verify_svid([leaf], BUNDLE, now=NOW + HOUR)


def test_verify_svid_refuses_no_certificate() -> None:
    assert reason_of([]) == "no_certificate"
    assert reason_of([b""]) == "no_certificate"


def test_verify_svid_refuses_garbage() -> None:
    assert reason_of([b"\x30\x03\x02\x01\x00"]) == "malformed"
    assert reason_of([make_leaf(), b"not a certificate"]) == "malformed"


def test_verify_svid_refuses_an_expired_leaf() -> None:
    assert reason_of([make_leaf()], now=NOW + HOUR + dt.timedelta(seconds=1)) == "expired"


def test_verify_svid_refuses_a_not_yet_valid_leaf() -> None:
    assert reason_of([make_leaf()], now=NOW - HOUR - dt.timedelta(seconds=1)) == "not_yet_valid"


def test_verify_svid_refuses_a_leaf_under_an_expired_root() -> None:
    old_root = make_ca_cert(ROOT_KEY, "mesh root", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    assert reason_of([make_leaf()], Bundle("mesh", (old_root,))) == "expired"


def test_verify_svid_refuses_a_leaf_under_a_not_yet_valid_root() -> None:
    future_root = make_ca_cert(
        ROOT_KEY, "mesh root", not_before=NOW + DAY, not_after=NOW + 10 * DAY
    )
    assert reason_of([make_leaf()], Bundle("mesh", (future_root,))) == "not_yet_valid"


def test_verify_svid_refuses_another_trust_domain_signed_by_our_root() -> None:
    leaf = make_leaf(sans=[x509.UniformResourceIdentifier("spiffe://other/web")])
    assert reason_of([leaf]) == "wrong_trust_domain"


def test_verify_svid_refuses_our_identity_signed_by_another_trust_domain() -> None:
    # a foreign CA claims spiffe://mesh/web: its root is not in mesh's bundle
    leaf = make_leaf(signer=OTHER_ROOT_KEY, issuer="other root")
    assert reason_of([leaf]) == "unknown_root"
    # ... and is not accepted either when its root is presented in the chain
    assert reason_of([leaf, der(OTHER_ROOT)]) == "unknown_root"


def test_verify_svid_refuses_a_chain_to_an_unknown_root_of_the_same_mesh() -> None:
    stranger = CertificateAuthority.create("mesh", now=NOW - DAY)
    _, csr_pem = make_key_and_csr(SpiffeId.for_service("mesh", "web"))
    leaf = x509.load_pem_x509_certificate(stranger.issue(csr_pem, "web", now=NOW))
    assert reason_of([der(leaf)]) == "unknown_root"


def test_verify_svid_refuses_a_bad_signature() -> None:
    # names the right issuer, but signed by another key
    assert reason_of([make_leaf(signer=OTHER_ROOT_KEY)]) == "bad_signature"


def test_verify_svid_refuses_two_uri_sans() -> None:
    sans = [
        x509.UniformResourceIdentifier("spiffe://mesh/web"),
        x509.UniformResourceIdentifier("spiffe://mesh/admin"),
    ]
    assert reason_of([make_leaf(sans=sans)]) == "uri_san_count"


def test_verify_svid_refuses_only_dns_and_email_sans() -> None:
    sans = [x509.DNSName("web.mesh"), x509.RFC822Name("web@mesh")]
    assert reason_of([make_leaf(sans=sans)]) == "uri_san_count"


def test_verify_svid_refuses_no_san() -> None:
    assert reason_of([make_leaf(sans=None)]) == "uri_san_count"


def test_verify_svid_ignores_dns_sans_next_to_the_uri_san() -> None:
    sans = [x509.DNSName("admin.mesh"), x509.UniformResourceIdentifier("spiffe://mesh/web")]
    assert verify_svid([make_leaf(sans=sans)], BUNDLE, now=NOW) == SpiffeId("mesh", "/web")


def test_verify_svid_refuses_a_nul_byte_in_the_uri_san() -> None:
    sans = [x509.UniformResourceIdentifier("spiffe://mesh/web\x00.admin")]
    assert reason_of([make_leaf(sans=sans)]) == "not_spiffe"


@pytest.mark.parametrize(
    "uri",
    [
        "https://mesh/web",
        "spiffe://mesh",
        "spiffe://mesh/",
        "SPIFFE://mesh/web",
        "spiffe://mesh/a%2Fb",
    ],
)
def test_verify_svid_refuses_a_uri_san_that_is_not_a_workload_spiffe_id(uri: str) -> None:
    assert reason_of([make_leaf(sans=[x509.UniformResourceIdentifier(uri)])]) == "not_spiffe"


def test_verify_svid_refuses_a_ca_leaf() -> None:
    leaf = make_leaf(basic_constraints=x509.BasicConstraints(ca=True, path_length=None))
    assert reason_of([leaf]) == "leaf_is_ca"


@pytest.mark.parametrize(
    ("usage", "extended_usage"),
    [
        (key_usage(cert_sign=True), SERVER_AND_CLIENT),
        (key_usage(crl_sign=True), SERVER_AND_CLIENT),
        (key_usage(signature=False), SERVER_AND_CLIENT),
        (key_usage(), (ExtendedKeyUsageOID.SERVER_AUTH,)),
        (key_usage(), (ExtendedKeyUsageOID.CLIENT_AUTH,)),
        (key_usage(), (ExtendedKeyUsageOID.CODE_SIGNING,)),
    ],
    ids=[
        "keyCertSign",
        "cRLSign",
        "no-digitalSignature",
        "server-only",
        "client-only",
        "codeSigning",
    ],
)
def test_verify_svid_refuses_wrong_key_usage(
    usage: x509.KeyUsage, extended_usage: tuple[x509.ObjectIdentifier, ...]
) -> None:
    assert reason_of([make_leaf(usage=usage, extended_usage=extended_usage)]) == "key_usage"


def test_verify_svid_refuses_a_leaf_without_key_usage() -> None:
    cert = x509.load_der_x509_certificate(make_leaf())
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(LEAF_KEY.public_key())
        .serial_number(1)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        if not isinstance(extension.value, x509.KeyUsage):
            builder = builder.add_extension(extension.value, extension.critical)
    assert reason_of([der(builder.sign(ROOT_KEY, hashes.SHA256()))]) == "key_usage"


def test_verify_svid_refuses_an_unexpected_identity() -> None:
    assert reason_of([make_leaf()], expected=SpiffeId("mesh", "/api")) == "unexpected_identity"


def test_verify_svid_refuses_an_unknown_critical_extension() -> None:
    extra = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    assert reason_of([make_leaf(extra=extra)]) == "invalid_chain"


def test_verify_svid_accepts_old_and_new_roots_of_a_rotation() -> None:
    old = CertificateAuthority.create("mesh", now=NOW - 300 * DAY)
    new = CertificateAuthority.create("mesh", now=NOW - DAY)
    bundle = Bundle.from_pem(old.root_pem + new.root_pem)
    assert len(bundle.roots) == 2
    for ca, service in ((old, "web"), (new, "api")):
        _, csr_pem = make_key_and_csr(SpiffeId.for_service("mesh", service))
        leaf = x509.load_pem_x509_certificate(ca.issue(csr_pem, service, now=NOW))
        assert verify_svid([der(leaf)], bundle, now=NOW) == SpiffeId("mesh", f"/{service}")
        # once the old root is dropped, only the new root's leaves pass
        if ca is old:
            assert reason_of([der(leaf)], new.bundle) == "unknown_root"


def test_verify_svid_follows_an_intermediate() -> None:
    intermediate = make_ca_cert(
        INTERMEDIATE_KEY, "mesh intermediate", issuer=(ROOT_KEY, "mesh root")
    )
    leaf = make_leaf(signer=INTERMEDIATE_KEY, issuer="mesh intermediate")
    assert verify_svid([leaf, der(intermediate)], BUNDLE, now=NOW) == SpiffeId("mesh", "/web")
    # without the intermediate there is no path
    assert reason_of([leaf]) == "unknown_root"


def test_verify_svid_refuses_an_expired_intermediate() -> None:
    intermediate = make_ca_cert(
        INTERMEDIATE_KEY,
        "mesh intermediate",
        issuer=(ROOT_KEY, "mesh root"),
        not_before=NOW - 10 * DAY,
        not_after=NOW - DAY,
    )
    leaf = make_leaf(signer=INTERMEDIATE_KEY, issuer="mesh intermediate")
    assert reason_of([leaf, der(intermediate)]) == "expired"


def test_verify_svid_refuses_an_intermediate_below_a_path_length_zero_root() -> None:
    strict_root = make_ca_cert(ROOT_KEY, "mesh root", path_length=0)
    intermediate = make_ca_cert(
        INTERMEDIATE_KEY, "mesh intermediate", issuer=(ROOT_KEY, "mesh root")
    )
    leaf = make_leaf(signer=INTERMEDIATE_KEY, issuer="mesh intermediate")
    assert reason_of([leaf, der(intermediate)], Bundle("mesh", (strict_root,))) == "invalid_chain"


def test_verify_svid_requires_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_svid([make_leaf()], BUNDLE, now=NOW.replace(tzinfo=None))


def test_svid_error_carries_reason_and_detail() -> None:
    with pytest.raises(SvidError) as caught:
        verify_svid([make_leaf()], BUNDLE, now=NOW, expected=SpiffeId("mesh", "/api"))
    assert caught.value.detail == "the peer is spiffe://mesh/web, expected spiffe://mesh/api"
    assert str(caught.value).startswith("unexpected_identity: ")


class FakeTlsObject:
    """What peer_identity_from_ssl_object reads from an SSLObject after a handshake."""

    def __init__(self, chain: list[bytes] | None, *, expose_chain: bool) -> None:
        self._chain = chain
        if expose_chain:
            self.get_unverified_chain = lambda: self._chain

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self._chain[0] if self._chain else None


def test_peer_identity_from_ssl_object_without_a_peer_certificate() -> None:
    with pytest.raises(SvidError) as caught:
        peer_identity_from_ssl_object(FakeTlsObject(None, expose_chain=False), BUNDLE, now=NOW)  # type: ignore[arg-type]
    assert caught.value.reason == "no_certificate"


def test_peer_identity_from_ssl_object_uses_the_presented_chain_when_available() -> None:
    intermediate = make_ca_cert(
        INTERMEDIATE_KEY, "mesh intermediate", issuer=(ROOT_KEY, "mesh root")
    )
    chain = [make_leaf(signer=INTERMEDIATE_KEY, issuer="mesh intermediate"), der(intermediate)]
    with_chain = FakeTlsObject(chain, expose_chain=True)
    identity = peer_identity_from_ssl_object(with_chain, BUNDLE, now=NOW)  # type: ignore[arg-type]
    assert identity == SpiffeId("mesh", "/web")
    # with only the leaf (Python < 3.13), an intermediate-issued leaf has no path
    leaf_only = FakeTlsObject(chain, expose_chain=False)
    with pytest.raises(SvidError) as caught:
        peer_identity_from_ssl_object(leaf_only, BUNDLE, now=NOW)  # type: ignore[arg-type]
    assert caught.value.reason == "unknown_root"


def test_bundle_from_pem_reads_the_trust_domain_from_the_roots() -> None:
    bundle = Bundle.from_pem(ROOT.public_bytes(serialization.Encoding.PEM))
    assert bundle.trust_domain == "mesh"
    assert bundle.roots == (ROOT,)
    assert Bundle.from_pem(bundle.to_pem()) == bundle


def test_bundle_from_pem_takes_an_explicit_trust_domain() -> None:
    unnamed = make_ca_cert(ROOT_KEY, "mesh root", trust_domain=None)
    pem = unnamed.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BundleError, match="pass trust_domain"):
        Bundle.from_pem(pem)
    assert Bundle.from_pem(pem, trust_domain="mesh").trust_domain == "mesh"


def test_bundle_refuses_roots_of_two_trust_domains() -> None:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ROOT, OTHER_ROOT))
    with pytest.raises(BundleError):
        Bundle.from_pem(pem)
    with pytest.raises(BundleError, match="not trust domain 'mesh'"):
        Bundle.from_pem(pem, trust_domain="mesh")


def test_bundle_refuses_a_leaf_as_root() -> None:
    leaf = x509.load_der_x509_certificate(make_leaf())
    with pytest.raises(BundleError, match="not a CA"):
        Bundle("mesh", (leaf,))


def test_bundle_refuses_empty_input() -> None:
    with pytest.raises(BundleError):
        Bundle("mesh", ())
    with pytest.raises(BundleError):
        Bundle.from_pem(b"")
    with pytest.raises(BundleError):
        Bundle("Mesh", (ROOT,))
