"""FaultInjection: delays, aborts and slow responses on an inbound, for testing callers.

* `schema` — the resource (`kind: FaultInjection`) and `parse_resource`, its validation;
* `snapshot` — the `fault:` fragment of an inbound filter chain (`FaultConfig`) and
  `fragment`, the pure conversion from resources on the control plane;
* `decide` — which faults a request meets, pure, on an injected random source;
* `testdata/` — golden resources and the fragments they convert into.

The data plane around the decisions is `meshling.proxy.fault`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.fault_injection.decide import NONE, Faults, decide
from meshling.policies.fault_injection.schema import (
    KIND,
    Abort,
    Bandwidth,
    Delay,
    FaultConf,
    FaultInjection,
    HeaderTrigger,
    parse_resource,
)
from meshling.policies.fault_injection.snapshot import FaultConfig, FaultRule, fragment

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane
    from meshling.policies.selection import Selection


def selects(policy: FaultInjection, dataplanes: Iterable[Dataplane]) -> Selection:
    """The dataplanes whose inbounds the policy acts on (its destinations)."""
    # imported here: the proxy loads this package for the fragment, never for selection
    from meshling.policies.matching import selects_inbound

    return selects_inbound(policy, dataplanes)


__all__ = [
    "KIND",
    "NONE",
    "Abort",
    "Bandwidth",
    "Delay",
    "FaultConf",
    "FaultConfig",
    "FaultInjection",
    "FaultRule",
    "Faults",
    "HeaderTrigger",
    "decide",
    "fragment",
    "parse_resource",
    "selects",
]
