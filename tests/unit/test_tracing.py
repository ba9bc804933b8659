"""Trace context: W3C and B3 parsing, precedence, injection, sampling, span descriptions."""

from __future__ import annotations

import itertools

import pytest

from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node
from meshling.tracing.config import parse_tracing, tracing_document
from meshling.tracing.context import (
    TRACE_FIELDS,
    extract,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    valid_tracestate,
)
from meshling.tracing.hop import Tracer, sampled_by_id, threshold
from meshling.tracing.span import Exchanged, TraceTag, describe

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
TP = f"00-{TID}-{SID}-01".encode()


def fixed_bits() -> object:
    """Deterministic ids: 1, 2, 3, ... in every width asked for."""
    counter = itertools.count(1)

    def bits(width: int) -> int:
        n = next(counter)
        return (n << 128 | n << 64 | n) if width == 192 else n

    return bits


# -- traceparent -------------------------------------------------------------------------
def test_traceparent_valid_sampled_and_not() -> None:
    parent = parse_traceparent(TP)
    assert parent is not None
    assert parent.trace_id == TID.encode()
    assert parent.span_id == SID.encode()
    assert parent.sampled is True and parent.format == "w3c"
    unsampled = parse_traceparent(f"00-{TID}-{SID}-00".encode())
    assert unsampled is not None and unsampled.sampled is False
    # other flag bits do not make it sampled; bit 0 alone decides
    assert parse_traceparent(f"00-{TID}-{SID}-02".encode()).sampled is False  # type: ignore[union-attr]
    assert parse_traceparent(f"00-{TID}-{SID}-03".encode()).sampled is True  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"00",
        f"00-{TID.upper()}-{SID}-01".encode(),  # upper-case hex
        f"00-{TID}-{SID.upper()}-01".encode(),
        f"00-{TID}-{SID}-0G".encode(),
        f"00-{'0' * 32}-{SID}-01".encode(),  # all-zero trace id
        f"00-{TID}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"ff-{TID}-{SID}-01".encode(),  # version ff is invalid
        f"0-{TID}-{SID}-01".encode(),
        f"00-{TID}-{SID}-01-extra".encode(),  # version 00 is exactly 55 characters
        f"00-{TID}-{SID}-1".encode(),
        f"00_{TID}-{SID}-01".encode(),
        f"00-{TID[:-1]}-{SID}-01".encode(),
        f"00-{TID}x{SID}-01".encode(),
        f"cc-{TID}-{SID}-01x".encode(),  # a future version: more must follow a '-'
        f"Zz-{TID}-{SID}-01".encode(),
        "00-" + "é" * 16 + f"-{SID}-01".encode().decode(),  # type: ignore[list-item]
    ],
)
def test_traceparent_invalid(value: bytes | str) -> None:
    raw = value.encode() if isinstance(value, str) else value
    assert parse_traceparent(raw) is None


def test_traceparent_future_version_parsed_leniently() -> None:
    parent = parse_traceparent(f"cc-{TID}-{SID}-01-whatever-comes-next".encode())
    assert parent is not None and parent.trace_id == TID.encode()
    assert parse_traceparent(f"01-{TID}-{SID}-01".encode()) is not None


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"congo=t61rcWkgMzE", True),
        (b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", True),
        (b"a=1, b=2 ,c=3", True),
        (b"noequals", False),
        (b"=value", False),
        (b"key=", False),
        (b"k=v\x01", False),
        (b",".join(b"k%d=v" % i for i in range(33)), False),  # more than 32 members
    ],
)
def test_tracestate_shape(value: bytes, ok: bool) -> None:
    assert valid_tracestate(value) is ok


# -- B3 ----------------------------------------------------------------------------------
def test_b3_single_full_and_padded_and_debug() -> None:
    parent = parse_b3_single(f"{TID}-{SID}-1-{'0' * 15}1".encode())
    assert parent is not None and parent.sampled is True and parent.format == "b3"
    short = parse_b3_single(f"{TID[16:]}-{SID}".encode())
    assert short is not None and short.trace_id == b"0" * 16 + TID[16:].encode()
    assert short.sampled is None  # deferred: the proxy decides
    debug = parse_b3_single(f"{TID}-{SID}-d".encode())
    assert debug is not None and debug.sampled is True
    deny = parse_b3_single(f"{TID}-{SID}-0".encode())
    assert deny is not None and deny.sampled is False


