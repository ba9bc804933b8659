"""The proxy's data directory: the last snapshot it ran and its own credentials.

```
<data dir>/          0700
  snapshot.json      0600  {"version": ..., "snapshot": {...}}: the last snapshot applied
  cert.pem           0600  the proxy's certificate (its SPIFFE identity)
  key.pem            0600  its private key, made here, never sent anywhere
  bundle.pem         0600  the trust bundle: the roots peers' certificates must chain to
```

Every file is replaced atomically (a temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new file, never half of one. The
running proxy reads the TLS files by these paths (the control plane builds snapshots that
name them), which is why they keep their names across renewals.

The cache is what makes the proxy self-reliant: started while no control plane answers,
it runs the cached snapshot with the cached certificate until one does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from meshling.agent.renewal import CertificateTimes

log = logging.getLogger("meshling.agent")

SNAPSHOT_FILE: Final = "snapshot.json"
CERTIFICATE_FILE: Final = "cert.pem"
KEY_FILE: Final = "key.pem"
BUNDLE_FILE: Final = "bundle.pem"


class DataDirError(Exception):
    """The data directory cannot be used; the text says which path and why."""


@dataclass(frozen=True, slots=True)
class CachedSnapshot:
    version: str
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Credentials:
    """The proxy's certificate (PEM chain), its key and the trust bundle."""

    certificate: bytes
    key: bytes
    bundle: bytes
    times: CertificateTimes


class DataDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()

    @property
    def certificate(self) -> str:
        return str(self.path / CERTIFICATE_FILE)

    @property
    def key(self) -> str:
        return str(self.path / KEY_FILE)

    @property
    def trust_bundle(self) -> str:
        return str(self.path / BUNDLE_FILE)

    @property
    def snapshot(self) -> str:
        return str(self.path / SNAPSHOT_FILE)

    def prepare(self) -> None:
        """Create the directory 0700 (or narrow an existing one to 0700)."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.path.stat().st_mode & 0o077:
                self.path.chmod(0o700)
        except OSError as exc:
            raise DataDirError(f"data dir {self.path}: {exc.strerror or exc}") from None

    def write(self, name: str, data: bytes) -> None:
        """Replace one file atomically, 0600."""
        target = self.path / name
        tmp = self.path / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask or an older file said
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            directory = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)
        except OSError as exc:
            raise DataDirError(f"cannot write {target}: {exc.strerror or exc}") from None

    # -- snapshot -------------------------------------------------------------------
    def save_snapshot(self, version: str, document: dict[str, Any]) -> None:
        body = {"version": version, "snapshot": document}
        self.write(SNAPSHOT_FILE, json.dumps(body, separators=(",", ":")).encode())

    def load_snapshot(self) -> CachedSnapshot | None:
        """The cached snapshot document, or None (missing or unreadable: logged)."""
        try:
            with open(self.snapshot, "rb") as f:
                body = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the cached snapshot %s: %s", self.snapshot, exc)
            return None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("version"), str)
            or not isinstance(body.get("snapshot"), dict)
        ):
            log.warning("ignoring the cached snapshot %s: not a cache file", self.snapshot)
            return None
        return CachedSnapshot(body["version"], body["snapshot"])

    # -- credentials ----------------------------------------------------------------
    def save_credentials(self, certificate: bytes, key: bytes, bundle: bytes) -> None:
        """Write the bundle, then the key, then the certificate.

        The bundle first: a new certificate may chain to a new root that only the new
        bundle holds. The key and certificate are two files, so a reader could see one
        new and one old; the proxy reads them only when told to (after this returns),
        and a crash between the two renames leaves a pair `load_credentials` rejects.
        """
        self.write(BUNDLE_FILE, bundle)
        self.write(KEY_FILE, key)
        self.write(CERTIFICATE_FILE, certificate)

    def load_credentials(self) -> Credentials | None:
        """The cached credentials if they are complete and belong together, else None."""
        try:
            with open(self.certificate, "rb") as f:
                certificate = f.read()
            obtained = os.stat(self.certificate).st_mtime
            with open(self.key, "rb") as f:
                key = f.read()
            with open(self.trust_bundle, "rb") as f:
                bundle = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring the cached certificate in %s: %s", self.path, exc)
            return None
        try:
            times = CertificateTimes.from_pem(certificate, obtained)
            check_pair(certificate, key)
        except ValueError as exc:
            log.warning("ignoring the cached certificate in %s: %s", self.path, exc)
            return None
        return Credentials(certificate, key, bundle, times)


def check_pair(certificate: bytes, key: bytes) -> None:
    """Raises ValueError unless `key` is the private key of the certificate's leaf."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(certificate)[0]
    private = serialization.load_pem_private_key(key, password=None)
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(pem, spki) != leaf.public_key().public_bytes(pem, spki):
        raise ValueError("the key does not belong to the certificate")
