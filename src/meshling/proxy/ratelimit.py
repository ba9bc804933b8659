"""Rate limits in the proxy: local token buckets, and a global limit shared through Redis.

One `RuleLimiter` per (listener, rule): the buckets of a `rate_limit:` rule, shared by
every connection the rule applies to. Limiters outlive snapshots: a reload that keeps a
rule's limits keeps its buckets (they are found again by listener, name and limits), so
reloading never hands out a fresh burst.

* **local** (HTTP requests) and **tcp** (connections): a token bucket in this proxy,
  checked in O(1) on the request path (`policies.rate_limit.decide.TokenBucket`). With
  `per_source`, one bucket per caller identity (plaintext callers share one), at most
  `PER_SOURCE_BUCKETS` of them, the least recently used dropped first.
* **global** (HTTP requests): a token bucket in Redis (a hash refilled by a Lua script
  from Redis' own clock, so proxies need no common clock). No request waits for Redis
  while the proxy holds tokens: it leases them in batches of about 50 ms of the rate,
  asks for the next batch when half of one is spent, and refuses without asking while
  Redis has said the bucket is empty. Only a request that finds no leased tokens and no
  news waits, for the one lease request under way, which then serves every request
  waiting. So the total across proxies follows the shared bucket, whatever the number
  of proxies, and Redis sees a few dozen calls a second per proxy at most.
* **Redis unreachable** (refused, reset, or no answer within `REDIS_TIMEOUT`): the
  global limit is skipped and the local one, which always applies, is all that holds;
  the outage is logged once and counted, and Redis is tried again after a backoff
  (0.5 s doubling to 10 s). The `redis` package is imported only when a snapshot has a
  global limit, as the snapshot is applied.

An HTTP request over a limit is answered 429 by the proxy, with `x-meshling-error:
rate_limited`, `Retry-After`, and the `RateLimit-Limit`, `RateLimit-Remaining` and
`RateLimit-Reset` fields of the IETF draft (draft-ietf-httpapi-ratelimit-headers, the
three-field form): the limit that refused it (requests per its interval), 0, and the
seconds until a token is there (rounded up, at least 1). Admitted responses pass
untouched. A TCP connection over its limit is closed right after it is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from meshling.policies.rate_limit.decide import Buckets, GlobalLease, TokenBucket, retry_after

if TYPE_CHECKING:
    from meshling.policies.rate_limit.schema import GlobalLimit, Limit
    from meshling.policies.rate_limit.snapshot import RateLimitRule
    from meshling.telemetry.metrics import RateLimitStats

log = logging.getLogger("meshling.proxy")

# callers with a bucket of their own, per rule, with `per_source`
PER_SOURCE_BUCKETS = 4096
# a lease request Redis has not answered by then counts as Redis unreachable
REDIS_TIMEOUT = 0.5
# a lease is this much of the rate (at least one token), and expires after LEASE_TTL
LEASE_SPAN = 0.05
LEASE_TTL = 1.0
KEY_PREFIX = "meshling:ratelimit:"

# Take up to ARGV[3] tokens from the bucket at KEYS[1] (refilled at ARGV[1] a second, at
# most ARGV[2]); returns {granted, seconds until one more token when not all granted}.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
if now > at then
  tokens = math.min(capacity, tokens + (now - at) * rate)
end
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
local wait = 0
if granted < want then
  wait = (1 - tokens) / rate
end
return {granted, tostring(wait)}
"""


class Refusal:
    """Why a request was refused: the limit's size and when to come back."""

    __slots__ = ("limit", "reset")

    def __init__(self, limit: int, reset: float) -> None:
        self.limit = limit
        self.reset = reset

    def headers(self) -> list[tuple[bytes, bytes]]:
        seconds = str(retry_after(self.reset)).encode()
        return [
            (b"retry-after", seconds),
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", b"0"),
            (b"ratelimit-reset", seconds),
        ]


class RuleLimiter:
    """The buckets of one rate-limit rule on one listener."""

    __slots__ = (
        "__weakref__",
        "global_limiter",
        "local",
        "local_count",
        "local_sources",
        "name",
        "stats",
        "tcp",
        "tcp_count",
        "tcp_sources",
    )

    def __init__(self, rule: RateLimitRule, stats: RateLimitStats, now: float) -> None:
        conf = rule.conf
        self.name = rule.name
        self.stats = stats
        self.local, self.local_sources, self.local_count = _buckets(
            conf.local, conf.per_source, now
        )
        self.tcp, self.tcp_sources, self.tcp_count = _buckets(conf.tcp, conf.per_source, now)
        self.global_limiter = (
            global_limiter(conf.global_limit, rule.name, stats)
            if conf.global_limit is not None
            else None
        )

    def local_bucket(self, source: str, now: float) -> TokenBucket | None:
        if self.local_sources is not None:
            return self.local_sources.get(source, now)
        return self.local

    def admit_connection(self, source: str, now: float) -> bool:
        """A TCP connection: take a token of the tcp limit."""
        bucket = self.tcp_sources.get(source, now) if self.tcp_sources is not None else self.tcp
        if bucket is None or bucket.take(now):
            return True
        limited = self.stats.limited
        key = (self.name, "tcp")
        limited[key] = limited.get(key, 0) + 1
        return False

    def refuse(self, kind: str, limit: int, reset: float) -> Refusal:
        limited = self.stats.limited
        key = (self.name, kind)
        limited[key] = limited.get(key, 0) + 1
        return Refusal(limit, reset)


