"""Live golden metrics and taps on the control plane, from what the proxies' streams say.

Every proxy that speaks the telemetry messages sends its cumulative golden counters
(`Stats`) every few seconds. `Telemetry` keeps, per dataplane, a ring of recent samples
(`retention` seconds of them: every one of the last DENSE seconds, at most one a
MIN_SPACING; one every COARSE seconds before, and each proxy process's last), and answers
`meshling stat` from their differences over a window:

* **increase**: for each stretch of samples from one proxy process (one start time),
  the last sample's counts minus the first's. A new start time, or counts that went
  down, is a proxy that restarted: its counters began again from zero, so the newer
  sample's counts are all increase. A dataplane's counts start at its first sample
  (what it counted before it reached this control plane is not in any window), and one
  that went away keeps counting in the windows that cover its samples until they age
  out. A proxy's rows count only for its own service (inbound rows to it, outbound rows
  from it); others are dropped.
* **rate**: the increase divided by the time the samples cover: the window, or less
  when the dataplanes counted reported for less (a new proxy, a control plane that
  just started), so that ten seconds of traffic are not spread over a minute.
* **quantiles**: from the increase of the latency histogram, interpolating linearly
  within the bucket the rank falls in, as Prometheus's `histogram_quantile` does; a
  rank in the last (unbounded) bucket answers the highest bound.

Service and route rows come from the destination's inbound counters (the server side);
edges from inbound counters by the caller's verified service ("unknown" for plaintext
callers). Each replica answers from the proxies connected to it: with several replicas
on PostgreSQL, `stat` on one of them covers only its own streams.

`TapHub` relays taps: a subscription (`meshling tap`) is sent as a `Tap` message to the
streams of the proxies concerned, including those that connect while it runs, and the
`TapEvents` they send back go to the subscription; when it ends, they get an `Untap`.

Both are plain objects driven by their callers with `now` (seconds on a monotonic clock)
and callbacks that must not block; the unit tests drive them with a fake clock.
"""

from __future__ import annotations

import datetime as dt
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from meshling.configstream.messages import (
    STATUS_CLASS_COUNT,
    Stats,
    Tap,
    TapEvents,
    TapFilter,
    TelemetryOffer,
    Untap,
    encode,
)

# how far back samples are kept, and so the longest window `stat` answers for
RETENTION: Final = 900.0
# samples closer together than this replace each other (bounds the ring's length)
MIN_SPACING: Final = 1.0
# every sample of the last DENSE seconds is kept; older ones, one every COARSE seconds
# (and each process's last): a window's start is exact within DENSE and rounded to
# COARSE beyond, and a dataplane holds ~50 samples instead of 180
DENSE: Final = 120.0
COARSE: Final = 30.0
DEFAULT_STATS_INTERVAL: Final = 5.0
# rates over less than this are taken over this (a first sample just in)
MIN_SPAN: Final = 1.0
QUANTILES: Final = (0.5, 0.95, 0.99)

Key = tuple[str, str]  # (mesh, dataplane name)
SeriesKey = tuple[str, str, str, str]  # (direction, source, destination, route)


class _Counters(NamedTuple):
    """One series' cumulative counts in a sample (a StatsRow without its names), as
    arrays of machine integers: a third of the memory of tuples of Python ints."""

    requests: Sequence[int]
    buckets: Sequence[int]
    sum: float
    grpc: dict[str, int] | None


@dataclass(slots=True)
class _Sample:
    at: float
    started: float
    bounds: tuple[float, ...]
    rows: dict[SeriesKey, _Counters]
    # every series' requests: a sum that went down is a restart, however it is told
    total: int = 0


@dataclass(slots=True)
class _Ring:
    service: str
    # the last DENSE seconds, every sample; before, the thinned ones
    recent: deque[_Sample] = field(default_factory=deque)
    older: deque[_Sample] = field(default_factory=deque)
    connected: bool = True

    def samples(self) -> list[_Sample]:
        return [*self.older, *self.recent]