def test_b3_single_lone_sampling_state() -> None:
    deny = parse_b3_single(b"0")
    assert deny is not None and deny.sampled is False and deny.trace_id is None
    accept = parse_b3_single(b"d")
    assert accept is not None and accept.sampled is True and accept.span_id is None
    assert parse_b3_single(b"x") is None


@pytest.mark.parametrize(
    "value",
    [
        b"",
        f"{TID}".encode(),
        f"{TID}-{SID}-2".encode(),  # unknown sampling state
        f"{TID}-{SID}-1-{'0' * 16}".encode(),  # zero parent span id
        f"{TID}-{SID}-1-{SID}-more".encode(),
        f"{'0' * 32}-{SID}".encode(),
        f"{TID}-{'0' * 16}".encode(),
        f"{TID[:20]}-{SID}".encode(),  # neither 64 nor 128 bits
        f"{TID.upper()}-{SID}".encode(),
        b"---",
    ],
)
def test_b3_single_invalid(value: bytes) -> None:
    assert parse_b3_single(value) is None


def test_b3_multi() -> None:
    parent = parse_b3_multi(TID.encode(), SID.encode(), b"1", None)
    assert parent is not None and parent.sampled is True and parent.format == "b3multi"
    assert parse_b3_multi(TID.encode(), SID.encode(), b"false", None).sampled is False  # type: ignore[union-attr]
    assert parse_b3_multi(TID.encode(), SID.encode(), None, b"1").sampled is True  # type: ignore[union-attr]
    assert parse_b3_multi(TID.encode(), SID.encode(), None, None).sampled is None  # type: ignore[union-attr]
    assert parse_b3_multi(TID.encode(), None, b"1", None) is None  # a trace id alone
    assert parse_b3_multi(b"zz", SID.encode(), b"1", None) is None
    only = parse_b3_multi(None, None, b"0", None)
    assert only is not None and only.trace_id is None and only.sampled is False


# -- extraction and precedence -----------------------------------------------------------
def test_extract_precedence_w3c_over_b3_single_over_multi() -> None:
    other = "a" * 32
    b3 = f"{other}-{'b' * 16}-1".encode()
    multi = [(b"x-b3-traceid", b"c" * 32), (b"x-b3-spanid", b"d" * 16)]
    incoming, kept = extract([(b"host", b"x"), (b"traceparent", TP), (b"b3", b3), *multi])
    assert incoming.parent is not None and incoming.parent.format == "w3c"
    assert incoming.b3 and incoming.b3multi
    assert kept == [(b"host", b"x")]
    incoming, _ = extract([(b"b3", b3), *multi])
    assert incoming.parent is not None and incoming.parent.trace_id == other.encode()
    incoming, _ = extract(multi)
    assert incoming.parent is not None and incoming.parent.trace_id == b"c" * 32


def test_extract_falls_back_when_w3c_invalid_and_drops_its_tracestate() -> None:
    b3 = f"{TID}-{SID}-1".encode()
    incoming, _ = extract([(b"traceparent", b"00-garbage"), (b"tracestate", b"a=1"), (b"b3", b3)])
    assert incoming.parent is not None and incoming.parent.format == "b3"
    assert incoming.parent.tracestate == b""


def test_extract_two_traceparents_are_invalid() -> None:
    incoming, kept = extract([(b"traceparent", TP), (b"traceparent", TP)])
    assert incoming.parent is None and kept == []


