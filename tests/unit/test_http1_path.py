"""Unit and property tests for request path normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshling.http1 import PathError, normalize_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/", b"/"),
        (b"/a/b/c", b"/a/b/c"),
        (b"/a/b/", b"/a/b/"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/..", b"/"),
        (b"/../../a", b"/a"),
        (b"/.", b"/"),
        (b"/a/.b/c", b"/a/.b/c"),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/a/b.../c", b"/a/b.../c"),
        (b"/mid/content=5/../6", b"/mid/6"),
    ],
)
def test_normalize_path_removes_dot_segments(path: bytes, expected: bytes) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a/%2e%2E/b", b"/b"),
        (b"/a/%2E/b", b"/a/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/%61%62%63", b"/abc"),
        (b"/%7E%2D%5F%2E", b"/~-_."),
        (b"/a%20b", b"/a%20b"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/a%c3%a9", b"/a%C3%A9"),
        (b"/%25", b"/%25"),
        (b"/%252e%252e/x", b"/%252e%252e/x"),
    ],
    ids=[
        "encoded-dotdot",
        "encoded-dot",
        "half-encoded",
        "letters",
        "unreserved-symbols",
        "space-stays",
        "slash-kept-uppercased",
        "utf8-uppercased",
        "percent-stays",
        "no-double-decoding",
    ],
)
def test_normalize_path_decodes_unreserved_and_uppercases_escapes(
    path: bytes, expected: bytes
) -> None:
    assert normalize_path(path) == expected


def test_normalize_path_merges_slashes_when_asked() -> None:
    assert normalize_path(b"//a///b//") == b"/a/b/"
    assert normalize_path(b"//") == b"/"
    assert normalize_path(b"//a///b//", merge_slashes=False) == b"//a///b//"
    assert normalize_path(b"/a//../b", merge_slashes=False) == b"/a/b"
    assert normalize_path(b"/a//./b", merge_slashes=False) == b"/a//b"


def test_normalize_path_keeps_escaped_slashes_encoded_by_default() -> None:
    # An encoded slash is not a separator: "..%2F" is one segment, not a step up.
    assert normalize_path(b"/a/..%2Fb") == b"/a/..%2Fb"
    assert normalize_path(b"/a%5cb") == b"/a%5Cb"


def test_normalize_path_rejects_escaped_slashes_when_asked() -> None:
    for path in (b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a%5cb"):
        with pytest.raises(PathError) as error:
            normalize_path(path, escaped_slashes="reject")
        assert error.value.status == 400
    assert normalize_path(b"/a/b", escaped_slashes="reject") == b"/a/b"


def test_normalize_path_unescapes_slashes_then_normalises() -> None:
    assert normalize_path(b"/a%2Fb", escaped_slashes="unescape") == b"/a/b"
    assert normalize_path(b"/a%5cb", escaped_slashes="unescape") == b"/a/b"
    assert normalize_path(b"/a/..%2f..%2fetc", escaped_slashes="unescape") == b"/etc"
    assert normalize_path(b"/a%2F%2Fb", escaped_slashes="unescape") == b"/a/b"


def test_normalize_path_refuses_unknown_policies() -> None:
    with pytest.raises(ValueError):
        normalize_path(b"/", escaped_slashes="decode")


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b"a/b",
        b"*",
        b"http://h/a",
        b"/a\x00b",
        b"/a%00b",
        b"/a\\b",
        b"/a%",
        b"/a%2",
        b"/a%zz",
        b"/a%2g",
        b"/a%%30",
        b"/a b",
        b"/a\tb",
        b"/a\rb",
        b"/a\xffb",
        b"/a?b",
        b"/a#b",
        b"/a\x7fb",
    ],
    ids=[
        "empty",
        "relative",
        "asterisk",
        "absolute-url",
        "nul",
        "encoded-nul",
        "backslash",
        "truncated-escape",
        "short-escape",
        "non-hex-escape",
        "half-hex-escape",
        "double-percent",
        "space",
        "tab",
        "cr",
        "non-ascii",
        "query",
        "fragment",
        "del",
    ],
)
def test_normalize_path_rejects_invalid_paths(path: bytes) -> None:
    with pytest.raises(PathError) as error:
        normalize_path(path)
    assert error.value.status == 400
    assert error.value.reason and error.value.reason == error.value.reason.lower()


def test_normalize_path_returns_clean_paths_unchanged() -> None:
    path = b"/api/v1/users/42"
    assert normalize_path(path) is path


# Paths mixing everything normalisation cares about.
_PIECES = [b"/", b"//", b".", b"..", b"a", b"b.c", b"%2e", b"%2E%2e", b"%2F", b"%5c", b"%41"]
_PIECES += [b"%7e", b"%c3%a9", b"%25", b"~", b"-", b":", b"@", b"!", b"'", b"=", b"%20"]
paths = st.lists(st.sampled_from(_PIECES), max_size=12).map(lambda p: b"/" + b"".join(p))
policies = st.sampled_from(["keep", "reject", "unescape"])


@given(paths, st.booleans(), policies)
def test_normalize_path_is_idempotent(path: bytes, merge: bool, policy: str) -> None:
    try:
        once = normalize_path(path, merge_slashes=merge, escaped_slashes=policy)
    except PathError:
        return
    assert normalize_path(once, merge_slashes=merge, escaped_slashes=policy) == once


@given(paths, st.booleans(), policies)
def test_normalize_path_leaves_no_dot_segments_or_unreserved_escapes(
    path: bytes, merge: bool, policy: str
) -> None:
    try:
        out = normalize_path(path, merge_slashes=merge, escaped_slashes=policy)
    except PathError:
        return
    assert out.startswith(b"/")
    segments = out.split(b"/")
    assert b"." not in segments and b".." not in segments
    assert b"%2e" not in out.lower() and b"%41" not in out and b"%7e" not in out.lower()
    if merge:
        assert b"//" not in out
    if policy != "keep":
        assert b"%2f" not in out.lower() and b"%5c" not in out.lower()


@given(st.binary(max_size=60), st.booleans(), policies)
def test_normalize_path_raises_only_path_error(path: bytes, merge: bool, policy: str) -> None:
    try:
        out = normalize_path(b"/" + path, merge_slashes=merge, escaped_slashes=policy)
    except PathError:
        return
    assert normalize_path(out, merge_slashes=merge, escaped_slashes=policy) == out
