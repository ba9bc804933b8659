"""Route selection: a pure function of the request head and the route config.

Virtual hosts are chosen as Envoy does — exact domain, then the longest
``*.suffix``, then the longest ``prefix.*``, then ``*`` — and within a virtual
host the first route whose match holds wins.
"""

from __future__ import annotations

from meshling.snapshot.model import (
    HeaderMatch,
    QueryMatch,
    Route,
    RouteConfig,
    RouteMatch,
    VirtualHost,
)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    return host[:colon] if colon >= 0 else host


class Router:
    """A route config compiled for lookups."""

    __slots__ = ("_any", "_cache", "_exact", "_prefixes", "_suffixes", "config")

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self._exact: dict[str, VirtualHost] = {}
        self._suffixes: list[tuple[str, VirtualHost]] = []
        self._prefixes: list[tuple[str, VirtualHost]] = []
        self._any: VirtualHost | None = None
        # Host values repeat: remember the answer for the ones seen, up to a bound.
        self._cache: dict[bytes, VirtualHost | None] = {}
        for vh in config.virtual_hosts:
            for domain in vh.domains:
                if domain == "*":
                    self._any = vh
                elif domain.startswith("*."):
                    self._suffixes.append((domain[1:], vh))
                elif domain.endswith(".*"):
                    self._prefixes.append((domain[:-1], vh))
                else:
                    self._exact[domain] = vh
        self._suffixes.sort(key=lambda item: -len(item[0]))
        self._prefixes.sort(key=lambda item: -len(item[0]))

    def virtual_host(self, host: bytes) -> VirtualHost | None:
        try:
            return self._cache[host]
        except KeyError:
            pass
        vh = self._lookup(host)
        if len(self._cache) >= 1024:
            self._cache.clear()
        self._cache[host] = vh
        return vh

    def _lookup(self, host: bytes) -> VirtualHost | None:
        name = host.decode("latin-1").lower()
        vh = self._exact.get(name)
        if vh is not None:
            return vh
        name = _strip_port(name)
        vh = self._exact.get(name)
        if vh is not None:
            return vh
        for suffix, vh in self._suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return vh
        for prefix, vh in self._prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                return vh
        return self._any

    def route(
        self,
        host: bytes,
        method: bytes,
        path: str,
        headers: list[tuple[bytes, bytes]],
        query: bytes = b"",
    ) -> Route | None:
        vh = self.virtual_host(host)
        if vh is None:
            return None
        for route in vh.routes:
            if matches(route.match, method, path, headers, query):
                return route
        return None


def matches(
    match: RouteMatch,
    method: bytes,
    path: str,
    headers: list[tuple[bytes, bytes]],
    query: bytes = b"",
) -> bool:
    """Does a request (path without the query; the raw query apart) satisfy a route's
    match? The query is decoded only for a route that matches on it."""
    pm = match.path
    if pm.kind == "prefix":
        if not path.startswith(pm.value):
            return False
    elif pm.kind == "exact":
        if path != pm.value:
            return False
    elif pm.pattern is None or pm.pattern.fullmatch(path) is None:
        return False
    if match.methods and method not in match.methods:
        return False
    if not all(_header_matches(hm, headers) for hm in match.headers):
        return False
    return not match.query or _query_matches(match.query, query)


def mismatch(
    match: RouteMatch,
    method: bytes,
    path: str,
    headers: list[tuple[bytes, bytes]],
    query: bytes = b"",
) -> str | None:
    """Why a request does not satisfy a route's match (its first failing part, for a
    person: `meshling explain`), or None when it does. It checks the parts in the order
    of `matches`, with the same functions, so the two always agree."""
    pm = match.path
    if not matches(RouteMatch(path=pm), method, path, []):
        return f"path {path!r} is not {_path_text(pm.kind)} {pm.value!r}"
    if match.methods and method not in match.methods:
        wanted = ", ".join(sorted(m.decode("latin-1") for m in match.methods))
        return f"method {method.decode('latin-1')} is not one of {wanted}"
    for hm in match.headers:
        if not _header_matches(hm, headers):
            return f"header {hm.name.decode('latin-1')}: {_header_text(hm)}"
    for qm in match.query:
        if not _query_matches((qm,), query):
            value = "" if qm.kind == "present" else f" {qm.value!r}"
            return f"query parameter {qm.name}: not {qm.kind}{value}"
    return None


def _path_text(kind: str) -> str:
    return {"prefix": "under prefix", "exact": "exactly", "regex": "matched by regex"}.get(
        kind, kind
    )


def _header_text(hm: HeaderMatch) -> str:
    wanted = "present" if hm.kind == "present" else f"{hm.kind} {hm.value!r}"
    return f"wanted {'not ' if hm.invert else ''}{wanted}"


def _query_matches(wanted: tuple[QueryMatch, ...], query: bytes) -> bool:
    from urllib.parse import parse_qsl

    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    for qm in wanted:
        values = [v for n, v in params if n == qm.name]
        if qm.kind == "present":
            found = bool(values)
        elif qm.kind == "exact":
            found = qm.value in values
        elif qm.kind == "prefix":
            found = any(v.startswith(qm.value) for v in values)
        else:
            found = qm.pattern is not None and any(qm.pattern.fullmatch(v) for v in values)
        if not found:
            return False
    return True


def _header_matches(hm: HeaderMatch, headers: list[tuple[bytes, bytes]]) -> bool:
    # Several fields with one name are matched as their comma-joined value (RFC 9110 5.3).
    values = [v for n, v in headers if n == hm.name]
    if hm.kind == "present":
        found = bool(values)
    elif not values:
        found = False
    else:
        value = b", ".join(values).decode("latin-1")
        if hm.kind == "exact":
            found = value == hm.value
        elif hm.kind == "prefix":
            found = value.startswith(hm.value)
        else:
            found = hm.pattern is not None and hm.pattern.fullmatch(value) is not None
    return found != hm.invert
