"""The HTTP/2 and gRPC mesh hops of bench/run.py: their configs, h2load, and their report.

Two proxies in a row joined by one mutual-TLS HTTP/2 connection (or as few as their
peer's stream limit allows), loaded by h2load with prior knowledge:

- the HTTP/2 hop ends at the nginx upstream of the other scenarios, over HTTP/1.1;
- the gRPC hop ends at bench/grpc_responder.py, over cleartext HTTP/2, and h2load posts
  a length-prefixed gRPC message to its unary method.

meshling's pair is an outbound proxy (plain listener, a cluster with `protocol: http2`
and `tls`) and an inbound proxy (a `tls: {mode: strict}` chain, ALPN h2); HAProxy's pair
is a frontend with `proto h2` and a server line with `ssl ... alpn h2`, then a bind with
`ssl ... verify required alpn h2`. Starting them, and measuring, is bench/run.py's.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GRPC_METHOD = "/bench.Echo/Unary"
GRPC_STATS = "/bench.Echo/Stats"
# a small protobuf-shaped message (field 1, a string), as a unary call sends it
GRPC_MESSAGE = b"\x0a\x08meshling"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
# (h2load clients, streams per client): the first is the comparison's, under 100 streams
# at once; the second, ten times as many, shows whether the connections between the two
# proxies stay flat as load grows
H2_LOADS = ((10, 10), (50, 20))
GRPC_LOADS = H2_LOADS[:1]

# (name, what is measured, bound, unit, the value must be at least (True) or at most the bound)
H2_TARGETS = [
    (
        "grpc rps",
        "meshling-grpc-hop rps / haproxy-grpc-hop rps, same load",
        0.5,
        "x",
        True,
    ),
    (
        "h2 hop connections",
        "meshling-h2-hop connections A opened to B over all its loads",
        4.0,
        "",
        False,
    ),
]


def grpc_body(path: Path) -> Path:
    """The request body of a unary call: the message behind its 5-byte prefix."""
    path.write_bytes(struct.pack(">BI", 0, len(GRPC_MESSAGE)) + GRPC_MESSAGE)
    return path


def _raw(data: bytes) -> bytes:
    return data


def grpc_unary(port: int, method: str, message: bytes, timeout: float = 5.0) -> bytes:
    """One unary call with grpcio, on a channel of its own (never through an HTTP proxy
    from the environment)."""
    import grpc

    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
        reply: bytes = call(message, timeout=timeout)
        return reply


def responder_stats(port: int) -> dict[str, int]:
    """bench/grpc_responder.py's counts: calls answered with status 0 (`ok`), otherwise
    (`failed`), and connections accepted."""
    stats: dict[str, int] = json.loads(grpc_unary(port, GRPC_STATS, b""))
    return stats


@dataclass
class H2Load:
    """What h2load reported for one measured run (latencies from its per-request log)."""

    clients: int
    streams: int
    requests: int  # succeeded (a 2xx response)
    seconds: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    failed: int
    errored: int
    timeouts: int
    non_2xx: int


def h2load_argv(
    h2load: str,
    url: str,
    seconds: float,
    clients: int,
    streams: int,
    log: Path | None = None,
    body: Path | None = None,
) -> list[str]:
    argv = [h2load, "-D", f"{seconds:g}", "-c", str(clients), "-m", str(streams), "-t", "1"]
    if body is not None:
        argv += ["-d", str(body)]
        for header in GRPC_HEADERS:
            argv += ["-H", header]
    if log is not None:
        argv += ["--log-file", str(log)]
    return [*argv, url]


def _percentile(ordered: list[int], q: float) -> int:
    """The nearest-rank percentile of a non-empty ascending list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latencies_us(log: Path) -> list[int]:
    """The per-request latencies (µs) of an h2load --log-file, ascending: one line per
    request, `start time<TAB>status<TAB>latency`; requests that got no response (status
    -1) are left out."""
    values = []
    with log.open("rb") as f:
        for line in f:
            parts = line.split(b"\t")
            if len(parts) == 3 and not parts[1].startswith(b"-"):
                values.append(int(parts[2]))
    values.sort()
    return values


