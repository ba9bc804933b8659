"""The live telemetry routes (admin token), answered from this replica's proxy streams:

- `GET /api/v1/stats?mesh=M&window=60[&service=S][&by=service|route]` — golden metrics
  over the last `window` seconds (1 to 900): `services` (every service with a registered
  Dataplane, with or without traffic), `routes` and `edges` (caller -> service), from the
  destinations' inbound counters. Both `routes` and `edges` are always there; `by` only
  says what the caller means to show, and is checked.
- `GET /api/v1/tap?mesh=M&service=S[&direction=inbound|outbound][&method=GET]
  [&path=/prefix][&status=5xx|503][&sample=100][&max=100][&duration=30]` — the requests
  to `service` as they end, one JSON object a line: inbound from its own proxies,
  outbound from the proxies that call it (both without `direction`). It ends after
  `duration` seconds or `max` events, with a last line `{"end": "duration"|"max",
  "events": n, "dropped": n}`, or when the client goes away; the proxies are then told
  to stop (`untap`).

With several replicas, each answers from the proxies connected to it (see
`meshling.controlplane.telemetry`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meshling.configstream.messages import ProtocolError, TapEvents, TapFilter
from meshling.controlplane.api.app import ApiError, guarded
from meshling.controlplane.resources import DATAPLANE_KIND
from meshling.controlplane.status import STATUS_KIND, Clock, summary
from meshling.controlplane.store import Store
from meshling.controlplane.telemetry import RETENTION, Key, TapSubscription, iso_now

if TYPE_CHECKING:
    from meshling.controlplane.distributor import Distributor

STATS_PATH: Final = "/api/v1/stats"
TAP_PATH: Final = "/api/v1/tap"
MAX_TAP_EVENTS: Final = 10_000
MAX_TAP_DURATION: Final = 3600.0
# events a second each proxy may send for one tap
TAP_RATE: Final = 100
# batches waiting for a slow client; beyond, they are dropped (and counted)
TAP_QUEUE: Final = 256
# the fields of an event, in the order they are written
EVENT_FIELDS: Final = (
    "time",
    "dataplane",
    "direction",
    "source",
    "destination",
    "method",
    "authority",
    "path",
    "status",
    "duration_ms",
    "route",
    "cluster",
    "upstream",
    "request_id",
    "grpc_status",
)


def telemetry_routes(
    store: Store, distributor: Distributor, offline_after: float, clock: Clock
) -> list[Route]:
    async def stats(request: Request) -> Response:
        query = request.query_params
        mesh = query.get("mesh") or "default"
        window = _number(query.get("window"), "window", 60, 1, RETENTION)
        by = query.get("by") or "service"
        if by not in ("service", "route"):
            raise ApiError(400, f"by: must be service or route, got {by!r}", field="by")
        service = query.get("service") or None
        registered = await _registered(store, mesh, clock, offline_after)
        now = time.monotonic()
        telemetry = distributor.telemetry
        telemetry.prune(now)
        body: dict[str, Any] = {
            "mesh": mesh,
            "window": int(window) if window == int(window) else window,
            "generated": iso_now(clock()),
        }
        body |= telemetry.summary(mesh, window, now, registered, service)
        return JSONResponse(body)

    async def tap(request: Request) -> Response:
        query = request.query_params
        mesh = query.get("mesh") or "default"
        service = query.get("service")
        if not service:
            raise ApiError(400, "service: the service to tap is required", field="service")
        try:
            tap_filter = TapFilter(
                direction=query.get("direction") or None,
                destination=service,
                method=(query.get("method") or "").upper() or None,
                path=query.get("path") or None,
                status=query.get("status") or None,
            )
        except ProtocolError as e:
            name = str(e).split(":", 1)[0].rsplit(".", 1)[-1]
            raise ApiError(400, str(e).replace("tap.filter.", ""), field=name) from None
        sample = _number(query.get("sample"), "sample", 100, 0.001, 100)
        most = int(_number(query.get("max"), "max", 100, 1, MAX_TAP_EVENTS))
        duration = _number(query.get("duration"), "duration", 30, 1, MAX_TAP_DURATION)
        registered = await _registered(store, mesh, clock, offline_after)
        if service not in registered:
            raise ApiError(
                404, f"no dataplane of service {service!r} is registered in mesh {mesh!r}"
            )
        batches: asyncio.Queue[tuple[Key, TapEvents]] = asyncio.Queue(TAP_QUEUE)
        lost = [0]

        def deliver(key: Key, batch: TapEvents) -> None:
            try:
                batches.put_nowait((key, batch))
            except asyncio.QueueFull:
                lost[0] += len(batch.events) + batch.dropped

        subscription = TapSubscription(
            mesh, service, tap_filter, deliver, sample, min(TAP_RATE, most), duration
        )
        asked = distributor.taps.subscribe(subscription, time.monotonic())
        events = _events(subscription, distributor, batches, lost, most, duration)
        return StreamingResponse(
            events,
            media_type="application/x-ndjson",
            headers={"X-Meshling-Tap-Id": subscription.id, "X-Meshling-Tap-Proxies": str(asked)},
        )

    return [
        Route(STATS_PATH, guarded(stats), methods=["GET"]),
        Route(TAP_PATH, guarded(tap), methods=["GET"]),
    ]


async def _events(
    subscription: TapSubscription,
    distributor: Distributor,
    batches: asyncio.Queue[tuple[Key, TapEvents]],
    lost: list[int],
    most: int,
    duration: float,
) -> AsyncIterator[bytes]:
    """The tap's lines until its end; the proxies are untapped however it ends (a client
    that goes away cancels this generator)."""
    deadline = time.monotonic() + duration
    sent = dropped = 0
    end = "duration"
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                key, batch = await asyncio.wait_for(batches.get(), left)
            except TimeoutError:
                break
            dropped += batch.dropped
            lines = []
            for raw in batch.events:
                if sent >= most:
                    break
                event = {name: raw.get(name) for name in EVENT_FIELDS}
                event["dataplane"] = key[1]
                event["time"] = _iso(event["time"])
                lines.append(json.dumps(event, separators=(",", ":")) + "\n")
                sent += 1
            if lines:
                yield "".join(lines).encode()
            if sent >= most:
                end = "max"
                break
    finally:
        distributor.taps.unsubscribe(subscription)
    trailer = {"end": end, "events": sent, "dropped": dropped + lost[0]}
    yield (json.dumps(trailer, separators=(",", ":")) + "\n").encode()


async def _registered(
    store: Store, mesh: str, clock: Clock, offline_after: float
) -> dict[str, tuple[int, int]]:
    """Each service with a registered Dataplane in `mesh`: (dataplanes, online)."""
    dataplanes = await store.list(DATAPLANE_KIND, mesh)
    statuses = {s.name: s for s in await store.list(STATUS_KIND, mesh)}
    now = clock()
    counts: dict[str, tuple[int, int]] = {}
    for d in dataplanes:
        service = d.spec.get("service")
        if not isinstance(service, str):
            continue
        online = summary(mesh, d.name, service, statuses.get(d.name), now, offline_after)["online"]
        total, up = counts.get(service, (0, 0))
        counts[service] = (total + 1, up + bool(online))
    return counts


def _iso(unix: Any) -> str | None:
    """A proxy's Unix time as ISO 8601 UTC with milliseconds."""
    if not isinstance(unix, int | float) or isinstance(unix, bool):
        return None
    try:
        moment = dt.datetime.fromtimestamp(unix, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(raw: str | None, name: str, default: float, low: float, high: float) -> float:
    if raw is None or raw == "":
        return float(default)
    text = raw.strip().removesuffix("s")
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, f"{name}: expected a number, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ApiError(
            400, f"{name}: must be between {low:g} and {high:g}, got {raw!r}", field=name
        )
    return value
