"""Access log formats: the template compiler (placeholders, `%%`, errors naming the
placeholder), text and JSON rendering of HTTP and TCP records, escaping of any header
bytes, response flags and trace ids."""

from __future__ import annotations

import json

import pytest

from meshling.http1 import RequestDecoder
from meshling.snapshot.model import Endpoint
from meshling.telemetry import logformat
from meshling.telemetry.logformat import (
    DEFAULT_TEXT,
    LogFormatError,
    compile_json,
    compile_text,
    parse_template,
    response_flags,
)

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def head(extra: bytes = b"", path: bytes = b"/api/v1?x=1") -> object:
    raw = b"POST " + path + b" HTTP/1.1\r\nHost: api.local\r\nUser-Agent: curl/8\r\n"
    return RequestDecoder().feed(raw + extra + b"Content-Length: 0\r\n\r\n")[0]


def http_record(**changes: object) -> tuple[object, ...]:
    fields: dict[str, object] = {
        "start": 1700000000.25,
        "duration": 0.0123456,
        "listener": "outbound:api",
        "route": "api",
        "cluster": "api~version=v2",
        "upstream": Endpoint("10.0.0.7", 15006),
        "downstream": b"127.0.0.1",
        "head": head(b"X-Request-Id: rid-1\r\ntraceparent: " + TRACEPARENT + b"\r\n"),
        "status": 503,
        "bytes_received": 5,
        "bytes_sent": 17,
        "error": "upstream_timeout",
        "request_id": b"rid-1",
        "identity": None,
        "source": "",
        "direction": "outbound",
        "service": "web",
    }
    fields.update(changes)
    return tuple(fields.values())


def tcp_record() -> tuple[object, ...]:
    return http_record(
        listener="inbound:15432",
        route=None,
        cluster="local:5432",
        upstream=Endpoint("127.0.0.1", 5432),
        head=None,
        status=0,
        bytes_received=1200,
        bytes_sent=64,
        error=None,
        request_id=None,
        identity=b"spiffe://default/api",
        source="api",
        direction="inbound",
        service="db",
    )


def test_access_log_format_text_placeholders_render_an_http_exchange() -> None:
    render = compile_text(
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" %UPSTREAM_HOST% %ROUTE_NAME% '
        "%UPSTREAM_CLUSTER% %SOURCE_SERVICE%->%DESTINATION_SERVICE% %TRACE_ID% "
        "%SOURCE_IDENTITY% %ERROR% %DIRECTION% %LISTENER_NAME% %REQ(:AUTHORITY)%"
    )
    assert render(http_record()) == (
        '[2023-11-14T22:13:20.250Z] "POST /api/v1?x=1 HTTP/1.1" 503 UT 5 17 12 "curl/8" '
        '"rid-1" 10.0.0.7:15006 api api~version=v2 web->api '
        "4bf92f3577b34da6a3ce929d0e0e4736 - upstream_timeout outbound outbound:api "
        "api.local\n"
    )


def test_access_log_format_text_of_a_tcp_connection_has_dashes_for_http_parts() -> None:
    render = compile_text(
        "%PROTOCOL% %REQ(:METHOD)% %RESPONSE_CODE% %BYTES_RECEIVED% %BYTES_SENT% "
        "%SOURCE_SERVICE% %DESTINATION_SERVICE% %SOURCE_IDENTITY% %UPSTREAM_HOST% %ROUTE_NAME%"
    )
    assert render(tcp_record()) == (
        "TCP - 0 1200 64 api db spiffe://default/api 127.0.0.1:5432 -\n"
    )


def test_access_log_format_percent_escape_and_literal_text() -> None:
    render = compile_text("100%% of %RESPONSE_CODE%%% done, 50%%")
    assert render(http_record()) == "100% of 503% done, 50%\n"
    assert compile_text("no placeholders")(http_record()) == "no placeholders\n"
    assert compile_text("")(http_record()) == "\n"


@pytest.mark.parametrize(
    ("template", "placeholder", "reason"),
    [
        ("%STATUS_CODE%", "%STATUS_CODE%", "unknown placeholder"),
        ("x %RESPONSE_CODE", "%RESPONSE_CODE", "not closed"),
        ("%REQ()%", "%REQ()%", "expected REQ(NAME)"),
        ("%REQ(A?B?C)%", "%REQ(A?B?C)%", "expected REQ(NAME)"),
        ("%REQ(:BODY)%", "%REQ(:BODY)%", "unknown pseudo-header :BODY"),
        ("%REQ(bad header)%", "%REQ(bad header)%", "invalid header name"),
        ("% RESPONSE_CODE%", "% RESPONSE_CODE%", "padded"),
    ],
)
def test_access_log_format_errors_name_the_placeholder(
    template: str, placeholder: str, reason: str
) -> None:
    with pytest.raises(LogFormatError) as caught:
        compile_text(template)
    assert caught.value.placeholder == placeholder
    assert reason in caught.value.reason


def test_access_log_format_default_text_compiles_and_names_both_services() -> None:
    line = compile_text(None)(http_record())
    assert line.startswith('[2023-11-14T22:13:20.250Z] "POST /api/v1?x=1 HTTP/1.1" 503 UT ')
    assert " web api - 4bf92f3577b34da6a3ce929d0e0e4736\n" in line
    assert len(parse_template(DEFAULT_TEXT)) > 10


