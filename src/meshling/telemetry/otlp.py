"""Span export over OTLP/HTTP (protobuf), through the OpenTelemetry SDK.

Imported only when a snapshot turns tracing on: the SDK and its exporter are a large
import the proxy does not pay for otherwise. The SDK's `BatchSpanProcessor` queues
ended spans and a background thread posts them in batches with `OTLPSpanExporter`, so
a slow or absent collector never holds up a request; what happens to every span is
counted in `Metrics.trace_spans` (`exported`, `failed`: the collector refused or could
not be reached, `dropped`: the queue was full).

Span ids are the proxy's own, chosen when the request head is built (the next hop needs
its parent id before this hop's span ends): the span is made only when it ends, with
explicit start and end times, and `HopIds` — the provider's id generator — hands the
SDK the ids the hop already chose, so what was propagated is what is exported.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

if TYPE_CHECKING:
    from meshling.telemetry.metrics import Metrics
    from meshling.tracing.hop import Hop
    from meshling.tracing.span import SpanDescription

log = logging.getLogger("meshling.tracing")

_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class HopIds(IdGenerator):
    """The SDK's ids for the next span: the ones the hop chose (set just before the span
    is started, on the event loop's thread, which is the only one starting spans)."""

    def __init__(self) -> None:
        self.span_id = 0
        self.trace_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id

    def is_trace_id_random(self) -> bool:
        return True


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting what it exported and what it failed to."""

    def __init__(self, inner: SpanExporter, export: OtlpExport) -> None:
        self.inner = inner
        self.export_state = export

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # a broken collector must never stop the export thread
            log.warning("span export failed: %s", exc)
            result = SpanExportResult.FAILURE
        self.export_state.settled(len(spans), result == SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class OtlpExport:
    """One proxy's span pipeline to one OTLP/HTTP endpoint."""

    def __init__(
        self,
        endpoint: str,
        service: str,
        node: str,
        metrics: Metrics,
        *,
        max_queue: int = 4096,
        batch: int = 512,
        delay: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        self.key = (endpoint, service, node)
        self.metrics = metrics
        self.max_queue = max_queue
        # spans handed to the processor and not yet exported or failed
        self._lock = threading.Lock()
        self._pending = 0
        self.ids = HopIds()
        resource = Resource.create(
            {"service.name": service or "meshling", "service.instance.id": node}
        )
        self.provider = TracerProvider(sampler=ALWAYS_ON, resource=resource, id_generator=self.ids)
        exporter = _CountingExporter(OTLPSpanExporter(endpoint=endpoint, timeout=timeout), self)
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue,
            schedule_delay_millis=delay * 1000,
            max_export_batch_size=batch,
            export_timeout_millis=timeout * 1000,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meshling")
        self.closed = False

    def settled(self, count: int, ok: bool) -> None:
        with self._lock:
            self._pending -= count
        spans = self.metrics.trace_spans
        outcome = "exported" if ok else "failed"
        spans[outcome] = spans.get(outcome, 0) + count

    def emit(self, hop: Hop, span: SpanDescription, start_ns: int, end_ns: int) -> None:
        """Queue one ended hop's span (sampled hops only)."""
        if self.closed:
            return
        with self._lock:
            full = self._pending >= self.max_queue
            if not full:
                self._pending += 1
        if full:
            spans = self.metrics.trace_spans
            spans["dropped"] = spans.get("dropped", 0) + 1
            return
        context: Context | None
        if hop.parent_span_id is not None:
            state = TraceState.from_header([hop.tracestate.decode()]) if hop.tracestate else None
            parent = SpanContext(
                int(hop.trace_id, 16),
                int(hop.parent_span_id, 16),
                is_remote=True,
                trace_flags=_SAMPLED,
                trace_state=state,
            )
            context = trace_api.set_span_in_context(NonRecordingSpan(parent))
        else:
            context = Context()  # a root: the trace id comes from `ids`
        ids = self.ids
        ids.trace_id = int(hop.trace_id, 16)
        ids.span_id = int(hop.span_id, 16)
        sdk_span = self.tracer.start_span(
            span.name,
            context=context,
            kind=_KINDS[span.kind],
            attributes=span.attributes,
            start_time=start_ns,
        )
        if span.error is not None:
            sdk_span.set_status(Status(StatusCode.ERROR, span.error))
        sdk_span.end(end_time=end_ns)

    def close(self) -> None:
        """Export what is queued (up to the export timeout), then stop: blocking, so the
        proxy calls it from a worker thread."""
        if self.closed:
            return
        self.closed = True
        try:
            self.provider.shutdown()
        except Exception as exc:
            log.warning("span export shutdown failed: %s", exc)
