"""The attempts of one exchange: retries, per-try timeouts and the stream idle timeout.

An `Exchange` on a route with a Retry policy, a per-try timeout or an idle timeout gets
an `Attempts`; every other exchange has none and never reaches this module, so a route
without those policies keeps the direct path and its cost.

What it does for the exchange:

* keeps the request body as it is sent (up to the policy's `max_body`; past it the
  request is no longer retried) so that another attempt can send it again;
* on a failed attempt (a response head whose status the policy retries, a connect
  failure, a connection that ended before a response head, a per-try timeout) asks
  `policies.retry.decide` whether to retry, then the route's `RetryBudget`; a retry
  aborts the failed attempt's connection (its upstream sees the connection end), waits
  out a jittered backoff on the deadline wheel, and starts the next attempt on another
  endpoint when the cluster has one;
* never retries once a response byte went downstream, or before the whole request
  arrived (it could not be sent again);
* counts the attempts, which every response of a retried route carries in
  `x-meshling-attempts`.

The route's request timeout keeps running across attempts and backoffs: when it fires,
the exchange answers 504 whatever attempt is under way.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshling.policies.retry.decide import Failure, RetryBudget
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.http import Exchange
    from meshling.snapshot.model import Endpoint, Route
    from meshling.telemetry.metrics import RetryStats

ATTEMPTS_HEADER = b"x-meshling-attempts"
# An attempt that ran out of time counts as this status (`policies.retry.decide`).
TIMED_OUT = 504

# what the one timer on the deadline wheel is for
_TRYING = 0  # an attempt is under way (per-try timeout, if any)
_BACKING_OFF = 1  # between attempts
_ANSWERED = 2  # the response head arrived: nothing more to time here


def needs_attempt_timers(route: Route) -> bool:
    """Does the route's Timeout policy time attempts (per try) or streams (idle)?"""
    timeouts = route.timeouts
    return timeouts is not None and bool(timeouts.per_try or timeouts.idle)


def wanted(route: Route) -> bool:
    """Does an exchange on this route need an `Attempts`?"""
    if route.retry is not None:
        return True
    timeouts = route.timeouts
    return timeouts is not None and bool(timeouts.per_try or timeouts.idle)


class RouteRetries:
    """What the exchanges of one route share: its budget and counters when it retries,
    and what its policies make of every exchange, worked out once."""

    __slots__ = ("budget", "idle", "per_try", "per_try_first", "route", "stats")

    def __init__(self, route: Route, budget: RetryBudget | None, stats: RetryStats | None) -> None:
        self.route = route
        self.budget = budget
        self.stats = stats
        policy = route.retry
        timeouts = route.timeouts
        # the Retry policy's own per-try timeout, else the Timeout policy's
        self.per_try = (policy.per_try_timeout if policy is not None else 0.0) or (
            timeouts.per_try if timeouts is not None else 0.0
        )
        self.idle = timeouts.idle if timeouts is not None else 0.0
        # The route's request timeout runs from the same moment as the first attempt's
        # and keeps running: a per-try timeout no shorter can never fire first, so the
        # first attempt arms none (a later one starts later still).
        timeout = route.timeout
        self.per_try_first = self.per_try if not timeout or self.per_try < timeout else 0.0


