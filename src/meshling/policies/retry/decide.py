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
    """

    __slots__ = (
        "_balance",
        "_deposit",
        "_floor",
        "_floor_at",
        "_open",
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
        # [slot number, thousandths still available], oldest first
        self._slots: deque[list[int]] = deque()
        self._balance = 0
        # the newest slot, which deposits go to until `_open_until`
        self._open: list[int] = [0, 0]
        self._open_until = 0.0
        # the floor's bucket, in retries, and when it was last refilled (None: full)
        self._floor = float(min_per_second)
        self._floor_at: float | None = None

    def deposit(self, now: float) -> None:
        """One request started."""
        deposit = self._deposit
        self._balance += deposit
        if now < self._open_until:
            self._open[1] += deposit  # the common case: the slot of the last request
            return
        if not deposit:
            return
        slot = int(now / self._slot)
        self._open = [slot, deposit]
        self._open_until = (slot + 1) * self._slot
        self._slots.append(self._open)

    def withdraw(self, now: float) -> bool:
        """May one retry start now? True spends it."""
        self._expire(now)
        if self._balance >= _UNIT:
            self._balance -= _UNIT
            owed = _UNIT
            slots = self._slots
            while owed:
                oldest = slots[0]
                take = min(owed, oldest[1])
                oldest[1] -= take
                owed -= take
                # the open slot stays, spent or not, for the deposits still to come
                if not oldest[1] and oldest is not self._open:
                    slots.popleft()
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
        return self._balance / _UNIT

    def _expire(self, now: float) -> None:
        # a slot's deposits expire once its whole slot is older than ttl
        first_alive = int((now - self.ttl) / self._slot)
        slots = self._slots
        while slots and slots[0][0] < first_alive:
            expired = slots.popleft()
            self._balance -= expired[1]
            if expired is self._open:
                self._open_until = 0.0
