"""The data plane's rate-limit decisions, as pure objects on an injected clock.

* `TokenBucket`: `rate` tokens a second, at most `capacity` held; `take(now)` spends one.
  O(1) and allocation-free apart from the floats it computes: the state is two floats
  updated in place, and nothing is built per call.
* `Buckets`: one bucket per key (a caller's identity), at most `size` of them; the least
  recently used is dropped first, so a flood of identities cannot grow memory. A dropped
  key starts again with a full bucket, which is the price of the bound.
* `GlobalLease`: one proxy's share of a bucket kept in Redis. The proxy leases tokens in
  batches (one Redis round trip per batch, never per request) and spends them locally;
  this object decides, from the clock and the lease replies, whether a request may pass
  now, must be refused, or has to wait for the lease on its way. The I/O around it is in
  `meshling.proxy.ratelimit`.
"""

from __future__ import annotations

from collections import OrderedDict
from math import ceil
from typing import Literal

Verdict = Literal["admit", "refuse", "wait"]


class TokenBucket:
    """A token bucket refilled continuously from the clock passed to each call."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity  # a new bucket is full
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        tokens = self.tokens + (now - self.updated) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.updated = now
        # the epsilon absorbs float error: ten tenths of a token make a token
        if tokens >= 0.999999999:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def wait(self) -> float:
        """Seconds from the last `take` until a token is there."""
        missing = 1.0 - self.tokens
        return missing / self.rate if missing > 0 else 0.0

    def remaining(self) -> int:
        """Whole tokens left at the last `take`."""
        return int(self.tokens)


class Buckets:
    """Token buckets by key, the least recently used dropped beyond `size`."""

    __slots__ = ("buckets", "capacity", "rate", "size")

    def __init__(self, rate: float, capacity: float, size: int = 4096) -> None:
        self.rate = rate
        self.capacity = capacity
        self.size = size
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, now: float) -> TokenBucket:
        buckets = self.buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(self.rate, self.capacity, now)
            if len(buckets) > self.size:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self.buckets)


def retry_after(seconds: float) -> int:
    """Whole seconds for `Retry-After` and `RateLimit-Reset`: rounded up, at least 1."""
    return max(1, ceil(seconds))


class GlobalLease:
    """One proxy's view of a shared bucket: leased tokens, and what it knows of the rest.

    A lease request asks for `batch` tokens (more if more requests wait); the reply says
    how many were granted and, when fewer, how long until the shared bucket holds some
    again. Until then requests are refused without asking. Leased tokens expire after
    `ttl` seconds, so tokens leased long ago cannot make a burst now. While Redis is
    unreachable the lease is *degraded*: requests pass (the local limit still applies)
    and the next attempt waits `backoff`, doubling up to `max_backoff`.
    """

    __slots__ = (
        "backoff",
        "batch",
        "degraded",
        "empty_until",
        "expires",
        "max_backoff",
        "min_backoff",
        "pending",
        "retry_at",
        "tokens",
        "ttl",
        "waiting",
    )

    def __init__(
        self, batch: int, ttl: float, min_backoff: float = 0.5, max_backoff: float = 10.0
    ) -> None:
        self.batch = batch
        self.ttl = ttl
        self.tokens = 0
        self.expires = 0.0
        # the shared bucket is known to be empty until then
        self.empty_until = 0.0
        # a lease request is on its way
        self.pending = False
        # requests that wait for it
        self.waiting = 0
        self.degraded = False
        self.retry_at = 0.0
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.backoff = min_backoff

    def take(self, now: float) -> Verdict:
        """May a request pass now? "wait": park it and `want()` a lease."""
        if self.tokens > 0:
            if now < self.expires:
                self.tokens -= 1
                return "admit"
            self.tokens = 0
        if self.degraded:
            return "admit"
        if now < self.empty_until:
            return "refuse"
        self.waiting += 1
        return "wait"

    def want(self, now: float) -> int:
        """How many tokens to ask Redis for now (0: do not ask)."""
        if self.pending:
            return 0
        if self.degraded:
            if now < self.retry_at:
                return 0
        elif self.tokens * 2 > self.batch and now < self.expires:
            return 0  # enough left: refill when half the batch is spent
        elif not self.waiting and now < self.empty_until:
            return 0
        self.pending = True
        return max(self.batch, self.waiting)

    def granted(self, granted: int, wait: float, now: float) -> tuple[int, int]:
        """A lease reply: `granted` tokens, and `wait` seconds until the shared bucket has
        more when it could not grant everything. Returns how many waiting requests pass
        and how many are refused, first come first served; any left keep waiting for
        the next lease (`want`)."""
        self.pending = False
        self.degraded = False
        self.backoff = self.min_backoff
        if now >= self.expires:
            self.tokens = 0
        self.tokens += granted
        self.expires = now + self.ttl
        if wait > 0:
            self.empty_until = now + wait
        admitted = min(self.waiting, self.tokens)
        self.tokens -= admitted
        self.waiting -= admitted
        refused = self.waiting if now < self.empty_until else 0
        self.waiting -= refused
        return admitted, refused

    def failed(self, now: float) -> tuple[int, bool]:
        """The lease request failed (Redis unreachable or too slow): every waiting request
        passes on the local limit alone. Returns (how many pass, whether this starts an
        outage)."""
        started = not self.degraded
        self.pending = False
        self.degraded = True
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)
        admitted, self.waiting = self.waiting, 0
        return admitted, started

    def reset_after(self, now: float) -> float:
        """Seconds until the shared bucket has tokens again, for a refused request."""
        return max(self.empty_until - now, 0.0)
