"""HTTP/2 through the proxy with real clients: curl with prior knowledge and with an h2c
upgrade to an HTTP/1.1 nginx, and the four kinds of gRPC call (grpcio client and server)
through two proxies joined by one multiplexed HTTP/2 mTLS connection."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from .conftest import Nginx, free_port, http_snapshot, wait_for
from .test_mtls import Pki, metric

pytestmark = pytest.mark.integration

CURL = shutil.which("curl") or "curl"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CURL, "-sS", "--max-time", "10", *args], capture_output=True, text=True, check=False
    )


def test_curl_with_prior_knowledge_reaches_an_http1_upstream(
    start_proxy, nginx: Nginx, tmp_path: Path
) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    out = curl(
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code} %{size_download}",
        proxy.url + "/hello",
    )
    assert out.stdout == "2 200 17", out.stderr
    # a body, in a request of its own (curl 7.88 cannot reuse a prior-knowledge
    # connection: nghttp below makes several streams on one)
    body = tmp_path / "body"
    body.write_bytes(b"x" * 200_000)
    out = curl(
        "--http2-prior-knowledge",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        "--data-binary",
        f"@{body}",
        proxy.url + "/swallow",
    )
    assert out.stdout == "200", out.stderr
    out = subprocess.run(
        ["nghttp", "-n", "-s", *(proxy.url + p for p in ("/hello", "/swallow", "/hello?again"))],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(re.findall(r"\s200\s+\d+ /", out.stdout)) == 3, out.stdout
    text = proxy.metrics()
    assert metric(text, 'meshling_downstream_connections_total{listener="in"}') == 3


def test_curl_h2c_upgrade(start_proxy, nginx: Nginx) -> None:
    proxy = start_proxy(http_snapshot(free_port(), free_port(), [nginx.port]))
    out = curl(
        "--http2", "-w", "%{http_version} %{http_code}", "-o", "/dev/null", proxy.url + "/hello"
    )
    assert out.stdout == "2 200", out.stderr


# -- gRPC ------------------------------------------------------------------------------


def _identity(b: bytes) -> bytes:
    return b


class Echo:
    """A gRPC service without protobuf: messages are raw bytes."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = 0
        self.lock = threading.Lock()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if request == b"sleep":
            time.sleep(2)
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"item %d" % i

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"|".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield message.upper()

    def handler(self) -> grpc.GenericRpcHandler:
        kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **kw),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, **kw),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, **kw),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, **kw),
            },
        )


