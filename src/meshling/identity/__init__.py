"""Workload identity: SPIFFE IDs, the mesh CA, and verification of peers' certificates.

What the proxy and the control plane use for mutual TLS between proxies:

* `SpiffeId` — `spiffe://<mesh>/<service>`, parsed strictly (`SpiffeIdError`).
* `CertificateAuthority` — a mesh's root; `issue(csr_pem, service)` signs a short-lived
  leaf from a CSR; `make_key_and_csr` is the proxy's half (its key never leaves it).
* `Bundle` — the roots trusted for one trust domain (two during a root rotation).
* `verify_svid` / `peer_identity_from_ssl_object` — the peer's `SpiffeId` per the
  SPIFFE X.509-SVID rules, or `SvidError` with a reason code fit for a metric label.
* `files` — PEM reading, and atomic writes with keys 0600.

Nothing here opens a socket; the TLS contexts that use these belong to the proxy.
"""

from meshling.identity.ca import (
    DEFAULT_LEAF_TTL,
    DEFAULT_ROOT_VALIDITY,
    CaError,
    CertificateAuthority,
    make_key_and_csr,
)
from meshling.identity.files import IdentityFileError
from meshling.identity.spiffe import SpiffeId, SpiffeIdError
from meshling.identity.svid import (
    SVID_REASONS,
    Bundle,
    BundleError,
    SvidError,
    SvidReason,
    peer_identity_from_ssl_object,
    verify_svid,
)

__all__ = [
    "DEFAULT_LEAF_TTL",
    "DEFAULT_ROOT_VALIDITY",
    "SVID_REASONS",
    "Bundle",
    "BundleError",
    "CaError",
    "CertificateAuthority",
    "IdentityFileError",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "SvidReason",
    "make_key_and_csr",
    "peer_identity_from_ssl_object",
    "verify_svid",
]
