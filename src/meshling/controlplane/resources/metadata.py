"""Field parsers shared by the control plane's resources: names, meshes, labels and tags.

Every parser takes a `_Node` (the value and its field path) and raises the snapshot
loader's `SnapshotError(source, field path, reason)`, so a resource error reads like a
snapshot error: file, field, what is wrong.
"""

from __future__ import annotations

import re
from typing import Any

from meshling.identity.spiffe import SpiffeId, SpiffeIdError
from meshling.snapshot.load import _Node

# a DNS label, so a name can become a metric label, a file name or a Kubernetes object
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# the mesh is the SPIFFE trust domain of its identities
_MESH = re.compile(r"^[a-z0-9._-]{1,255}$")
# a service becomes a SPIFFE path segment and a snapshot cluster name: both rules apply
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# label and tag keys and values, in the Kubernetes shape (a key may have a "domain/" prefix)
_LABEL_KEY = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


def kind_of(value: Any) -> str:
    """How a value reads in an error: "a mapping", "a list", "int"."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def text(node: _Node) -> str:
    if not isinstance(node.value, str) or not node.value:
        raise node.error(f"expected a non-empty string, got {kind_of(node.value)}")
    return node.value


def flag(node: _Node) -> bool:
    if not isinstance(node.value, bool):
        raise node.error(f"expected true or false, got {kind_of(node.value)}")
    return node.value


def name(node: _Node) -> str:
    value = text(node)
    if not _NAME.match(value):
        raise node.error(
            f"invalid name {value!r}: use at most 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def mesh(node: _Node) -> str:
    value = text(node)
    if not _MESH.match(value):
        raise node.error(
            f"invalid mesh {value!r}: a mesh is a SPIFFE trust domain, "
            "use lower-case letters, digits, '.', '-' and '_'"
        )
    return value


def service(node: _Node, mesh_name: str) -> str:
    value = text(node)
    if not _SERVICE.match(value):
        raise node.error(
            f"invalid service name {value!r}: use at most 128 letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    try:
        SpiffeId.for_service(mesh_name, value)
    except SpiffeIdError as exc:
        raise node.error(f"invalid service name {value!r}: {exc}") from None
    return value


def string_map(node: _Node) -> dict[str, str]:
    """Labels or tags: a mapping of keys to (possibly empty) values, sorted by key."""
    if not isinstance(node.value, dict):
        raise node.error(f"expected a mapping, got {kind_of(node.value)}")
    result: dict[str, str] = {}
    for key in sorted(node.value, key=str):
        child = node.child(str(key))
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise child.error(
                f"invalid key {key!r}: use letters, digits, '.', '_' and '-' "
                "(at most 63, starting and ending with a letter or digit), "
                "optionally after a 'domain/' prefix"
            )
        value = child.value
        if not isinstance(value, str):
            raise child.error(f'expected a string, got {kind_of(value)} (quote it: "1")')
        if not _LABEL_VALUE.match(value):
            raise child.error(
                f"invalid value {value!r}: use at most 63 letters, digits, '.', '_' and '-', "
                "starting and ending with a letter or digit"
            )
        result[key] = value
    return result


def parse_selector(raw: str) -> dict[str, str]:
    """A label selector `a=b,c=d` as {"a": "b", "c": "d"}; ValueError names the bad term.

    The one reading of selectors, for the API's `labelSelector` and the CLI's `-l`.
    """
    selector: dict[str, str] = {}
    for term in raw.split(","):
        term = term.strip()
        if not term:
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or "=" in value:
            raise ValueError(f"expected key=value[,key=value...], got {term!r}")
        selector[key] = value
    return selector
