"""PEM files for certificates, bundles and private keys.

Every write is atomic (a temporary file in the same directory, fsynced, then renamed
over the target), so a proxy that reloads its certificate while it is being renewed
reads the old file or the new one, never half of one. Private keys are created 0600
from the first byte: the key is never readable by others, not even for a moment
between a create and a chmod.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

KEY_MODE = 0o600
CERT_MODE = 0o644
# the reason of an IdentityFileError for a missing file, for callers that add a hint
NO_SUCH_FILE = "no such file"


class IdentityFileError(Exception):
    """A certificate or key file that cannot be read or used; says which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = CERT_MODE) -> None:
    """Replace `path` with `data` in one step; the file ends with exactly `mode`."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write through a file (or symlink) someone else put there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        # the umask may have taken bits away; the mode is a promise, so set it exactly
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    # makes the rename itself durable; some filesystems cannot open a directory
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_private_key(path: str | os.PathLike[str], key_pem: bytes) -> None:
    """Write a PEM private key, mode 0600."""
    write_atomic(path, key_pem, mode=KEY_MODE)


def write_certificates(path: str | os.PathLike[str], pem: bytes) -> None:
    """Write PEM certificates (a leaf, or a bundle of roots), mode 0644."""
    write_atomic(path, pem, mode=CERT_MODE)


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityFileError(path, NO_SUCH_FILE) from None
    except IsADirectoryError:
        raise IdentityFileError(path, "is a directory, expected a PEM file") from None
    except OSError as exc:
        raise IdentityFileError(path, exc.strerror or str(exc)) from None


def read_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in file order; at least one."""
    data = _read(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise IdentityFileError(path, "no PEM certificate in the file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityFileError(path, f"unreadable certificate: {exc}") from None


def read_private_key(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    """The unencrypted PEM private key in `path`."""
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityFileError(
            path, "the key is encrypted; meshling needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityFileError(path, f"unreadable private key: {exc}") from None
