"""Access log formats: the record the proxy hands over, and how it becomes a line.

The proxy builds one plain tuple per finished HTTP exchange or TCP connection (the
`Record` layout below): references to values it already holds, so the request path
pays next to nothing. Turning a record into text happens later, in the writer's batched
flush, through a renderer compiled once from the sink's format:

* `json`: one object per line, with the chosen named fields (`JSON_FIELDS`) and/or
  custom keys whose value is a template (`{key: ua, value: "%REQ(USER-AGENT)%"}`);
* `text`: an Envoy-like template of placeholders (`PLACEHOLDERS`), `%%` for a percent
  sign, `DEFAULT_TEXT` when none is given.

A value that is not known (a header not sent, no upstream, a TCP connection's method) is
`-` in text and `null` in JSON. Header bytes are decoded as UTF-8 where they are valid
(latin-1 otherwise, so no byte is lost) and escaped: JSON output is always ASCII-safe
JSON, and a text line never contains a raw control character, so a header holding a
newline cannot forge a second record.

Everything here is pure (no I/O, no clock): compile errors are `LogFormatError`, which
the snapshot loader turns into an error naming the field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any

# A record's fields, in tuple order.
(
    START,  # wall-clock start, seconds since the epoch
    DURATION,  # seconds
    LISTENER,  # the listener's name
    ROUTE,  # the route's name ("none": no route; None for TCP)
    CLUSTER,  # the cluster's name (the one picked, on a weighted route)
    UPSTREAM,  # the endpoint (Endpoint) or None
    DOWNSTREAM,  # the client's address, bytes
    HEAD,  # the request head (HTTP/1.1 or HTTP/2) or None (TCP)
    STATUS,  # the response status; 0 when none was sent (TCP, a reset)
    BYTES_RECEIVED,  # request body bytes (HTTP) or bytes from the client (TCP)
    BYTES_SENT,  # response body bytes (HTTP) or bytes to the client (TCP)
    ERROR,  # the proxy's reason for a failure (`upstream_timeout`, ...) or None
    REQUEST_ID,  # the request id the proxy used, bytes, or None
    IDENTITY,  # the caller's verified SPIFFE ID (bytes), None for plaintext
    SOURCE,  # the calling service on an inbound listener, "" elsewhere
    DIRECTION,  # "inbound", "outbound" or None
    SERVICE,  # the proxy's own service, "" when not known
) = range(17)
Record = tuple[Any, ...]
# A placeholder's value: a number, text, or None for "not known".
Value = int | float | str | None
Extract = Callable[[Record], Value]


class LogFormatError(ValueError):
    """A template or field list that cannot be compiled: which placeholder, and why."""

    def __init__(self, placeholder: str, reason: str) -> None:
        self.placeholder = placeholder
        self.reason = reason
        super().__init__(f"{placeholder}: {reason}" if placeholder else reason)


# -- values ----------------------------------------------------------------------------
def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _header(record: Record, name: bytes) -> bytes | None:
    head = record[HEAD]
    if head is None:
        return None
    for n, v in head.headers:
        if n == name:
            return bytes(v)
    return None


_second: list[Any] = [None, ""]  # the last second formatted, and its text


def _start_time(record: Record) -> str:
    start: float = record[START]
    second = int(start)
    if second != _second[0]:
        # a batch's records mostly share their second: format it once
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int(start * 1000) % 1000:03d}Z"


def _protocol(record: Record) -> str:
    head = record[HEAD]
    return "TCP" if head is None else "HTTP/" + head.version.decode("latin-1")


def _cluster_service(cluster: str | None) -> str | None:
    """The service a cluster stands for: `api` for `api` and `api~version=v2`; None for
    the proxy's local clusters (`local:8080`) and none."""
    if not cluster or cluster == "none" or cluster.startswith("local:"):
        return None
    return cluster.split("~", 1)[0]


def _source_service(record: Record) -> str | None:
    if record[DIRECTION] == "inbound":
        return record[SOURCE] or None
    return record[SERVICE] or None


def _destination_service(record: Record) -> str | None:
    if record[DIRECTION] == "inbound":
        return record[SERVICE] or None
    return _cluster_service(record[CLUSTER])


_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def _trace_id(record: Record) -> str | None:
    """The trace id of a W3C `traceparent` header (an all-zero one is invalid)."""
    value = _header(record, b"traceparent")
    if value is None:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None or match.group(1) == b"0" * 32:
        return None
    return match.group(1).decode()


# The proxy's failure reasons as Envoy-style response flags, for people and tools that
# read those; the reason itself is %ERROR%.
RESPONSE_FLAGS = {
    "route_not_found": "NR",
    "no_endpoint": "UH",
    "upstream_connect_failure": "UF",
    "upstream_timeout": "UT",
    "upstream_per_try_timeout": "UT",
    "upstream_reset": "UR",
    "upstream_protocol_error": "UPE",
    "stream_idle_timeout": "SI",
    "rate_limited": "RL",
    "permission_denied": "RBAC",
    "fault_abort": "FI",
    "circuit_breaker_max_pending_requests": "UO",
    "circuit_breaker_max_connections": "UO",
    "circuit_breaker_max_requests": "UO",
}
_AFTER_HEADERS = "_after_headers"


