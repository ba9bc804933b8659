"""The access log sinks of a snapshot: how one is written, read, and made from resources.

A sink is a format and a backend, as the snapshot carries it (the proxy-wide
`access_log:`, and each filter chain's `access_log:` list, which the AccessLog policy
fills in):

```yaml
access_log:
  - name: web-calls            # the AccessLog resource it comes from
    identities: ["*"]          # inbound chains: the callers logged (SPIFFE IDs, "*": any)
    file: /var/log/web.log     # or `tcp: collector:5170`, or `stdout: true`
    format: text               # or json
    template: "%START_TIME% %RESPONSE_CODE%\n"   # text; default: logformat.DEFAULT_TEXT
    max_pending: 16384         # records held for the backend at most, then dropped
  - tcp: 127.0.0.1:5170
    format: json
    fields: [start_time, status, {key: ua, value: "%REQ(USER-AGENT)%"}]
```

`parse_sink` is what the snapshot loader reads (templates and fields are compiled there,
so a snapshot with an unknown placeholder is refused, naming the field and the
placeholder); `sink_document` writes exactly what it reads. `fragment` is the control
plane's conversion of the AccessLog resources selecting a dataplane into one chain's
list: outbound chains take the resources whose `to` names the chain's destination
service, inbound chains those with a `from`, as rules by caller identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from meshling.snapshot.model import AccessLog, AccessLogBackend

if TYPE_CHECKING:
    from meshling.policies.access_log.schema import AccessLog as Resource
    from meshling.snapshot.load import _Node

ANY = "*"
BACKENDS = ("stdout", "file", "tcp")
SINK_FIELDS = ("format", "fields", "template", "max_pending", *BACKENDS)
MAX_PENDING = 16384
MOST_PENDING = 1 << 22
# a collector's host: an IPv4 address or DNS name, or an IPv6 address in brackets
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)$")


def parse_sink(node: _Node, *, chain: bool = False, legacy: bool = False) -> AccessLog:
    """One sink; `chain`: a filter chain's (with `name` and `identities`); `legacy`: the
    snapshot's own, which also takes `path:` (a file, or "-" for stdout)."""
    from meshling.snapshot.load import _choice, _int, _str
    from meshling.telemetry.logformat import LogFormatError, compile_json, compile_text

    known = SINK_FIELDS + (("name", "identities") if chain else ()) + (("path",) if legacy else ())
    node.mapping(known)
    backend = _backend(node, legacy, node.get("max_pending", _int(1, MOST_PENDING), MAX_PENDING))
    form = node.get("format", _choice("json", "text"), "json")
    fields: list[tuple[str, str | None]] = []
    template = None
    if form == "json":
        if node.has("template"):
            raise node.child("template").error("a template is for format: text")
        for item in node.items("fields", required=False):
            field = _json_field(item)
            try:
                compile_json([field])
            except LogFormatError as exc:
                target = item.child("value") if isinstance(item.value, dict) else item
                raise target.error(str(exc)) from None
            if field[0] in (f[0] for f in fields):
                raise item.error(f"field {field[0]!r} is given twice")
            fields.append(field)
    else:
        if node.has("fields"):
            raise node.child("fields").error("fields are for format: json; use a template")
        template = node.get("template", _str, None)
        try:
            compile_text(template)
        except LogFormatError as exc:
            raise node.child("template").error(str(exc)) from None
    identities: tuple[str, ...] = (ANY,)
    if chain and node.has("identities"):
        from meshling.policies.inbound import identities as parse_identities

        identities = parse_identities(node.child("identities"))
    name = ""
    if chain and node.has("name"):
        from meshling.policies.inbound import rule_name

        name = rule_name(node.child("name"))
    return AccessLog(
        backend=backend,
        format=form,  # type: ignore[arg-type]
        fields=tuple(fields),
        template=template,
        identities=identities,
        name=name,
    )


def _json_field(item: _Node) -> tuple[str, str | None]:
    """`status` (a named field) or `{key: ua, value: "%REQ(USER-AGENT)%"}`."""
    from meshling.snapshot.load import _str

    if isinstance(item.value, dict):
        item.mapping(("key", "value"))
        return item.need("key", _str), item.need("value", _str)
    return _str(item), None


