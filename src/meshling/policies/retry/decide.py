"""The retry decisions, as pure functions of a policy, an outcome and a clock.

The *policy* says what is retryable (`should_retry`); the *mechanism* (the proxy's
attempt loop in `proxy/retry.py`) keeps the body, waits out the `backoff` and asks the
`RetryBudget` before each retry. Nothing here reads a clock or a random source: both
are arguments, so the tests drive them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from meshling.policies.retry.snapshot import RetryPolicy

# An attempt that ended without a response: no connection, or the connection ended
# before a response head.
Failure = Literal["connect-failure", "reset"]
# An attempt that ran out of time counts as this status.
TIMED_OUT = 504
_GATEWAY_ERRORS = frozenset({502, 503, 504})


def retriable(policy: RetryPolicy, status: int, failure: Failure | None = None) -> bool:
    """Is this outcome one of the policy's retry conditions? `status` is the response's
    (504 for a timed-out attempt), ignored when there was a `failure` instead."""
    conditions = policy.conditions
    if failure is not None:
        return failure in conditions
    if status in policy.statuses:
        return True
    if 500 <= status <= 599 and "5xx" in conditions:
        return True
    return status in _GATEWAY_ERRORS and "gateway-error" in conditions


def should_retry(
    policy: RetryPolicy,
    method: bytes,
    attempts: int,
    status: int = 0,
    failure: Failure | None = None,
    *,
    replayable: bool = True,
) -> bool:
    """Retry after attempt number `attempts` ended with `status` or `failure`?

    Only while attempts remain, only when the whole request was kept to send again
    (`replayable`), and only for the policy's methods, except after a connect failure:
    then the request never left the proxy, and sending it is its first delivery.
    The budget is asked afterwards, by the caller, since asking spends it.
    """
    if attempts >= policy.max_attempts or not replayable:
        return False
    methods = policy.method_set
    if failure != "connect-failure" and methods is not None and method not in methods:
        return False
    return retriable(policy, status, failure)


def backoff(attempt: int, base: float, maximum: float, random: Callable[[], float]) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry): "full
    jitter", uniform in [0, min(maximum, base * 2^(attempt - 1))), so that clients that
    failed together do not retry together. `random()` is uniform in [0, 1)."""
    ceiling = min(maximum, base * (1 << min(attempt - 1, 30)))
    return ceiling * random()


# The budget counts in thousandths of a retry, so ratios add up without float error.
_UNIT = 1000
# deposits are grouped in this many slots per ttl
_SLOTS = 10


class RetryBudget:
    """How many retries a route may make, Linkerd's way: a share of the requests, plus
    a floor per second.

    Every request deposits `ratio` of a retry, which stays available for `ttl` seconds;
    a retry withdraws one whole retry from the oldest deposits still available. When
    they do not cover it, the floor may pay: a bucket of `min_per_second` retries,
    refilled at `min_per_second` a second, so a route with little traffic still gets its
    retries. Retries never deposit, so over any T seconds with N requests the retries
    allowed are at most ratio*N + min_per_second*(T + 1): an upstream that fails every
    attempt sees at most (1 + ratio) times the traffic, plus the floor.

    Sans-I/O: every call takes the time, so it runs on a fake clock in tests.

    A deposit is the common call, made by every request: within the slot of the last
    deposit it adds one to that slot's count of requests and allocates nothing; the
    thousandths are worked out when the slot closes or a retry asks.
    """

    __slots__ = (
        "_balance",
        "_deposit",
        "_floor",
        "_floor_at",
        "_open_count",
        "_open_slot",
        "_open_spent",
        "_open_until",
        "_slot",
        "_slots",
        "min_per_second",
        "ttl",
    )

    def __init__(self, ratio: float, min_per_second: int, ttl: float) -> None:
        self._deposit = round(ratio * _UNIT)
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._slot = ttl / _SLOTS
        # closed slots, [slot number, thousandths still available], oldest first
        self._slots: deque[list[int]] = deque()
        # the thousandths the closed slots hold
        self._balance = 0
        # the open slot, the newest, which deposits go to until `_open_until`: its number,
        # the requests that deposited in it, and the thousandths retries took from it
        self._open_slot = 0
        self._open_count = 0
        self._open_spent = 0
        # a ratio of 0 opens no slot: every deposit is nothing
        self._open_until = 0.0 if self._deposit else float("inf")
        # the floor's bucket, in retries, and when it was last refilled (None: full)
        self._floor = float(min_per_second)
        self._floor_at: float | None = None

    def deposit(self, now: float) -> None:
        """One request started."""
        if now < self._open_until:
            self._open_count += 1  # the common case: the slot of the last request
            return
        # the open slot closes with what is left of it, and this request opens the next
        left = self._open_count * self._deposit - self._open_spent
        if left > 0:
            self._slots.append([self._open_slot, left])
            self._balance += left
        slot = int(now / self._slot)
        self._open_slot = slot
        self._open_count = 1
        self._open_spent = 0
        self._open_until = (slot + 1) * self._slot

    def withdraw(self, now: float) -> bool:
        """May one retry start now? True spends it."""
        self._expire(now)
        in_open = self._open_count * self._deposit - self._open_spent
        if self._balance + in_open >= _UNIT:
            owed = _UNIT
            slots = self._slots
            while owed and slots:
                oldest = slots[0]
                take = min(owed, oldest[1])
                oldest[1] -= take
                self._balance -= take
                owed -= take
                if not oldest[1]:
                    slots.popleft()
            # the rest from the open slot, which stays for the deposits still to come
            self._open_spent += owed
            return True
        rate = self.min_per_second
        if self._floor_at is not None:
            self._floor = min(float(rate), self._floor + (now - self._floor_at) * rate)
        self._floor_at = now
        if self._floor >= 1.0:
            self._floor -= 1.0
            return True
        return False

    def available(self, now: float) -> float:
        """Retries the deposits cover now (the floor not included); for tests and metrics."""
        self._expire(now)
        return (self._balance + self._open_count * self._deposit - self._open_spent) / _UNIT

    def _expire(self, now: float) -> None:
        # a slot's deposits expire once its whole slot is older than ttl
        first_alive = int((now - self.ttl) / self._slot)
        slots = self._slots
        while slots and slots[0][0] < first_alive:
            self._balance -= slots.popleft()[1]
        if self._open_count and self._open_slot < first_alive:
            self._open_count = 0
            self._open_spent = 0
            if self._deposit:
                self._open_until = 0.0
