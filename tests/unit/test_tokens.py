"""Dataplane tokens: issue and verify, and every way a token is refused."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from collections.abc import Container
from pathlib import Path

import pytest

from meshling.controlplane.tokens import (
    SigningKeyError,
    TokenError,
    TokenSigner,
    load_or_create_signing_key,
)

KEY = b"k" * 32
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refused(
    token: str, reason: str, *, now: dt.datetime = NOW, revoked: Container[str] = ()
) -> None:
    with pytest.raises(TokenError) as info:
        TokenSigner(KEY).verify(token, now, revoked)
    assert info.value.reason == reason
    assert KEY.decode() not in str(info.value)


def test_round_trip() -> None:
    signer = TokenSigner(KEY)
    token, issued = signer.issue_with_claims("default", "api", DAY, NOW)
    claims = signer.verify(token, NOW + dt.timedelta(hours=23), ())
    assert claims == issued
    assert (claims.mesh, claims.service) == ("default", "api")
    assert str(claims.identity) == "spiffe://default/api"
    assert claims.issued == NOW
    assert claims.expires == NOW + DAY
    assert len(claims.jti) == 32
    header, payload, _ = token.split(".")
    assert json.loads(unb64(header)) == {"alg": "HS256", "typ": "meshling-dataplane"}
    assert json.loads(unb64(payload)) == {
        "mesh": "default",
        "service": "api",
        "jti": claims.jti,
        "iat": int(NOW.timestamp()),
        "exp": int((NOW + DAY).timestamp()),
    }


def test_every_token_has_its_own_id() -> None:
    signer = TokenSigner(KEY)
    a = signer.verify(signer.issue("default", "api", DAY, NOW), NOW)
    b = signer.verify(signer.issue("default", "api", DAY, NOW), NOW)
    assert a.jti != b.jti


def test_tampered_payload_is_a_bad_signature() -> None:
    token = TokenSigner(KEY).issue("default", "api", DAY, NOW)
    header, payload, signature = token.split(".")
    claims = json.loads(unb64(payload))
    claims["service"] = "web"
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    refused(forged, "bad_signature")
    # a longer lifetime is no better
    claims = json.loads(unb64(payload))
    claims["exp"] += 10**6
    refused(f"{header}.{b64(json.dumps(claims).encode())}.{signature}", "bad_signature")


def test_wrong_key() -> None:
    token = TokenSigner(b"o" * 32).issue("default", "api", DAY, NOW)
    refused(token, "bad_signature")


def test_expired_with_a_fake_clock() -> None:
    token = TokenSigner(KEY).issue("default", "api", DAY, NOW)
    TokenSigner(KEY).verify(token, NOW + DAY - dt.timedelta(seconds=1))
    refused(token, "expired", now=NOW + DAY)
    refused(token, "expired", now=NOW + 10 * DAY)


def test_revoked() -> None:
    signer = TokenSigner(KEY)
    token = signer.issue("default", "api", DAY, NOW)
    jti = signer.verify(token, NOW).jti
    refused(token, "revoked", revoked={jti})
    signer.verify(token, NOW, {"0" * 32})


def test_signature_checked_before_expiry_and_revocation() -> None:
    token = TokenSigner(b"o" * 32).issue("default", "api", DAY, NOW)
    refused(token, "bad_signature", now=NOW + 10 * DAY)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d",
        "é.b.c",
        "x" * 5000,
    ],
)
def test_malformed(token: str) -> None:
    refused(token, "malformed")


def test_malformed_parts() -> None:
    token = TokenSigner(KEY).issue("default", "api", DAY, NOW)
    header, payload, _ = token.split(".")
    # another algorithm in the header is not negotiated: it is not our token at all
    none_header = b64(json.dumps({"alg": "none", "typ": "meshling-dataplane"}).encode())
    refused(f"{none_header}.{payload}.", "malformed")
    refused(f"{header}.{payload}.not*base64", "malformed")
    # a correctly signed payload that is not the claims
    signer = TokenSigner(KEY)
    for body in (b"[]", b"not json", json.dumps({"mesh": "default"}).encode()):
        part = b64(body)
        mac = signer._mac(f"{header}.{part}")
        refused(f"{header}.{part}.{b64(mac)}", "malformed")


def test_issue_refuses_bad_input() -> None:
    signer = TokenSigner(KEY)
    with pytest.raises(ValueError, match="SPIFFE"):
        signer.issue("default", "a/b", DAY, NOW)
    with pytest.raises(ValueError, match="positive"):
        signer.issue("default", "api", dt.timedelta(0), NOW)
    with pytest.raises(ValueError, match="timezone"):
        signer.issue("default", "api", DAY, NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="32 bytes"):
        TokenSigner(b"short")
    assert "k" * 32 not in repr(signer)


def test_signing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    key = load_or_create_signing_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_signing_key(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600") as info:
        load_or_create_signing_key(path)
    assert key.hex() not in str(info.value)
    os.chmod(path, 0o600)
    path.write_text("abcd\n")
    with pytest.raises(SigningKeyError, match="shorter"):
        load_or_create_signing_key(path)
