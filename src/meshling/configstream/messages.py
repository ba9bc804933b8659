"""The config stream's messages, as frozen dataclasses, and their JSON text encoding.

Every WebSocket text frame holds one JSON object whose `type` names the message:

proxy -> control plane
    hello  {"type": "hello", "protocol": 1, "dataplane": {Dataplane document},
            "applied": "<version>" | null, "tls_paths": {"certificate", "key",
            "trust_bundle"} | null, "proxy": {"version": "...", ...}}
           the first message, exactly once: registers the dataplane (created or
           updated in the store) and says which snapshot the proxy runs already;
    ack    {"type": "ack", "version": "<version>"}
           the snapshot of that version is running;
    nack   {"type": "nack", "version": "<version>", "reason": "..."}
           the snapshot of that version was refused; the proxy keeps the one it had;
    stats  {"type": "stats", "started": <Unix time>, "bounds": [latency bucket bounds, s],
            "rows": [{"direction", "source", "destination", "route", "requests": [5 counts
            by status class 1xx..5xx], "buckets": [len(bounds) + 1 counts, the last
            above every bound], "sum": <seconds>, "grpc": {"<grpc-status>": n} | null}]}
           the proxy's golden counters, cumulative since `started` (the process start:
           a new value means the counters began again from zero), sent right after the
           `telemetry` message and then every `stats_interval` seconds;
    tap_events {"type": "tap_events", "id": "<tap id>", "events": [{...}], "dropped": n}
           requests that matched a tap, in a small batch; `dropped`: matched requests
           left out since the last batch to keep within the tap's rate.

control plane -> proxy
    push   {"type": "push", "version": "<version>", "snapshot": {snapshot document}}
           the snapshot the proxy should run; sent after the hello, then whenever it
           changes. Versions are content hashes: equal versions, equal snapshots;
    refuse {"type": "refuse", "reason": "<word>", "message": "..."}
           the stream is refused (bad hello, a token for another service, ...); the
           control plane closes the connection right after it;
    telemetry {"type": "telemetry", "stats_interval": <seconds>}
           this control plane takes `stats` (every `stats_interval` seconds) and may send
           taps;
    tap    {"type": "tap", "id": "<tap id>", "filter": {"direction", "destination",
            "method", "path", "status"}, "sample": <percent>, "rate": <events/s>,
            "duration": <seconds>}
           send the requests that match the filter (fields null: any) as `tap_events`,
           `sample` percent of them, at most `rate` a second, for at most `duration`;
    untap  {"type": "untap", "id": "<tap id>"}
           stop that tap.

Compatibility: the new messages are sent only to a peer that said it understands them.
A proxy lists `"telemetry"` in `hello.proxy.features`; only then does a control plane
send `telemetry`, `tap` and `untap`, and only after `telemetry` does the proxy send
`stats` and `tap_events`. An older control plane ignores the feature list and an older
proxy never sends it, so neither ever sees a message type it would refuse.

Decoding checks shape and types and raises `ProtocolError` with a reason a person can
act on; it does not validate the Dataplane or the snapshot themselves (their own parsers
do, with field paths).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
STREAM_PATH: Final = "/api/v1/stream"
# a snapshot of a large mesh is a few hundred KiB; anything far beyond is an error
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says how."""


@dataclass(frozen=True, slots=True)
class TlsPaths:
    """Where the proxy keeps its own certificate, key and trust bundle."""

    certificate: str
    key: str
    trust_bundle: str


@dataclass(frozen=True, slots=True)
class Hello:
    dataplane: dict[str, Any]
    applied: str | None = None
    tls_paths: TlsPaths | None = None
    proxy: dict[str, Any] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ack:
    version: str


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    reason: str


@dataclass(frozen=True, slots=True)
class Push:
    version: str
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    message: str


