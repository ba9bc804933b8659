"""Taps on the proxy: the ended requests an operator watches live (`meshling tap`).

The control plane asks for a tap over the config stream (a `Tap` message: a filter, a
sampling percent, a rate and a duration); the agent installs it here. `record()` in
`proxy.http` calls `Taps.observe` for every ended exchange, HTTP/1.1 or HTTP/2, but only
while a tap is installed: without one, `Metrics.tap` is None and the request path pays one
attribute check. The agent takes the matched events in small batches (`Taps.take`) and
sends them back as `TapEvents`.

A tap cannot hurt the proxy: each one admits at most `rate` events a second (a token
bucket), holds at most that many waiting, and counts the rest as dropped; the filter is
checked before any event is built, and a tap ends by itself after its duration even if
the control plane never says `untap`.

`matches` and the `TapSession` bookkeeping are plain functions of their inputs and the
clock, tested without sockets.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Final

from meshling.configstream.messages import MAX_TAP_EVENTS, Tap, TapEvents, TapFilter

# whatever the control plane asks, a tap sends at most this many events a second...
MAX_RATE: Final = 1000
# ...and lasts at most this long (an operator's tap is minutes, not days)
MAX_DURATION: Final = 3600.0
# at most this many taps at once; a further one replaces none and is refused
MAX_TAPS: Final = 16


def matches(
    f: TapFilter, direction: str, destination: str, method: str, path: str, status: int
) -> bool:
    """Whether an ended request is one the filter wants (a None field matches anything)."""
    if f.direction is not None and f.direction != direction:
        return False
    if f.destination is not None and f.destination != destination:
        return False
    if f.method is not None and f.method.upper() != method.upper():
        return False
    if f.path is not None and not path.startswith(f.path):
        return False
    if f.status is not None:
        if f.status[1:] == "xx":
            return status // 100 == int(f.status[0])
        return status == int(f.status)
    return True


class TapSession:
    """One installed tap: its filter, its budget of events, and the events waiting."""

    __slots__ = (
        "dropped",
        "ends",
        "events",
        "filter",
        "id",
        "rate",
        "refilled",
        "sample",
        "tokens",
    )

    def __init__(self, tap: Tap, now: float) -> None:
        self.id = tap.id
        self.filter = tap.filter
        self.sample = min(100.0, tap.sample)
        self.rate = max(1, min(tap.rate, MAX_RATE))
        self.ends = now + min(tap.duration, MAX_DURATION)
        self.events: list[dict[str, Any]] = []
        self.dropped = 0
        # a token bucket of `rate` a second, full at the start
        self.tokens = float(self.rate)
        self.refilled = now

    def admit(self, now: float) -> bool:
        """Whether one more matched event fits this second's budget; counts it if not."""
        self.tokens = min(float(self.rate), self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1.0 and len(self.events) < self.rate:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        return False

    def take(self) -> TapEvents | None:
        """The waiting events as one message (None when there is nothing to say)."""
        if not self.events and not self.dropped:
            return None
        events, self.events = self.events[:MAX_TAP_EVENTS], self.events[MAX_TAP_EVENTS:]
        dropped, self.dropped = self.dropped, 0
        return TapEvents(self.id, tuple(events), dropped)


class Taps:
    """The taps of one proxy, fed by `record()` and drained by the agent."""

    def __init__(
        self,
        metrics: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.rand = rand
        self.sessions: dict[str, TapSession] = {}

    def add(self, tap: Tap) -> bool:
        """Install (or replace) a tap; False when too many are running already."""
        if tap.id not in self.sessions and len(self.sessions) >= MAX_TAPS:
            return False
        self.sessions[tap.id] = TapSession(tap, self.clock())
        self.metrics.tap = self
        return True

    def remove(self, tap_id: str) -> None:
        self.sessions.pop(tap_id, None)
        if not self.sessions:
            self.metrics.tap = None

    def clear(self) -> None:
        """Every tap ends (the stream that asked for them is gone)."""
        self.sessions.clear()
        self.metrics.tap = None

    def take(self) -> list[TapEvents]:
        """The batches to send now; taps past their duration end here, after a last one."""
        now = self.clock()
        batches = []
        for session in list(self.sessions.values()):
            batch = session.take()
            if batch is not None:
                batches.append(batch)
            if now >= session.ends:
                self.remove(session.id)
        return batches

    def observe(
        self,
        ex: Any,
        listener: str,
        source: str,
        route: str,
        cluster: str,
        duration: float,
    ) -> None:
        """An exchange ended: keep it for each tap that wants it."""
        metrics = self.metrics
        direction = metrics.directions.get(listener)
        if direction is None:
            return
        own = metrics.service or "unknown"
        if direction == "inbound":
            src, dst = source or "unknown", own
        else:
            src, dst = own, cluster.split("~", 1)[0]
        head = ex.head
        method = head.method.decode("latin-1") if head is not None else ""
        path = head.path.decode("latin-1") if head is not None else ""
        status = ex.status
        now = self.clock()
        event: dict[str, Any] | None = None
        for session in self.sessions.values():
            if not matches(session.filter, direction, dst, method, path, status):
                continue
            if session.sample < 100.0 and self.rand() * 100.0 >= session.sample:
                continue
            if not session.admit(now):
                continue
            if event is None:
                event = _event(ex, direction, src, dst, method, route, cluster, duration)
            session.events.append(event)


def _event(
    ex: Any,
    direction: str,
    source: str,
    destination: str,
    method: str,
    route: str,
    cluster: str,
    duration: float,
) -> dict[str, Any]:
    head = ex.head
    request_id = getattr(ex, "request_id", None) or None
    if request_id is None and head is not None:
        for name, value in head.headers:
            if name == b"x-request-id":
                request_id = bytes(value)
                break
    grpc_status = getattr(ex, "grpc_status", None) if getattr(ex, "is_grpc", False) else None
    return {
        # a Unix time: the control plane writes it as ISO 8601, off the proxy's loop
        "time": round(time.time() - duration, 6),
        "direction": direction,
        "source": source,
        "destination": destination,
        "method": method or None,
        "authority": head.host.decode("latin-1") if head is not None and head.host else None,
        "path": head.target.decode("latin-1") if head is not None else None,
        "status": ex.status,
        "duration_ms": round(duration * 1000, 3),
        "route": route,
        "cluster": cluster,
        "upstream": None if ex.endpoint is None else str(ex.endpoint),
        "request_id": request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id,
        "grpc_status": grpc_status,
    }