def _buckets(
    limit: Limit | None, per_source: bool, now: float
) -> tuple[TokenBucket | None, Buckets | None, int]:
    if limit is None:
        return None, None, 0
    if per_source:
        return None, Buckets(limit.rate, limit.burst, PER_SOURCE_BUCKETS), limit.count
    return TokenBucket(limit.rate, limit.burst, now), None, limit.count


# Limiters by (listener, rule name, limits): kept while a chain uses them, so that a
# reload finds the buckets of an unchanged rule again. One proxy runs per process.
_LIMITERS: weakref.WeakValueDictionary[tuple[Any, ...], RuleLimiter] = weakref.WeakValueDictionary()
_GLOBALS: weakref.WeakValueDictionary[tuple[Any, ...], GlobalLimiter] = (
    weakref.WeakValueDictionary()
)


def rule_limiter(
    listener: str, rule: RateLimitRule, stats: RateLimitStats, now: float
) -> RuleLimiter:
    """The limiter of a rule on a listener: the running one if its limits are unchanged."""
    key = (listener, rule.name, rule.conf)
    limiter = _LIMITERS.get(key)
    if limiter is None:
        limiter = _LIMITERS[key] = RuleLimiter(rule, stats, now)
    return limiter


def global_limiter(conf: GlobalLimit, rule: str, stats: RateLimitStats) -> GlobalLimiter:
    """One lease per shared bucket in this proxy, whichever rules and listeners use it."""
    key = (conf.redis, conf.key, conf.requests, conf.interval, conf.burst)
    limiter = _GLOBALS.get(key)
    if limiter is None:
        limiter = _GLOBALS[key] = GlobalLimiter(conf, rule, stats)
    return limiter


class GlobalLimiter:
    """This proxy's lease on a Redis bucket, and the requests waiting for it."""

    __slots__ = (
        "__weakref__",
        "conf",
        "lease",
        "loop",
        "redis_key",
        "rule",
        "script",
        "stats",
        "waiters",
    )

    def __init__(self, conf: GlobalLimit, rule: str, stats: RateLimitStats) -> None:
        self.conf = conf
        self.rule = rule
        self.stats = stats
        batch = min(1000, max(1, round(conf.rate * LEASE_SPAN)))
        self.lease = GlobalLease(batch=batch, ttl=min(LEASE_TTL, conf.interval))
        self.redis_key = KEY_PREFIX + conf.key
        # requests that wait for the lease under way, first come first served
        self.waiters: deque[Callable[[bool], None]] = deque()
        # Built with the snapshot, so the redis import happens there, not on a request;
        # the client connects at the first lease.
        self.script: Any = _client(conf.redis).register_script(LEASE_SCRIPT)
        self.loop: asyncio.AbstractEventLoop | None = None

    def take(self, now: float) -> Refusal | Literal[True] | None:
        """True: pass now; a `Refusal`: over the limit; None: the request must `wait`."""
        lease = self.lease
        verdict = lease.take(now)
        if verdict == "admit":
            if not lease.pending and (lease.tokens * 2 <= lease.batch or lease.degraded):
                self._ask(now)
            return True
        if verdict == "refuse":
            return Refusal(self.conf.requests, lease.reset_after(now))
        return None

    def wait(self, resume: Callable[[bool], None]) -> None:
        """Park a request `take` answered None: `resume(admitted)` when the lease is back."""
        self.waiters.append(resume)
        self._ask(time.monotonic())

    def _ask(self, now: float) -> None:
        want = self.lease.want(now)
        if want:
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.loop.create_task(self._lease(want))

    async def _lease(self, want: int) -> None:
        lease = self.lease
        try:
            reply = await asyncio.wait_for(
                self.script(
                    keys=[self.redis_key],
                    args=[repr(self.conf.rate), self.conf.burst, want],
                ),
                REDIS_TIMEOUT,
            )
            granted, wait = int(reply[0]), float(reply[1])
        except Exception as exc:  # any failure of Redis: degrade, never fail the request
            now = time.monotonic()
            admitted, started = lease.failed(now)
            errors = self.stats.redis_errors
            errors[self.rule] = errors.get(self.rule, 0) + 1
            self.stats.degraded[self.rule] = 1
            if started:
                log.warning(
                    "rate limit %s: Redis at %s unreachable (%s): enforcing the local "
                    "limit only, retrying in %.1fs",
                    self.rule,
                    _redacted(self.conf.redis),
                    _describe(exc),
                    lease.retry_at - now,
                )
            self._resume(admitted, 0)
            return
        if self.stats.degraded.get(self.rule):
            self.stats.degraded[self.rule] = 0
            log.warning("rate limit %s: Redis is back, the global limit applies again", self.rule)
        now = time.monotonic()
        admitted, refused = lease.granted(granted, wait, now)
        self._resume(admitted, refused)
        if self.waiters:
            self._ask(now)

    def _resume(self, admitted: int, refused: int) -> None:
        waiters = self.waiters
        for _ in range(min(admitted, len(waiters))):
            waiters.popleft()(True)
        for _ in range(min(refused, len(waiters))):
            waiters.popleft()(False)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {REDIS_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}://{rest}"


_CLIENTS: dict[str, Any] = {}


def _client(url: str) -> Any:
    """One Redis client per URL: imported and built at the first lease."""
    client = _CLIENTS.get(url)
    if client is None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries of its own: a failed lease degrades to the local limit at once,
        # and the limiter's backoff decides when Redis is tried again.
        client = _CLIENTS[url] = Redis.from_url(
            url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
    return client
