"""Distributed tracing: trace context on the wire, sampling, and one span per proxy hop.

* `context` — W3C Trace Context and B3 (single and multi) headers, read and written;
* `hop` — a request's trace decision (`Tracer.begin`): join or start a trace, the hop's
  span id, sampling by trace id, the fields to forward;
* `span` — what a hop's span says (name, kind, OpenTelemetry attributes, status);
* `config` — the snapshot's `tracing:` section;
* `recorder` — the glue the proxy's exchanges call.

All of it is sans-I/O; the export through the OpenTelemetry SDK is `telemetry.otlp`,
imported only when a snapshot turns tracing on.
"""
