"""Distributed tracing end to end: real proxies over mTLS export spans over OTLP/HTTP to a
receiver in the test, which decodes them with `opentelemetry-proto`.

The call goes client -> web's inbound -> web app -> web's outbound -> api's inbound ->
api app -> api's outbound -> store's inbound -> store app, and the apps copy the trace
fields onto their own calls, as every app in a mesh must. One trace, five spans, each
proxy hop the child of the one before.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .conftest import ProxyProcess, free_port, http_snapshot, wait_for
from .test_mtls import Pki

pytestmark = pytest.mark.integration

# what an app copies from the request it serves onto the calls it makes
PROPAGATED = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
)
SERVER, CLIENT = 2, 3  # Span.SpanKind in the OTLP protobuf
STATUS_ERROR = 2


# -- an OTLP/HTTP receiver ---------------------------------------------------------------
@dataclass
class Span:
    service: str
    instance: str
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int
    message: str
    start: int
    end: int


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


class OtlpReceiver:
    """POST /v1/traces (protobuf) on 127.0.0.1: every span received, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ok = (
                    self.path == "/v1/traces"
                    and self.headers.get("content-type") == "application/x-protobuf"
                )
                if ok:
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def take(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    found.append(
                        Span(
                            service=resource.get("service.name", ""),
                            instance=resource.get("service.instance.id", ""),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status=s.status.code,
                            message=s.status.message,
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, count: int, timeout: float = 20.0) -> list[Span]:
        wait_for(lambda: len(self.trace(trace_id)) >= count, timeout, f"{count} spans")
        spans = self.trace(trace_id)
        assert len(spans) == count, spans
        return spans

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.stop()


# -- the apps ----------------------------------------------------------------------------
class App:
    """A service's app: answers every GET; with `next_url`, by calling it (same path)
    with the trace fields copied; the last one answers 500 on /fail."""

    def __init__(self, name: str, next_url: str | None = None) -> None:
        self.name = name
        self.next_url = next_url
        self.seen: list[dict[str, str]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fields = {k.lower(): v for k, v in self.headers.items()}
                app.seen.append(fields)
                status, body = app.answer(self.path, fields)
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, fields: dict[str, str]) -> tuple[int, bytes]:
        if self.next_url is None:
            if path.startswith("/fail"):
                return 500, b"store failed\n"
            return 200, f"{self.name} ok\n".encode()
        copied = {k: v for k, v in fields.items() if k in PROPAGATED}
        request = urllib.request.Request(self.next_url + path, headers=copied)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- the mesh ----------------------------------------------------------------------------
def tracing(receiver: OtlpReceiver, sampling: float = 100, **more: Any) -> dict[str, Any]:
    return {"endpoint": receiver.endpoint, "sampling": sampling, **more}


def inbound_proxy(
    start_proxy: Callable[[dict[str, Any]], ProxyProcess],
    service: str,
    app_port: int,
    trace: dict[str, Any] | None,
    files: Any = None,
    *,
    h2_app: bool = False,
) -> ProxyProcess:
    doc = http_snapshot(free_port(), free_port(), [app_port])
    doc["service"] = service
    doc["node"] = f"{service}-1"
    doc["listeners"][0]["name"] = "inbound:http"
    doc["listeners"][0]["direction"] = "inbound"
    doc["listeners"][0]["filter_chains"][0]["http"]["route_config"]["virtual_hosts"][0][
        "routes"
    ] = [{"name": service, "cluster": "up", "timeout": "0s" if h2_app else "15s"}]
    if files is not None:
        doc["listeners"][0]["filter_chains"][0]["tls"] = files.tls()
    if h2_app:
        doc["clusters"][0]["protocol"] = "http2"
    if trace is not None:
        doc["tracing"] = trace
    return start_proxy(doc)


def outbound_proxy(
    start_proxy: Callable[[dict[str, Any]], ProxyProcess],
    service: str,
    destination: str,
    port: int,
    files: Any,
    trace: dict[str, Any] | None,
    *,
    protocol: str = "http2",
) -> ProxyProcess:
    routes = [
        {"name": "dead", "match": {"path": {"prefix": "/dead"}}, "cluster": "nowhere"},
        {"name": destination, "cluster": destination, "timeout": "0s"},
    ]
    clusters = [
        {
            "name": destination,
            "endpoints": [{"address": "127.0.0.1", "port": port}],
            "tls": files.tls(identity=f"spiffe://default/{destination}"),
            "protocol": protocol,
        },
        {"name": "nowhere", "endpoints": [{"address": "127.0.0.1", "port": free_port()}]},
    ]
    doc = http_snapshot(free_port(), free_port(), [], routes=routes, clusters=clusters)
    doc["service"] = service
    doc["node"] = f"{service}-1"
    doc["listeners"][0]["name"] = f"outbound:{destination}"
    doc["listeners"][0]["direction"] = "outbound"
    if trace is not None:
        doc["tracing"] = trace
    return start_proxy(doc)


@dataclass
class Mesh:
    web_in: ProxyProcess
    apps: dict[str, App]
    proxies: dict[str, ProxyProcess] = field(default_factory=dict)


@pytest.fixture
def mesh_of(start_proxy, pki: Pki) -> Iterator[Callable[..., Mesh]]:
    apps: list[App] = []

    def build(trace: dict[str, Any] | None) -> Mesh:
        store_app = App("store")
        apps.append(store_app)
        store_in = inbound_proxy(start_proxy, "store", store_app.port, trace, pki.issue("store"))
        api_out = outbound_proxy(
            start_proxy, "api", "store", store_in.port, pki.issue("api"), trace, protocol="http1"
        )
        api_app = App("api", f"http://127.0.0.1:{api_out.port}")
        apps.append(api_app)
        api_in = inbound_proxy(start_proxy, "api", api_app.port, trace, pki.issue("api"))
        web_out = outbound_proxy(start_proxy, "web", "api", api_in.port, pki.issue("web"), trace)
        web_app = App("web", f"http://127.0.0.1:{web_out.port}")
        apps.append(web_app)
        web_in = inbound_proxy(start_proxy, "web", web_app.port, trace)
        return Mesh(
            web_in,
            {"web": web_app, "api": api_app, "store": store_app},
            {
                "web_in": web_in,
                "web_out": web_out,
                "api_in": api_in,
                "api_out": api_out,
                "store_in": store_in,
            },
        )

    yield build
    for app in apps:
        app.stop()


def trace_id_seen(app: App) -> str:
    return app.seen[-1]["traceparent"].split("-")[1]


def chain(spans: list[Span]) -> list[Span]:
    """The spans of one trace from the root down, each the parent of the next."""
    by_parent = {s.parent: s for s in spans}
    assert len(by_parent) == len(spans), "two spans share a parent: not a chain"
    roots = [s for s in spans if s.parent not in {x.span_id for x in spans}]
    assert len(roots) == 1, roots
    ordered = [roots[0]]
    while ordered[-1].span_id in by_parent:
        ordered.append(by_parent[ordered[-1].span_id])
    assert len(ordered) == len(spans)
    return ordered


# -- tests -------------------------------------------------------------------------------
def test_tracing_one_trace_across_three_services(mesh_of, receiver: OtlpReceiver) -> None:
    mesh = mesh_of(tracing(receiver))
    status, body = get(mesh.web_in.url + "/orders/7", {"user-agent": "tracing-test/1"})
    assert (status, body) == (200, b"store ok\n")
    trace_id = trace_id_seen(mesh.apps["store"])
    # every app saw the same trace, each with another parent (its own proxy's span)
    assert {trace_id_seen(a) for a in mesh.apps.values()} == {trace_id}
    spans = chain(receiver.wait_trace(trace_id, 5))
    assert [(s.service, s.kind) for s in spans] == [
        ("web", SERVER),
        ("web", CLIENT),
        ("api", SERVER),
        ("api", CLIENT),
        ("store", SERVER),
    ]
    assert spans[0].parent == ""  # the client sent no context: web's inbound started it
    for app, span in zip(("web", "api", "store"), spans[0::2], strict=True):
        # each app's parent is its inbound proxy's span
        assert mesh.apps[app].seen[-1]["traceparent"] == f"00-{trace_id}-{span.span_id}-01"
    assert [s.instance for s in spans] == ["web-1", "web-1", "api-1", "api-1", "store-1"]
    assert [s.name for s in spans] == ["GET web", "GET api", "GET api", "GET store", "GET store"]
    for s in spans:
        a = s.attributes
        assert a["http.request.method"] == "GET" and a["url.path"] == "/orders/7"
        assert a["http.response.status_code"] == 200 and s.status != STATUS_ERROR
        assert a["url.scheme"] == "http" if s is spans[0] else True
        assert a["server.address"] == "127.0.0.1"
        assert a["meshling.request_id"]
        assert s.start <= s.end
    # the same request id runs through the whole call (the apps copy it)
    assert len({s.attributes["meshling.request_id"] for s in spans}) == 1
    assert spans[0].attributes["user_agent.original"] == "tracing-test/1"
    assert spans[1].attributes["peer.service"] == "api"
    assert spans[2].attributes["peer.service"] == "web"  # the caller's verified identity
    assert spans[2].attributes["url.scheme"] == "https"  # over mTLS (HTTP/2 between proxies)
    assert spans[1].attributes["meshling.cluster"] == "api"
    assert spans[1].attributes["meshling.upstream.address"].startswith("127.0.0.1:")
    assert spans[3].attributes["network.protocol.version"] == "1.1"
    # children start within their parents' time (a server's span may end a little after
    # its caller's: it ends once its proxy has written the last byte, in another process)
    for parent, child in itertools.pairwise(spans):
        assert parent.start <= child.start <= parent.end
    # the exporters counted what they sent
    text = mesh.web_in.metrics()
    assert 'meshling_trace_spans_total{outcome="exported"} 1.0' in text


def test_tracing_error_status_on_failing_calls(mesh_of, receiver: OtlpReceiver) -> None:
    mesh = mesh_of(tracing(receiver))
    assert get(mesh.web_in.url + "/fail")[0] == 500
    trace_id = trace_id_seen(mesh.apps["store"])
    spans = chain(receiver.wait_trace(trace_id, 5))
    for s in spans:
        assert s.status == STATUS_ERROR and s.attributes["http.response.status_code"] == 500
        assert s.message == "HTTP 500"
    # a local failure: web's outbound cannot connect ("dead" routes nowhere)
    assert get(mesh.web_in.url + "/dead")[0] == 502
    trace_id = trace_id_seen(mesh.apps["web"])
    spans = chain(receiver.wait_trace(trace_id, 2))
    client = spans[1]
    assert client.kind == CLIENT and client.status == STATUS_ERROR
    assert client.message == "upstream_connect_failure"
    assert client.attributes["error.type"] == "upstream_connect_failure"
    assert client.attributes["meshling.route"] == "dead"
    assert spans[0].status == STATUS_ERROR and spans[0].message == "HTTP 502"


def test_tracing_sampling_zero_exports_nothing_but_propagates(
    mesh_of, receiver: OtlpReceiver
) -> None:
    mesh = mesh_of(tracing(receiver, sampling=0))
    for _ in range(5):
        assert get(mesh.web_in.url + "/quiet")[0] == 200
    seen = mesh.apps["store"].seen[-1]["traceparent"]
    quiet_trace = seen.split("-")[1]
    assert seen.endswith("-00")  # unsampled, and said so downstream
    assert {trace_id_seen(a) for a in mesh.apps.values()} == {quiet_trace}
    parents = {a.seen[-1]["traceparent"].split("-")[2] for a in mesh.apps.values()}
    # the first hop started the trace unsampled; the others pass its context on as it
    # came (no span of theirs exists to be a parent)
    assert len(parents) == 1
    # a caller's own decision wins over 0 %: its spans arrive, and none of the quiet ones
    # (the export queue is in order)
    sampled = "0af7651916cd43dd8448eb211c80319c"
    get(mesh.web_in.url + "/loud", {"traceparent": f"00-{sampled}-b7ad6b7169203331-01"})
    spans = chain(receiver.wait_trace(sampled, 5))
    assert spans[0].parent == "b7ad6b7169203331"
    assert receiver.trace(quiet_trace) == []
    assert len(receiver.spans) == 5


def test_tracing_continues_incoming_b3(mesh_of, receiver: OtlpReceiver) -> None:
    mesh = mesh_of(tracing(receiver))
    trace_id = "463ac35c9f6413ad48485a3953bb6124"
    parent = "a2fb4a1d1a96d312"
    status, _ = get(
        mesh.web_in.url + "/b3",
        {"x-b3-traceid": trace_id, "x-b3-spanid": parent, "x-b3-sampled": "1"},
    )
    assert status == 200
    spans = chain(receiver.wait_trace(trace_id, 5))
    assert spans[0].parent == parent
    # the web app got B3 back in kind, naming web's inbound span, and W3C with it
    seen = mesh.apps["web"].seen[-1]
    assert seen["x-b3-traceid"] == trace_id and seen["x-b3-spanid"] == spans[0].span_id
    assert seen["x-b3-parentspanid"] == parent and seen["x-b3-sampled"] == "1"
    assert seen["traceparent"] == f"00-{trace_id}-{spans[0].span_id}-01"
    # B3 single, 64-bit trace id: padded to 128 bits
    short = "48485a3953bb6124"
    get(mesh.web_in.url + "/b3s", {"b3": f"{short}-{parent}-1"})
    spans = chain(receiver.wait_trace("0" * 16 + short, 5))
    assert mesh.apps["web"].seen[-1]["b3"] == f"{'0' * 16}{short}-{spans[0].span_id}-1-{parent}"


def test_tracing_invalid_context_is_replaced_not_forwarded(mesh_of, receiver: OtlpReceiver) -> None:
    mesh = mesh_of(tracing(receiver))
    bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"  # upper-case: invalid
    get(mesh.web_in.url + "/bad", {"traceparent": bad, "tracestate": "k=v"})
    seen = mesh.apps["web"].seen[-1]
    assert seen["traceparent"] != bad and "tracestate" not in seen
    spans = chain(receiver.wait_trace(seen["traceparent"].split("-")[1], 5))
    assert spans[0].parent == ""


# -- gRPC --------------------------------------------------------------------------------
def _identity(b: bytes) -> bytes:
    return b


class Greeter:
    """A gRPC service without protobuf (raw bytes), recording the metadata it got."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if request == b"missing":
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return b"hello " + request


@pytest.fixture
def greeter() -> Iterator[tuple[Greeter, int]]:
    service = Greeter()
    kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
    handler = grpc.method_handlers_generic_handler(
        "test.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(service.hello, **kw)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, port
    server.stop(0)


def test_tracing_grpc_call_makes_spans(
    start_proxy, pki: Pki, receiver: OtlpReceiver, greeter: tuple[Greeter, int]
) -> None:
    service, port = greeter
    trace = tracing(receiver)
    api = inbound_proxy(start_proxy, "api", port, trace, pki.issue("api"), h2_app=True)
    web = outbound_proxy(start_proxy, "web", "api", api.port, pki.issue("web"), trace)
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        hello = channel.unary_unary("/test.Greeter/Hello")
        assert hello(b"mesh", timeout=10) == b"hello mesh"
        trace_id = service.metadata[-1]["traceparent"].split("-")[1]
        spans = chain(receiver.wait_trace(trace_id, 2))
        assert [(s.service, s.kind) for s in spans] == [("web", CLIENT), ("api", SERVER)]
        for s in spans:
            a = s.attributes
            assert s.name == "test.Greeter/Hello" and a["rpc.system"] == "grpc"
            assert a["rpc.service"] == "test.Greeter" and a["rpc.method"] == "Hello"
            assert a["rpc.grpc.status_code"] == 0 and a["network.protocol.version"] == "2"
            assert s.status != STATUS_ERROR
        with pytest.raises(grpc.RpcError):
            hello(b"missing", timeout=10)
    trace_id = service.metadata[-1]["traceparent"].split("-")[1]
    spans = chain(receiver.wait_trace(trace_id, 2))
    for s in spans:
        assert s.attributes["rpc.grpc.status_code"] == 14
        assert s.status == STATUS_ERROR and s.message == "gRPC status 14"


def test_tracing_spans_flushed_on_drain(start_proxy, receiver: OtlpReceiver) -> None:
    app = App("solo")
    try:
        proxy = inbound_proxy(start_proxy, "solo", app.port, tracing(receiver))
        assert get(proxy.url + "/x")[0] == 200
        trace_id = trace_id_seen(app)
        started = time.monotonic()
        assert proxy.stop() == 0
        # exported by the time the process is gone: the drain flushed it
        spans = receiver.trace(trace_id)
        assert len(spans) == 1 and spans[0].kind == SERVER
        assert time.monotonic() - started < 15
    finally:
        app.stop()


# -- golden metrics off ------------------------------------------------------------------
def test_tracing_metrics_off_counts_no_requests(start_proxy, receiver: OtlpReceiver) -> None:
    app = App("quiet")
    try:
        doc = http_snapshot(free_port(), free_port(), [app.port])
        doc["metrics"] = {"enabled": False}
        doc["tracing"] = tracing(receiver)
        proxy = start_proxy(doc)
        for _ in range(3):
            assert get(proxy.url + "/x")[0] == 200
        receiver.wait_trace(trace_id_seen(app), 1)  # traced all the same
        text = proxy.metrics()
        assert "meshling_http_requests_total{" not in text
        assert 'meshling_snapshot_info{version="1"}' in text  # the proxy's own: kept
        doc["metrics"] = {"enabled": True}
        doc["version"] = "2"
        proxy.write_config(doc)
        wait_for(lambda: 'version="2"' in proxy.metrics(), 15, "the reload")
        assert get(proxy.url + "/x")[0] == 200
        assert "meshling_http_requests_total{" in proxy.metrics()
    finally:
        app.stop()


# -- with a control plane: a Trace policy turns tracing on -------------------------------
def test_tracing_trace_policy_from_the_control_plane(receiver: OtlpReceiver, tmp_path) -> None:
    from .cp_mesh import ControlPlane, allow, start_ready, web_and_service
    from .test_cp_policies import Mesh, running

    app = App("api")
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(allow("web", "api"))
    api, web, outbound = web_and_service(tmp_path, cp, "api", app.port)
    mesh = Mesh(tmp_path, cp, outbound)
    trace = {
        "kind": "Trace",
        "metadata": {"name": "everyone", "mesh": "default"},
        "spec": {
            "dataplanes": [{"service": "*"}],
            "conf": {"sampling": 100, "backend": {"otlp": {"endpoint": receiver.endpoint}}},
        },
    }
    try:
        start_ready(api, web)
        wait_for(lambda: mesh.call("/ok/")[0] == 200, 20, "web -> api over mTLS")
        assert "traceparent" not in app.seen[-1]  # no Trace: no tracing

        mesh.apply(trace)
        for proxy in (web, api):
            wait_for(lambda p=proxy: running(p)["tracing"] is not None, 15, f"{proxy.name} traces")

        # the multiplexed connection between the proxies moves to api's new chain within
        # a tick (GOAWAY): until then api's hop is on the chain without tracing
        def api_traces() -> bool:
            assert mesh.call("/warm-up/")[0] == 200
            return any(s.service == "api" for s in receiver.spans)

        wait_for(api_traces, 20, "api's spans")
        assert mesh.call("/traced/")[0] == 200
        spans = chain(receiver.wait_trace(trace_id_seen(app), 2))
        assert [(s.service, s.instance, s.kind) for s in spans] == [
            ("web", "web-1", CLIENT),
            ("api", "api-1", SERVER),
        ]
        assert spans[1].attributes["peer.service"] == "web"

        mesh.delete(trace)
        for proxy in (web, api):
            wait_for(lambda p=proxy: running(p)["tracing"] is None, 15, f"{proxy.name} stops")
        # keep-alive connections move to the new snapshot after a response
        wait_for(
            lambda: mesh.call("/ok/")[0] == 200 and "traceparent" not in app.seen[-1],
            15,
            "untraced calls",
        )
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()
        app.stop()


def test_tracing_collector_down_never_affects_requests(start_proxy) -> None:
    app = App("solo")
    try:
        # nothing listens there: every export fails, after the exporter's own retries
        doc = http_snapshot(free_port(), free_port(), [app.port])
        doc["tracing"] = {"endpoint": f"http://127.0.0.1:{free_port()}/v1/traces"}
        proxy = start_proxy(doc)
        started = time.monotonic()
        for _ in range(20):
            assert get(proxy.url + "/x")[0] == 200
        assert time.monotonic() - started < 5  # no request waited for the collector

        def failed() -> float:
            for line in proxy.metrics().splitlines():
                if line.startswith('meshling_trace_spans_total{outcome="failed"}'):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        wait_for(lambda: failed() >= 20, 20, "the failed exports counted")
        assert 'meshling_trace_spans_total{outcome="exported"} 0.0' in proxy.metrics()
        assert proxy.stop() == 0  # the drain's flush gives up in time, too
    finally:
        app.stop()
