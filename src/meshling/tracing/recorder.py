"""Tracing in a running proxy: the per-request decisions, and the span of an ended hop.

`ProxyTracing` is what a listener's chain holds while a snapshot has `tracing:` on
(`ChainRuntime.tracer`; None otherwise, which is the only check the request path makes
then). The exchange calls `begin` when it builds the upstream request head (the hop's
context and the fields to forward) and `end` when it ends (`proxy.http.record`). An
unsampled hop costs the header parse and the fields written, no span object; a sampled
one is described (`span.describe`) and handed to the exporter (`telemetry.otlp`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshling.tracing.hop import Hop, Tracer
from meshling.tracing.span import Exchanged, SpanDescription, describe

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime
    from meshling.snapshot.model import Tracing


class SpanSink(Protocol):
    def emit(self, hop: Hop, span: SpanDescription, start_ns: int, end_ns: int) -> None: ...


class ProxyTracing:
    """One snapshot's tracing configuration, compiled, with the exporter it feeds."""

    __slots__ = ("begin", "config", "sink", "tags", "tracer")

    def __init__(self, config: Tracing, sink: SpanSink, tracer: Tracer | None = None) -> None:
        self.config = config
        self.sink = sink
        self.tags = config.tags
        self.tracer = tracer or Tracer(config.sampling, config.propagation)  # type: ignore[arg-type]
        # (request fields) -> (the hop, the fields without trace ones): the tracer's own
        # method, so the request path makes one call, not two
        self.begin: Callable[[list[tuple[bytes, bytes]]], tuple[Hop, list[tuple[bytes, bytes]]]]
        self.begin = self.tracer.begin

    def end(
        self,
        ex: Any,
        chain: ChainRuntime,
        peer: bytes,
        source: str,
        route: str,
        cluster: str,
        duration: float,
    ) -> None:
        """Report an ended exchange (HTTP/1.1 `Exchange` or HTTP/2 `H2Exchange`); the
        caller skips this for a hop known to be unsampled."""
        hop: Hop | None = ex.trace
        head = ex.head
        if hop is None:
            # answered before an upstream head was built (403, 404, 429, a direct
            # response): the hop joins the caller's trace now
            hop, _ = self.tracer.begin(head.headers if head is not None else [])
            ex.trace = hop
        if not hop.sampled:
            return
        scheme = getattr(head, "scheme", None) or (b"https" if chain.tls is not None else b"http")
        endpoint = ex.endpoint
        facts = Exchanged(
            direction=chain.direction,
            listener=chain.listener,
            method=head.method if head is not None else b"",
            path=ex.path or (head.path if head is not None else b""),
            scheme=scheme,
            authority=head.host if head is not None else b"",
            version=head.version if head is not None else b"1.1",
            headers=head.headers if head is not None else [],
            status=ex.status,
            route=route,
            cluster=cluster,
            endpoint=str(endpoint) if endpoint is not None else "",
            request_id=ex.request_id,
            peer=peer,
            source=source,
            error=ex.error,
            body_in=ex.body_in,
            body_out=ex.body_out,
            grpc=getattr(ex, "is_grpc", False),
            grpc_status=getattr(ex, "grpc_status", None),
        )
        end_ns = time.time_ns()
        self.sink.emit(hop, describe(facts, self.tags), end_ns - int(duration * 1e9), end_ns)