# what a proxy lists in `hello.proxy.features` when it speaks the telemetry messages
TELEMETRY_FEATURE: Final = "telemetry"
STATUS_CLASS_COUNT: Final = 5
# bounds on what a proxy may send: a row per (direction, source, destination, route) is
# bounded by the configuration, but a stream must not grow the control plane unbounded
MAX_STATS_ROWS: Final = 10_000
MAX_BOUNDS: Final = 64
MAX_TAP_EVENTS: Final = 1_000
TAP_DIRECTIONS: Final = ("inbound", "outbound")


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One (direction, source, destination, route)'s cumulative golden counters."""

    direction: str
    source: str
    destination: str
    route: str
    # by status class, 1xx to 5xx
    requests: tuple[int, ...]
    # requests per latency bucket (`Stats.bounds`), the last one above every bound
    buckets: tuple[int, ...]
    sum: float
    # gRPC calls by grpc-status ("" when a call ended without one); None: no gRPC call
    grpc: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    started: float
    bounds: tuple[float, ...]
    rows: tuple[StatsRow, ...]


@dataclass(frozen=True, slots=True)
class TapEvents:
    id: str
    events: tuple[dict[str, Any], ...]
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class TelemetryOffer:
    stats_interval: float


@dataclass(frozen=True, slots=True)
class TapFilter:
    """Which requests a tap wants; None matches anything. `status` is a class ("5xx")
    or one code ("503"); `path` a prefix; `destination` the called service."""

    direction: str | None = None
    destination: str | None = None
    method: str | None = None
    path: str | None = None
    status: str | None = None

    def __post_init__(self) -> None:
        if self.direction is not None and self.direction not in TAP_DIRECTIONS:
            raise ProtocolError(
                f"tap.filter.direction: must be inbound or outbound, got {self.direction!r}"
            )
        if self.status is not None and not _status_pattern(self.status):
            raise ProtocolError(
                f"tap.filter.status: must be a class such as 5xx or a code such as 503, "
                f"got {self.status!r}"
            )
        if self.path is not None and not self.path.startswith("/"):
            raise ProtocolError(f"tap.filter.path: must start with /, got {self.path!r}")

    def to_dict(self) -> dict[str, str | None]:
        return {
            "direction": self.direction,
            "destination": self.destination,
            "method": self.method,
            "path": self.path,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class Tap:
    id: str
    filter: TapFilter
    # percent of the matching requests to send, 0 < sample <= 100
    sample: float = 100.0
    # events a second at most; the rest are dropped (and counted)
    rate: int = 100
    # the proxy ends the tap by itself after this, should no untap arrive
    duration: float = 30.0


@dataclass(frozen=True, slots=True)
class Untap:
    id: str


ClientMessage = Hello | Ack | Nack | Stats | TapEvents
ServerMessage = Push | Refusal | TelemetryOffer | Tap | Untap


def _status_pattern(value: str) -> bool:
    if len(value) != 3 or value[0] not in "12345":
        return False
    return value[1:] == "xx" or value[1:].isdigit()


def encode(message: ClientMessage | ServerMessage) -> str:
    """The JSON text frame of a message."""
    body: dict[str, Any]
    if isinstance(message, Hello):
        tls = message.tls_paths
        body = {
            "type": "hello",
            "protocol": message.protocol,
            "dataplane": message.dataplane,
            "applied": message.applied,
            "tls_paths": None
            if tls is None
            else {"certificate": tls.certificate, "key": tls.key, "trust_bundle": tls.trust_bundle},
            "proxy": message.proxy,
        }
    elif isinstance(message, Ack):
        body = {"type": "ack", "version": message.version}
    elif isinstance(message, Nack):
        body = {"type": "nack", "version": message.version, "reason": message.reason}
    elif isinstance(message, Push):
        body = {"type": "push", "version": message.version, "snapshot": message.snapshot}
    elif isinstance(message, Stats):
        body = {
            "type": "stats",
            "started": message.started,
            "bounds": list(message.bounds),
            "rows": [
                {
                    "direction": r.direction,
                    "source": r.source,
                    "destination": r.destination,
                    "route": r.route,
                    "requests": list(r.requests),
                    "buckets": list(r.buckets),
                    "sum": r.sum,
                    "grpc": r.grpc,
                }
                for r in message.rows
            ],
        }
    elif isinstance(message, TapEvents):
        body = {
            "type": "tap_events",
            "id": message.id,
            "events": list(message.events),
            "dropped": message.dropped,
        }
    elif isinstance(message, TelemetryOffer):
        body = {"type": "telemetry", "stats_interval": message.stats_interval}
    elif isinstance(message, Tap):
        body = {
            "type": "tap",
            "id": message.id,
            "filter": message.filter.to_dict(),
            "sample": message.sample,
            "rate": message.rate,
            "duration": message.duration,
        }
    elif isinstance(message, Untap):
        body = {"type": "untap", "id": message.id}
    else:
        body = {"type": "refuse", "reason": message.reason, "message": message.message}
    return json.dumps(body, separators=(",", ":"))


def encode_push(version: str, snapshot_json: str) -> str:
    """The text frame of a `Push` whose snapshot is already JSON text (one JSON object):
    a control plane that serialised the snapshot to hash it sends that text as it is,
    instead of serialising the document again. Decodes like `encode(Push(...))`."""
    return f'{{"type":"push","version":{json.dumps(version)},"snapshot":{snapshot_json}}}'


def decode_client(text: str | bytes) -> ClientMessage:
    """A message from a proxy. Raises ProtocolError."""
    body = _object(text)
    kind = body.get("type")
    if kind == "hello":
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"hello.protocol: this control plane speaks protocol {PROTOCOL_VERSION}, "
                f"the proxy sent {protocol!r}"
            )
        dataplane = body.get("dataplane")
        if not isinstance(dataplane, dict):
            raise ProtocolError("hello.dataplane: must be a Dataplane document (a mapping)")
        applied = body.get("applied")
        if applied is not None and not isinstance(applied, str):
            raise ProtocolError(f"hello.applied: must be a version string or null, got {applied!r}")
        proxy = body.get("proxy", {})
        if not isinstance(proxy, dict):
            raise ProtocolError("hello.proxy: must be a mapping")
        return Hello(dataplane, applied, _tls_paths(body.get("tls_paths")), proxy, protocol)
    if kind == "ack":
        return Ack(_string(body, "ack", "version"))
    if kind == "nack":
        return Nack(_string(body, "nack", "version"), _string(body, "nack", "reason"))
    if kind == "stats":
        return _stats(body)
    if kind == "tap_events":
        events = body.get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise ProtocolError("tap_events.events: must be a list of objects")
        if len(events) > MAX_TAP_EVENTS:
            raise ProtocolError(
                f"tap_events.events: {len(events)} events, at most {MAX_TAP_EVENTS} a message"
            )
        return TapEvents(
            _string(body, "tap_events", "id"),
            tuple(events),
            _count(body.get("dropped", 0), "tap_events.dropped"),
        )
    raise ProtocolError(
        f"type: a proxy sends hello, ack or nack (and stats, tap_events), not {kind!r}"
    )


