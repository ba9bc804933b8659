"""The circuit breaker's decisions, as functions of plain state and an injected clock.

Everything that decides whether an endpoint is ejected, for how long, and when it
returns lives here; the proxy's balancer (`proxy/balancer.py`) only calls these, with
`time.monotonic()` for `now`, and keeps the state on each endpoint. Tests call them with
a fake clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshling.policies.circuit_breaker.snapshot import OutlierDetection

# What one response (or failure) says about the endpoint that gave it.
SUCCESS = 0
FAILURE_5XX = 1  # a 5xx that is not a gateway failure
GATEWAY_FAILURE = 2  # 502, 503, 504, or the proxy's own failure on the way
NEUTRAL = 3  # says nothing about the endpoint (the client left, a local limit)

# The proxy's own errors (`x-meshling-error`) that are the endpoint's fault.
_LOCAL_ORIGIN = "upstream_"


def classify(status: int, error: str | None) -> int:
    """The outcome of one exchange with an endpoint, from the status the client got and
    the proxy's own error, if any."""
    if error is not None:
        # connect failures, resets, timeouts, malformed responses: the endpoint failed
        # even when part of a response got through; refusals by the proxy's own limits
        # or certificate say nothing about the endpoint
        return GATEWAY_FAILURE if error.startswith(_LOCAL_ORIGIN) else NEUTRAL
    if status < 500:
        return NEUTRAL if status == 499 or status == 0 else SUCCESS
    return GATEWAY_FAILURE if 502 <= status <= 504 else FAILURE_5XX


class OutlierState:
    """One endpoint's standing with outlier detection."""

    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected_until", "ejections", "since")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        # when the current ejection ends; 0.0 while the endpoint is in
        self.ejected_until = 0.0
        # the ejection count that sets the next ejection's length (decays while in)
        self.ejections = 0
        # when the endpoint last came back (or 0.0)
        self.since = 0.0


def record(state: OutlierState, outcome: int, conf: OutlierDetection) -> bool:
    """Count one outcome; True when it makes the endpoint due for ejection."""
    if outcome == SUCCESS:
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        return False
    if outcome == NEUTRAL:
        return False
    state.consecutive_5xx += 1
    if outcome == GATEWAY_FAILURE:
        state.consecutive_gateway += 1
    else:
        state.consecutive_gateway = 0
    return bool(
        (conf.consecutive_5xx and state.consecutive_5xx >= conf.consecutive_5xx)
        or (
            conf.consecutive_gateway_failures
            and state.consecutive_gateway >= conf.consecutive_gateway_failures
        )
    )


def may_eject(ejected: int, total: int, max_percent: int) -> bool:
    """Whether one more ejection keeps the ejected share within `max_percent`."""
    return (ejected + 1) * 100 <= max_percent * total


def eject(state: OutlierState, now: float, conf: OutlierDetection) -> float:
    """Eject the endpoint; returns how long for.

    The count of past ejections first falls by one for every whole `interval` the
    endpoint stayed in since it last came back, then this ejection adds one, and the
    ejection lasts `base_ejection_time` times the count, at most `max_ejection_time`.
    """
    if state.ejections and state.since:
        forgiven = int((now - state.since) // conf.interval)
        state.ejections = max(0, state.ejections - forgiven)
    state.ejections += 1
    duration = min(conf.base_ejection_time * state.ejections, conf.max_ejection_time)
    state.ejected_until = now + duration
    state.consecutive_5xx = 0
    state.consecutive_gateway = 0
    return duration


def due_back(state: OutlierState, now: float) -> bool:
    """Whether an ejected endpoint's time is up."""
    return 0.0 < state.ejected_until <= now


def restore(state: OutlierState, now: float) -> None:
    """The endpoint comes back into the load balancer, with clean counts."""
    state.ejected_until = 0.0
    state.since = now
    state.consecutive_5xx = 0
    state.consecutive_gateway = 0