@dataclass(slots=True)
class Counts:
    """Requests by status class, a latency histogram and its sum, over some interval."""

    requests: list[int] = field(default_factory=lambda: [0] * STATUS_CLASS_COUNT)
    bounds: tuple[float, ...] | None = None
    buckets: list[int] = field(default_factory=list)
    sum: float = 0.0
    grpc: dict[str, int] = field(default_factory=dict)
    # seconds the samples counted cover (of the longest-reporting dataplane, when merged)
    span: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.requests)

    @property
    def failures(self) -> int:
        return self.requests[4]

    def add(
        self,
        requests: Iterable[int],
        bounds: tuple[float, ...],
        buckets: Iterable[int],
        total: float,
        grpc: dict[str, int] | None,
    ) -> None:
        for i, n in enumerate(requests):
            self.requests[i] += n
        if self.bounds is None:
            self.bounds = bounds
            self.buckets = [0] * (len(bounds) + 1)
        if bounds == self.bounds:  # histograms of other bounds cannot be merged
            for i, n in enumerate(buckets):
                self.buckets[i] += n
        self.sum += total
        for code, n in (grpc or {}).items():
            self.grpc[code] = self.grpc.get(code, 0) + n

    def merge(self, other: Counts) -> None:
        self.span = max(self.span, other.span)
        if other.bounds is not None:
            self.add(other.requests, other.bounds, other.buckets, other.sum, other.grpc)
        else:
            for i, n in enumerate(other.requests):
                self.requests[i] += n

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the latency in seconds; None without requests."""
        if self.bounds is None:
            return None
        return quantile(q, self.bounds, self.buckets)


def quantile(q: float, bounds: tuple[float, ...], buckets: list[int]) -> float | None:
    """`histogram_quantile`: the q-quantile (0 <= q <= 1) of a histogram whose bucket i
    counts values in (bounds[i-1], bounds[i]] (the first from 0, the last unbounded);
    linear within the bucket the rank falls in. None for an empty histogram."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, n in enumerate(buckets):
        if n and below + n >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * max(0.0, rank - below) / n
        below += n
    return bounds[-1]


def _difference(now: _Counters, before: _Counters | None) -> _Counters:
    """What a series counted between two samples; all of `now` after a counter reset."""
    if before is None:
        return now
    if any(a < b for a, b in zip(now.requests, before.requests, strict=True)) or any(
        a < b for a, b in zip(now.buckets, before.buckets, strict=False)
    ):
        return now
    grpc = None
    if now.grpc is not None:
        old = before.grpc or {}
        grpc = {k: n - old.get(k, 0) for k, n in now.grpc.items() if n - old.get(k, 0) > 0}
    return _Counters(
        tuple(a - b for a, b in zip(now.requests, before.requests, strict=True)),
        tuple(a - b for a, b in zip(now.buckets, before.buckets, strict=False)),
        max(0.0, now.sum - before.sum),
        grpc,
    )


