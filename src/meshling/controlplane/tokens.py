"""Dataplane tokens: what a proxy shows the control plane to get a certificate.

A token is bound to one mesh and one service, expires, and can be revoked by its id
(`jti`). Its compact form is `header.payload.signature`, each part base64url without
padding:

* header: `{"alg":"HS256","typ":"meshling-dataplane"}`, always exactly these bytes;
* payload: `{"mesh", "service", "jti", "iat", "exp"}`, times in Unix seconds;
* signature: HMAC-SHA256 over `header.payload` with the control plane's secret key.

Why HMAC and not Ed25519: the control plane is the only party that issues tokens and
the only one that checks them, so a public key would have no one to be given to. A
shared secret is simpler to keep (one file, shared by the replicas of one control
plane), a MAC is quicker to check than a signature, and there is no algorithm to
negotiate: the header is compared as a constant, so a token cannot pick `none` or
another algorithm.

Nothing here reads a clock: `now` is passed in. The secret never appears in an error.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from meshling.identity import SpiffeId, SpiffeIdError

TokenReason = Literal["malformed", "bad_signature", "expired", "revoked"]

# what a person reads for each reason; the codes are stable, the texts may improve
_REASONS: Final[dict[str, str]] = {
    "malformed": "the dataplane token is malformed",
    "bad_signature": (
        "the dataplane token's signature is not valid "
        "(it was altered, or issued by another control plane)"
    ),
    "expired": "the dataplane token has expired",
    "revoked": "the dataplane token has been revoked",
}

# the store kind of a revocation: mesh of the token (or `default`), name = its jti
REVOCATION_KIND: Final = "TokenRevocation"

HEADER: Final = {"alg": "HS256", "typ": "meshling-dataplane"}
MIN_KEY_LENGTH: Final = 32
# a token is well under 1 KiB; refuse to even decode anything much larger
MAX_TOKEN_LENGTH: Final = 4096

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_JTI = re.compile(r"[0-9a-f]{32}")


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER_PART: Final = _b64encode(json.dumps(HEADER, separators=(",", ":")).encode())


class TokenError(Exception):
    """A token refused; `reason` is one of `malformed`, `bad_signature`, `expired`,
    `revoked`. The message never holds the token or the key."""

    def __init__(self, reason: TokenReason, detail: str = "") -> None:
        self.reason: TokenReason = reason
        self.detail = detail
        text = _REASONS[reason]
        super().__init__(f"{text}: {detail}" if detail else text)


class SigningKeyError(Exception):
    """The signing key file cannot be read or written; the message says why."""


def is_jti(value: object) -> bool:
    """Whether `value` has the form of a token id (32 lower-case hex digits)."""
    return isinstance(value, str) and _JTI.fullmatch(value) is not None


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


@dataclass(frozen=True)
class TokenClaims:
    mesh: str
    service: str
    jti: str
    issued: dt.datetime
    expires: dt.datetime

    @property
    def identity(self) -> SpiffeId:
        """The one identity a holder of this token may have certified."""
        return SpiffeId.for_service(self.mesh, self.service)


class TokenSigner:
    """Issues and verifies dataplane tokens with one secret key."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the signing key must be at least {MIN_KEY_LENGTH} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "TokenSigner(<secret>)"

    def _mac(self, signed: str) -> bytes:
        return hmac.new(self._key, signed.encode("ascii"), hashlib.sha256).digest()

    def issue(self, mesh: str, service: str, ttl: dt.timedelta, now: dt.datetime) -> str:
        """A token for `spiffe://<mesh>/<service>`, valid from `now` for `ttl`."""
        return self.issue_with_claims(mesh, service, ttl, now)[0]

    def issue_with_claims(
        self, mesh: str, service: str, ttl: dt.timedelta, now: dt.datetime
    ) -> tuple[str, TokenClaims]:
        """`issue`, and the claims the token carries.

        Raises ValueError for a mesh or service that cannot form a SPIFFE ID, or a
        `ttl` that is not positive.
        """
        now = _utc(now)
        if ttl <= dt.timedelta(0):
            raise ValueError("the token's lifetime must be positive")
        try:
            SpiffeId.for_service(mesh, service)
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from None
        iat = int(now.timestamp())
        exp = iat + max(1, int(ttl.total_seconds()))
        jti = secrets.token_hex(16)
        payload = {"mesh": mesh, "service": service, "jti": jti, "iat": iat, "exp": exp}
        payload_part = _b64encode(
            json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        )
        signed = f"{_HEADER_PART}.{payload_part}"
        token = f"{signed}.{_b64encode(self._mac(signed))}"
        claims = TokenClaims(
            mesh=mesh,
            service=service,
            jti=jti,
            issued=dt.datetime.fromtimestamp(iat, dt.UTC),
            expires=dt.datetime.fromtimestamp(exp, dt.UTC),
        )
        return token, claims

    def verify(self, token: str, now: dt.datetime, revoked: Container[str] = ()) -> TokenClaims:
        """The claims of `token` if it is well-formed, signed with this key, not expired
        at `now` and its id not in `revoked`; otherwise `TokenError`, checked in that
        order."""
        now = _utc(now)
        claims = self.verify_signature(token)
        if now >= claims.expires:
            raise TokenError("expired", f"it expired at {claims.expires:%Y-%m-%dT%H:%M:%SZ}")
        if claims.jti in revoked:
            raise TokenError("revoked", f"token id {claims.jti}")
        return claims

    def verify_signature(self, token: str) -> TokenClaims:
        """The claims of a well-formed token signed with this key, expired or not (to
        revoke a token by itself, say). Raises `TokenError` `malformed` or
        `bad_signature`."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenError("malformed")
        parts = token.strip().split(".")
        if len(parts) != 3:
            raise TokenError("malformed", "expected header.payload.signature")
        header_part, payload_part, signature_part = parts
        if header_part != _HEADER_PART:
            raise TokenError("malformed", "not a meshling dataplane token")
        try:
            signature = _b64decode(signature_part)
        except (ValueError, binascii.Error):
            raise TokenError("malformed", "the signature is not base64url") from None
        if not hmac.compare_digest(self._mac(f"{header_part}.{payload_part}"), signature):
            raise TokenError("bad_signature")
        try:
            payload = json.loads(_b64decode(payload_part))
        except (ValueError, binascii.Error):
            raise TokenError("malformed", "the payload is not base64url JSON") from None
        return _claims(payload)


def _claims(payload: Any) -> TokenClaims:
    if not isinstance(payload, dict):
        raise TokenError("malformed", "the payload is not a JSON object")
    mesh, service, jti = payload.get("mesh"), payload.get("service"), payload.get("jti")
    iat, exp = payload.get("iat"), payload.get("exp")
    if not (isinstance(mesh, str) and isinstance(service, str) and is_jti(jti)):
        raise TokenError("malformed", "mesh, service or jti is missing or invalid")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in (iat, exp)):
        raise TokenError("malformed", "iat or exp is missing or invalid")
    try:
        SpiffeId.for_service(mesh, service)
        issued = dt.datetime.fromtimestamp(iat, dt.UTC)  # type: ignore[arg-type]
        expires = dt.datetime.fromtimestamp(exp, dt.UTC)  # type: ignore[arg-type]
    except (SpiffeIdError, ValueError, OverflowError, OSError):
        raise TokenError("malformed", "the payload's values are out of range") from None
    assert isinstance(jti, str)
    return TokenClaims(mesh=mesh, service=service, jti=jti, issued=issued, expires=expires)


def load_or_create_signing_key(path: str | os.PathLike[str]) -> bytes:
    """The token signing key in `path` (hex), creating it (0600) with 32 random bytes if
    there is none yet. Raises `SigningKeyError` naming the file, never the key."""
    file = Path(path)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_signing_key(file)
    except OSError as exc:
        raise SigningKeyError(f"cannot create the token signing key {file}: {exc}") from None
    key = secrets.token_bytes(MIN_KEY_LENGTH)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    return key


def _read_signing_key(file: Path) -> bytes:
    try:
        text = file.read_text(encoding="ascii").strip()
        mode = stat.S_IMODE(file.stat().st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise SigningKeyError(f"cannot read the token signing key {file}: {exc}") from None
    if mode & 0o077:
        raise SigningKeyError(
            f"the token signing key {file} is readable by others (mode {mode:04o}); "
            f"run: chmod 600 {file}"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SigningKeyError(f"the token signing key {file} is not hex") from None
    if len(key) < MIN_KEY_LENGTH:
        raise SigningKeyError(
            f"the token signing key {file} is shorter than {MIN_KEY_LENGTH} bytes; "
            "remove it to have a new one made (every issued token then stops working)"
        )
    return key
