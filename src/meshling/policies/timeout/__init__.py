"""Timeout: how long calls to a service may take (connect, request, per try, idle).

* `schema` — the resource (`kind: Timeout`) and `parse_resource`, its validation;
* `snapshot` — the route's `timeout:` fragment (`Timeouts`) and `fragment`, its pure
  conversion from a resource;
* `testdata/` — golden resources and the fragments they convert into.

The data plane enforces it in the exchange (`proxy/http.py`, `proxy/retry.py`): the
request deadline and per-try deadlines on the timing wheel, the connect timeout when a
connection is opened, the idle timeout on the proxy's one-second tick.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshling.policies.selection import Selection
from meshling.policies.timeout.schema import KIND, Timeout, parse_resource
from meshling.policies.timeout.snapshot import Timeouts, fragment

if TYPE_CHECKING:
    from meshling.controlplane.resources import Dataplane


def selects(policy: Timeout, dataplanes: "Iterable[Dataplane]") -> Selection:
    """The dataplanes a Timeout acts in: callers with an outbound to a destination."""
    from meshling.policies.matching import selects_outbound

    return selects_outbound(policy, dataplanes)


__all__ = ["KIND", "Timeout", "Timeouts", "fragment", "parse_resource", "selects"]