def decode_server(text: str | bytes) -> ServerMessage:
    """A message from the control plane. Raises ProtocolError."""
    body = _object(text)
    kind = body.get("type")
    if kind == "push":
        snapshot = body.get("snapshot")
        if not isinstance(snapshot, dict):
            raise ProtocolError("push.snapshot: must be a snapshot document (a mapping)")
        return Push(_string(body, "push", "version"), snapshot)
    if kind == "refuse":
        return Refusal(_string(body, "refuse", "reason"), _string(body, "refuse", "message"))
    if kind == "telemetry":
        return TelemetryOffer(_positive(body.get("stats_interval"), "telemetry.stats_interval"))
    if kind == "tap":
        raw = body.get("filter")
        if not isinstance(raw, dict):
            raise ProtocolError("tap.filter: must be a mapping")
        fields = {}
        for name in ("direction", "destination", "method", "path", "status"):
            value = raw.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ProtocolError(f"tap.filter.{name}: must be a non-empty string or null")
            fields[name] = value
        sample = _positive(body.get("sample", 100.0), "tap.sample")
        if sample > 100:
            raise ProtocolError(f"tap.sample: a percent, at most 100, got {sample!r}")
        rate = body.get("rate", 100)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise ProtocolError(f"tap.rate: must be a positive integer, got {rate!r}")
        return Tap(
            _string(body, "tap", "id"),
            TapFilter(**fields),
            sample,
            rate,
            _positive(body.get("duration", 30.0), "tap.duration"),
        )
    if kind == "untap":
        return Untap(_string(body, "untap", "id"))
    raise ProtocolError(
        f"type: a control plane sends push or refuse (and telemetry, tap, untap), not {kind!r}"
    )


