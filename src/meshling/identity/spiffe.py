"""SPIFFE IDs: the one form a workload's identity takes in meshling.

A SPIFFE ID is `spiffe://<trust domain>/<path>`; in meshling the trust domain is the
mesh and the path is the service, `spiffe://<mesh>/<service>`.

Parsing follows the SPIFFE ID specification to the letter and refuses anything it does
not allow, rather than normalising it: an identity is compared byte for byte, so two
spellings of one identity must not both be accepted.

* scheme `spiffe`, lower case, then `://`;
* trust domain: 1 to 255 characters from `a-z 0-9 . - _` (so no upper case, no
  userinfo `@`, no port `:`, no percent-encoding);
* path: empty, or `/`-separated segments that are non-empty, are not `.` or `..`, and use
  only `a-z A-Z 0-9 . - _` (so no trailing `/`, no percent-encoding);
* no query or fragment, and 2048 bytes at most in all.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")

# reason code -> what a person reads; the code is stable, the text may improve
_REASONS = {
    "too_long": f"longer than {MAX_ID_LENGTH} bytes",
    "wrong_scheme": "must start with spiffe:// (lower case)",
    "empty_trust_domain": "the trust domain is empty",
    "trust_domain_too_long": f"the trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} bytes",
    "userinfo": "userinfo (user@) is not allowed",
    "port": "a port is not allowed",
    "query_or_fragment": "a query (?) or fragment (#) is not allowed",
    "trust_domain_chars": "the trust domain may use only a-z 0-9 . - _",
    "path_not_absolute": "the path must start with /",
    "empty_segment": "the path has an empty segment (// or a trailing /)",
    "dot_segment": "the path has a . or .. segment",
    "path_chars": "the path may use only a-z A-Z 0-9 . - _ between slashes",
    "not_a_string": "a SPIFFE ID is a string",
    "service_not_one_segment": "a service name is one path segment, without /",
}


class SpiffeIdError(ValueError):
    """A string that is not a valid SPIFFE ID; `reason` is a short stable code."""

    def __init__(self, reason: str, value: object) -> None:
        self.reason = reason
        self.value = value
        super().__init__(f"invalid SPIFFE ID {value!r}: {_REASONS.get(reason, reason)}")


def _check_trust_domain(trust_domain: str, value: object) -> None:
    if not trust_domain:
        raise SpiffeIdError("empty_trust_domain", value)
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError("trust_domain_too_long", value)
    if not _TRUST_DOMAIN_CHARS.issuperset(trust_domain):
        # name the likely mistake instead of just "bad character"
        if "@" in trust_domain:
            raise SpiffeIdError("userinfo", value)
        if ":" in trust_domain:
            raise SpiffeIdError("port", value)
        raise SpiffeIdError("trust_domain_chars", value)


def _check_path(path: str, value: object) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError("path_not_absolute", value)
    for segment in path[1:].split("/"):
        if not segment:
            raise SpiffeIdError("empty_segment", value)
        if segment in (".", ".."):
            raise SpiffeIdError("dot_segment", value)
        if not _PATH_CHARS.issuperset(segment):
            raise SpiffeIdError("path_chars", value)


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID. Building one validates it; `str()` gives the URI.

    `path` is empty (the ID of a trust domain itself, as a CA carries) or starts
    with `/` (a workload: `/web`, `/ns/prod/sa/web`).
    """

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        value = f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"
        if len(value) > MAX_ID_LENGTH:
            raise SpiffeIdError("too_long", value)
        _check_trust_domain(self.trust_domain, value)
        _check_path(self.path, value)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The SPIFFE ID in `uri`, or `SpiffeIdError` saying what is wrong with it."""
        if not isinstance(uri, str):
            raise SpiffeIdError("not_a_string", uri)
        # length first: everything after it is linear in a bounded input
        if len(uri) > MAX_ID_LENGTH:
            raise SpiffeIdError("too_long", uri[:64] + "...")
        if not uri.startswith(SCHEME_PREFIX):
            raise SpiffeIdError("wrong_scheme", uri)
        if "?" in uri or "#" in uri:
            raise SpiffeIdError("query_or_fragment", uri)
        rest = uri[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        trust_domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        _check_trust_domain(trust_domain, uri)
        _check_path(path, uri)
        return cls(trust_domain, path)

    @classmethod
    def for_service(cls, mesh: str, service: str) -> SpiffeId:
        """`spiffe://<mesh>/<service>`: a service name is exactly one path segment."""
        if "/" in service:
            # one segment keeps service <-> identity a bijection
            raise SpiffeIdError("service_not_one_segment", f"{SCHEME_PREFIX}{mesh}/{service}")
        return cls(mesh, f"/{service}")

    @property
    def service(self) -> str | None:
        """The service name if the path is one segment (`/web` -> `web`), else None."""
        if self.path.count("/") == 1:
            return self.path[1:]
        return None

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"
