"""The control plane's CA and dataplane-token routes.

- `POST /api/v1/tokens/dataplane`  (admin token) `{"mesh", "service", "ttl"}` →
  `{"token", "jti", "expires"}`
- `POST /api/v1/tokens/revoke`     (admin token) `{"jti"[, "mesh"]}` or `{"token"}` → 204;
  the revocation is a `TokenRevocation` record in the store (mesh, name = jti)
- `POST /api/v1/ca/sign`           (dataplane token) `{"csr": PEM[, "dataplane": NAME]}` →
  `{"certificate", "bundle", "expires"}`, for the token's identity only, from the CA of
  the token's mesh; naming the dataplane records the certificate's expiry in its status
- `GET  /api/v1/ca/bundle[?mesh=M]` (open) the trust bundle of a mesh (default `default`), PEM

`/api/v1/ca/*` is outside the admin token's guard (`OPEN_PATHS`): the sign route checks a
dataplane token itself, and the admin token is not one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography import x509
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshling.controlplane.api.app import ApiError, guarded, read_document
from meshling.controlplane.resources import DATAPLANE_KIND
from meshling.controlplane.status import STATUS_KIND
from meshling.controlplane.store import AlreadyExists, NotFound, Store
from meshling.controlplane.tokens import (
    REVOCATION_KIND,
    TokenClaims,
    TokenError,
    TokenSigner,
    is_jti,
)
from meshling.identity import CaError, CertificateAuthority, SpiffeId
from meshling.identity.ca import CA_CERT_FILE
from meshling.identity.cli import parse_duration

DEFAULT_MESH: Final = "default"
DEFAULT_TOKEN_TTL: Final = "24h"
SIGN_PATH: Final = "/api/v1/ca/sign"
BUNDLE_PATH: Final = "/api/v1/ca/bundle"
OPEN_PATHS: Final = frozenset({SIGN_PATH, BUNDLE_PATH})

Clock = Callable[[], dt.datetime]

_DATAPLANE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_routes(store: Store, signer: TokenSigner, *, clock: Clock = utc_now) -> list[Route]:
    """The admin routes that issue and revoke dataplane tokens."""

    async def issue(request: Request) -> Response:
        body = await _object(request)
        mesh = _string(body, "mesh", DEFAULT_MESH)
        service = _string(body, "service", None)
        ttl_text = _string(body, "ttl", DEFAULT_TOKEN_TTL)
        try:
            ttl = parse_duration(ttl_text)
        except argparse.ArgumentTypeError as e:
            raise ApiError(400, str(e), field="ttl", reason=str(e)) from None
        try:
            token, claims = signer.issue_with_claims(mesh, service, ttl, clock())
        except ValueError as e:
            raise ApiError(400, str(e), field="service", reason=str(e)) from None
        return JSONResponse(
            {
                "token": token,
                "jti": claims.jti,
                "mesh": claims.mesh,
                "service": claims.service,
                "expires": _iso(claims.expires),
            },
            status_code=201,
        )

    async def revoke(request: Request) -> Response:
        body = await _object(request)
        expires: str | None = None
        if "token" in body:
            raw = body["token"]
            if not isinstance(raw, str):
                raise ApiError(400, "token must be a string", field="token")
            try:
                claims = signer.verify_signature(raw)
            except TokenError as e:
                raise ApiError(400, str(e), field="token", reason=e.reason) from None
            jti, mesh, expires = claims.jti, claims.mesh, _iso(claims.expires)
        else:
            jti = _string(body, "jti", None)
            mesh = _string(body, "mesh", DEFAULT_MESH)
            if not is_jti(jti):
                raise ApiError(
                    400,
                    f"invalid token id {jti!r}",
                    field="jti",
                    reason="a token id is 32 lower-case hex digits, as issued",
                )
        spec: dict[str, Any] = {"jti": jti, "revoked": _iso(clock())}
        if expires:
            spec["expires"] = expires
        with contextlib.suppress(AlreadyExists):  # revoking twice is revoking once
            await store.create(REVOCATION_KIND, mesh, jti, spec)
        return Response(status_code=204)

    return [
        Route("/api/v1/tokens/dataplane", guarded(issue), methods=["POST"]),
        Route("/api/v1/tokens/revoke", guarded(revoke), methods=["POST"]),
    ]


async def is_revoked(store: Store, claims: TokenClaims) -> bool:
    """Whether a revocation is stored for the token, in its mesh or (for a revocation
    made by id alone) in the default mesh; ids are random, so they cannot collide."""
    for mesh in dict.fromkeys((claims.mesh, DEFAULT_MESH)):
        try:
            await store.get(REVOCATION_KIND, mesh, claims.jti)
        except NotFound:
            continue
        return True
    return False


class AuthorityProvider(Protocol):
    async def for_mesh(self, mesh: str) -> CertificateAuthority | None:
        """The CA of `mesh`, or None when this control plane has none for it."""
        ...


def ca_routes(
    store: Store,
    ca: CertificateAuthority | AuthorityProvider,
    signer: TokenSigner,
    *,
    clock: Clock = utc_now,
) -> list[Route]:
    """The CA routes: sign a CSR for a dataplane token's holder, and the trust bundle.

    `ca` is one CA (for its one mesh) or a provider of a CA per mesh."""
    from meshling.controlplane.trust import FixedAuthority

    authorities: AuthorityProvider = (
        FixedAuthority(ca) if isinstance(ca, CertificateAuthority) else ca
    )

    async def authority(mesh: str) -> CertificateAuthority:
        found = await authorities.for_mesh(mesh)
        if found is None:
            raise ApiError(
                403,
                f"the token is for mesh {mesh}, for which this control plane has no CA "
                "(is there such a mesh?)",
                reason="wrong_mesh",
            )
        return found

    async def authenticate(request: Request) -> TokenClaims:
        values = request.headers.getlist("authorization")
        scheme, _, credentials = (values[0] if len(values) == 1 else "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ApiError(
                401,
                "missing dataplane token: send 'Authorization: Bearer <dataplane token>'",
                reason="malformed",
            )
        try:
            claims = signer.verify(credentials.strip(), clock())
            if await is_revoked(store, claims):
                raise TokenError("revoked", f"token id {claims.jti}")
        except TokenError as e:
            raise ApiError(401, str(e), reason=e.reason) from None
        return claims

    async def sign(request: Request) -> Response:
        claims = await authenticate(request)
        body = await _object(request)
        csr_text = body.get("csr")
        if not isinstance(csr_text, str) or not csr_text.strip():
            raise ApiError(400, "the body needs a PEM CSR in 'csr'", field="csr")
        csr_pem = csr_text.encode()
        check_csr_identity(csr_pem, claims)
        dataplane = await _dataplane_of(store, claims, body.get("dataplane"))
        ca = await authority(claims.mesh)
        try:
            certificate = ca.issue(csr_pem, claims.service, now=clock())
        except CaError as e:
            status = 503 if e.reason == "root_expired" else 400
            raise ApiError(status, e.detail, field="csr", reason=e.reason) from None
        expires = x509.load_pem_x509_certificate(certificate).not_valid_after_utc
        if dataplane is not None:
            await store.patch_many(
                STATUS_KIND, [(claims.mesh, dataplane, {"certificate_expires": _iso(expires)})]
            )
        return JSONResponse(
            {
                "certificate": certificate.decode(),
                "bundle": ca.bundle.to_pem().decode(),
                "identity": str(claims.identity),
                "expires": _iso(expires),
            }
        )

    async def bundle(request: Request) -> Response:
        mesh = request.query_params.get("mesh") or DEFAULT_MESH
        found = await authorities.for_mesh(mesh)
        if found is None:
            raise ApiError(404, f"no CA for mesh {mesh!r}: is there such a mesh?")
        return Response(found.bundle.to_pem(), media_type="application/x-pem-file")

    return [
        Route(SIGN_PATH, guarded(sign), methods=["POST"]),
        Route(BUNDLE_PATH, guarded(bundle), methods=["GET"]),
    ]


async def _dataplane_of(store: Store, claims: TokenClaims, raw: Any) -> str | None:
    """The dataplane a sign request names, if any: one of the token's service."""
    if raw is None:
        return None
    if not isinstance(raw, str) or not _DATAPLANE_NAME.fullmatch(raw):
        raise ApiError(
            400,
            "dataplane must be a dataplane name",
            field="dataplane",
            reason=f"got {raw!r}",
        )
    try:
        existing = await store.get(DATAPLANE_KIND, claims.mesh, raw)
    except NotFound:
        return raw  # a proxy gets its certificate before its first hello registers it
    if existing.spec.get("service") != claims.service:
        raise ApiError(
            403,
            f"dataplane {raw} is service {existing.spec.get('service')}, not the token's "
            f"service {claims.service}",
            field="dataplane",
            reason="forbidden",
        )
    return raw


