"""The web GUI's static files as served: bytes, content type and validator, decided
without I/O.

The GUI has no build step, so its file names carry no content hash: every answer says
`Cache-Control: no-cache` (a browser keeps the file but asks again), with an ETag so that
asking again costs a 304 and no body. The files are read once, when the app is built;
they are a few kilobytes and never change while the control plane runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# The page loads only its own files and talks only to this origin; no inline script or
# style can run, so an injected string in a resource's name stays text.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

INDEX: Final = "index.html"


class AssetError(Exception):
    """A static file the GUI cannot serve; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Asset:
    """One file, ready to send."""

    body: bytes
    content_type: str
    # a strong validator: the file's SHA-256, quoted as RFC 9110 wants
    etag: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What to send for one GET of the GUI."""

    status: int
    headers: dict[str, str]
    body: bytes


def load_assets(directory: Path) -> dict[str, Asset]:
    """Every file directly in `directory`, by name; a file of a type the GUI does not
    serve is an error naming it, so that a stray file is noticed when it is added."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None:
            known = ", ".join(CONTENT_TYPES)
            raise AssetError(f"{path}: no content type for {path.suffix!r} files (known: {known})")
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.name] = Asset(body, content_type, etag)
    if INDEX not in assets:
        raise AssetError(f"{directory}: the GUI has no {INDEX}")
    return assets


def answer(assets: Mapping[str, Asset], name: str, if_none_match: str | None) -> Answer:
    """The answer to `GET /gui/<name>` (`""` is the index), given the request's
    If-None-Match."""
    asset = assets.get(name or INDEX)
    if asset is None:
        return Answer(
            404,
            {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
            f"no such file in the GUI: {name}\n".encode(),
        )
    headers = {
        "Content-Type": asset.content_type,
        "Cache-Control": "no-cache",
        "ETag": asset.etag,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if asset.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    if if_none_match is not None and _matches(if_none_match, asset.etag):
        return Answer(304, headers, b"")
    return Answer(200, headers, asset.body)


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether If-None-Match names `etag` (weak comparison, as RFC 9110 asks for GET)."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False