@pytest.fixture
def echo_server() -> Iterator[tuple[Echo, int]]:
    echo = Echo()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((echo.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield echo, port
    server.stop(0)


def grpc_mesh(start_proxy, pki: Pki, server_port: int, retry: dict[str, Any] | None = None):
    """client -> outbound proxy (h2c) -> mTLS HTTP/2 -> inbound proxy -> gRPC server."""
    api_files = pki.issue("api")
    inbound = http_snapshot(free_port(), free_port(), [server_port])
    inbound["listeners"][0]["filter_chains"][0]["tls"] = api_files.tls()
    inbound["clusters"][0]["protocol"] = "http2"
    api = start_proxy(inbound)
    route: dict[str, Any] = {"name": "all", "cluster": "up", "timeout": "0s"}
    if retry is not None:
        route["retry"] = retry
    outbound = http_snapshot(free_port(), free_port(), [api.port], routes=[route])
    outbound["clusters"][0]["tls"] = pki.issue("web").tls(identity="spiffe://default/api")
    outbound["clusters"][0]["protocol"] = "downstream"
    web = start_proxy(outbound)
    return web, api


def test_grpc_four_kinds_of_call_through_two_proxies(
    start_proxy, pki: Pki, echo_server: tuple[Echo, int]
) -> None:
    _, port = echo_server
    web, api = grpc_mesh(start_proxy, pki, port)
    kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary", **kw)
        assert unary(b"hi", timeout=5) == b"echo:hi"
        stream = channel.unary_stream("/test.Echo/ServerStream", **kw)
        assert list(stream(b"5", timeout=5)) == [b"item %d" % i for i in range(5)]
        collect = channel.stream_unary("/test.Echo/ClientStream", **kw)
        assert collect(iter([b"a", b"b", b"c"]), timeout=5) == b"a|b|c"
        bidi = channel.stream_stream("/test.Echo/Bidi", **kw)
        assert list(bidi(iter([b"x", b"y"]), timeout=5)) == [b"X", b"Y"]
        # many calls at once share the proxies' one connection
        with futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: unary(b"%d" % i, timeout=5), range(200)))
        assert results == [b"echo:%d" % i for i in range(200)]
        # a large message, both ways
        big = b"z" * 3_000_000
        assert unary(big, timeout=10) == b"echo:" + big
        # an unknown method: the server's UNIMPLEMENTED comes through
        missing = channel.unary_unary("/test.Echo/Nope", **kw)
        with pytest.raises(grpc.RpcError) as err:
            missing(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = web.metrics()
    assert metric(text, 'meshling_upstream_connections_total{cluster="up"}') == 1
    assert metric(text, 'meshling_grpc_responses_total{cluster="up",grpc_status="0"') >= 204 or (
        'grpc_status="0"' in text
    )
    assert 'grpc_status="12"' in text
    assert metric(api.metrics(), 'meshling_downstream_connections_total{listener="in"}') == 1


def test_grpc_deadline_and_unavailable_answers(
    start_proxy, pki: Pki, echo_server: tuple[Echo, int]
) -> None:
    _, port = echo_server
    web, _ = grpc_mesh(start_proxy, pki, port)
    kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary", **kw)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            unary(b"sleep", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
    # no server behind the mesh: the proxy answers UNAVAILABLE the gRPC way
    dead = free_port()
    web2, _ = grpc_mesh(start_proxy, pki, dead)
    with grpc.insecure_channel(f"127.0.0.1:{web2.port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary", **kw)
        with pytest.raises(grpc.RpcError) as err:
            unary(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_retry_on_unavailable(start_proxy, pki: Pki, echo_server: tuple[Echo, int]) -> None:
    echo, port = echo_server
    web, _ = grpc_mesh(
        start_proxy,
        pki,
        port,
        retry={"max_attempts": 3, "retry_on": ["unavailable"], "backoff": {"base": "10ms"}},
    )
    kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary", **kw)
        echo.fail_next = 2
        reply, call = unary.with_call(b"again", timeout=5)
        assert reply == b"echo:again"
        assert ("x-meshling-attempts", "3") in call.initial_metadata()
        echo.fail_next = 5
        with pytest.raises(grpc.RpcError) as err:
            unary(b"again", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: "meshling_http_retries_total" in web.metrics(), 5, "retries counted")


def test_grpc_through_a_mesh_the_control_plane_configures(
    tmp_path: Path, echo_server: tuple[Echo, int]
) -> None:
    """Dataplanes declare `protocol: grpc`; the control plane (mTLS strict) builds the
    HTTP/2 clusters, and a grpcio client reaches the server through both proxies."""
    from .cp_mesh import ControlPlane, allow, start_ready, web_and_service

    _, port = echo_server
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(allow("web", "greeter"))
    greeter, web, outbound = web_and_service(tmp_path, cp, "greeter", port, protocol="grpc")
    try:
        start_ready(greeter, web)
        kw: dict[str, Any] = {"request_serializer": _identity, "response_deserializer": _identity}
        with grpc.insecure_channel(f"127.0.0.1:{outbound}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary", **kw)

            def answered() -> bool:
                try:
                    return unary(b"mesh", timeout=2) == b"echo:mesh"
                except grpc.RpcError:
                    return False

            wait_for(answered, 20, "web -> greeter")
            bidi = channel.stream_stream("/test.Echo/Bidi", **kw)
            assert list(bidi(iter([b"a", b"b"]), timeout=5)) == [b"A", b"B"]
        text = web.metrics()
        assert 'grpc_status="0"' in text
        assert metric(text, 'meshling_upstream_connections_total{cluster="greeter"}') == 1
    finally:
        web.stop_all()
        greeter.stop_all()
        cp.stop()
