"""The control plane's secrets, kept in the store so that every replica on one database
signs the same tokens and certificates: the dataplane-token signing key, and one CA per
mesh.

Both are internal kinds (not in `resources.kinds()`, so the resource API neither lists
nor writes them):

* `TokenSigningKey`, mesh `*`, name `dataplane-tokens`: `{"key": "<hex>"}`;
* `MeshCertificateAuthority`, mesh `<mesh>`, name `root`: `{"certificate": PEM,
  "key": PEM}` — the root and its private key.

Each is created on first need with `create`, which only one writer can win: a replica
that gets `AlreadyExists` reads the winner's instead of keeping its own. So anyone who can
read the store can read the CA's key: give the store the protection the CA deserves
(the SQLite file is 0600; a PostgreSQL role of its own).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshling.controlplane.resources import MESH_KIND
from meshling.controlplane.store import AlreadyExists, NotFound, Store
from meshling.controlplane.tokens import MIN_KEY_LENGTH, TokenSigner
from meshling.identity import CertificateAuthority

SIGNING_KEY_KIND: Final = "TokenSigningKey"
CA_KIND: Final = "MeshCertificateAuthority"
# the mesh of records that belong to no mesh
GLOBAL: Final = "*"
SIGNING_KEY_NAME: Final = "dataplane-tokens"
CA_NAME: Final = "root"


class TrustError(Exception):
    """A stored secret is unusable; the message says which and why."""


async def load_or_create_signer(store: Store) -> TokenSigner:
    """The token signer of the control plane, its key made on the first start."""
    try:
        record = await store.get(SIGNING_KEY_KIND, GLOBAL, SIGNING_KEY_NAME)
    except NotFound:
        key = secrets.token_bytes(MIN_KEY_LENGTH)
        try:
            await store.create(SIGNING_KEY_KIND, GLOBAL, SIGNING_KEY_NAME, {"key": key.hex()})
            return TokenSigner(key)
        except AlreadyExists:  # another replica made one first: use that
            record = await store.get(SIGNING_KEY_KIND, GLOBAL, SIGNING_KEY_NAME)
    try:
        return TokenSigner(bytes.fromhex(str(record.spec["key"])))
    except (KeyError, ValueError) as e:
        raise TrustError(f"the stored token signing key is unusable: {e}") from None


def _ca_spec(ca: CertificateAuthority) -> dict[str, str]:
    # the CA keeps its key private; this module is the one place that stores it
    key = ca._key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"certificate": ca.root_pem.decode(), "key": key.decode()}


def _ca_from(mesh: str, spec: dict[str, object]) -> CertificateAuthority:
    try:
        root = x509.load_pem_x509_certificate(str(spec["certificate"]).encode())
        key = serialization.load_pem_private_key(str(spec["key"]).encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the key is not ECDSA")
        ca = CertificateAuthority(root, key)
    except (KeyError, ValueError, TypeError) as e:
        raise TrustError(f"the stored CA of mesh {mesh!r} is unusable: {e}") from None
    if ca.mesh != mesh:
        raise TrustError(f"the stored CA of mesh {mesh!r} is for mesh {ca.mesh!r}")
    return ca


class Authorities:
    """One CA per mesh, from the store; made the first time a mesh needs one."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: dict[str, CertificateAuthority] = {}
        self._lock = asyncio.Lock()

    async def for_mesh(self, mesh: str) -> CertificateAuthority | None:
        """The CA of `mesh`, or None if there is no such mesh."""
        if (ca := self._cache.get(mesh)) is not None:
            return ca
        try:
            await self._store.get(MESH_KIND, mesh, mesh)
        except NotFound:
            return None
        async with self._lock:
            if (ca := self._cache.get(mesh)) is not None:
                return ca
            try:
                record = await self._store.get(CA_KIND, mesh, CA_NAME)
                ca = _ca_from(mesh, record.spec)
            except NotFound:
                ca = CertificateAuthority.create(mesh)
                try:
                    await self._store.create(CA_KIND, mesh, CA_NAME, _ca_spec(ca))
                except AlreadyExists:  # another replica made one first: use that
                    record = await self._store.get(CA_KIND, mesh, CA_NAME)
                    ca = _ca_from(mesh, record.spec)
            self._cache[mesh] = ca
            return ca


class FixedAuthority:
    """One CA for its one mesh (for a control plane given a CA, and for tests)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    async def for_mesh(self, mesh: str) -> CertificateAuthority | None:
        return self.ca if mesh == self.ca.mesh else None