def _backend(node: _Node, legacy: bool, max_pending: int) -> AccessLogBackend:
    from meshling.snapshot.load import _bool, _str

    given = [k for k in (*BACKENDS, "path") if node.has(k)]
    if len(given) != 1:
        hint = "path: FILE, " if legacy else ""
        raise node.error(
            f"give exactly one backend: {hint}stdout: true, file: PATH or tcp: HOST:PORT"
            + (f" (got {', '.join(given)})" if given else "")
        )
    kind = given[0]
    if kind == "path":
        path = _str(node.child("path"))
        if path == "-":
            return AccessLogBackend("stdout", max_pending=max_pending)
        return AccessLogBackend("file", path=path, max_pending=max_pending)
    if kind == "stdout":
        if not _bool(node.child("stdout")):
            raise node.child("stdout").error("stdout: true, or another backend")
        return AccessLogBackend("stdout", max_pending=max_pending)
    if kind == "file":
        return AccessLogBackend("file", path=_str(node.child("file")), max_pending=max_pending)
    host, port = collector_address(node.child("tcp"))
    return AccessLogBackend("tcp", host=host, port=port, max_pending=max_pending)


def collector_address(node: _Node) -> tuple[str, int]:
    """`host:port` (`[::1]:5170` for IPv6) of a TCP collector."""
    value = node.value
    if not isinstance(value, str) or ":" not in value:
        raise node.error(f"expected HOST:PORT such as 127.0.0.1:5170, got {value!r}")
    host, _, port = value.rpartition(":")
    if not _HOST.match(host):
        raise node.error(f"invalid collector host {host!r} in {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise node.error(f"invalid port {port!r} in {value!r}: expected 1 to 65535")
    return host.strip("[]"), int(port)


def sink_document(sink: AccessLog, *, chain: bool = True) -> dict[str, Any]:
    """A sink as `parse_sink` reads it."""
    document: dict[str, Any] = {}
    if chain:
        if sink.name:
            document["name"] = sink.name
        document["identities"] = list(sink.identities)
    backend = sink.backend
    if backend.kind == "stdout":
        document["stdout"] = True
    elif backend.kind == "file":
        document["file"] = backend.path
    else:
        host = f"[{backend.host}]" if ":" in backend.host else backend.host
        document["tcp"] = f"{host}:{backend.port}"
    document["format"] = sink.format
    if sink.fields:
        document["fields"] = [
            key if template is None else {"key": key, "value": template}
            for key, template in sink.fields
        ]
    if sink.template is not None:
        document["template"] = sink.template
    document["max_pending"] = backend.max_pending
    return document


def outbound_sinks(
    resources: Iterable[Resource],
    dataplane: tuple[str, Mapping[str, str]],
    destination: str,
) -> list[dict[str, Any]]:
    """The sinks of an outbound chain to `destination` of a dataplane ((service, tags)):
    every backend of every resource selecting the dataplane whose `to` names the service
    (or "*"), by resource name."""
    sinks: list[dict[str, Any]] = []
    for resource in sorted(resources, key=lambda r: r.name):
        if not any(s.matches(*dataplane) for s in resource.dataplanes):
            continue
        if not any(s.service in (ANY, destination) for s in resource.to):
            continue
        sinks.extend(_named(resource, b, (ANY,)) for b in resource.backends)
    return sinks


def inbound_sinks(
    resources: Iterable[Resource], dataplane: tuple[str, Mapping[str, str]], mesh: str
) -> list[dict[str, Any]]:
    """The sinks of a dataplane's inbound chains: every backend of every resource
    selecting it with a `from`, logging the callers it names (their SPIFFE IDs; "*" for
    any caller, plaintext ones included), by resource name."""
    sinks: list[dict[str, Any]] = []
    for resource in sorted(resources, key=lambda r: r.name):
        if not resource.from_ or not any(s.matches(*dataplane) for s in resource.dataplanes):
            continue
        if any(s.service == ANY for s in resource.from_):
            callers: tuple[str, ...] = (ANY,)
        else:
            named = {f"spiffe://{mesh}/{s.service}": None for s in resource.from_}
            callers = tuple(named)
        sinks.extend(_named(resource, b, callers) for b in resource.backends)
    return sinks


def _named(resource: Resource, sink: AccessLog, identities: tuple[str, ...]) -> dict[str, Any]:
    return sink_document(
        AccessLog(
            backend=sink.backend,
            format=sink.format,
            fields=sink.fields,
            template=sink.template,
            identities=identities,
            name=resource.name,
        )
    )


def fragment(
    resources: Iterable[Resource],
    mesh: str,
    dataplane: tuple[str, Mapping[str, str]],
    destination: str | None = None,
) -> dict[str, Any]:
    """The `access_log:` of one chain of a dataplane ((service, tags)): an outbound one to
    `destination`, or (None) an inbound one; {} when no resource logs it."""
    resources = [r for r in resources if r.mesh == mesh]
    if destination is None:
        sinks = inbound_sinks(resources, dataplane, mesh)
    else:
        sinks = outbound_sinks(resources, dataplane, destination)
    return {"access_log": sinks} if sinks else {}