def response_flags(error: str | None) -> str | None:
    """The flag of a failure reason; a reason without one is `DPE` (downstream protocol
    error: a malformed request) when it is not the upstream's; None for no failure."""
    if not error:
        return None
    if error.endswith(_AFTER_HEADERS):
        error = error[: -len(_AFTER_HEADERS)]
    flag = RESPONSE_FLAGS.get(error)
    if flag is not None:
        return flag
    return "UF" if error.startswith("upstream") else "DPE"


def _request_id(record: Record) -> str | None:
    return _text(record[REQUEST_ID] or _header(record, b"x-request-id"))


def _identity(record: Record) -> str | None:
    return _text(record[IDENTITY])


def _upstream(record: Record) -> str | None:
    return None if record[UPSTREAM] is None else str(record[UPSTREAM])


def _head_attribute(attribute: str) -> Extract:
    def extract(record: Record) -> Value:
        head = record[HEAD]
        return None if head is None else _text(getattr(head, attribute))

    return extract


def _field(index: int) -> Extract:
    return lambda record: record[index]


# -- placeholders ----------------------------------------------------------------------
# %NAME% -> what it extracts; every one is documented in the README's table.
PLACEHOLDERS: dict[str, Extract] = {
    "START_TIME": _start_time,
    "DURATION": lambda r: int(r[DURATION] * 1000),
    "PROTOCOL": _protocol,
    "RESPONSE_CODE": _field(STATUS),
    "RESPONSE_FLAGS": lambda r: response_flags(r[ERROR]),
    "ERROR": _field(ERROR),
    "BYTES_RECEIVED": _field(BYTES_RECEIVED),
    "BYTES_SENT": _field(BYTES_SENT),
    "UPSTREAM_HOST": _upstream,
    "UPSTREAM_CLUSTER": lambda r: r[CLUSTER] if r[CLUSTER] != "none" else None,
    "ROUTE_NAME": lambda r: r[ROUTE] if r[ROUTE] != "none" else None,
    "LISTENER_NAME": _field(LISTENER),
    "DIRECTION": _field(DIRECTION),
    "DOWNSTREAM_REMOTE_ADDRESS": lambda r: _text(r[DOWNSTREAM]),
    "SOURCE_SERVICE": _source_service,
    "DESTINATION_SERVICE": _destination_service,
    "SOURCE_IDENTITY": _identity,
    "REQUEST_ID": _request_id,
    "TRACE_ID": _trace_id,
}
# %REQ(NAME)%'s pseudo-headers: parts of the request head that are not header fields
_PSEUDO: dict[str, Extract] = {
    ":method": _head_attribute("method"),
    ":path": _head_attribute("target"),
    ":authority": _head_attribute("host"),
    ":scheme": lambda r: (
        None if r[HEAD] is None else _text(getattr(r[HEAD], "scheme", None)) or "http"
    ),
}
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

DEFAULT_TEXT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    "%RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '"%REQ(USER-AGENT)%" "%REQUEST_ID%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" '
    "%SOURCE_SERVICE% %DESTINATION_SERVICE% %SOURCE_IDENTITY% %TRACE_ID%"
)


def _request_header(argument: str, placeholder: str) -> Extract:
    """%REQ(A)% or %REQ(A?B)%: header A, else header B (Envoy's alternative)."""
    names = argument.split("?")
    if not argument or len(names) > 2:
        raise LogFormatError(placeholder, "expected REQ(NAME) or REQ(NAME?ALTERNATIVE)")
    extractors: list[Extract] = []
    for name in names:
        lower = name.lower()
        if lower.startswith(":"):
            pseudo = _PSEUDO.get(lower)
            if pseudo is None:
                known = ", ".join(n.upper() for n in _PSEUDO)
                raise LogFormatError(placeholder, f"unknown pseudo-header {name} (known: {known})")
            extractors.append(pseudo)
        elif _HEADER_NAME.match(name):
            encoded = lower.encode()
            extractors.append(lambda r, n=encoded: _text(_header(r, n)))  # type: ignore[misc]
        else:
            raise LogFormatError(placeholder, f"invalid header name {name!r}")
    if len(extractors) == 1:
        return extractors[0]
    first, second = extractors

    def either(record: Record) -> Value:
        value = first(record)
        return value if value is not None else second(record)

    return either


def placeholder(token: str) -> Extract:
    """The extractor of one placeholder's inside (`RESPONSE_CODE`, `REQ(USER-AGENT)`)."""
    shown = f"%{token}%"
    if token.startswith("REQ(") and token.endswith(")"):
        return _request_header(token[4:-1], shown)
    found = PLACEHOLDERS.get(token)
    if found is None:
        raise LogFormatError(
            shown, f"unknown placeholder (known: {', '.join(sorted(PLACEHOLDERS))}, REQ(NAME))"
        )
    return found


