"""How `meshling stat` and `meshling tap` show what the control plane answers: a table of
golden metrics like `linkerd viz stat`, one line a request like `linkerd viz tap`.
Plain functions of the API's JSON, tested without a control plane."""

from __future__ import annotations

import re
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_seconds(text: str, name: str) -> float:
    """`60`, `60s`, `5m`, `1h`: seconds; ValueError naming `name` otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{name}: expected a duration such as 30s, 5m or 1h, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _percent(rate: Any) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def _latency(ms: Any) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}ms" if ms >= 10 else f"{ms:.1f}ms"


def _rps(rps: Any) -> str:
    return f"{rps:.1f}rps"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def stat_table(body: dict[str, Any], by: str = "service") -> str:
    """The services (or routes) of a `GET /api/v1/stats` answer as a table."""
    latencies = ["LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    if by == "route":
        rows = [["ROUTE", "SERVICE", "SUCCESS", "RPS", *latencies]]
        for r in body.get("routes", []):
            rows.append(
                [
                    str(r["route"]),
                    str(r["service"]),
                    _percent(r.get("success_rate")),
                    _rps(r.get("rps", 0)),
                    *(_latency(r.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms")),
                ]
            )
    else:
        rows = [["NAME", "MESHED", "SUCCESS", "RPS", *latencies]]
        for s in body.get("services", []):
            rows.append(
                [
                    str(s["service"]),
                    f"{s.get('online', 0)}/{s.get('dataplanes', 0)}",
                    _percent(s.get("success_rate")),
                    _rps(s.get("rps", 0)),
                    *(_latency(s.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms")),
                ]
            )
    return _table(rows)


def tap_line(event: dict[str, Any]) -> str:
    """One tap event as `req id=... src=web dst=api :method=GET :path=/x status=200 ...`."""
    parts = [
        "req",
        f"id={event.get('request_id') or '-'}",
        f"dp={event.get('dataplane')}",
        f"dir={event.get('direction')}",
        f"src={event.get('source')}",
        f"dst={event.get('destination')}",
        f":method={event.get('method')}",
        f":authority={event.get('authority') or '-'}",
        f":path={event.get('path')}",
        f"status={event.get('status')}",
        f"latency={_latency(event.get('duration_ms'))}",
        f"route={event.get('route')}",
    ]
    if event.get("grpc_status") is not None:
        parts.append(f"grpc-status={event['grpc_status']}")
    return " ".join(parts)


def tap_end(trailer: dict[str, Any]) -> str:
    why = "its duration passed" if trailer.get("end") == "duration" else "it reached --max"
    return (
        f"tap ended: {why}; {trailer.get('events', 0)} events, {trailer.get('dropped', 0)} dropped"
    )
