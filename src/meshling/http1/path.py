"""Request path normalisation (RFC 3986 section 6) for route matching and forwarding.

The proxy matches routes on the normalised path and forwards that same path upstream, so
the upstream never sees a spelling that the route table did not: ``/a/%2e%2E/admin`` is
``/admin`` for both. The result is idempotent (normalising it again changes nothing),
which is what makes it safe to apply at every hop.

Steps, in order:

1. Reject what has no safe reading: a path not starting with ``/``, raw NUL, raw
   backslash (Windows upstreams read it as ``/``), ``?``/``#`` (they belong to the
   query and fragment), control, space and non-ASCII bytes, malformed escapes and
   ``%00``.
2. Decode percent-escapes of unreserved characters (``ALPHA DIGIT - . _ ~``) and
   upper-case the hex digits of every escape that stays.
3. Escaped slashes (``%2F``, ``%5C``) follow the ``escaped_slashes`` policy: ``"keep"``
   leaves them encoded (so they are not path separators), ``"reject"`` refuses the path,
   ``"unescape"`` turns both into ``/`` before the segments are split.
4. Split into segments, drop ``.`` and resolve ``..`` (RFC 3986 5.2.4), and drop empty
   segments when ``merge_slashes`` is set. A trailing slash is kept.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["PathError", "normalize_path"]

_POLICIES: Final = frozenset({"keep", "reject", "unescape"})


class PathError(ValueError):
    """A request path that cannot be normalised; ``reason`` is safe to put in a response."""

    status: int = 400
    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Printable ASCII except '#', '?' and '\\'. RFC 3986 would also exclude `"<>[]^`{|}`, but
# browsers send some of them raw, and none of them is a separator or a dot, so letting
# them through changes nothing about where a path routes.
_VALID: Final = re.compile(rb"[!\"$->@-\[\]-~]*")
_ESCAPE: Final = re.compile(rb"%(.?.?)")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


def _decode_escape(match: re.Match[bytes], escaped_slashes: str) -> bytes:
    hexits = match.group(1)
    if len(hexits) != 2 or hexits[0] not in _HEX or hexits[1] not in _HEX:
        raise PathError("invalid percent-encoding in path")
    value = int(hexits, 16)
    if value in _UNRESERVED:
        return bytes((value,))
    if value == 0:
        raise PathError("nul in path")
    if value == 0x2F or value == 0x5C:
        if escaped_slashes == "reject":
            raise PathError("escaped slash in path")
        if escaped_slashes == "unescape":
            return b"/"
    return b"%" + hexits.upper()


def normalize_path(
    path: bytes, *, merge_slashes: bool = True, escaped_slashes: str = "keep"
) -> bytes:
    """Return the normalised form of ``path`` (the part of a request-target before ``?``).

    Raises PathError for a path that is malformed or that the policy refuses.
    """
    if escaped_slashes not in _POLICIES:
        raise ValueError(f"escaped_slashes must be one of {sorted(_POLICIES)}")
    if path[:1] != b"/":
        raise PathError("path does not start with /")
    if _VALID.fullmatch(path) is None:
        if 0 in path:
            raise PathError("nul in path")
        if 92 in path:  # '\\'
            raise PathError("backslash in path")
        raise PathError("invalid character in path")

    # Most paths need no work: answer them without splitting or copying. (find and int
    # membership: on this hot path they are cheaper than "in" with a bytes needle.)
    escaped = 37 in path  # '%'
    if not escaped and path.find(b"/.") == -1 and not (merge_slashes and path.find(b"//") != -1):
        return path

    if escaped:
        path = _ESCAPE.sub(lambda m: _decode_escape(m, escaped_slashes), path)

    segments = path.split(b"/")
    out: list[bytes] = []
    last = len(segments) - 1
    # segments[0] is the empty string before the leading '/'.
    for i in range(1, last + 1):
        segment = segments[i]
        if segment == b".":
            pass
        elif segment == b"..":
            if out:
                out.pop()
        elif segment or not merge_slashes:
            out.append(segment)
            continue
        # A dot segment or a dropped empty segment at the end still means the path names
        # a directory: keep the trailing slash ("/a/." is "/a/", "/a/.." is "/").
        if i == last:
            out.append(b"")
    return b"/" + b"/".join(out)
