"""The data plane's fault decisions: pure functions of a rule, the request and a random
source (`random()` in [0, 1), injected so tests can seed it).

Each fault draws on its own, in a fixed order (abort, then delay, then bandwidth), so a
rule with 10% aborts and 50% delays aborts a tenth of the requests and delays half of the
rest. A rule's faults never fire on requests without its trigger header. The common
outcome, no fault, is one shared object, so a rule that does not fire allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshling.policies.fault_injection.schema import FaultConf

Random = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Faults:
    """What happens to one request (or TCP connection)."""

    # abort it: the status to answer with, 0 to reset the connection, None: no abort
    abort: int | None = None
    # hold it this many seconds before forwarding
    delay: float = 0.0
    # pace the response at this many bytes a second; 0: no limit
    bytes_per_second: float = 0.0

    @property
    def any(self) -> bool:
        return self.abort is not None or self.delay > 0 or self.bytes_per_second > 0


NONE = Faults()


def fires(percentage: float, random: Random) -> bool:
    """Does a fault with this percentage (0 to 100) fire this time?"""
    if percentage >= 100.0:
        return True
    return percentage > 0.0 and random() * 100.0 < percentage


def triggered(conf: FaultConf, headers: Sequence[tuple[bytes, bytes]] | None) -> bool:
    """Does the request carry the rule's trigger header (always, without one)?
    `headers` None: not an HTTP request (a TCP connection)."""
    trigger = conf.header
    if trigger is None:
        return True
    if headers is None:
        return False
    name = trigger.name_bytes
    value = trigger.value_bytes
    # a plain loop: no generator to build, for the request that carries no trigger
    for n, v in headers:  # noqa: SIM110
        if n == name and v == value:
            return True
    return False


def decide(
    conf: FaultConf, headers: Sequence[tuple[bytes, bytes]] | None, random: Random
) -> Faults:
    """The faults for one request (`headers` lower-case names, as decoded) or, with
    `headers` None, one TCP connection."""
    if not triggered(conf, headers):
        return NONE
    abort = conf.abort
    if abort is not None and fires(abort.percentage, random):
        # a TCP connection has no status to answer with: its aborts are resets
        status = abort.http_status if headers is not None else None
        return Faults(abort=status or 0)
    delay = conf.delay
    seconds = delay.value if delay is not None and fires(delay.percentage, random) else 0.0
    bandwidth = conf.response_bandwidth
    rate = (
        bandwidth.bits_per_second / 8.0
        if bandwidth is not None and fires(bandwidth.percentage, random)
        else 0.0
    )
    if not seconds and not rate:
        return NONE
    return Faults(delay=seconds, bytes_per_second=rate)
