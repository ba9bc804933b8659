"""The inbound policy layers of a filter chain: rate limit, then faults, then routing.

`InboundPolicies` is a chain's `rate_limit:` and `fault:` fragments compiled once per
snapshot; `for_caller` resolves, once per connection, the rules that apply to the
caller's identity, and returns None when neither does, so such connections pay nothing
per request. Per request (`CallerPolicies`), in this order:

1. the local bucket (a 429 at once when empty);
2. the global lease (a 429 when Redis said the shared bucket is empty; or the request
   is *held* until the lease under way comes back);
3. the faults: an abort answers or resets, a delay *holds* the request, a bandwidth
   limit paces the response.

A held request has not started yet: its head and whatever follows stay in the
connection's queue, as pipelined requests do, and are dispatched again when the hold
ends (the decision made for that head is kept, so it is not decided twice). So the
exchange, its routing and its upstream step never see a held request. A TCP
connection meets the same policies once, when it is accepted: over the `tcp` limit or
aborted it is closed at once (reset, for an abort); delayed, it connects upstream late.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshling.policies.fault_injection.decide import NONE, Faults, decide
from meshling.proxy.fault import PacedTransport, hold, reset
from meshling.proxy.ratelimit import Refusal, RuleLimiter, rule_limiter

if TYPE_CHECKING:
    from meshling.http1 import RequestHead
    from meshling.policies.fault_injection.schema import FaultConf
    from meshling.policies.fault_injection.snapshot import FaultConfig
    from meshling.policies.rate_limit.snapshot import RateLimitConfig
    from meshling.proxy.deadlines import Deadlines
    from meshling.proxy.http import Exchange, HttpDownstream
    from meshling.proxy.tcp import TcpDownstream
    from meshling.telemetry.metrics import FaultStats, Metrics


class InboundPolicies:
    """A filter chain's rate limits and faults, compiled against one snapshot."""

    __slots__ = (
        "deadlines",
        "fault",
        "fault_stats",
        "limiters",
        "random",
        "rate_limit",
    )

    def __init__(
        self,
        listener: str,
        rate_limit: RateLimitConfig | None,
        fault: FaultConfig | None,
        deadlines: Deadlines,
        metrics: Metrics,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.rate_limit = rate_limit
        self.fault = fault
        self.deadlines = deadlines
        self.random = random
        self.fault_stats = metrics.fault_stats(listener) if fault is not None else None
        self.limiters: dict[str, RuleLimiter] = {}
        if rate_limit is not None:
            stats = metrics.rate_limit_stats(listener)
            now = time.monotonic()
            for rule in rate_limit.rules:
                if rule.name not in self.limiters:
                    self.limiters[rule.name] = rule_limiter(listener, rule, stats, now)

    def for_caller(self, identity: bytes | None) -> CallerPolicies | None:
        """The policies for one connection's caller (verified SPIFFE ID; None: plaintext)."""
        caller = identity.decode() if identity is not None else None
        limiter = None
        if self.rate_limit is not None:
            rule = self.rate_limit.rule_for(caller)
            if rule is not None:
                limiter = self.limiters[rule.name]
        fault_rule = self.fault.rule_for(caller) if self.fault is not None else None
        if limiter is None and fault_rule is None:
            return None
        return CallerPolicies(
            self,
            limiter,
            fault_rule.conf if fault_rule is not None else None,
            fault_rule.name if fault_rule is not None else "",
            caller or "",
        )

    def connection(self, downstream: TcpDownstream, identity: bytes | None) -> float | None:
        """A TCP connection accepted: None if it was refused or aborted (and closed),
        else the seconds to delay it by (0: none)."""
        policies = self.for_caller(identity)
        if policies is None:
            return 0.0
        transport = downstream.transport
        assert transport is not None
        limiter = policies.limiter
        if limiter is not None and not limiter.admit_connection(policies.source, time.monotonic()):
            transport.close()
            return None
        if policies.fault is None:
            return 0.0
        faults = decide(policies.fault, None, self.random)
        if faults is NONE:
            return 0.0
        if faults.abort is not None:
            policies.count("reset")
            reset(transport)
            return None
        if faults.bytes_per_second:
            policies.count("bandwidth")
            paced = PacedTransport(transport, downstream, self.deadlines)
            paced.pace(faults.bytes_per_second)
            downstream.transport = paced  # type: ignore[assignment]
        if faults.delay:
            policies.count("delay")
        return faults.delay

    def delay(self, downstream: TcpDownstream, seconds: float) -> None:
        """Connect a delayed TCP connection upstream once `seconds` have passed."""
        hold(self.deadlines, seconds, start_connecting(downstream))


class CallerPolicies:
    """The rate-limit rule and faults of one connection's caller, per request."""

    __slots__ = (
        "downstream",
        "fault",
        "fault_name",
        "faults",
        "head",
        "limiter",
        "paced",
        "policies",
        "refusal",
        "source",
        "trigger",
    )

    def __init__(
        self,
        policies: InboundPolicies,
        limiter: RuleLimiter | None,
        fault: FaultConf | None,
        fault_name: str,
        source: str,
    ) -> None:
        self.policies = policies
        self.limiter = limiter
        self.fault = fault
        self.fault_name = fault_name
        # the fault's trigger header (name, value), when it has one: a request without
        # it is decided without drawing anything
        trigger = fault.header if fault is not None else None
        self.trigger = (trigger.name_bytes, trigger.value_bytes) if trigger is not None else None
        # the key of the caller's own buckets (per_source): its SPIFFE ID, "" if plaintext
        self.source = source
        # the request decided last, and what was decided
        self.head: RequestHead | None = None
        self.refusal: Refusal | None = None
        self.faults: Faults = NONE
        self.downstream: HttpDownstream | None = None
        self.paced: PacedTransport | None = None

    def count(self, fault: str) -> None:
        stats = self.policies.fault_stats
        assert stats is not None
        _count(stats, self.fault_name, fault)

    # -- HTTP ------------------------------------------------------------------------
    def hold(self, downstream: HttpDownstream, head: RequestHead) -> bool:
        """Decide a new request's policies; True if it must wait (a global lease, a
        delay), after which the connection dispatches it again."""
        if head is self.head:
            return False  # decided before its hold
        self.head = head
        self.refusal = None
        self.faults = NONE
        limiter = self.limiter
        if limiter is not None:
            now = time.monotonic()
            self.refusal = self._local(limiter, now)
            if self.refusal is not None:
                return False
            shared = limiter.global_limiter
            if shared is not None:
                verdict = shared.take(now)
                if verdict is None:
                    self.downstream = downstream
                    shared.wait(self._lease_back)
                    return True
                if verdict is not True:
                    self.refusal = limiter.refuse("global", verdict.limit, verdict.reset)
                    return False
        if self.fault is None:
            return False
        trigger = self.trigger
        if trigger is not None:
            # `decide` would find no trigger and answer NONE: the common case, cheaply
            name, value = trigger
            for n, v in head.headers:
                if n == name and v == value:
                    break
            else:
                return False
        return self._decide_faults(downstream, head)

    def _local(self, limiter: RuleLimiter, now: float) -> Refusal | None:
        """Take from the local bucket (the caller's own, per source); the refusal when
        it is empty."""
        sources = limiter.local_sources
        bucket = limiter.local if sources is None else sources.get(self.source, now)
        if bucket is not None and not bucket.take(now):
            return limiter.refuse("local", limiter.local_count, bucket.wait())
        return None

    def _decide_faults(self, downstream: HttpDownstream, head: RequestHead) -> bool:
        assert self.fault is not None
        faults = self.faults = decide(self.fault, head.headers, self.policies.random)
        if faults.abort is None and faults.delay:
            self.count("delay")
            self.downstream = downstream
            hold(self.policies.deadlines, faults.delay, self._release)
            return True
        return False

    def _lease_back(self, admitted: bool) -> None:
        downstream = self.downstream
        head = self.head
        if downstream is None or head is None or downstream.closed:
            return
        limiter = self.limiter
        assert limiter is not None and limiter.global_limiter is not None
        if not admitted:
            shared = limiter.global_limiter
            self.refusal = limiter.refuse(
                "global", shared.conf.requests, shared.lease.reset_after(time.monotonic())
            )
        elif self.fault is not None and self._decide_faults(downstream, head):
            return
        self._release()

    def _release(self) -> None:
        downstream = self.downstream
        self.downstream = None
        if downstream is not None and not downstream.closed:
            downstream._next()

    # -- HTTP/2 streams ---------------------------------------------------------------
    def stream(
        self,
        headers: list[tuple[bytes, bytes]],
        proceed: Callable[[Refusal | None, Faults], None],
    ) -> None:
        """Decide one HTTP/2 stream's policies, then call `proceed` with a refusal (429)
        or the faults to apply: at once, or once a global lease or a delay is over.

        Streams of one connection run side by side, so nothing is kept between them (an
        HTTP/1.1 connection's requests are decided one at a time by `hold`). A bandwidth
        fault does not apply to streams: pacing is per connection."""
        limiter = self.limiter
        if limiter is not None:
            now = time.monotonic()
            refusal = self._local(limiter, now)
            if refusal is not None:
                proceed(refusal, NONE)
                return
            shared = limiter.global_limiter
            if shared is not None:
                verdict = shared.take(now)
                if verdict is None:

                    def leased(admitted: bool) -> None:
                        if admitted:
                            self._stream_faults(headers, proceed)
                            return
                        assert shared is not None
                        reset_after = shared.lease.reset_after(time.monotonic())
                        refusal = limiter.refuse("global", shared.conf.requests, reset_after)
                        proceed(refusal, NONE)

                    shared.wait(leased)
                    return
                if verdict is not True:
                    proceed(limiter.refuse("global", verdict.limit, verdict.reset), NONE)
                    return
        self._stream_faults(headers, proceed)

    def _stream_faults(
        self,
        headers: list[tuple[bytes, bytes]],
        proceed: Callable[[Refusal | None, Faults], None],
    ) -> None:
        if self.fault is None:
            proceed(None, NONE)
            return
        faults = decide(self.fault, headers, self.policies.random)
        if faults.abort is not None:
            self.count("abort" if faults.abort else "reset")
            proceed(None, faults)
        elif faults.delay:
            self.count("delay")
            hold(self.policies.deadlines, faults.delay, lambda: proceed(None, NONE))
        else:
            proceed(None, NONE)

    def answer(self, ex: Exchange) -> bool:
        """Answer a request the policies stop (429, a fault's abort); True if answered.
        A bandwidth fault starts pacing the response here."""
        refusal = self.refusal
        if refusal is not None:
            self.refusal = None
            ex.local_reply(429, "rate_limited", extra=refusal.headers())
            return True
        faults = self.faults
        paced = self.paced
        if faults is NONE:
            if paced is not None:
                paced.unpace()
            return False
        if faults.abort is not None:
            if faults.abort:
                self.count("abort")
                ex.local_reply(faults.abort, "fault_abort")
            else:
                self.count("reset")
                ex.error = "fault_abort"
                ex.keep_alive = False
                transport = ex.downstream.transport
                if transport is not None:
                    reset(transport)
            return True
        if faults.bytes_per_second:
            self.count("bandwidth")
            if paced is None:
                downstream = ex.downstream
                paced = self.paced = PacedTransport(
                    downstream.transport, downstream, self.policies.deadlines
                )
                downstream.transport = paced  # type: ignore[assignment]
            paced.pace(faults.bytes_per_second)
        elif paced is not None:
            paced.unpace()
        return False


def _count(stats: FaultStats, rule: str, fault: str) -> None:
    key = (rule, fault)
    stats.injected[key] = stats.injected.get(key, 0) + 1


def start_connecting(downstream: TcpDownstream) -> Callable[[], None]:
    """What a delayed TCP connection does when its delay is over."""

    def release() -> None:
        if not downstream.closed:
            downstream.connecting = asyncio.ensure_future(downstream._connect())

    return release