def _stats(body: dict[str, Any]) -> Stats:
    started = body.get("started")
    if not isinstance(started, int | float) or isinstance(started, bool):
        raise ProtocolError(f"stats.started: must be a Unix time, got {started!r}")
    bounds = body.get("bounds")
    if (
        not isinstance(bounds, list)
        or not 0 < len(bounds) <= MAX_BOUNDS
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or any(b >= c for b, c in itertools.pairwise(bounds))
        or bounds[0] <= 0
    ):
        raise ProtocolError(
            f"stats.bounds: must be 1 to {MAX_BOUNDS} increasing positive numbers (seconds)"
        )
    rows = body.get("rows")
    if not isinstance(rows, list):
        raise ProtocolError("stats.rows: must be a list")
    if len(rows) > MAX_STATS_ROWS:
        raise ProtocolError(f"stats.rows: {len(rows)} rows, at most {MAX_STATS_ROWS}")
    parsed = []
    for i, row in enumerate(rows):
        where = f"stats.rows[{i}]"
        if not isinstance(row, dict):
            raise ProtocolError(f"{where}: must be an object")
        direction = row.get("direction")
        if direction not in TAP_DIRECTIONS:
            raise ProtocolError(f"{where}.direction: must be inbound or outbound")
        requests = _counts(row.get("requests"), STATUS_CLASS_COUNT, f"{where}.requests")
        buckets = _counts(row.get("buckets"), len(bounds) + 1, f"{where}.buckets")
        total = row.get("sum")
        if not isinstance(total, int | float) or isinstance(total, bool) or total < 0:
            raise ProtocolError(f"{where}.sum: must be a non-negative number of seconds")
        grpc = row.get("grpc")
        if grpc is not None:
            if not isinstance(grpc, dict):
                raise ProtocolError(f"{where}.grpc: must be a mapping of grpc-status to count")
            grpc = {str(k): _count(v, f"{where}.grpc.{k}") for k, v in grpc.items()}
        parsed.append(
            StatsRow(
                str(direction),
                _string(row, where, "source"),
                _string(row, where, "destination"),
                _string(row, where, "route"),
                requests,
                buckets,
                float(total),
                grpc,
            )
        )
    return Stats(float(started), tuple(float(b) for b in bounds), tuple(parsed))


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: must be a non-negative integer, got {value!r}")
    return value


def _counts(value: Any, length: int, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise ProtocolError(f"{where}: must be a list of {length} counts")
    return tuple(_count(v, f"{where}[{i}]") for i, v in enumerate(value))


def _positive(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ProtocolError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def _object(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(text)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message must be a JSON object")
    return body


def _string(body: dict[str, Any], message: str, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{message}.{name}: must be a non-empty string, got {value!r}")
    return value


def _tls_paths(raw: Any) -> TlsPaths | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError("hello.tls_paths: must be a mapping or null")
    paths = {}
    for name in ("certificate", "key", "trust_bundle"):
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"hello.tls_paths.{name}: must be a non-empty path")
        paths[name] = value
    return TlsPaths(**paths)
