"""The health checker's decisions: the state machine of one endpoint, and panic.

Pure functions of immutable state: a check result goes in, the next state comes out. The
proxy's checker (`proxy/health.py`) runs the checks and keeps the states; tests drive
these directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthState:
    """One endpoint's health, as active checks have found it."""

    # in the load balancer (unless outlier detection ejected it)
    healthy: bool = True
    # passes, or failures, in a row: the streak that may flip `healthy`
    streak: int = 0
    # no check has finished yet
    fresh: bool = True


def observe(
    state: HealthState, passed: bool, healthy_threshold: int, unhealthy_threshold: int
) -> HealthState:
    """The state after one check.

    The first check of an endpoint decides at once. After that a healthy endpoint turns
    unhealthy after `unhealthy_threshold` failures in a row, and an unhealthy one healthy
    after `healthy_threshold` passes in a row; a result that agrees with the current
    state clears the streak.
    """
    if state.fresh:
        return HealthState(healthy=passed, streak=0, fresh=False)
    if passed == state.healthy:
        return state if state.streak == 0 else HealthState(state.healthy, 0, False)
    streak = state.streak + 1
    if streak >= (healthy_threshold if passed else unhealthy_threshold):
        return HealthState(healthy=passed, streak=0, fresh=False)
    return HealthState(state.healthy, streak, False)


def panic(usable: int, total: int, threshold: int) -> bool:
    """Whether so few endpoints are usable (below `threshold` percent of `total`, or
    none at all) that the balancer should ignore health and use every endpoint."""
    return total > 0 and (usable == 0 or usable * 100 < threshold * total)


def status_passes(status: int, expected: tuple[tuple[int, int], ...]) -> bool:
    """Whether an HTTP check's status is one of the expected ranges."""
    return any(lo <= status <= hi for lo, hi in expected)