class Attempts:
    """The attempts of one exchange and the timer between or during them."""

    __slots__ = (
        "attempt_start",
        "count",
        "exchange",
        "failed_endpoint",
        "idle",
        "idle_mark",
        "idle_since",
        "keeping",
        "kept",
        "kept_size",
        "per_try",
        "phase",
        "policy",
        "shared",
        "slot",
        "too_large",
        "tried",
    )

    def __init__(self, exchange: Exchange, route: Route, cluster: ClusterRuntime) -> None:
        self.exchange = exchange
        start = exchange.start
        plan = cluster.retries.get(route.name)
        if plan is None or plan.route is not route:
            plan = _route_plan(exchange, route, cluster, plan)
        self.shared = plan
        self.policy = route.retry
        self.per_try = plan.per_try
        self.idle = idle = plan.idle
        if idle:
            self.idle_mark = (0, 0, 0)
            self.idle_since = start
        # attempts started, and when the current one did
        self.count = 1
        self.attempt_start = start
        # the endpoints this request failed on, made at its first retry
        self.tried: set[Endpoint] | None = None
        self.phase = _TRYING
        self.slot: int | None = None
        self.kept_size = 0
        self.too_large = False
        # Request bytes as framed for the upstream, to send again (made at the first
        # body bytes: a request without a body keeps nothing); None: nothing to keep.
        self.kept: list[bytes] | None = None
        self.keeping = budget = plan.budget
        if budget is not None:
            # every request pays its share into the budget, retried or not
            budget.deposit(start)

    # -- the request -------------------------------------------------------------------
    def keep(self, framed: bytes, size: int) -> None:
        """Keep request body bytes (`size` of them, `framed` for the upstream)."""
        if self.keeping is None:
            return
        self.kept_size += size
        policy = self.policy
        assert policy is not None
        if self.kept_size > policy.max_body:
            # Too large to keep: this request is not retried.
            self.keeping = self.kept = None
            self.too_large = True
        elif self.kept is None:
            self.kept = [framed]
        else:
            self.kept.append(framed)

    def request_sent(self) -> None:
        """The whole request went to the first attempt: its per-try time starts."""
        per_try = self.shared.per_try_first
        if per_try and self.phase == _TRYING and self.slot is None:
            self.slot = self.exchange.downstream.chain.deadlines.add(self, per_try)

    # -- outcomes of an attempt ----------------------------------------------------------
    def response_head(self, status: int) -> bool:
        """A response head arrived. True: it is retried, so the exchange drops it."""
        if self.slot is not None:
            self._disarm()
        if self.policy is not None and status >= 400 and self._retry(status, None):
            return True
        self.phase = _ANSWERED
        return False

    def failed(self, failure: Failure) -> bool:
        """An attempt ended without a response. True: another attempt is on its way."""
        self._disarm()
        return self.policy is not None and self._retry(0, failure)

    def on_timeout(self) -> None:
        """The wheel: a per-try timeout, or the end of a backoff."""
        self.slot = None
        ex = self.exchange
        if ex.finished:
            return
        if self.phase == _BACKING_OFF:
            self._next_attempt()
            return
        if self.phase != _TRYING or ex.response_started:
            return
        # The attempt took too long: it counts as a 504 from the upstream.
        stats = self.shared.stats
        if stats is not None:
            stats.per_try_timeouts += 1
        if ex.cluster is not None:
            ex.cluster.stats.timeouts += 1
        ex.abort_upstream()
        if self.policy is None or not self._retry(TIMED_OUT, None):
            ex.local_reply(504, "upstream_per_try_timeout")

    # -- the stream idle timeout -----------------------------------------------------------
    def tick(self, now: float) -> None:
        """About once a second, from the downstream connection: the idle timeout."""
        if not self.idle:
            return
        ex = self.exchange
        mark = (ex.body_in, ex.body_out, ex.status)
        if mark != self.idle_mark:
            self.idle_mark = mark
            self.idle_since = now
            return
        if now - self.idle_since < self.idle or ex.finished:
            return
        ex.abort_upstream()
        if ex.response_started:
            # Too late for a status: the client sees the connection reset instead.
            ex.status = 504
            ex.error = "stream_idle_timeout_after_headers"
            ex.downstream.abort()
            ex.finish()
        else:
            ex.local_reply(504, "stream_idle_timeout")

    def close(self) -> None:
        """The exchange finished: nothing more may fire."""
        if self.slot is not None:
            self._disarm()
        self.phase = _ANSWERED

    # -- the attempt loop ------------------------------------------------------------------
    def _retry(self, status: int, failure: Failure | None) -> bool:
        # The decisions are imported on the first failure: the proxy starts without the
        # policy registry, and a route that never fails never needs them.
        from meshling.policies.retry.decide import backoff, should_retry

        ex = self.exchange
        policy = self.policy
        head = ex.head
        assert policy is not None and head is not None
        # Only a whole request can be sent again, and only before the client saw anything.
        if ex.finished or ex.response_started or not ex.request_done:
            return False
        if not should_retry(
            policy, head.method, self.count, status, failure, replayable=not self.too_large
        ):
            if self.too_large and should_retry(policy, head.method, self.count, status, failure):
                assert self.shared.stats is not None
                self.shared.stats.body_too_large += 1
            return False
        shared = self.shared
        stats = shared.stats
        budget = shared.budget
        assert stats is not None and budget is not None
        if not budget.withdraw(time.monotonic()):
            stats.budget_exhausted += 1
            return False
        stats.retries += 1
        # The failed attempt's connection ends here: its upstream sees it close.
        ex.abort_upstream()
        self.failed_endpoint = ex.endpoint
        # Outlier detection and latency estimates hear every failed attempt, not only the
        # request's last: a retry must not hide a failing endpoint from ejection.
        cluster = ex.cluster
        if cluster is not None and ex.endpoint is not None:
            if failure is not None:
                outcome, error = 502, _FAILURE_ERRORS[failure]
            elif status == TIMED_OUT:
                outcome, error = 504, "upstream_per_try_timeout"
            else:
                outcome, error = status, None
            cluster.report(ex.endpoint, outcome, error, time.monotonic() - self.attempt_start)
        # retry number `count` (attempts so far) waits this long
        delay = backoff(self.count, policy.backoff.base, policy.backoff.max, random.random)
        self.phase = _BACKING_OFF
        self.slot = ex.downstream.chain.deadlines.add(self, delay)
        return True

    def _next_attempt(self) -> None:
        ex = self.exchange
        cluster = ex.cluster
        assert cluster is not None and self.keeping is not None
        tried = self.tried
        if tried is None:
            tried = self.tried = set()
        if self.failed_endpoint is not None:
            tried.add(self.failed_endpoint)
        host = ex.chosen = cluster.choose_other(ex.chosen, tried)
        if host is None:
            cluster.stats.no_endpoint += 1
            ex.local_reply(503, "no_endpoint")
            return
        self.count += 1
        self.attempt_start = time.monotonic()
        ex.endpoint = host.endpoint
        ex.pending = list(self.kept) if self.kept is not None else []
        ex.pending_size = self.kept_size
        self.phase = _TRYING
        if self.per_try:
            self.slot = ex.downstream.chain.deadlines.add(self, self.per_try)
        ex.send_attempt()

    def _disarm(self) -> None:
        if self.slot is not None:
            self.exchange.downstream.chain.deadlines.remove(self, self.slot)
            self.slot = None