def parse_h2load(output: str, clients: int, streams: int, latencies: list[int]) -> H2Load:
    """Read the counts out of h2load's text output; the latencies come from its log."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, output, re.MULTILINE)
        if not m:
            raise ValueError(f"h2load output has no {pattern!r}:\n{output}")
        return m

    finished = find(r"^finished in ([\d.]+)(ms|s), ([\d.]+) req/s")
    counts = find(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout"
    )
    codes = find(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
    seconds = float(finished.group(1)) / (1e3 if finished.group(2) == "ms" else 1.0)
    return H2Load(
        clients=clients,
        streams=streams,
        requests=int(counts.group(4)),
        seconds=seconds,
        rps=float(finished.group(3)),
        p50_ms=_percentile(latencies, 0.5) / 1e3 if latencies else None,
        p99_ms=_percentile(latencies, 0.99) / 1e3 if latencies else None,
        mean_ms=sum(latencies) / len(latencies) / 1e3 if latencies else None,
        max_ms=latencies[-1] / 1e3 if latencies else None,
        failed=int(counts.group(5)),
        errored=int(counts.group(6)),
        timeouts=int(counts.group(7)),
        non_2xx=sum(int(codes.group(i)) for i in (2, 3, 4)),
    )


# -- configs ---------------------------------------------------------------------------


def meshling_h2_hop_conf(
    workdir: Path,
    name: str,
    port: int,
    admin: int,
    target: int,
    protocol: str,
    listener_tls: dict[str, Any] | None,
    cluster_tls: dict[str, Any] | None,
    max_streams: int | None = None,
) -> Path:
    """One half of meshling's HTTP/2 hop: an HTTP listener (which also takes HTTP/2 in
    cleartext, and ALPN h2 with `listener_tls`) routing everything to one endpoint, over
    `protocol` ("http1" or "http2"). `max_streams`: the streams an HTTP/2 client may
    have open at once on one connection, if not the default."""
    chain: dict[str, Any] = {
        "name": "http",
        "http": {
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "bench",
                        "domains": ["*"],
                        "routes": [{"name": "all", "cluster": "next"}],
                    }
                ]
            }
        },
    }
    if listener_tls:
        chain["tls"] = listener_tls
    if max_streams is not None:
        chain["http"]["http2"] = {"max_concurrent_streams": max_streams}
    cluster: dict[str, Any] = {
        "name": "next",
        "protocol": protocol,
        "endpoints": [{"address": "127.0.0.1", "port": target}],
    }
    if cluster_tls:
        cluster["tls"] = cluster_tls
    snapshot: dict[str, Any] = {
        "version": "1",
        "node": name,
        "drain_timeout": "2s",
        "admin": {"address": "127.0.0.1", "port": admin, "token": "bench"},
        "listeners": [
            {"name": "hop", "address": "127.0.0.1", "port": port, "filter_chains": [chain]}
        ],
        "clusters": [cluster],
    }
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    return conf


def haproxy_h2_hop_conf(
    workdir: Path,
    name: str,
    stats: Path,
    frontend: str,
    backend: str,
    max_streams: int | None = None,
) -> Path:
    """A one-thread HAProxy in mode http with a stats socket; the HTTP/2 settings are in
    the `bind` and `server` lines. `max_streams`: the streams an HTTP/2 client may have
    open at once on one connection, if not the default."""
    conf = workdir / f"{name}.cfg"
    tune = f"\n    tune.h2.max-concurrent-streams {max_streams}" if max_streams else ""
    conf.write_text(f"""\
global
    nbthread 1
    maxconn 4096
    stats socket {stats} mode 600 level user{tune}

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend hop
    {frontend}
    default_backend next

backend next
    http-reuse always
    {backend}
""")
    return conf


# -- results ---------------------------------------------------------------------------


@dataclass
class H2HopResult:
    """One measured load through one HTTP/2 (or gRPC) hop."""

    scenario: str
    description: str
    clients: int
    streams: int
    load: H2Load | None = None
    # the two proxies' CPU together (they share one CPU), per request and as % of that CPU
    cpu_us_per_request: float | None = None
    cpu_percent: float | None = None
    # how busy the load CPU (h2load, the server, this script, anything else) was over the
    # run, and the server's share of it (the nginx upstream or the gRPC responder)
    load_cpu_percent: float | None = None
    server_cpu_percent: float | None = None
    # connections from proxy A to proxy B: open at the end of the run, and opened since
    # the pair started (its warm-ups and any earlier load included)
    connections: int | None = None
    connections_opened: int | None = None
    # gRPC: calls the server answered with status 0 during the run
    server_ok: int | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.scenario} c{self.clients}x{self.streams}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def h2_rows(results: list[H2HopResult]) -> list[list[str]]:
    header = [
        "hop, h2load clients x streams",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu us/req",
        "cpu %",
        "load cpu %",
        "server cpu %",
        "A-B conns",
        "opened",
    ]
    rows = [header]
    for r in results:
        if r.error or r.load is None:
            rows.append([r.label, "failed"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                r.label,
                _fmt(r.load.rps, ",.0f"),
                _fmt(r.load.p50_ms, ".2f"),
                _fmt(r.load.p99_ms, ".2f"),
                _fmt(r.cpu_us_per_request, ".1f"),
                _fmt(r.cpu_percent, ".0f"),
                _fmt(r.load_cpu_percent, ".0f"),
                _fmt(r.server_cpu_percent, ".0f"),
                _fmt(r.connections, "d"),
                _fmt(r.connections_opened, "d"),
            ]
        )
    return rows


def h2_measured(results: list[H2HopResult]) -> list[float | None]:
    """The values of H2_TARGETS, in order (None: not measured)."""
    ok = [r for r in results if r.load and not r.error]

    def rps(scenario: str) -> float | None:
        loads = [r.load.rps for r in ok if r.scenario == scenario and r.load]
        return loads[0] if loads else None

    mesh, peer = rps("meshling-grpc-hop"), rps("haproxy-grpc-hop")
    grpc_ratio = mesh / peer if mesh is not None and peer else None
    opened = [
        r.connections_opened
        for r in ok
        if r.scenario == "meshling-h2-hop" and r.connections_opened is not None
    ]
    return [grpc_ratio, float(max(opened)) if opened else None]
