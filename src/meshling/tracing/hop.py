"""One proxy hop of a trace: which trace it joins, its own span id, and the decision.

`Tracer.begin` is the whole per-request decision, taken when the upstream request head
is built: read the caller's context (`context.extract`), keep its trace or start one,
pick the hop's span id, decide sampling, and give the fields to forward. It is pure
apart from the random ids, whose source is injected, so tests can fix them.

Sampling is decided from the trace id (`sampled_by_id`), like OpenTelemetry's
TraceIdRatioBased sampler: every proxy with the same percentage decides the same for a
trace, so a trace is kept whole or not at all. A caller's explicit decision (the W3C
sampled flag, B3 `1`/`0`/`d`) is honoured as it is, as a parent-based sampler does.

What the proxy writes: W3C Trace Context always (the mesh's own format), and B3 too —
single (`b3`) and/or multi (`x-b3-*`) — when the configuration lists it, or when the
request came in with it, so that an app instrumented with Zipkin's libraries keeps
getting the format it reads. Stale values of every format are dropped first. A caller's
valid W3C context that is not sampled goes on unchanged (no span of the hop will exist
to be its parent), which spares the request path a copy of its fields.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable

from meshling.tracing.context import (
    TRACE_FIELDS,
    Format,
    extract,
    parse_traceparent,
    propagation_fields,
)

# 2**64: sampling compares the trace id's low 64 bits against percent of this
_SPACE = 1 << 64


class Hop:
    """The trace context of one request through this proxy (slots: one per request)."""

    __slots__ = (
        "fields",
        "parent_span_id",
        "remote",
        "sampled",
        "span_id",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        trace_id: bytes,
        span_id: bytes,
        parent_span_id: bytes | None,
        sampled: bool,
        tracestate: bytes,
        fields: list[tuple[bytes, bytes]],
    ) -> None:
        # ids in lower-case hex, as they are written
        self.trace_id = trace_id
        self.span_id = span_id
        # the caller's span, the parent of this hop's; None: the hop starts the trace
        self.parent_span_id = parent_span_id
        self.remote = parent_span_id is not None
        self.sampled = sampled
        self.tracestate = tracestate
        # the trace fields to forward upstream (already formatted)
        self.fields = fields


def threshold(percent: float) -> int:
    """The trace-id bound below which a trace is sampled at `percent` (0 to 100)."""
    if percent >= 100:
        return _SPACE
    if percent <= 0:
        return 0
    return int(percent * _SPACE / 100)


def sampled_by_id(trace_id: bytes, bound: int) -> bool:
    """Is a trace sampled, by its id (hex; the low 64 bits, random in W3C and B3)?"""
    return int(trace_id[16:], 16) < bound


def _system_bits() -> Callable[[int], int]:
    return random.Random(os.urandom(16)).getrandbits


class Tracer:
    """The per-request decisions of one proxy's tracing configuration."""

    __slots__ = ("b3", "b3multi", "bound", "percent", "random_bits")

    def __init__(
        self,
        percent: float,
        formats: Iterable[Format] = ("w3c",),
        random_bits: Callable[[int], int] | None = None,
    ) -> None:
        self.percent = percent
        self.bound = threshold(percent)
        wanted = set(formats)
        self.b3 = "b3" in wanted
        self.b3multi = "b3multi" in wanted
        # ids must be unique, not secret: a seeded PRNG is ~10x cheaper than os.urandom
        self.random_bits = random_bits or _system_bits()

    def _w3c_only(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[Hop, list[tuple[bytes, bytes]]] | None:
        """The two cases nearly every request is, decided without copying its fields;
        None for the rest. A request with no trace field starts a trace. One whose only
        trace field is a valid W3C `traceparent` of a caller that chose not to sample
        (flags 00) goes on with that context unchanged: no span of this hop is ever
        recorded, so a span id of its own would name nothing."""
        found: tuple[bytes, bytes] | None = None
        for field in headers:
            if field[0] in TRACE_FIELDS:
                if found is not None:
                    return None
                found = field
        if found is None:
            trace_id, span_id, low = self._new_ids()
            sampled = low < self.bound
            value = b"00-%b-%b-0%b" % (trace_id, span_id, b"1" if sampled else b"0")
            return Hop(trace_id, span_id, None, sampled, b"", [(b"traceparent", value)]), headers
        name, value = found
        if name != b"traceparent" or len(value) != 55 or value[53:] != b"00":
            return None
        parent = parse_traceparent(value)
        if parent is None or parent.trace_id is None or parent.span_id is None:
            return None
        return Hop(parent.trace_id, parent.span_id, parent.span_id, False, b"", []), headers

    def _span_id(self) -> bytes:
        value = self.random_bits(64)
        while not value:
            value = self.random_bits(64)
        return b"%016x" % value

    def _new_ids(self) -> tuple[bytes, bytes, int]:
        """A new trace id and span id (hex), from one draw of 192 bits, and the trace
        id's low 64 bits, which sampling reads. No id, nor half of the trace id, is 0."""
        mask = _SPACE - 1
        value = self.random_bits(192)
        while not (value >> 128 and (value >> 64) & mask and value & mask):
            value = self.random_bits(192)
        both = b"%048x" % value
        return both[:32], both[32:], (value >> 64) & mask

    def begin(self, headers: list[tuple[bytes, bytes]]) -> tuple[Hop, list[tuple[bytes, bytes]]]:
        """The hop for a request with these fields, and the fields without the trace
        ones (the caller forwards those, then `hop.fields`; neither list is changed)."""
        if not (self.b3 or self.b3multi):
            quick = self._w3c_only(headers)
            if quick is not None:
                return quick
        incoming, kept = extract(headers)
        parent = incoming.parent
        tracestate = b""
        parent_span_id: bytes | None = None
        if parent is not None and parent.trace_id is not None:
            span_id = self._span_id()
            decision = parent.sampled
            trace_id = parent.trace_id
            parent_span_id = parent.span_id
            tracestate = parent.tracestate
            sampled = sampled_by_id(trace_id, self.bound) if decision is None else decision
        else:
            trace_id, span_id, low = self._new_ids()
            if parent is not None and parent.sampled is not None:
                sampled = parent.sampled  # a B3 decision without a trace
            else:
                sampled = low < self.bound
        b3 = self.b3 or incoming.b3
        b3multi = self.b3multi or incoming.b3multi
        if not (b3 or b3multi or tracestate):
            # W3C alone, the usual case: one field, written here
            fields = [
                (b"traceparent", b"00-%b-%b-0%b" % (trace_id, span_id, b"1" if sampled else b"0"))
            ]
            return Hop(trace_id, span_id, parent_span_id, sampled, b"", fields), kept
        fields = propagation_fields(
            trace_id,
            span_id,
            sampled,
            tracestate,
            parent_span_id,
            (b3, b3multi),
        )
        return Hop(trace_id, span_id, parent_span_id, sampled, tracestate, fields), kept