class Telemetry:
    """Per-dataplane rings of golden-counter samples, and the `stat` answers over them."""

    def __init__(
        self,
        *,
        retention: float = RETENTION,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
    ) -> None:
        self.retention = retention
        self.stats_interval = stats_interval
        self._rings: dict[Key, _Ring] = {}
        # rings of dataplanes gone for good are dropped on the way, not only when asked
        self._pruned = 0.0

    # what the streams say

    def record(self, key: Key, service: str, stats: Stats, now: float) -> None:
        """A `stats` message from the dataplane `key` (of `service`), received at `now`."""
        if now - self._pruned > self.retention / 10:
            self._pruned = now
            self.prune(now)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(service)
        ring.service = service
        ring.connected = True
        recent = ring.recent
        # the last sample's series names, and the counts of those that did not change,
        # are shared rather than held again in each sample
        last = recent[-1].rows if recent else {}
        names = {name: name for name in last}
        rows = {}
        for r in stats.rows:
            # a proxy speaks for its own service only: what it serves (inbound), what it
            # calls (outbound); a row about others is a lie, or a bug, and left out
            if (r.destination if r.direction == "inbound" else r.source) != service:
                continue
            name = (r.direction, r.source, r.destination, r.route)
            name = names.get(name, name)
            counters = _Counters(array("Q", r.requests), array("Q", r.buckets), r.sum, r.grpc)
            before = last.get(name)
            rows[name] = before if before == counters else counters
        total = sum(sum(c.requests) for c in rows.values())
        sample = _Sample(now, stats.started, stats.bounds, rows, total)
        if (
            len(recent) > 1
            and now - recent[-1].at < MIN_SPACING
            and recent[-1].started == stats.started
        ):
            recent[-1] = sample  # too soon after the last: it replaces that one
        else:
            recent.append(sample)
        self._trim(ring, now)

    def disconnected(self, key: Key) -> None:
        """The dataplane's stream ended; its samples stay until they age out."""
        ring = self._rings.get(key)
        if ring is not None:
            ring.connected = False

    def prune(self, now: float) -> None:
        """Forget dataplanes whose every sample is older than the retention."""
        for key, ring in list(self._rings.items()):
            self._trim(ring, now)
            if not ring.recent or ring.recent[-1].at < now - self.retention:
                del self._rings[key]

    def _trim(self, ring: _Ring, now: float) -> None:
        recent, older = ring.recent, ring.older
        while len(recent) > 1 and recent[0].at < now - DENSE:
            sample = recent.popleft()
            after = recent[0]
            # Dropping a sample between two of the same process loses nothing (the
            # increase is last minus first); a process's last sample must stay.
            if (
                not older
                or sample.at - older[-1].at >= COARSE
                or after.started != sample.started
                or after.total < sample.total
            ):
                older.append(sample)
        # the newest sample at or before the cutoff stays: it is the longest window's base
        while len(older) > 1 and older[1].at <= now - self.retention:
            older.popleft()
        if older and recent[0].at <= now - self.retention:
            older.clear()

    def dataplanes(self, mesh: str) -> dict[str, str]:
        """The dataplanes of `mesh` with samples: name -> service."""
        return {name: r.service for (m, name), r in self._rings.items() if m == mesh}

    # answers

    def increase(self, key: Key, window: float, now: float) -> dict[SeriesKey, Counts]:
        """What each series of one dataplane counted in the last `window` seconds."""
        ring = self._rings.get(key)
        if ring is None:
            return {}
        samples = ring.samples()
        start = now - window
        base = 0
        for i, sample in enumerate(samples):
            if sample.at <= start:
                base = i
            else:
                break
        totals: dict[SeriesKey, Counts] = {}

        def count(last: _Sample, first: _Sample | None) -> None:
            for series, row in last.rows.items():
                delta = _difference(row, None if first is None else first.rows.get(series))
                if not any(delta.requests):
                    continue
                counts = totals.get(series)
                if counts is None:
                    counts = totals[series] = Counts()
                counts.add(delta.requests, last.bounds, delta.buckets, delta.sum, delta.grpc)

        # One process's counters only grow: its increase is its last sample minus the
        # one it started the window from, whatever lies between. A new start time (or a
        # total that went down) ends one process's stretch and begins the next from zero.
        first: _Sample | None = samples[base]
        previous = samples[base]
        for sample in samples[base + 1 :]:
            if sample.started != previous.started or sample.total < previous.total:
                count(previous, first)
                first = None
            previous = sample
        count(previous, first)
        span = min(window, now - samples[base].at)
        for counts in totals.values():
            counts.span = span
        return totals

    def summary(
        self,
        mesh: str,
        window: float,
        now: float,
        registered: dict[str, tuple[int, int]],
        service: str | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """The `services`, `routes` and `edges` rows of `GET /api/v1/stats`.

        `registered`: each service with a registered Dataplane, and its (dataplanes,
        online) counts; those services are listed even without traffic.
        """
        services: dict[str, Counts] = {name: Counts() for name in registered}
        routes: dict[tuple[str, str], Counts] = {}
        edges: dict[tuple[str, str], Counts] = {}
        for (ring_mesh, name), _ring in list(self._rings.items()):
            if ring_mesh != mesh:
                continue
            for (direction, source, destination, route), counts in self.increase(
                (mesh, name), window, now
            ).items():
                if direction != "inbound":
                    continue
                services.setdefault(destination, Counts()).merge(counts)
                routes.setdefault((destination, route), Counts()).merge(counts)
                edges.setdefault((source, destination), Counts()).merge(counts)

        def rates(counts: Counts) -> dict[str, Any]:
            total = counts.total
            p50, p95, p99 = (_ms(counts.quantile(q)) for q in QUANTILES)
            return {
                "requests": total,
                "rps": round(total / max(MIN_SPAN, counts.span), 3) if total else 0.0,
                "success_rate": None if total == 0 else round((total - counts.failures) / total, 4),
                "p50_ms": p50,
                "p95_ms": p95,
                "p99_ms": p99,
            }

        service_rows = []
        for name in sorted(services):
            if service is not None and name != service:
                continue
            dataplanes, online = registered.get(name, (0, 0))
            service_rows.append(
                {"service": name, "dataplanes": dataplanes, "online": online}
                | rates(services[name])
            )
        route_rows = [
            {"service": dst, "route": route} | rates(counts)
            for (dst, route), counts in sorted(routes.items())
            if service is None or dst == service
        ]
        edge_rows = []
        for (src, dst), counts in sorted(edges.items()):
            if service is not None and service not in (src, dst):
                continue
            row = rates(counts)
            edge_rows.append(
                {
                    "source": src,
                    "destination": dst,
                    "requests": row["requests"],
                    "rps": row["rps"],
                    "success_rate": row["success_rate"],
                    "p99_ms": row["p99_ms"],
                }
            )
        return {"services": service_rows, "routes": route_rows, "edges": edge_rows}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def iso_now(now: dt.datetime | None = None) -> str:
    """UTC now (or `now`) as ISO 8601 with a Z."""
    moment = now or dt.datetime.now(dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# taps

Send = Callable[[str], None]


@dataclass(eq=False)
class TapSubscription:
    """One `meshling tap`: what it wants, and where its events go (`deliver`, which
    must not block)."""

    mesh: str
    service: str
    filter: TapFilter
    deliver: Callable[[Key, TapEvents], None]
    sample: float = 100.0
    rate: int = 100
    duration: float = 30.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # the streams it was sent to, to untap them
    sent: dict[Key, Send] = field(default_factory=dict)

    def wants(self, mesh: str, service: str) -> bool:
        """Whether a proxy of `service` in `mesh` can see requests this tap wants: the
        tapped service's own proxies for inbound requests; any other proxy of the mesh
        for outbound ones (it may call the service; if it does not, nothing matches)."""
        if mesh != self.mesh:
            return False
        if self.filter.direction == "inbound":
            return service == self.service
        if self.filter.direction == "outbound":
            return service != self.service
        return True

    def message(self, remaining: float) -> Tap:
        return Tap(self.id, self.filter, self.sample, self.rate, max(1.0, remaining))


class TapHub:
    """The taps running on this replica, and the streams that can serve them."""

    def __init__(self, stats_interval: float = DEFAULT_STATS_INTERVAL) -> None:
        self.stats_interval = stats_interval
        # streams whose proxy speaks telemetry: key -> (mesh, service, send)
        self._streams: dict[Key, tuple[str, Send]] = {}
        self._taps: dict[str, tuple[TapSubscription, float]] = {}

    def connected(self, key: Key, service: str, send: Send, now: float) -> None:
        """A proxy that speaks telemetry registered: tell it so, and give it the running
        taps that concern it."""
        self._streams[key] = (service, send)
        send(encode(TelemetryOffer(self.stats_interval)))
        for tap, ends in list(self._taps.values()):
            if tap.wants(key[0], service) and ends > now:
                tap.sent[key] = send
                send(encode(tap.message(ends - now)))

    def disconnected(self, key: Key, send: Send) -> None:
        # `==`, not `is`: each `stream.send` is a new bound method of the same stream
        if key in self._streams and self._streams[key][1] == send:
            del self._streams[key]
        for tap, _ in self._taps.values():
            if tap.sent.get(key) == send:
                del tap.sent[key]

    def subscribe(self, tap: TapSubscription, now: float) -> int:
        """Start a tap; the number of proxies asked."""
        for stale, ends in list(self._taps.values()):
            if ends < now - 60:  # never ended by its client (it went away before reading)
                self.unsubscribe(stale)
        self._taps[tap.id] = (tap, now + tap.duration)
        for key, (service, send) in list(self._streams.items()):
            if tap.wants(key[0], service):
                tap.sent[key] = send
                send(encode(tap.message(tap.duration)))
        return len(tap.sent)

    def unsubscribe(self, tap: TapSubscription) -> None:
        """End a tap: every proxy still tapping for it gets an `untap`."""
        if self._taps.pop(tap.id, None) is None:
            return
        frame = encode(Untap(tap.id))
        for send in tap.sent.values():
            send(frame)
        tap.sent.clear()

    def events(self, key: Key, batch: TapEvents) -> bool:
        """A proxy's tap events; False when no such tap runs (it ended meanwhile)."""
        entry = self._taps.get(batch.id)
        if entry is None:
            return False
        entry[0].deliver(key, batch)
        return True