# a failed attempt's outcome as the proxy's own error, the way the exchange names it
_FAILURE_ERRORS: dict[str, str] = {
    "connect-failure": "upstream_connect_failure",
    "reset": "upstream_reset",
}


def _route_plan(
    exchange: Exchange, route: Route, cluster: ClusterRuntime, found: RouteRetries | None
) -> RouteRetries:
    """What an exchange of `route` needs, worked out at the route's first exchange in
    this snapshot and kept by route name. `found`: what another route of the same name
    keeps; the retried routes of a name share one budget and one set of counters."""
    policy = route.retry
    retried = policy is not None and policy.max_attempts > 1
    if found is not None and (found.budget is not None or not retried):
        # the other route keeps its place; this one works out its own timeouts each time
        if retried:
            return RouteRetries(route, found.budget, found.stats)
        return RouteRetries(route, None, None)
    budget: RetryBudget | None = None
    stats: RetryStats | None = None
    if retried:
        from meshling.policies.retry.decide import RetryBudget

        assert policy is not None
        b = policy.budget
        chain = exchange.downstream.chain
        budget = RetryBudget(b.ratio, b.min_per_second, b.ttl)
        stats = chain.metrics.retry_stats(chain.listener, route.name, cluster.config.name)
    shared = cluster.retries[route.name] = RouteRetries(route, budget, stats)
    return shared
