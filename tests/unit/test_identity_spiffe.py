"""SPIFFE ID parsing: what the spec allows parses and prints back the same, the rest is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshling.identity import SpiffeId, SpiffeIdError

TRUST_DOMAIN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
PATH_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"

trust_domains = st.text(TRUST_DOMAIN_ALPHABET, min_size=1, max_size=40)
segments = st.text(PATH_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=5).map(lambda parts: "".join(f"/{p}" for p in parts))
valid_ids = st.builds(lambda td, path: f"spiffe://{td}{path}", trust_domains, paths)


@pytest.mark.parametrize(
    ("uri", "trust_domain", "path"),
    [
        ("spiffe://mesh/web", "mesh", "/web"),
        (
            "spiffe://prod.example.com/ns/payments/sa/api-v1",
            "prod.example.com",
            "/ns/payments/sa/api-v1",
        ),
        ("spiffe://mesh", "mesh", ""),
        ("spiffe://a_b-c.d/Web_1.x-y", "a_b-c.d", "/Web_1.x-y"),
        ("spiffe://mesh/.../a..b", "mesh", "/.../a..b"),
    ],
)
def test_spiffe_id_parse_accepts_valid_ids(uri: str, trust_domain: str, path: str) -> None:
    identity = SpiffeId.parse(uri)
    assert (identity.trust_domain, identity.path) == (trust_domain, path)
    assert str(identity) == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "wrong_scheme"),
        ("mesh/web", "wrong_scheme"),
        ("SPIFFE://mesh/web", "wrong_scheme"),
        ("Spiffe://mesh/web", "wrong_scheme"),
        ("https://mesh/web", "wrong_scheme"),
        ("spiffe:/mesh/web", "wrong_scheme"),
        ("spiffe://", "empty_trust_domain"),
        ("spiffe:///web", "empty_trust_domain"),
        ("spiffe://Mesh/web", "trust_domain_chars"),
        ("spiffe://me%73h/web", "trust_domain_chars"),
        ("spiffe://mésh/web", "trust_domain_chars"),
        ("spiffe://user@mesh/web", "userinfo"),
        ("spiffe://mesh:8443/web", "port"),
        ("spiffe://mesh:/web", "port"),
        ("spiffe://mesh/web?x=1", "query_or_fragment"),
        ("spiffe://mesh/web#frag", "query_or_fragment"),
        ("spiffe://mesh?x", "query_or_fragment"),
        ("spiffe://mesh/", "empty_segment"),
        ("spiffe://mesh/web/", "empty_segment"),
        ("spiffe://mesh//web", "empty_segment"),
        ("spiffe://mesh/./web", "dot_segment"),
        ("spiffe://mesh/web/..", "dot_segment"),
        ("spiffe://mesh/w%65b", "path_chars"),
        ("spiffe://mesh/web server", "path_chars"),
        ("spiffe://mesh/web\x00.evil", "path_chars"),
        ("spiffe://mesh/wéb", "path_chars"),
        ("spiffe://mesh/web*", "path_chars"),
        ("spiffe://" + "a" * 256 + "/web", "trust_domain_too_long"),
        ("spiffe://mesh/" + "a" * 2040, "too_long"),
    ],
)
def test_spiffe_id_parse_refuses_invalid_ids(uri: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(uri)
    assert caught.value.reason == reason


def test_spiffe_id_parse_accepts_exactly_2048_bytes() -> None:
    uri = "spiffe://mesh/" + "a" * (2048 - len("spiffe://mesh/"))
    assert str(SpiffeId.parse(uri)) == uri
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(uri + "a")


def test_spiffe_id_parse_refuses_non_strings() -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(b"spiffe://mesh/web")  # type: ignore[arg-type]
    assert caught.value.reason == "not_a_string"


def test_spiffe_id_constructor_validates() -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId("Mesh", "/web")
    with pytest.raises(SpiffeIdError):
        SpiffeId("mesh", "web")
    assert SpiffeId("mesh", "/web") == SpiffeId.parse("spiffe://mesh/web")


def test_spiffe_id_for_service_builds_mesh_and_service() -> None:
    identity = SpiffeId.for_service("mesh", "api-v1")
    assert str(identity) == "spiffe://mesh/api-v1"
    assert identity.service == "api-v1"


@pytest.mark.parametrize(
    ("mesh", "service", "reason"),
    [
        ("mesh", "", "empty_segment"),
        ("mesh", "a/b", "service_not_one_segment"),
        ("mesh", "..", "dot_segment"),
        ("mesh", "web app", "path_chars"),
        ("Mesh", "web", "trust_domain_chars"),
    ],
)
def test_spiffe_id_for_service_refuses_bad_names(mesh: str, service: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.for_service(mesh, service)
    assert caught.value.reason == reason


def test_spiffe_id_service_is_none_for_other_paths() -> None:
    assert SpiffeId.parse("spiffe://mesh/ns/prod").service is None
    assert SpiffeId.parse("spiffe://mesh").service is None


def test_spiffe_id_error_message_names_the_input() -> None:
    with pytest.raises(SpiffeIdError, match=r"'spiffe://mesh/web/': .*empty segment"):
        SpiffeId.parse("spiffe://mesh/web/")


@given(valid_ids)
def test_spiffe_id_parse_round_trips(uri: str) -> None:
    identity = SpiffeId.parse(uri)
    assert str(identity) == uri
    assert SpiffeId.parse(str(identity)) == identity
    assert SpiffeId(identity.trust_domain, identity.path) == identity


@given(st.text(max_size=100))
def test_spiffe_id_parse_raises_only_spiffe_id_error_on_text(text: str) -> None:
    try:
        identity = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(identity) == text


@given(st.text(max_size=60).map(lambda s: "spiffe://" + s))
def test_spiffe_id_parse_raises_only_spiffe_id_error_after_scheme(text: str) -> None:
    try:
        identity = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(identity) == text


@given(valid_ids, st.data())
def test_spiffe_id_parse_refuses_a_forbidden_character_anywhere(
    uri: str, data: st.DataObject
) -> None:
    forbidden = data.draw(
        st.sampled_from(["%", "?", "#", "@", " ", "\x00", "\\", "é", "*", "+", "~"])
    )
    position = data.draw(st.integers(min_value=len("spiffe://"), max_value=len(uri)))
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(uri[:position] + forbidden + uri[position:])