def test_access_log_format_text_escapes_control_bytes_so_a_header_cannot_forge_a_line() -> None:
    evil = head(b"User-Agent2: x\r\n").headers  # type: ignore[attr-defined]
    record_head = head()
    record_head.headers[:] = [*evil, (b"user-agent", b"a\nfake line\\x0a\x1b\x7f")]  # type: ignore[attr-defined]
    # the first user-agent field wins; drop curl's
    record_head.headers[:] = [h for h in record_head.headers if h != (b"user-agent", b"curl/8")]  # type: ignore[attr-defined]
    line = compile_text("%REQ(USER-AGENT)%")(http_record(head=record_head))
    assert line == "a\\x0afake line\\\\x0a\\x1b\\x7f\n"
    assert line.count("\n") == 1


@pytest.mark.parametrize(
    "value",
    [b'quote" backslash\\ tab\t nl\n', b"\xff\xfe\x00 binary", "żółw ☃".encode(), b"\x7f"],
)
def test_access_log_format_json_escapes_any_header_bytes(value: bytes) -> None:
    record_head = head()
    record_head.headers.append((b"x-custom", value))  # type: ignore[attr-defined]
    line = compile_json([("h", "%REQ(X-CUSTOM)%"), ("status", None)])(http_record(head=record_head))
    assert line.endswith("}\n") and line.count("\n") == 1
    assert line.isascii()
    parsed = json.loads(line)
    try:
        expected = value.decode()
    except UnicodeDecodeError:
        expected = value.decode("latin-1")
    assert parsed == {"h": expected, "status": 503}


def test_access_log_format_json_named_fields_keep_their_types_and_order() -> None:
    render = compile_json(
        [
            ("status", None),
            ("duration_ms", None),
            ("source_service", None),
            ("destination_service", None),
            ("trace_id", None),
            ("response_flags", None),
            ("bytes", "%BYTES_SENT%"),
            ("line", "%REQ(:METHOD)% %REQ(:PATH)%"),
            ("missing", "%REQ(X-NOT-SENT)%"),
        ]
    )
    parsed = json.loads(render(http_record()))
    assert list(parsed) == [
        "status",
        "duration_ms",
        "source_service",
        "destination_service",
        "trace_id",
        "response_flags",
        "bytes",
        "line",
        "missing",
    ]
    assert parsed["status"] == 503 and parsed["duration_ms"] == 12.346
    assert parsed["source_service"] == "web" and parsed["destination_service"] == "api"
    assert parsed["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parsed["response_flags"] == "UT" and parsed["bytes"] == 17
    assert parsed["line"] == "POST /api/v1?x=1" and parsed["missing"] is None


def test_access_log_format_json_default_fields_of_a_tcp_record() -> None:
    parsed = json.loads(compile_json([])(tcp_record()))
    assert parsed["method"] is None and parsed["protocol"] is None
    assert parsed["status"] == 0 and parsed["bytes_received"] == 1200
    assert parsed["upstream"] == "127.0.0.1:5432" and parsed["route"] is None


def test_access_log_format_json_errors_name_the_field() -> None:
    with pytest.raises(LogFormatError) as caught:
        compile_json([("nope", None)])
    assert caught.value.placeholder == "nope" and "unknown access log field" in caught.value.reason
    with pytest.raises(LogFormatError) as caught:
        compile_json([("ua", "%USER_AGENT%")])
    assert caught.value.placeholder == "%USER_AGENT%"
    with pytest.raises(LogFormatError, match="given twice"):
        compile_json([("status", None), ("status", "%RESPONSE_CODE%")])
    with pytest.raises(LogFormatError, match="a key is"):
        compile_json([("bad key", "%RESPONSE_CODE%")])


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        (b"garbage", None),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
    ],
)
def test_access_log_format_trace_id_from_traceparent(
    traceparent: bytes, expected: str | None
) -> None:
    record_head = head(b"traceparent: " + traceparent + b"\r\n")
    assert logformat._trace_id(http_record(head=record_head)) == expected
    assert logformat._trace_id(http_record(head=head())) is None


@pytest.mark.parametrize(
    ("error", "flag"),
    [
        (None, None),
        ("route_not_found", "NR"),
        ("no_endpoint", "UH"),
        ("upstream_connect_failure", "UF"),
        ("upstream_reset_after_headers", "UR"),
        ("rate_limited", "RL"),
        ("permission_denied", "RBAC"),
        ("circuit_breaker_max_connections", "UO"),
        ("upstream_something_new", "UF"),
        ("invalid_header", "DPE"),
    ],
)
def test_access_log_format_response_flags(error: str | None, flag: str | None) -> None:
    assert response_flags(error) == flag


def test_access_log_format_inbound_services_come_from_the_caller_and_the_proxy() -> None:
    record = http_record(direction="inbound", source="web", service="api", cluster="local:8080")
    assert compile_text("%SOURCE_SERVICE% %DESTINATION_SERVICE%")(record) == "web api\n"
    plaintext = http_record(direction="inbound", source="", service="api")
    assert compile_text("%SOURCE_SERVICE% %DESTINATION_SERVICE%")(plaintext) == "- api\n"
