"""The mesh CA: the root it makes, the leaves it issues from CSRs, and the CSRs it refuses."""

from __future__ import annotations

import base64
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from meshling.identity import (
    CaError,
    CertificateAuthority,
    IdentityFileError,
    SpiffeId,
    SpiffeIdError,
    make_key_and_csr,
    verify_svid,
)
from meshling.identity.ca import CLOCK_SKEW

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
CA = CertificateAuthority.create("mesh", now=NOW)
KEY_PEM, CSR_PEM = make_key_and_csr(SpiffeId.for_service("mesh", "web"))


def issue(csr_pem: bytes = CSR_PEM, service: str = "web", **kwargs: object) -> x509.Certificate:
    return x509.load_pem_x509_certificate(CA.issue(csr_pem, service, now=NOW, **kwargs))  # type: ignore[arg-type]


def refusal(csr_pem: bytes, service: str = "web", **kwargs: object) -> str:
    with pytest.raises(CaError) as caught:
        CA.issue(csr_pem, service, now=NOW, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def csr_for(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_ca_create_makes_a_p256_root_for_the_mesh() -> None:
    root = CA.root
    assert CA.mesh == "mesh"
    public_key = root.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert root.not_valid_before_utc == NOW - CLOCK_SKEW
    assert root.not_valid_after_utc == NOW + dt.timedelta(days=3650)
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshling"


def test_ca_create_root_extensions() -> None:
    extensions = {ext.oid: ext for ext in CA.root.extensions}
    constraints = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = extensions[ExtensionOID.KEY_USAGE]
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert extensions[ExtensionOID.SUBJECT_KEY_IDENTIFIER].value == (
        x509.SubjectKeyIdentifier.from_public_key(CA.root.public_key())
    )
    san = extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME].value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh"]
    assert CA.bundle.trust_domain == "mesh"
    assert CA.bundle.roots == (CA.root,)


def test_ca_create_roots_of_a_rotation_have_different_names() -> None:
    other = CertificateAuthority.create("mesh", now=NOW)
    assert other.root.subject != CA.root.subject


def test_ca_create_refuses_a_bad_mesh_name() -> None:
    with pytest.raises(SpiffeIdError):
        CertificateAuthority.create("My Mesh")
    with pytest.raises(ValueError, match="positive"):
        CertificateAuthority.create("mesh", validity=dt.timedelta(0))


def test_ca_issue_leaf_has_exactly_the_svid_extensions() -> None:
    leaf = issue()
    extensions = {ext.oid: ext for ext in leaf.extensions}
    assert set(extensions) == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    san = extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://mesh/web")]
    constraints = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert constraints.critical and constraints.value.ca is False
    usage = extensions[ExtensionOID.KEY_USAGE]
    assert usage.critical
    assert usage.value == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    purposes = extensions[ExtensionOID.EXTENDED_KEY_USAGE]
    assert set(purposes.value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key_id = extensions[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value
    assert (
        key_id.key_identifier
        == CA.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )


def test_ca_issue_leaf_fields() -> None:
    leaf = issue(ttl=dt.timedelta(hours=6))
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == CA.root.subject
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=6)
    assert leaf.signature_hash_algorithm is not None
    assert leaf.signature_hash_algorithm.name == "sha256"
    assert 0 < leaf.serial_number < 2**128
    leaf.verify_directly_issued_by(CA.root)
    key = serialization.load_pem_private_key(KEY_PEM, password=None)
    assert leaf.public_key() == key.public_key()


def test_ca_issue_default_ttl_is_a_day() -> None:
    assert issue().not_valid_after_utc == NOW + dt.timedelta(hours=24)


def test_ca_issue_serials_are_random() -> None:
    assert len({issue().serial_number for _ in range(20)}) == 20


def test_ca_issue_leaf_passes_svid_verification() -> None:
    leaf = issue().public_bytes(serialization.Encoding.DER)
    assert verify_svid([leaf], CA.bundle, now=NOW) == SpiffeId("mesh", "/web")


def test_ca_issue_never_outlives_the_root() -> None:
    short = CertificateAuthority.create("mesh", validity=dt.timedelta(hours=2), now=NOW)
    leaf = x509.load_pem_x509_certificate(
        short.issue(CSR_PEM, "web", now=NOW + dt.timedelta(hours=1))
    )
    assert leaf.not_valid_after_utc == short.root.not_valid_after_utc


def test_ca_issue_refuses_after_the_root_expired() -> None:
    short = CertificateAuthority.create("mesh", validity=dt.timedelta(hours=2), now=NOW)
    with pytest.raises(CaError) as caught:
        short.issue(CSR_PEM, "web", now=NOW + dt.timedelta(hours=3))
    assert caught.value.reason == "root_expired"


def test_ca_issue_ignores_everything_the_csr_asks_for_but_its_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://mesh/admin"),
                    x509.DNSName("admin.mesh"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    leaf = issue(greedy, "web")
    assert leaf.subject == x509.Name([])
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier("spiffe://mesh/web")
    ]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.public_key() == key.public_key()


def test_ca_issue_refuses_a_csr_with_a_bad_signature() -> None:
    csr = x509.load_pem_x509_csr(CSR_PEM)
    tampered = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # the last byte is inside the signature's s value: still DER, no longer a signature
    tampered[-1] ^= 0x01
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(tampered))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    assert not x509.load_pem_x509_csr(pem).is_signature_valid
    assert refusal(pem) == "bad_csr_signature"


def test_ca_issue_refuses_a_csr_signed_by_another_key() -> None:
    # a CSR carrying someone else's public key, signed with the requester's own key
    victim = ec.generate_private_key(ec.SECP256R1())
    attacker = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(csr_for(victim))
    forged = x509.load_pem_x509_csr(csr_for(attacker))
    victim_spki = victim.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attacker_spki = attacker.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    swapped = forged.public_bytes(serialization.Encoding.DER).replace(attacker_spki, victim_spki)
    assert good.public_key() == x509.load_der_x509_csr(swapped).public_key()
    pem = x509.load_der_x509_csr(swapped).public_bytes(serialization.Encoding.PEM)
    assert refusal(pem) == "bad_csr_signature"


def test_ca_issue_refuses_garbage() -> None:
    assert refusal(b"not a csr") == "bad_csr"
    assert refusal(CA.root_pem) == "bad_csr"


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate(),
        ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa2048", "ed25519", "p384"],
)
def test_ca_issue_refuses_keys_other_than_p256(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> None:
    assert refusal(csr_for(key)) == "unsupported_key"


@pytest.mark.parametrize("service", ["", "a/b", "Web App", "..", "web?x"])
def test_ca_issue_refuses_a_bad_service_name(service: str) -> None:
    assert refusal(CSR_PEM, service) == "invalid_service"


def test_ca_issue_refuses_a_non_positive_ttl() -> None:
    with pytest.raises(ValueError, match="positive"):
        CA.issue(CSR_PEM, "web", ttl=dt.timedelta(0), now=NOW)


def test_ca_issue_requires_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone"):
        CA.issue(CSR_PEM, "web", now=NOW.replace(tzinfo=None))


def test_ca_constructor_refuses_a_key_of_another_root() -> None:
    with pytest.raises(CaError) as caught:
        CertificateAuthority(CA.root, ec.generate_private_key(ec.SECP256R1()))
    assert caught.value.reason == "key_mismatch"


def test_ca_save_and_load_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CA.save(directory)
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "ca.crt").stat().st_mode) == 0o644
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    loaded = CertificateAuthority.load(directory)
    assert loaded.root == CA.root
    assert loaded.mesh == "mesh"
    # the loaded key signs: a leaf from it verifies under the original root
    leaf = x509.load_pem_x509_certificate(loaded.issue(CSR_PEM, "web", now=NOW))
    leaf.verify_directly_issued_by(CA.root)


def test_ca_save_refuses_to_overwrite(tmp_path: Path) -> None:
    CA.save(tmp_path)
    other = CertificateAuthority.create("mesh", now=NOW)
    with pytest.raises(FileExistsError):
        other.save(tmp_path)
    assert CertificateAuthority.load(tmp_path).root == CA.root
    other.save(tmp_path, overwrite=True)
    assert CertificateAuthority.load(tmp_path).root == other.root


def test_ca_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError) as caught:
        CertificateAuthority.load(tmp_path)
    assert caught.value.path == str(tmp_path / "ca.crt")


def test_ca_load_names_a_key_that_does_not_match(tmp_path: Path) -> None:
    CA.save(tmp_path)
    CertificateAuthority.create("mesh", now=NOW).save(tmp_path / "other")
    (tmp_path / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(IdentityFileError) as caught:
        CertificateAuthority.load(tmp_path)
    assert caught.value.path == str(tmp_path / "ca.key")
    assert "does not belong" in caught.value.reason


def test_make_key_and_csr_makes_a_p256_key_and_a_signed_csr() -> None:
    key_pem, csr_pem = make_key_and_csr(SpiffeId.for_service("mesh", "api"))
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh/api"]
    assert b"PRIVATE KEY" not in csr_pem
