"""PEM files: atomic writes with exact modes, and reads that name the file and the problem."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshling.identity import CertificateAuthority, IdentityFileError
from meshling.identity.files import (
    read_certificates,
    read_private_key,
    write_atomic,
    write_certificates,
    write_private_key,
)

CA = CertificateAuthority.create("mesh")
KEY = ec.generate_private_key(ec.SECP256R1())
KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_write_private_key_is_0600_whatever_the_umask(
    tmp_path: Path, permissive_umask: None
) -> None:
    write_private_key(tmp_path / "web.key", KEY_PEM)
    assert mode(tmp_path / "web.key") == 0o600
    assert (tmp_path / "web.key").read_bytes() == KEY_PEM


def test_files_write_private_key_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "web.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_private_key(path, KEY_PEM)
    assert mode(path) == 0o600
    assert path.read_bytes() == KEY_PEM


def test_files_write_certificates_is_0644(tmp_path: Path) -> None:
    write_certificates(tmp_path / "web.crt", CA.root_pem)
    assert mode(tmp_path / "web.crt") == 0o644


def test_files_write_atomic_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "bundle.crt"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.crt"]


def test_files_write_atomic_cleans_up_after_a_failed_rename(tmp_path: Path) -> None:
    # the target is a non-empty directory: the rename fails, the temporary file goes
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_bytes(b"")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "taken", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_files_read_certificates_reads_every_certificate(tmp_path: Path) -> None:
    other = CertificateAuthority.create("mesh")
    path = tmp_path / "bundle.crt"
    path.write_bytes(CA.root_pem + other.root_pem)
    assert read_certificates(path) == [CA.root, other.root]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no such file"),
        (b"", "no PEM certificate"),
        (KEY_PEM, "no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "unreadable certificate",
        ),
    ],
)
def test_files_read_certificates_names_file_and_reason(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "web.crt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IdentityFileError) as caught:
        read_certificates(path)
    assert caught.value.path == str(path)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: ")


def test_files_read_certificates_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError, match="directory"):
        read_certificates(tmp_path)


def test_files_read_private_key_reads_what_was_written(tmp_path: Path) -> None:
    write_private_key(tmp_path / "web.key", KEY_PEM)
    assert read_private_key(tmp_path / "web.key").public_key() == KEY.public_key()


def test_files_read_private_key_refuses_an_encrypted_key(tmp_path: Path) -> None:
    encrypted = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "web.key").write_bytes(encrypted)
    with pytest.raises(IdentityFileError, match="encrypted"):
        read_private_key(tmp_path / "web.key")


def test_files_read_private_key_refuses_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "web.key").write_bytes(CA.root_pem)
    with pytest.raises(IdentityFileError, match="unreadable private key"):
        read_private_key(tmp_path / "web.key")