# -- text ------------------------------------------------------------------------------
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL[ord("\\")] = "\\\\"


def text_value(value: Value) -> str:
    """A value as it appears in a text line: `-` for none, control characters escaped
    (and backslashes, so an escape cannot be forged)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value.translate(_CONTROL)
    return str(value)


Part = str | Extract


def parse_template(template: str) -> list[Part]:
    """The literal text and placeholders of a template, in order; `%%` is a `%`."""
    parts: list[Part] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        start = template.find("%", i)
        if start < 0:
            literal.append(template[i:])
            break
        literal.append(template[i:start])
        if template.startswith("%%", start):
            literal.append("%")
            i = start + 2
            continue
        end = template.find("%", start + 1)
        if end < 0:
            raise LogFormatError(
                template[start : start + 30],
                "a placeholder is not closed with % (write %% for a percent sign)",
            )
        token = template[start + 1 : end]
        if not token or token != token.strip():
            raise LogFormatError(f"%{token}%", "an empty or padded placeholder")
        extract = placeholder(token)
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(extract)
        i = end + 1
    if literal and "".join(literal):
        parts.append("".join(literal))
    return parts


def compile_text(template: str | None) -> Callable[[Record], str]:
    """A renderer of a record as one text line (newline included)."""
    parts = parse_template(DEFAULT_TEXT if template is None else template)

    def render(record: Record) -> str:
        return "".join([p if isinstance(p, str) else text_value(p(record)) for p in parts]) + "\n"

    return render


# -- JSON ------------------------------------------------------------------------------
def json_value(value: Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return str(_json_string(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# The named fields of the `json` format, and what each holds (typed: numbers are numbers).
JSON_FIELDS: dict[str, Extract] = {
    "start_time": lambda r: round(r[START], 6),
    "duration_ms": lambda r: round(r[DURATION] * 1000, 3),
    "listener": _field(LISTENER),
    "route": _field(ROUTE),
    "cluster": _field(CLUSTER),
    "upstream": _upstream,
    "downstream": lambda r: _text(r[DOWNSTREAM]),
    "method": _head_attribute("method"),
    "path": _head_attribute("target"),
    "authority": _head_attribute("host"),
    "protocol": lambda r: None if r[HEAD] is None else _protocol(r),
    "status": _field(STATUS),
    "bytes_received": _field(BYTES_RECEIVED),
    "bytes_sent": _field(BYTES_SENT),
    "request_id": _request_id,
    "user_agent": lambda r: _text(_header(r, b"user-agent")),
    "error": _field(ERROR),
    "response_flags": lambda r: response_flags(r[ERROR]),
    "direction": _field(DIRECTION),
    "source_service": _source_service,
    "destination_service": _destination_service,
    "source_identity": _identity,
    "trace_id": _trace_id,
}
# The fields of a `json` sink that names none: the ones the proxy-wide log always had.
DEFAULT_JSON_FIELDS = (
    "start_time",
    "duration_ms",
    "listener",
    "route",
    "cluster",
    "upstream",
    "downstream",
    "method",
    "path",
    "authority",
    "protocol",
    "status",
    "bytes_received",
    "bytes_sent",
    "request_id",
    "user_agent",
    "error",
)
_JSON_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:@-]{0,63}$")


def json_field(key: str, template: str | None) -> Extract:
    """One JSON field: a named one (`template` None), or `key` with a template's value (a
    template of one placeholder keeps its type, numbers stay numbers)."""
    if template is None:
        found = JSON_FIELDS.get(key)
        if found is None:
            raise LogFormatError(key, f"unknown access log field (known: {', '.join(JSON_FIELDS)})")
        return found
    if not _JSON_KEY.match(key):
        raise LogFormatError(key, "a key is letters, digits and '_.:@-', at most 64")
    parts = parse_template(template)
    if len(parts) == 1 and not isinstance(parts[0], str):
        return parts[0]

    def render(record: Record) -> Value:
        # JSON escapes the result itself: values go in as they are, `-` for none
        return "".join([p if isinstance(p, str) else _raw(p(record)) for p in parts])

    return render


def _raw(value: Value) -> str:
    return "-" if value is None or value == "" else str(value)


def compile_json(fields: Sequence[tuple[str, str | None]]) -> Callable[[Record], str]:
    """A renderer of a record as one JSON object line, with `fields` ((key, template or
    None for a named field)) in order."""
    if not fields:
        fields = [(name, None) for name in DEFAULT_JSON_FIELDS]
    seen: set[str] = set()
    compiled: list[tuple[str, Extract]] = []
    for key, template in fields:
        if key in seen:
            raise LogFormatError(key, "the key is given twice")
        seen.add(key)
        compiled.append((json_value(key) + ":", json_field(key, template)))

    def render(record: Record) -> str:
        return "{" + ",".join([k + json_value(f(record)) for k, f in compiled]) + "}\n"

    return render