def check_csr_identity(csr_pem: bytes, claims: TokenClaims) -> None:
    """Refuses (403) a CSR that asks for an identity other than the token's.

    A CSR may name no identity (the CA decides it anyway); if it names one, in a URI SAN
    or as its subject's common name, it must be the token's SPIFFE ID (a common name may
    also be the bare service name). An unreadable CSR is a 400.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise ApiError(400, f"unreadable CSR: {e}", field="csr", reason="bad_csr") from None
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris: list[str] = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as e:
        raise ApiError(400, f"unreadable CSR: {e}", field="csr", reason="bad_csr") from None
    names = [
        str(attr.value) for attr in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ]
    expected = str(claims.identity)
    wrong = [u for u in uris if u != expected]
    wrong += [n for n in names if n not in (expected, claims.service)]
    if wrong:
        raise ApiError(
            403,
            f"csr identity {wrong[0]} does not match the token's service {claims.service}",
            field="csr",
            reason="identity_mismatch",
            expected=expected,
        )


async def _object(request: Request) -> dict[str, Any]:
    document = await read_document(request)
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object", field="")
    return document


def _string(body: dict[str, Any], field: str, default: str | None) -> str:
    value = body.get(field, default)
    if value is None:
        raise ApiError(400, f"{field} is required", field=field, reason="required field is missing")
    if not isinstance(value, str) or not value:
        raise ApiError(
            400, f"{field} must be a non-empty string", field=field, reason=f"got {value!r}"
        )
    return value


def load_or_create_ca(directory: str | os.PathLike[str], mesh: str) -> CertificateAuthority:
    """The CA saved in `directory`, or a new one for `mesh` saved there (key 0600).

    Raises `files.IdentityFileError` for unusable files, and ValueError if the saved CA
    belongs to another mesh.
    """
    path = Path(directory)
    if not (path / CA_CERT_FILE).exists():
        SpiffeId(mesh)  # validates the mesh as a trust domain
        ca = CertificateAuthority.create(mesh)
        try:
            ca.save(path)
            return ca
        except FileExistsError:
            pass  # another replica made one first: use that
    ca = CertificateAuthority.load(path)
    if ca.mesh != mesh:
        raise ValueError(f"the CA in {path} is for mesh {ca.mesh!r}, not {mesh!r}")
    return ca
