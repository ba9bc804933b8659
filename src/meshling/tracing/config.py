"""The `tracing:` section of a snapshot: reading it, and writing it back as a document.

The Trace policy's `conf` and the snapshot section share these field parsers, so a
mistake is reported the same way in a resource and in a snapshot file (the file, the
field path and the reason).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from meshling.tracing.span import TraceTag

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node
    from meshling.snapshot.model import Tracing

FORMATS = ("w3c", "b3", "b3multi")
MAX_TAGS = 32
_ENDPOINT = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/[^\s?#]*)?$")
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# a span attribute the proxy sets itself cannot be replaced by a custom tag
_RESERVED_PREFIXES = ("http.", "url.", "server.", "client.", "rpc.", "meshling.", "network.")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def endpoint(node: _Node) -> str:
    """An OTLP/HTTP traces URL; a bare `http://host:port` gets the standard `/v1/traces`."""
    value = node.value
    if not isinstance(value, str) or not _ENDPOINT.match(value):
        raise node.error(
            f"expected an OTLP/HTTP URL such as http://127.0.0.1:4318/v1/traces, got {value!r}"
        )
    scheme_end = value.index("//") + 2
    if "/" not in value[scheme_end:]:
        value += "/v1/traces"
    return value


def sampling(node: _Node) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error(f"expected a percentage from 0 to 100, got {_kind(value)}")
    if not 0 <= value <= 100:
        raise node.error(f"a percentage is from 0 to 100, got {value}")
    return float(value)


def propagation(node: _Node) -> tuple[str, ...]:
    value = node.value
    if not isinstance(value, list) or not value:
        raise node.error(f"expected a non-empty list of formats ({', '.join(FORMATS)})")
    found: list[str] = []
    for i, item in enumerate(value):
        if item not in FORMATS:
            raise node.child(i).error(
                f"unknown propagation format {item!r} (known: {', '.join(FORMATS)})"
            )
        if item not in found:
            found.append(item)
    if "w3c" not in found:
        found.insert(0, "w3c")  # the mesh's own format is always written
    return tuple(found)


def tag(node: _Node) -> TraceTag:
    node.mapping(("name", "literal", "header"))
    name = node.child("name")
    if not isinstance(name.value, str) or not _TAG_NAME.match(name.value):
        raise name.error(f"expected an attribute name such as team or app.tier, got {name.value!r}")
    if name.value.startswith(_RESERVED_PREFIXES):
        raise name.error(f"{name.value!r} is an attribute the proxy sets itself")
    if node.has("literal") == node.has("header"):
        raise node.error("a tag takes exactly one of literal or header")
    if node.has("literal"):
        literal = node.child("literal")
        if not isinstance(literal.value, str):
            raise literal.error(f"expected a string, got {_kind(literal.value)}")
        return TraceTag(name.value, literal=literal.value)
    header = node.child("header").mapping(("name", "default"))
    header_name = header.child("name")
    if not isinstance(header_name.value, str) or not _HEADER.match(header_name.value):
        raise header_name.error(f"expected a header name, got {header_name.value!r}")
    default = None
    if header.has("default"):
        given = header.child("default")
        if not isinstance(given.value, str):
            raise given.error(f"expected a string, got {_kind(given.value)}")
        default = given.value
    return TraceTag(name.value, header=header_name.value.lower().encode(), default=default)


def tags(node: _Node) -> tuple[TraceTag, ...]:
    if not isinstance(node.value, list):
        raise node.error(f"expected a list of tags, got {_kind(node.value)}")
    if len(node.value) > MAX_TAGS:
        raise node.error(f"at most {MAX_TAGS} tags, got {len(node.value)}")
    found = tuple(tag(node.child(i)) for i in range(len(node.value)))
    names = [t.name for t in found]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise node.child(i).child("name").error(f"duplicate tag {name!r}")
    return found


def parse_tracing(node: _Node) -> Tracing:
    """A snapshot's `tracing:` section."""
    from meshling.snapshot.model import Tracing

    node.mapping(("endpoint", "sampling", "propagation", "tags"))
    return Tracing(
        endpoint=node.need("endpoint", endpoint),
        sampling=node.get("sampling", sampling, 100.0),
        propagation=node.get("propagation", propagation, ("w3c",)),
        tags=node.get("tags", tags, ()),
    )


def tag_document(t: TraceTag) -> dict[str, Any]:
    if t.literal is not None:
        return {"name": t.name, "literal": t.literal}
    header: dict[str, Any] = {"name": (t.header or b"").decode()}
    if t.default is not None:
        header["default"] = t.default
    return {"name": t.name, "header": header}


def tracing_document(tracing: Tracing) -> dict[str, Any]:
    """`tracing` as the snapshot document `parse_tracing` reads."""
    document: dict[str, Any] = {
        "endpoint": tracing.endpoint,
        "sampling": tracing.sampling,
        "propagation": list(tracing.propagation),
    }
    if tracing.tags:
        document["tags"] = [tag_document(t) for t in tracing.tags]
    return document