def test_extract_tracestate_joined_and_validated() -> None:
    incoming, _ = extract([(b"traceparent", TP), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")])
    assert incoming.parent is not None and incoming.parent.tracestate == b"a=1,b=2"
    incoming, _ = extract([(b"traceparent", TP), (b"tracestate", b"broken")])
    assert incoming.parent is not None and incoming.parent.tracestate == b""


def test_extract_without_trace_fields_keeps_everything() -> None:
    fields = [(b"host", b"x"), (b"user-agent", b"curl")]
    incoming, kept = extract(fields)
    assert incoming.parent is None and kept == fields


# -- the hop: join, start, inject, sample ------------------------------------------------
def fields_of(hop_fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return dict(hop_fields)


def test_hop_joins_w3c_and_writes_its_own_span_as_parent() -> None:
    tracer = Tracer(0.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    hop, kept = tracer.begin([(b"traceparent", TP), (b"tracestate", b"k=v"), (b"a", b"b")])
    assert hop.trace_id == TID.encode() and hop.parent_span_id == SID.encode()
    assert hop.sampled  # the caller's decision, though the sampler says 0 %
    assert hop.span_id == b"%016x" % 1
    out = fields_of(hop.fields)
    assert out[b"traceparent"] == f"00-{TID}-{'0' * 15}1-01".encode()
    assert out[b"tracestate"] == b"k=v"
    assert b"b3" not in out and b"x-b3-traceid" not in out
    assert kept == [(b"a", b"b")]


def test_hop_passes_an_unsampled_w3c_context_on_unchanged() -> None:
    tracer = Tracer(100.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    unsampled = f"00-{TID}-{SID}-00".encode()
    fields = [(b"a", b"b"), (b"traceparent", unsampled)]
    hop, kept = tracer.begin(fields)
    # the caller chose not to sample (even at 100 %): no span of this hop exists, so the
    # caller's context goes on as it came, and no field is copied or written
    assert not hop.sampled and hop.fields == []
    assert kept is fields and (b"traceparent", unsampled) in kept
    assert hop.trace_id == TID.encode() and hop.parent_span_id == SID.encode()
    # an invalid one, one with other flags, or one with a tracestate takes the full path
    for extra in (
        [(b"traceparent", f"00-{TID}-{'0' * 16}-00".encode())],
        [(b"traceparent", f"00-{TID}-{SID}-02".encode())],
        [(b"traceparent", unsampled), (b"tracestate", b"k=v")],
    ):
        hop, kept = tracer.begin([(b"a", b"b"), *extra])
        assert kept == [(b"a", b"b")] and hop.fields


def test_hop_starts_a_trace_without_copying_the_fields() -> None:
    tracer = Tracer(100.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    fields = [(b"a", b"b")]
    hop, kept = tracer.begin(fields)
    assert kept is fields and hop.sampled and hop.parent_span_id is None
    assert [name for name, _ in hop.fields] == [b"traceparent"]


def test_hop_answers_b3_in_kind_and_w3c_too() -> None:
    tracer = Tracer(100.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    hop, _ = tracer.begin([(b"x-b3-traceid", TID[16:].encode()), (b"x-b3-spanid", SID.encode())])
    out = fields_of(hop.fields)
    padded = "0" * 16 + TID[16:]
    assert out[b"x-b3-traceid"] == padded.encode()
    assert out[b"x-b3-spanid"] == b"0" * 15 + b"1"
    assert out[b"x-b3-parentspanid"] == SID.encode()
    assert out[b"x-b3-sampled"] == b"1"
    assert out[b"traceparent"].startswith(f"00-{padded}-".encode())
    assert b"b3" not in out
    hop, _ = tracer.begin([(b"b3", f"{TID}-{SID}-0".encode())])
    out = fields_of(hop.fields)
    assert not hop.sampled
    assert out[b"b3"] == f"{TID}-{'0' * 15}2-0-{SID}".encode()


def test_hop_configured_formats_always_written() -> None:
    tracer = Tracer(100.0, ("w3c", "b3", "b3multi"), random_bits=fixed_bits())  # type: ignore[arg-type]
    hop, _ = tracer.begin([])
    out = fields_of(hop.fields)
    assert {b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"} <= set(out)
    assert hop.parent_span_id is None and b"x-b3-parentspanid" not in out
    assert len(out[b"b3"].split(b"-")) == 3  # no parent span on a new trace


def test_hop_invalid_headers_never_forwarded_as_they_came() -> None:
    tracer = Tracer(100.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    junk = [
        (b"traceparent", b"00-XYZ"),
        (b"tracestate", b"\x01"),
        (b"b3", b"nope"),
        (b"x-b3-traceid", b"1"),
        (b"x-b3-flags", b"7"),
    ]
    hop, kept = tracer.begin(junk)
    assert kept == []
    assert hop.parent_span_id is None  # a new trace
    for name, value in hop.fields:
        assert (name, value) not in junk
        assert name in TRACE_FIELDS


def test_hop_lone_b3_deny_starts_unsampled_trace() -> None:
    tracer = Tracer(100.0, random_bits=fixed_bits())  # type: ignore[arg-type]
    hop, _ = tracer.begin([(b"b3", b"0")])
    assert not hop.sampled and hop.parent_span_id is None
    assert fields_of(hop.fields)[b"b3"].endswith(b"-0")


def test_sampling_is_decided_by_trace_id_so_hops_agree() -> None:
    assert threshold(0) == 0 and threshold(100) == 1 << 64
    low = b"0" * 31 + b"1"
    high = b"0" * 16 + b"f" * 16
    assert sampled_by_id(low, threshold(1)) and not sampled_by_id(high, threshold(99))
    # two proxies at the same rate decide the same for every trace (B3 deferred)
    a, b = Tracer(30.0), Tracer(30.0)
    kept = 0
    for i in range(1, 2001):
        tid = b"%016x" % (i * 0x9E3779B97F4A7C15 % (1 << 64))
        header = [(b"b3", f"{'1' * 16}{tid.decode()}-{SID}".encode())]
        first, _ = a.begin(header)
        second, _ = b.begin(header)
        assert first.sampled == second.sampled
        kept += first.sampled
    assert 500 < kept < 700  # about 30 % of 2000


def test_sampling_zero_and_hundred() -> None:
    none = Tracer(0.0)
    every = Tracer(100.0)
    for _ in range(200):
        assert not none.begin([])[0].sampled
        assert every.begin([])[0].sampled


def test_new_trace_ids_are_never_zero() -> None:
    # a new trace draws 192 bits: trace id (high 128), span id (low 64); draws with a
    # zero span id, or a zero half of the trace id, are drawn again
    good = (5 << 64 | 7) << 64 | 3
    values = iter([0, 3, 7 << 64 | 3, 5 << 128 | 3, good])
    tracer = Tracer(100.0, random_bits=lambda width: next(values))
    hop, _ = tracer.begin([])
    assert hop.span_id == b"%016x" % 3
    assert hop.trace_id == b"%032x" % (5 << 64 | 7)
    # a joined trace draws only its span id (64 bits), again while it is 0
    values = iter([0, 9])
    hop, _ = tracer.begin([(b"traceparent", TP)])
    assert hop.span_id == b"%016x" % 9


# -- spans -------------------------------------------------------------------------------
def exchanged(**given: object) -> Exchanged:
    facts: dict[str, object] = {
        "direction": "inbound",
        "listener": "inbound:8080",
        "method": b"GET",
        "path": b"/orders",
        "scheme": b"https",
        "authority": b"api:8080",
        "version": b"1.1",
        "headers": [(b"user-agent", b"curl/8"), (b"x-tenant", b"acme")],
        "status": 200,
        "route": "api",
        "cluster": "local:9000",
        "endpoint": "127.0.0.1:9000",
        "request_id": b"r-1",
        "peer": b"10.0.0.1",
        "source": "web",
        "error": None,
        "body_in": 3,
        "body_out": 12,
    }
    facts.update(given)
    return Exchanged(**facts)  # type: ignore[arg-type]


def test_server_span_attributes() -> None:
    span = describe(exchanged())
    assert span.kind == "server" and span.name == "GET api" and span.error is None
    a = span.attributes
    assert a["http.request.method"] == "GET" and a["url.path"] == "/orders"
    assert a["url.scheme"] == "https" and a["server.address"] == "api"
    assert a["server.port"] == 8080 and a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1" and a["user_agent.original"] == "curl/8"
    assert a["client.address"] == "10.0.0.1" and a["peer.service"] == "web"
    assert a["meshling.route"] == "api" and a["meshling.cluster"] == "local:9000"
    assert a["meshling.upstream.address"] == "127.0.0.1:9000"
    assert a["meshling.request_id"] == "r-1"


def test_client_span_peer_service_is_the_destination() -> None:
    span = describe(exchanged(direction="outbound", cluster="api~version=v2", source=""))
    assert span.kind == "client" and span.attributes["peer.service"] == "api"
    assert "client.address" not in span.attributes
    assert describe(exchanged(direction=None)).kind == "internal"


def test_error_status_for_5xx_and_no_response_only() -> None:
    failed = describe(exchanged(status=502, error="upstream_connect_failure"))
    assert failed.error == "upstream_connect_failure"
    assert failed.attributes["error.type"] == "upstream_connect_failure"
    assert describe(exchanged(status=503)).error == "HTTP 503"
    assert describe(exchanged(status=0)).error == "no response"
    assert describe(exchanged(status=404, error="route_not_found")).error is None
    assert describe(exchanged(status=404)).error is None


def test_grpc_span() -> None:
    facts = exchanged(path=b"/helloworld.Greeter/SayHello", version=b"2", grpc=True)
    ok = describe(exchanged(**{**_as_dict(facts), "grpc_status": 0}))
    assert ok.name == "helloworld.Greeter/SayHello" and ok.error is None
    assert ok.attributes["rpc.system"] == "grpc"
    assert ok.attributes["rpc.service"] == "helloworld.Greeter"
    assert ok.attributes["rpc.method"] == "SayHello"
    assert ok.attributes["rpc.grpc.status_code"] == 0
    # NOT_FOUND is the caller's problem on a server span, a failure on a client span
    server = describe(exchanged(**{**_as_dict(facts), "grpc_status": 5}))
    assert server.error is None
    client = describe(exchanged(**{**_as_dict(facts), "grpc_status": 5, "direction": "outbound"}))
    assert client.error == "gRPC status 5"
    assert describe(exchanged(**{**_as_dict(facts), "grpc_status": 14})).error == "gRPC status 14"


def _as_dict(facts: Exchanged) -> dict[str, object]:
    return {name: getattr(facts, name) for name in Exchanged.__dataclass_fields__}


def test_custom_tags() -> None:
    tags = (
        TraceTag("team", literal="payments"),
        TraceTag("tenant", header=b"x-tenant"),
        TraceTag("region", header=b"x-region", default="unknown"),
        TraceTag("absent", header=b"x-absent"),
    )
    a = describe(exchanged(), tags).attributes
    assert a["team"] == "payments" and a["tenant"] == "acme" and a["region"] == "unknown"
    assert "absent" not in a


# -- the snapshot section ----------------------------------------------------------------
def node(value: object) -> _Node:
    return _Node("snap.yaml", "tracing", value)


def test_tracing_section_round_trip() -> None:
    document = {
        "endpoint": "http://127.0.0.1:4318",
        "sampling": 2.5,
        "propagation": ["b3multi"],
        "tags": [
            {"name": "team", "literal": "x"},
            {"name": "tenant", "header": {"name": "X-Tenant", "default": "none"}},
        ],
    }
    tracing = parse_tracing(node(document))
    assert tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert tracing.propagation == ("w3c", "b3multi")
    assert tracing.tags[1].header == b"x-tenant"
    again = parse_tracing(node(tracing_document(tracing)))
    assert again == tracing


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        ({}, "tracing.endpoint", "required"),
        ({"endpoint": "ftp://x"}, "tracing.endpoint", "OTLP/HTTP URL"),
        ({"endpoint": "http://x", "sampling": 101}, "tracing.sampling", "0 to 100"),
        ({"endpoint": "http://x", "sampling": "5%"}, "tracing.sampling", "percentage"),
        ({"endpoint": "http://x", "propagation": ["jaeger"]}, "tracing.propagation[0]", "unknown"),
        ({"endpoint": "http://x", "propagation": []}, "tracing.propagation", "non-empty"),
        ({"endpoint": "http://x", "extra": 1}, "tracing.extra", "unknown field"),
        ({"endpoint": "http://x", "tags": [{"name": "http.x", "literal": "y"}]}, "name", "sets"),
        ({"endpoint": "http://x", "tags": [{"name": "t"}]}, "tracing.tags[0]", "exactly one"),
        (
            {"endpoint": "http://x", "tags": [{"name": "t", "literal": "a"}] * 2},
            "tracing.tags[1].name",
            "duplicate",
        ),
    ],
)
def test_tracing_section_errors_name_the_field(document: object, path: str, reason: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        parse_tracing(node(document))
    assert path in str(caught.value) and reason in str(caught.value)
